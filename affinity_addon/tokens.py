"""A cheap token estimate: no tokenizer, just characters per token.

Good enough to decide whether a prefix clears a provider's minimum cacheable length; the
provider's reported usage is always the truth.
"""

CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def format_tokens(n: float) -> str:
    """e.g. 1.23k, 45.1k, 1.2M: one way to print a token count everywhere."""
    n = float(n)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{1 if abs(n) >= 10 * size else 2}f}{unit}"
    return f"{n:.0f}"
