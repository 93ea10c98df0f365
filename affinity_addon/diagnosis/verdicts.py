"""Why a response did or did not read from the prompt cache: one verdict per response.

The previous request of each conversation (by affinity ID) is kept as a fingerprint in a bounded
LRU store. At response time the verdict comes from the fingerprint diff, the time gap and the
normalized usage, by an ordered table of checks where the first that applies wins.
"""

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from affinity_addon.buckets import OVERFLOW_RPM
from affinity_addon.catalog.profiles import BY_API
from affinity_addon.catalog.providers import PROVIDER_FACTS
from affinity_addon.diagnosis.blockprint import BlockPrint, Blocks, Fingerprint
from affinity_addon.diagnosis.prefix_diff import PrefixDiff, compare
from affinity_addon.record.schema import Usage

logger = logging.getLogger(__name__)

REASONS = ("hit", "partial", "first-write", "prefix-changed", "ttl-expired", "routed-away", "below-minimum",
           "lookback-exceeded", "response-cache", "overflow", "unknown")

# How many blocks back from a breakpoint the provider looks for an earlier cache entry, by API
# API. APIs not listed match any earlier entry (OpenAI breakpoints, automatic prefix
# caching); a route's cache profile may say otherwise (`lookback_blocks`: a prefix cache behind
# an Anthropic-format endpoint has no limit).
LOOKBACK_BLOCKS: Mapping[str, int] = PROVIDER_FACTS.lookback_blocks

# A read below this share of the expected tokens is `partial`, not a `hit`. Expectations are
# character estimates calibrated by the reported prompt size, so a few percent is noise.
PARTIAL_BELOW = 0.9


@dataclass(frozen=True, slots=True)
class Entry:
    """What the last request of a conversation made cacheable, and when."""

    fingerprint: Fingerprint
    ts: float  # seconds on the caller's clock, taken at request start (TTLs count from there)
    ttl_seconds: float
    marked: bool  # the request asked for caching (a marker, or automatic caching)
    cacheable_tokens: int  # tokens up to the last marker, or the whole prompt when automatic


def _marker_positions(blocks: list[BlockPrint], automatic: bool) -> list[int]:
    """Breakpoints by comparable-block index; automatic caching breaks at the last block."""
    positions = [i for i, b in enumerate(blocks) if b.marked]
    if automatic and blocks and (not positions or positions[-1] != len(blocks) - 1):
        positions.append(len(blocks) - 1)
    return positions


def _cache_point(blocks: list[BlockPrint], automatic: bool) -> int:
    """Number of leading comparable blocks a request makes cacheable."""
    positions = _marker_positions(blocks, automatic)
    return positions[-1] + 1 if positions else 0


def entry_for(fp: Fingerprint, ts: float, *, ttl_seconds: float, automatic: bool,
              unpacked: Blocks | None = None) -> Entry:
    """The store entry for a request just sent."""
    blocks = (unpacked or fp.unpack()).comparable
    point = _cache_point(blocks, automatic)
    return Entry(fp, ts, ttl_seconds, point > 0, sum(b.tokens for b in blocks[:point]))


class ConversationStore[T]:
    """Entries by affinity ID, least recently used evicted first. O(1) get/put."""

    __slots__ = ("_entries", "capacity")

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"conversation store capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, T] = OrderedDict()

    def get(self, affinity_id: str) -> T | None:
        entry = self._entries.get(affinity_id)
        if entry is not None:
            self._entries.move_to_end(affinity_id)
        return entry

    def put(self, affinity_id: str, entry: T) -> None:
        self._entries[affinity_id] = entry
        self._entries.move_to_end(affinity_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, affinity_id: object) -> bool:
        return affinity_id in self._entries


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: str  # one of REASONS
    detail: str | None = None
    expected_cacheable_tokens: int | None = None
    reported_read_tokens: int | None = None
    # What the comparison with the previous request saw change, for weighing the provider's own
    # answer against ours (diagnosis/agreement.py): a subset of CHANGES; None when there was no
    # previous request to compare with.
    changed: frozenset[str] | None = None
    key_changed: bool = False  # the routing value (affinity ID, prompt_cache_key) changed
    previous_id: str | None = None  # the provider's id of the response compared with

    def to_log(self) -> dict[str, Any]:
        """The verdict's fields of a JSONL record (docs/log-format.md)."""
        return {
            "miss_reason": self.reason,
            "miss_detail": self.detail,
            "expected_cacheable_tokens": self.expected_cacheable_tokens,
        }


