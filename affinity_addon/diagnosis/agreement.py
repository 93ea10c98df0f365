"""Does our verdict fit the provider's own answer? (the record's `provider_diagnosis.agrees`)

Both compare a request with the conversation's previous one, so they can be weighed against each
other: the provider names the first change it found (its order is its own), the tracker knows
every part that changed (`Verdict.changed`). `agrees` is true when the provider's answer is one
of the things the tracker saw (or, for "nothing diverged", when it saw nothing), false when it
is not: each false is a blind spot of our fingerprint or a provider surprise, worth a look.
It is None where there is nothing to weigh: the provider compared nothing or could not say
(`pending`, not found, unavailable, a result we do not know), the tracker had no previous
request, or the two compared different previous requests. The table is docs/log-format.md's.
"""

from collections.abc import Callable, Mapping
from typing import Any

from affinity_addon.diagnosis.verdicts import Verdict

_MESSAGES = frozenset({"messages"})

# Provider result -> what in our verdict fits it.
_FITS: Mapping[str, Callable[[Verdict], bool]] = {
    # Anthropic: a comparison that found nothing (request structure, not whether it hit).
    "no-divergence": lambda v: v.changed == frozenset(),
    # OpenAI: the prefix was reused: so did our reading of the usage.
    "cache_hit": lambda v: v.reason in ("hit", "partial"),
    "model_changed": lambda v: "model" in (v.changed or ()),
    "system_changed": lambda v: "system" in (v.changed or ()),
    "tools_changed": lambda v: "tools" in (v.changed or ()),
    "messages_changed": lambda v: "messages" in (v.changed or ()),
    # OpenAI's input holds the instructions too, and compaction rewrites the history.
    "input_changed": lambda v: not {"messages", "system"}.isdisjoint(v.changed or ()),
    "context_compacted": lambda v: "messages" in (v.changed or ()),
    "prompt_cache_key_changed": lambda v: v.key_changed,
    # Request settings that are part of the cached prefix (our `settings`).
    "text_format_changed": lambda v: "settings" in (v.changed or ()),
    "reasoning_effort_changed": lambda v: "settings" in (v.changed or ()),
    "verbosity_changed": lambda v: "settings" in (v.changed or ()),
    "service_tier_changed": lambda v: "settings" in (v.changed or ()),
}

# Results that answer nothing about the prompt: nothing to weigh ours against.
NOT_JUDGED = frozenset({"pending", "previous_message_not_found",
                        "comparison_response_not_found", "unavailable"})


def agrees(result: str | None, verdict: Verdict | None, compared_to: str | None) -> bool | None:
    """True/False: our verdict fits the provider's `result` or not; None: nothing to weigh."""
    if result is None or verdict is None or compared_to is None or verdict.changed is None:
        return None
    if verdict.previous_id != compared_to:
        return None  # the provider compared with another request than we did (or we cannot tell)
    fits = _FITS.get(result)
    return None if fits is None else fits(verdict)


def judged_results() -> tuple[str, ...]:
    """The provider results the table weighs (for docs and tests)."""
    return tuple(_FITS)


def diagnosis(source: str, compared_to: str | None, result: str | None,
              missed_tokens: int | None, verdict: Verdict | None) -> dict[str, Any]:
    """The record's `provider_diagnosis` object."""
    return {"source": source, "compared_to": compared_to, "result": result,
            "missed_tokens": missed_tokens, "agrees": agrees(result, verdict, compared_to)}
