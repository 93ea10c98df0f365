"""What the cache TTL cost you: the logged requests replayed under all-5m, all-1h and auto.

Per conversation (affinity ID), in request order, each request's cacheable prefix K (its cache
reads + writes as logged) is replayed against a simulated cache entry: within the entry's TTL
of the previous request, K reads what the previous request cached and writes the rest; past it,
K is written again. Uncached tokens cost 1x, reads `read`x, writes `write_5m`x or `write_1h`x of
the base input price (catalog/prices.yaml). Only models whose price has a 1h tier take part
(Anthropic-style caches). Time is the request start (`ts` minus `duration_ms`).
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
from affinity_addon.views.pricing import USD, Price, PriceTable, prompt_counts
from affinity_addon.views.pricing import default_table as default_price_table

AUTO = "auto"
POLICIES = (FIVE_MINUTES, ONE_HOUR, AUTO)


@dataclass(frozen=True, slots=True)
class Turn:
    start: float  # seconds
    prompt: int  # every prompt token
    prefix: int  # tokens under markers: logged cache reads + writes


@dataclass(slots=True)
class ConversationTtl:
    key: str
    model: str | None
    unit: str
    turns: list[Turn] = field(default_factory=list)
    scale: float = 1.0  # USD per token-equivalent, or 1 for token-equivalents
    price: Price | None = None
    cost: dict[str, float] = field(default_factory=dict)  # policy -> cost in `unit`

    @property
    def cheapest(self) -> str:
        return min((FIVE_MINUTES, ONE_HOUR), key=lambda p: self.cost[p])


def replay(turns: list[Turn], m: Multipliers, policy: str) -> float:
    """Prompt cost in token-equivalents of `turns` under one TTL policy."""
    cost = 0.0
    cached, expires = 0, float("-inf")
    rhythm = Rhythm()
    prev_start: float | None = None
    for t in sorted(turns, key=lambda t: t.start):
        rhythm.observe(None if prev_start is None else t.start - prev_start, t.prefix)
        ttl = rhythm.choose(m) if policy == AUTO else policy
        read = min(cached, t.prefix) if t.start <= expires else 0
        write = t.prefix - read
        cost += (t.prompt - t.prefix) + read * m.read
        cost += write * (m.write_1h if ttl == ONE_HOUR else m.write_5m)
        if t.prefix:
            cached, expires = t.prefix, t.start + TTL_SECONDS[ttl]
        prev_start = t.start
    return cost


def _start(record: Mapping[str, Any]) -> float | None:
    ts = record.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        end = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    duration = record.get("duration_ms")
    if type(duration) in (int, float) and 0 <= duration < 86_400_000:
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


def advise(records: Iterable[Mapping[str, Any]], prices: PriceTable | None = None,
           max_conversations: int = 100_000) -> TtlAdvice:
    prices = prices or default_price_table()
    convs: dict[str, ConversationTtl] = {}
    for r in records:
        usage = r.get("usage")
        key = r.get("affinity_id")
        if not isinstance(usage, Mapping) or not isinstance(key, str) or r.get("response_cache"):
            continue
        model = r.get("model") if isinstance(r.get("model"), str) else None
        price = prices.price_for(model, r.get("provider") if isinstance(r.get("provider"), str)
                                 else None, r.get("host") if isinstance(r.get("host"), str) else None)
        if price.write_1h <= price.write_5m:
            continue  # no TTL choice on this model
        start = _start(r)
        if start is None:
            continue
        total, read, write, _ = prompt_counts(usage)
        conv = convs.get(key)
        if conv is None:
            if len(convs) >= max_conversations:
                continue
            scale = price.input_usd_per_mtok / 1e6 if price.input_usd_per_mtok else 1.0
            conv = convs[key] = ConversationTtl(key, model, price.unit, scale=scale, price=price)
        conv.turns.append(Turn(start, total, read + write))
    for conv in convs.values():
        assert conv.price is not None
        m = Multipliers(conv.price.read, conv.price.write_5m, conv.price.write_1h)
        conv.cost = {p: replay(conv.turns, m, p) for p in POLICIES}
    return TtlAdvice(list(convs.values()))


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
