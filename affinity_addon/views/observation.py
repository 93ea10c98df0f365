"""One JSONL record as the aggregator counts it: an `Observation` of plain numbers, read from a
dict straight from `json.loads` where every field may be missing or of the wrong type (then it
is ignored, never raised on).
"""

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from affinity_addon.catalog.prices import Cost, Priced
from affinity_addon.views.pricing import (
    Price,
    prompt_counts,
    weighted_prompt,
)
from affinity_addon.views.safe import label

logger = logging.getLogger(__name__)

NONE_KEY = "(none)"
NO_USAGE = "no-usage"
RESPONSE_CACHE = "response-cache"
NO_PROMPT = "no-prompt"
# Verdicts that are not a miss: the prompt was read from cache, or there was no prompt to cache.
NOT_MISSED = frozenset({"hit", NO_PROMPT, NO_USAGE, RESPONSE_CACHE})


class Example(NamedTuple):
    """A missed request to show next to its reason: ids, numbers and the miss detail only."""

    tokens_lost: int
    ts: str | None
    affinity_id: str | None
    model: str | None
    rule: str | None
    flow_id: str | None
    miss_detail: str | None


def _str(value: Any) -> str | None:
    return value if type(value) is str and value else None


# Larger numbers are junk (a log line with 10**400 tokens must not crash float conversion).
MAX_NUMBER = 10**15


def _number(value: Any) -> float | None:
    if (type(value) is int and -MAX_NUMBER <= value <= MAX_NUMBER) or (
            type(value) is float and math.isfinite(value)):
        return value
    return None


@dataclass(slots=True)
class Observation:
    """What one record contributes, computed once and added to each bucket it falls in."""

    verdict: str
    ts: str | None
    incomplete: bool
    dry_run: bool
    counted: bool = False  # has usage and is not a response-cache hit
    input_tokens: int = 0
    read_tokens: int = 0
    write_tokens: int = 0
    output_tokens: int = 0
    provider_cost: float = 0.0
    eq_with: float = 0.0  # prompt cost in input-token equivalents
    usd: Cost | None = None  # dollars by kind, when someone prices the model
    usd_scale: float | None = None  # USD per token equivalent (the input price), when priced
    model: str | None = None  # the aggregator's label for the model (to name unpriced ones)
    tokens_lost: int = 0  # missed requests: uncached + written tokens
    predicted_read: float | None = None  # dry run: read tokens the rules would have given
    dry_saved_eq: float = 0.0


PriceOf = Callable[[str | None, str | None, str | None], Price]
UsdOf = Callable[[str | None, str | None, str | None, str | None], Priced | None]


def observe(record: Mapping[str, Any], price_of: PriceOf,
            usd_of: UsdOf | None = None) -> Observation:
    """One record's contribution; `price_of(model, api, host)` picks the multipliers,
    `usd_of(model, api, host, ts)` the dollar prices (None: nobody prices the model).

    Dollars are computed from the usage here, not read from the record's `cost_usd`: logs
    written before that field existed are priced the same way, and by the table the report
    names."""
    get = record.get
    obs = Observation(NO_USAGE, label(get("ts"), 64), get("complete") is False,
                      get("dry_run") is True)
    if get("response_cache") is True:
        obs.verdict = RESPONSE_CACHE
        return obs
    usage = get("usage")
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return obs
    obs.counted = True
    total, read, write, write_1h = prompt_counts(usage)
    obs.input_tokens, obs.read_tokens, obs.write_tokens = total, read, write
    output = usage.get("output_tokens")
    obs.output_tokens = output if type(output) is int and 0 < output <= MAX_NUMBER else 0
    cost = _number(usage.get("cost"))
    if cost is not None:
        obs.provider_cost = float(cost)

    reason = label(get("miss_reason"), 64)
    if total <= 0:
        obs.verdict = NO_PROMPT
    elif reason:
        obs.verdict = reason
    else:  # the miss analysis did not run (or is off): judge by the counters alone
        obs.verdict = "hit" if read > 0 else "unknown"
    if obs.verdict not in NOT_MISSED:
        obs.tokens_lost = total - read
        expected = get("expected_cacheable_tokens")
        if obs.verdict == "partial" and type(expected) is int and expected >= 0:
            obs.tokens_lost = min(max(expected - read, 0), total)  # only what was cached before

    model, host = label(get("model")), label(get("host"))
    api = label(get("api") if get("api") is not None else get("provider"))  # older logs: provider
    price = price_of(model, api, host)
    obs.eq_with = weighted_prompt(total, read, write, write_1h, price)
    priced = usd_of(model, api, host, obs.ts) if usd_of is not None else None
    if priced is not None:
        obs.usd = priced.cost(total, read, write, write_1h, obs.output_tokens)
        obs.usd_scale = priced.input_price(total)

    predicted = _number(get("predicted_hit_ratio")) if obs.dry_run else None
    if predicted is not None and total > 0:
        obs.predicted_read = min(max(float(predicted), 0.0), 1.0) * total
        # Tokens the rules would have turned from full-price into cache reads.
        obs.dry_saved_eq = max(obs.predicted_read - read, 0.0) * (1.0 - price.read)
    return obs
