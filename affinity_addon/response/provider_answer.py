"""The provider's own answer to "why did the cache miss", read from the response where the
catalog says it is (catalog/provider_diagnostics.yaml). Provider data is untrusted: an odd
answer is never raised on; it reads as no result.
"""

import re
from dataclasses import dataclass
from typing import Any

from affinity_addon.catalog.diagnostics import AnswerSide
from affinity_addon.jsonpath import get_path

PENDING = "pending"
# A result is a provider's enum value: short, plain. Anything else is not one.
_RESULT = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")
_MAX_TOKENS = 2**53


@dataclass(frozen=True, slots=True)
class Answer:
    result: str | None  # the provider's reason as given, `no-divergence`, `pending`, or None
    missed_tokens: int | None
    malformed: bool = False  # the object was there but not in an API we know


NOTHING = Answer(None, None)


def read_answer(spec: AnswerSide, seen: bool, value: Any, *, compared: bool) -> Answer:
    """The answer in `value` (the diagnostics object as found; `seen`: it was there at all).
    `compared`: the request named a previous response; a null object means "nothing diverged"
    only then (an opt-in without a comparison is answered with null too)."""
    if not seen:
        return NOTHING
    if value is None:
        return Answer(spec.on_null, None) if compared and spec.on_null else NOTHING
    if not isinstance(value, dict):
        return Answer(None, None, malformed=True)
    if spec.pending is not None and spec.pending in value and value[spec.pending] is None:
        return Answer(PENDING, None)
    result = next((r for p in spec.result if isinstance(r := get_path(value, p), str)), None)
    if result is None or not _RESULT.fullmatch(result):
        return Answer(None, None, malformed=True)
    tokens = next((n for p in spec.missed_tokens
                   if type(n := get_path(value, p)) is int and 0 <= n <= _MAX_TOKENS), None)
    return Answer(result, tokens)