# What a comparison can see change between two requests of a conversation.
CHANGES = ("model", "tools", "system", "messages", "settings")


@dataclass(frozen=True, slots=True)
class _Case:
    """Everything a check looks at, computed once per response."""

    prev: Entry | None
    usage: Usage | None
    now: float
    api: str
    automatic: bool
    min_tokens: int
    ttl_seconds: float
    response_cache: bool
    affinity_changed: bool
    affinity_missing: bool
    prev_blocks: list[BlockPrint]
    cur_blocks: list[BlockPrint]
    cur_markers: list[int]
    diff: PrefixDiff | None
    prev_point: int  # leading blocks the previous request made cacheable
    scale: float  # reported prompt tokens per estimated token, to calibrate estimates
    expected: int | None  # tokens this request could read from what the previous one cached
    load: Mapping[str, Any] | None = None  # its prompt_cache_key's observed rate (see _LOAD)
    lookback: int | None = None  # blocks a marker looks back (None: no limit)

    @property
    def reads(self) -> int:
        return self.usage.cache_read_tokens if self.usage else 0

    @property
    def prefix_changed(self) -> bool:
        return self.diff is not None and self.diff.common_blocks < self.prev_point

    def tokens(self, estimate: int) -> int:
        return round(estimate * self.scale)


def _expected(prev: Entry | None, diff: PrefixDiff | None, point: int) -> int | None:
    if prev is None or diff is None or point == 0:
        return None
    if diff.common_blocks >= point:
        return prev.cacheable_tokens
    return min(diff.common_tokens, prev.cacheable_tokens)


def _lookback_gap(case: _Case) -> tuple[int, int] | None:
    """(previous breakpoint, nearest following one) when they are too far apart to connect."""
    lookback = case.lookback
    if lookback is None or case.prev_point == 0 or case.prefix_changed:
        return None
    p = case.prev_point - 1
    q = next((i for i in case.cur_markers if i >= p), None)
    if q is None or q - p <= lookback:
        return None
    return p, q


def _lookback_text(case: _Case, gap: tuple[int, int]) -> str:
    p, q = gap
    return (f"breakpoint {case.cur_blocks[q].path} is {q - p} blocks after the previous one "
            f"({case.prev_blocks[p].path}); the provider looks back only {case.lookback}")


# --- the checks, in order ---------------------------------------------------------------------

def _response_cache(case: _Case) -> Verdict | None:
    if case.response_cache:
        return Verdict("response-cache", "served from the OpenRouter response cache (zero usage)")
    return None


def _no_usage(case: _Case) -> Verdict | None:
    if case.usage is None:
        return Verdict("unknown", "no usage in the response (stream ended before it was reported)",
                       case.expected)
    return None


def _hit(case: _Case) -> Verdict | None:
    """`hit`: (nearly) everything expected was read; `partial`: a read that stopped short,
    with the tokens lost and where the prefix broke."""
    reads = case.reads
    if reads <= 0:
        return None
    expected = case.expected
    if case.prefix_changed and case.diff is not None and case.prev is not None:
        # The previous request's cache point is gone: whatever it made cacheable past the
        # change is written again.
        cached = case.tokens(case.prev.cacheable_tokens)
        lost = cached - reads
        if lost <= 0:  # by the numbers nothing was lost (estimates are approximate)
            return Verdict("hit", None, cached)
        return Verdict("partial", f"read {reads} of ~{cached} tokens the previous request "
                       f"cached, ~{lost} lost: prefix changed ({case.diff.kind}): "
                       f"{case.diff.detail}", cached)
    if expected and reads < PARTIAL_BELOW * expected:
        notes = [f"read {reads} of ~{expected} expected tokens, ~{expected - reads} lost"]
        gap = _lookback_gap(case)
        if gap is not None:
            notes.append(_lookback_text(case, gap))
        return Verdict("partial", "; ".join(notes), expected)
    if case.prev is None:
        return Verdict("hit", "first request seen for this conversation; its prefix was "
                       "already cached", expected)
    return Verdict("hit", None, expected)


