"""A cheap token estimate: no tokenizer, just characters per token.

Good enough to decide whether a prefix clears a provider's minimum cacheable length; the
provider's reported usage is always the truth.
"""

CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
