"""What the cache TTL cost you: the logged requests replayed under all-5m, all-1h and auto.

Per conversation (affinity ID), in request order, each request's cacheable prefix K (its cache
reads + writes as logged) is replayed against a simulated cache entry: within the entry's TTL
of the previous request, K reads what the previous request cached and writes the rest; past it,
K is written again. Uncached tokens cost 1x, reads `read`x, writes `write_5m`x or `write_1h`x of
the base input price (views/pricing.py: the model's dollar prices divided by its input price, or
the token-equivalent multipliers of catalog/prices.yaml for a model nobody prices). Only models
whose price has a dearer 1h tier take part (Anthropic-style caches). Time is the request start
(`ts` minus `duration_ms`).
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from affinity_addon.ttl_policy import (
    FIVE_MINUTES,
    ONE_HOUR,
    TTL_SECONDS,
    Multipliers,
    Rhythm,
)
from affinity_addon.views.pricing import USD, PriceTable, prompt_counts
from affinity_addon.views.pricing import default_table as default_price_table
from affinity_addon.views.safe import label, printable

AUTO = "auto"
POLICIES = (FIVE_MINUTES, ONE_HOUR, AUTO)


@dataclass(frozen=True, slots=True)
class Turn:
    start: float  # seconds
    prompt: int  # every prompt token
    prefix: int  # tokens under markers: logged cache reads + writes


@dataclass(slots=True)
class _Cache:
    """One policy's simulated cache entry and running cost (token-equivalents)."""

    cached: int = 0
    expires: float = float("-inf")
    cost: float = 0.0

    def turn(self, t: Turn, ttl: str, m: Multipliers) -> None:
        read = min(self.cached, t.prefix) if t.start <= self.expires else 0
        write = t.prefix - read
        self.cost += (t.prompt - t.prefix) + read * m.read
        self.cost += write * (m.write_1h if ttl == ONE_HOUR else m.write_5m)
        if t.prefix:
            self.cached, self.expires = t.prefix, t.start + TTL_SECONDS[ttl]


@dataclass(slots=True)
class ConversationTtl:
    """A conversation replayed under every policy at once: a few numbers, no turn list."""

    key: str
    model: str | None
    unit: str
    multipliers: Multipliers
    scale: float = 1.0  # USD per token-equivalent, or 1 for token-equivalents
    requests: int = 0
    rhythm: Rhythm = field(default_factory=Rhythm)
    last_start: float | None = None
    caches: dict[str, _Cache] = field(default_factory=lambda: {p: _Cache() for p in POLICIES})

    def add(self, t: Turn) -> None:
        gap = None if self.last_start is None else max(t.start - self.last_start, 0.0)
        self.rhythm.observe(gap, t.prefix)
        auto = self.rhythm.choose(self.multipliers)
        for policy, cache in self.caches.items():
            cache.turn(t, auto if policy == AUTO else policy, self.multipliers)
        self.last_start = t.start
        self.requests += 1

    @property
    def cost(self) -> dict[str, float]:
        return {p: c.cost for p, c in self.caches.items()}

    @property
    def cheapest(self) -> str:
        return min((FIVE_MINUTES, ONE_HOUR), key=lambda p: self.caches[p].cost)


def replay(turns: list[Turn], m: Multipliers, policy: str) -> float:
    """Prompt cost in token-equivalents of `turns` under one TTL policy."""
    conv = ConversationTtl("", None, "", m)
    for t in sorted(turns, key=lambda t: t.start):
        conv.add(t)
    return conv.caches[policy].cost


def record_start(record: Mapping[str, Any]) -> float | None:
    ts = record.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        end = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    duration = record.get("duration_ms")
    if isinstance(duration, int | float) and not isinstance(duration, bool) \
            and 0 <= duration < 86_400_000:
        end -= duration / 1000
    return end


@dataclass(slots=True)
class TtlAdvice:
    conversations: list[ConversationTtl]

    def total(self, unit: str) -> dict[str, float]:
        return {p: sum(c.cost[p] * c.scale for c in self.conversations if c.unit == unit)
                for p in POLICIES}

    @property
    def units(self) -> list[str]:
        return sorted({c.unit for c in self.conversations})

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        worse = sorted(self.conversations, key=lambda c: c.cost[c.cheapest] - c.cost[FIVE_MINUTES])
        return {
            "totals": {u: self.total(u) for u in self.units},
            "conversations": len(self.conversations),
            "cheaper_on_1h": [c.key for c in worse if c.cheapest == ONE_HOUR][:top],
        }


class TtlAdvisor:
    """Feed records one by one (the live proxy, `affinity report`); `advice()` at any time."""

    def __init__(self, prices: PriceTable | None = None,
                 max_conversations: int = 100_000) -> None:
        self.prices = prices or default_price_table()
        self.max_conversations = max_conversations
        self.conversations: dict[str, ConversationTtl] = {}

    def add(self, r: Mapping[str, Any]) -> None:
        usage = r.get("usage")
        key = r.get("affinity_id")
        if not isinstance(usage, Mapping) or not isinstance(key, str) or r.get("response_cache"):
            return
        conv = self.conversations.get(key)
        if conv is None:
            model = r.get("model") if isinstance(r.get("model"), str) else None
            api, host = r.get("api", r.get("provider")), r.get("host")  # older logs: provider
            price = self.prices.price_for(model, api if isinstance(api, str) else None,
                                          host if isinstance(host, str) else None)
            if price.write_1h <= price.write_5m or len(self.conversations) >= self.max_conversations:
                return  # no TTL choice on this model, or too many to follow
            scale = price.input_usd_per_mtok / 1e6 if price.input_usd_per_mtok else 1.0
            conv = self.conversations[key] = ConversationTtl(
                printable(key), label(model), price.unit, Multipliers(price.read, price.write_5m, price.write_1h),
                scale=scale)
        start = record_start(r)
        if start is None:
            return
        total, read, write, _ = prompt_counts(usage)
        conv.add(Turn(start, total, read + write))

    def advice(self) -> TtlAdvice:
        return TtlAdvice([c for c in self.conversations.values() if c.requests])


def advise(records: Iterable[Mapping[str, Any]], prices: PriceTable | None = None) -> TtlAdvice:
    advisor = TtlAdvisor(prices)
    for r in records:
        advisor.add(r)
    return advisor.advice()


def summary_line(advice: TtlAdvice) -> str | None:
    """One line for the live summary, e.g. `TTL: all-5m $1.20 · all-1h $0.80 · auto $0.82`."""
    if not advice.conversations:
        return None
    unit = USD if USD in advice.units else advice.units[0]
    totals = advice.total(unit)
    fmt = (lambda v: f"${v:,.2f}") if unit == USD else (lambda v: f"{v:,.0f} teq")
    n1h = sum(c.cheapest == ONE_HOUR for c in advice.conversations)
    return (f"TTL: all-5m {fmt(totals[FIVE_MINUTES])} · all-1h {fmt(totals[ONE_HOUR])} · "
            f"auto {fmt(totals[AUTO])}; {n1h} of {len(advice.conversations)} conversation(s) "
            "cheaper on 1h")