def _not_requested(case: _Case) -> Verdict | None:
    if case.automatic or case.cur_markers or (case.usage and case.usage.cache_write_tokens):
        return None
    return Verdict("unknown", "the request asks for no caching (no cache marker, not automatic)",
                   case.expected)


def _below_minimum(case: _Case) -> Verdict | None:
    usage = case.usage
    if case.min_tokens <= 0 or usage is None or usage.cache_write_tokens:
        return None
    if case.automatic and usage.input_tokens:
        cacheable = usage.input_tokens
    else:
        point = case.cur_markers[-1] + 1 if case.cur_markers else 0
        cacheable = case.tokens(sum(b.tokens for b in case.cur_blocks[:point]))
    if cacheable >= case.min_tokens:
        return None
    return Verdict("below-minimum",
                   f"cacheable prefix ~{cacheable} tokens is below the {case.min_tokens}-token "
                   "minimum", case.expected)


def _first_write(case: _Case) -> Verdict | None:
    prev = case.prev
    if prev is None:
        why = "new conversation"
    elif case.prev_point == 0:
        why = "the previous request of this conversation asked for no caching"
    elif case.tokens(prev.cacheable_tokens) < case.min_tokens:
        why = (f"the previous request's cacheable prefix (~{case.tokens(prev.cacheable_tokens)} "
               f"tokens) was below the {case.min_tokens}-token minimum")
    else:
        return None
    if case.usage is not None and case.usage.cache_write_tokens:
        why += f"; wrote {case.usage.cache_write_tokens} tokens"
    return Verdict("first-write", why, case.expected)


def _prefix_changed(case: _Case) -> Verdict | None:
    if not case.prefix_changed or case.diff is None:
        return None
    return Verdict("prefix-changed", f"{case.diff.kind}: {case.diff.detail}", case.expected)


def _ttl_expired(case: _Case) -> Verdict | None:
    if case.prev is None:
        return None
    ttl = case.prev.ttl_seconds or case.ttl_seconds
    gap = case.now - case.prev.ts
    if ttl <= 0 or gap <= ttl:
        return None
    return Verdict("ttl-expired", f"{gap:.0f} s since the previous request, above the "
                   f"{ttl:.0f} s TTL", case.expected)


def _lookback_exceeded(case: _Case) -> Verdict | None:
    gap = _lookback_gap(case)
    if gap is None:
        return None
    return Verdict("lookback-exceeded", _lookback_text(case, gap), case.expected)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _overflow(case: _Case) -> Verdict | None:
    """A miss the routed-away check would report, while this proxy saw the request's
    prompt_cache_key above OpenAI's ~15 requests a minute per prefix+key: the provider likely
    sent it to an overflow machine that has not cached the prefix. A missing or changed key is
    left to `routed-away` (that is the cause then)."""
    load = case.load
    if not load or case.prev_point == 0 or case.affinity_missing or case.affinity_changed:
        return None
    key_rpm = _number(load.get("key_rpm")) or 0.0
    family_rpm, buckets = _number(load.get("family_rpm")), _number(load.get("buckets"))
    # The family's rate spread over its buckets is the per-key load when the key alone was
    # not tracked (a full table).
    spread = family_rpm / buckets if family_rpm is not None and buckets else 0.0
    rpm = max(key_rpm, spread)
    limit = _number(load.get("limit")) or OVERFLOW_RPM
    if rpm <= limit:
        return None
    where = f"; family ~{family_rpm:.0f} RPM over {buckets:.0f} bucket(s)"\
        if family_rpm is not None and buckets else ""
    return Verdict("overflow", f"same prefix within the TTL, previously cached, yet nothing read, "
                   f"while its prompt_cache_key got ~{rpm:.0f} requests in the last minute"
                   f"{where}, above the ~{limit:.0f} RPM a prefix+key takes before the "
                   "provider overflows it to other machines", case.expected)


def _routed_away(case: _Case) -> Verdict | None:
    if case.prev_point == 0:
        return None
    if case.affinity_missing:
        why = "no affinity ID reached the provider (the routing header or field was missing)"
    elif case.affinity_changed:
        why = "the affinity ID changed since the previous request"
    else:
        why = "the affinity ID is missing or not honoured, or the provider moved the conversation"
    return Verdict("routed-away", f"same prefix within the TTL, previously cached, yet nothing "
                   f"read: {why}", case.expected)


_CHECKS: tuple[Callable[[_Case], Verdict | None], ...] = (
    _response_cache, _no_usage, _hit, _not_requested, _below_minimum, _first_write,
    _prefix_changed, _ttl_expired, _lookback_exceeded, _overflow, _routed_away,
)


def _case(prev: Entry | None, cur_fp: Fingerprint, usage: Usage | None, now: float, *,
          api: str, automatic: bool, min_tokens: int, ttl_seconds: float,
          response_cache: bool = False, affinity_changed: bool = False,
          affinity_missing: bool = False, load: Mapping[str, Any] | None = None,
          unpacked: tuple[Blocks | None, Blocks | None] = (None, None),
          lookback: int | str | None = BY_API) -> _Case:
    prev_unpacked = (unpacked[0] or prev.fingerprint.unpack()) if prev else None
    cur_unpacked = unpacked[1] or cur_fp.unpack()
    cur_blocks = cur_unpacked.comparable
    prev_blocks = prev_unpacked.comparable if prev_unpacked else []
    diff = compare(prev.fingerprint, cur_fp, prev_unpacked, cur_unpacked) if prev else None
    point = _cache_point(prev_blocks, automatic) if prev and prev.marked else 0
    scale = 1.0
    if usage is not None and usage.input_tokens > 0 and cur_fp.total_tokens > 0:
        scale = usage.input_tokens / cur_fp.total_tokens
    expected = _expected(prev, diff, point)
    if expected is not None:
        expected = round(expected * scale)
    blocks_back = LOOKBACK_BLOCKS.get(api) if lookback == BY_API else lookback
    return _Case(prev, usage, now, api, automatic, min_tokens, ttl_seconds, response_cache,
                 affinity_changed, affinity_missing, prev_blocks, cur_blocks,
                 _marker_positions(cur_blocks, automatic),
                 diff, point, scale, expected, load,
                 blocks_back if isinstance(blocks_back, int) else None)


def diagnose(prev: Entry | None, cur_fp: Fingerprint, usage: Usage | None, now: float, *,
             api: str, automatic: bool, min_tokens: int, ttl_seconds: float,
             response_cache: bool = False, affinity_changed: bool = False,
             affinity_missing: bool = False,
             load: Mapping[str, Any] | None = None,
             unpacked: tuple[Blocks | None, Blocks | None] = (None, None),
             lookback: int | str | None = BY_API) -> Verdict:
    """The verdict for one response. `prev` is the conversation's entry before this request.
    `load`: the request rate its prompt_cache_key had when it was sent (`CacheKeyRates.observe`:
    key_rpm, family_rpm, buckets), the `overflow` check's evidence. `lookback`: the route's
    marker lookback in blocks (BY_API: the API's; None: no limit)."""
    case = _case(prev, cur_fp, usage, now, api=api, automatic=automatic,
                 min_tokens=min_tokens, ttl_seconds=ttl_seconds, response_cache=response_cache,
                 affinity_changed=affinity_changed, affinity_missing=affinity_missing,
                 load=load if isinstance(load, Mapping) else None, unpacked=unpacked,
                 lookback=lookback)
    verdict = next((v for v in (check(case) for check in _CHECKS) if v is not None),
                   Verdict("unknown", None, case.expected))
    return replace(verdict, reported_read_tokens=usage.cache_read_tokens if usage else None)


def predict_hit_ratio(prev: Entry | None, cur_fp: Fingerprint, *, min_tokens: int,
                      automatic: bool, api: str | None = None,
                      unpacked: tuple[Blocks | None, Blocks | None] = (None, None),
                      lookback: int | str | None = BY_API) -> float | None:
    """The hit ratio this request should get from a warm cache (for dry runs).

    Counts the tokens the previous request made cacheable that this one shares, when this one
    has a breakpoint to read them with; None when the prompt is empty.
    """
    case = _case(prev, cur_fp, None, 0.0, api=api or "", automatic=automatic,
                 min_tokens=min_tokens, ttl_seconds=0.0, unpacked=unpacked, lookback=lookback)
    total = sum(b.tokens for b in case.cur_blocks)
    if total <= 0:
        return None
    readable = case.expected or 0
    if not case.cur_markers or _lookback_gap(case) is not None or readable < min_tokens:
        return 0.0
    return min(readable / total, 1.0)
