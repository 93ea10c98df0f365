"""Aggregation of JSONL usage records (docs/log-format.md) by model, rule, conversation, verdict.

One `Aggregator` serves the proxy's live summary and `affinity report`, so both count the same
way. Records are dicts straight from `json.loads`: every field may be missing or of the wrong
type, and is then ignored rather than raised on.

What counts toward hit ratios: records with a `usage` object that are not OpenRouter
response-cache hits (those report zero usage by design). Records without usage (errors, cut
streams) and response-cache hits are counted separately, never as misses.
"""

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from rich import box
from rich.console import Console
from rich.table import Table

from affinity_addon.pricing import (
    TOKEN_EQUIVALENTS,
    USD,
    CostEstimate,
    Price,
    PriceTable,
    estimate_cost,
)
from affinity_addon.pricing import default_table as default_price_table

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


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return 0
    return int(value)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(slots=True)
class Observation:
    """What one record contributes, computed once and added to every bucket it falls in."""

    verdict: str
    counted: bool
    incomplete: bool
    dry_run: bool
    input_tokens: int = 0
    read_tokens: int = 0
    write_tokens: int = 0
    uncached_tokens: int = 0
    output_tokens: int = 0
    provider_cost: float = 0.0
    eq_with: float = 0.0
    eq_without: float = 0.0
    usd: CostEstimate | None = None
    missed: bool = False
    tokens_lost: int = 0
    predicted_read: float | None = None  # dry run: read tokens the rules would have given
    dry_saved_eq: float = 0.0
    ts: str | None = None


def observe(record: Mapping[str, Any], prices: PriceTable) -> Observation:
    usage = record.get("usage")
    response_cache = record.get("response_cache") is True
    obs = Observation(
        verdict=NO_USAGE,
        counted=False,
        incomplete=record.get("complete") is False,
        dry_run=record.get("dry_run") is True,
        ts=_str(record.get("ts")),
    )
    if response_cache:
        obs.verdict = RESPONSE_CACHE
        return obs
    if not isinstance(usage, Mapping):
        return obs
    obs.counted = True
    obs.input_tokens = total = _int(usage.get("input_tokens"))
    obs.read_tokens = read = min(_int(usage.get("cache_read_tokens")), total)
    obs.write_tokens = write = min(_int(usage.get("cache_write_tokens")), total - read)
    obs.uncached_tokens = total - read - write
    obs.output_tokens = _int(usage.get("output_tokens"))
    cost = usage.get("cost")
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        obs.provider_cost = float(cost)

    reason = _str(record.get("miss_reason"))
    if total <= 0:
        obs.verdict = NO_PROMPT
    elif reason is not None:
        obs.verdict = reason
    else:  # the miss analysis did not run (or is off): judge by the counters alone
        obs.verdict = "hit" if read > 0 else "unknown"
    obs.missed = obs.verdict not in NOT_MISSED
    if obs.missed:
        obs.tokens_lost = obs.uncached_tokens + write

    price = prices.price_for(_str(record.get("model")), _str(record.get("provider")),
                             _str(record.get("host")))
    eq = _equivalents(usage, price)
    obs.eq_with, obs.eq_without = eq.with_cache, eq.without_cache
    if price.input_usd_per_mtok is not None:
        scale = price.input_usd_per_mtok / 1_000_000
        obs.usd = CostEstimate.of(eq.with_cache * scale, eq.without_cache * scale, USD)

    predicted = record.get("predicted_hit_ratio")
    if (obs.dry_run and total > 0 and isinstance(predicted, int | float)
            and not isinstance(predicted, bool)):
        obs.predicted_read = min(max(float(predicted), 0.0), 1.0) * total
        # Tokens the rules would have turned from full-price into cache reads.
        obs.dry_saved_eq = max(obs.predicted_read - read, 0.0) * (1.0 - price.read)
    return obs


_EQ_PRICES: dict[Price, Price] = {}


def _equivalents(usage: Mapping[str, Any], price: Price) -> CostEstimate:
    """The cost in token equivalents whatever the unit of the price, so all models add up."""
    eq_price = _EQ_PRICES.get(price)
    if eq_price is None:
        eq_price = _EQ_PRICES[price] = dataclasses.replace(price, input_usd_per_mtok=None)
    return estimate_cost(usage, eq_price)


@dataclass(slots=True)
class Bucket:
    """Running totals for one group of records (a model, a rule, a conversation, a verdict)."""

    key: str
    requests: int = 0
    counted: int = 0  # with usage and not a response-cache hit: the base of every ratio
    no_usage: int = 0
    response_cache: int = 0
    incomplete: int = 0
    prompt_requests: int = 0  # counted with input_tokens > 0
    hit_requests: int = 0  # ... and cache_read_tokens > 0
    input_tokens: int = 0
    read_tokens: int = 0
    write_tokens: int = 0
    uncached_tokens: int = 0
    output_tokens: int = 0
    provider_cost: float = 0.0
    eq_with: float = 0.0
    eq_without: float = 0.0
    usd_with: float = 0.0
    usd_without: float = 0.0
    usd_requests: int = 0  # counted requests whose model has a known base price
    miss_reasons: Counter[str] = field(default_factory=Counter)
    tokens_lost: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[Example]] = field(default_factory=dict)
    dry_run: int = 0
    dry_requests: int = 0  # dry-run records with a prediction
    dry_input_tokens: int = 0
    dry_read_tokens: int = 0
    dry_predicted_read: float = 0.0
    dry_saved_eq: float = 0.0
    dry_saved_usd: float = 0.0
    first_ts: str | None = None
    last_ts: str | None = None

    def add(self, obs: Observation, example: Example | None = None, max_examples: int = 3) -> None:
        self.requests += 1
        if obs.ts is not None:
            # ISO-8601 UTC strings of one format sort like the times they name.
            if self.first_ts is None or obs.ts < self.first_ts:
                self.first_ts = obs.ts
            if self.last_ts is None or obs.ts > self.last_ts:
                self.last_ts = obs.ts
        self.incomplete += obs.incomplete
        self.dry_run += obs.dry_run
        if not obs.counted:
            if obs.verdict == RESPONSE_CACHE:
                self.response_cache += 1
            else:
                self.no_usage += 1
            return
        self.counted += 1
        if obs.input_tokens > 0:
            self.prompt_requests += 1
            self.hit_requests += obs.read_tokens > 0
        self.input_tokens += obs.input_tokens
        self.read_tokens += obs.read_tokens
        self.write_tokens += obs.write_tokens
        self.uncached_tokens += obs.uncached_tokens
        self.output_tokens += obs.output_tokens
        self.provider_cost += obs.provider_cost
        self.eq_with += obs.eq_with
        self.eq_without += obs.eq_without
        if obs.usd is not None:
            self.usd_requests += 1
            self.usd_with += obs.usd.with_cache
            self.usd_without += obs.usd.without_cache
        if obs.missed:
            self.miss_reasons[obs.verdict] += 1
            self.tokens_lost[obs.verdict] += obs.tokens_lost
            if example is not None and max_examples > 0:
                _keep_largest(self.examples.setdefault(obs.verdict, []), example, max_examples)
        if obs.predicted_read is not None:
            self.dry_requests += 1
            self.dry_input_tokens += obs.input_tokens
            self.dry_read_tokens += obs.read_tokens
            self.dry_predicted_read += obs.predicted_read
            self.dry_saved_eq += obs.dry_saved_eq
            if obs.usd is not None and obs.eq_without > 0:
                self.dry_saved_usd += obs.dry_saved_eq * obs.usd.without_cache / obs.eq_without

    @property
    def hit_ratio(self) -> float | None:
        """Token-weighted: share of all prompt tokens read from cache."""
        return self.read_tokens / self.input_tokens if self.input_tokens else None

    @property
    def request_hit_ratio(self) -> float | None:
        """Request-weighted: share of requests with a prompt that read anything from cache."""
        return self.hit_requests / self.prompt_requests if self.prompt_requests else None

    @property
    def missed_requests(self) -> int:
        return self.miss_reasons.total()

    def cost(self) -> CostEstimate:
        """In USD when every counted request has a known base price, else token equivalents."""
        if self.counted and self.usd_requests == self.counted:
            return CostEstimate.of(self.usd_with, self.usd_without, USD)
        return CostEstimate.of(self.eq_with, self.eq_without, TOKEN_EQUIVALENTS)

    def dry_predicted_ratio(self) -> float | None:
        return self.dry_predicted_read / self.dry_input_tokens if self.dry_input_tokens else None

    def dry_observed_ratio(self) -> float | None:
        return self.dry_read_tokens / self.dry_input_tokens if self.dry_input_tokens else None

    def top_reasons(self, n: int | None = None) -> list[tuple[str, int, int]]:
        """(reason, requests, tokens lost), most tokens lost first."""
        ranked = sorted(self.miss_reasons, key=lambda r: (-self.tokens_lost[r],
                                                          -self.miss_reasons[r], r))
        return [(r, self.miss_reasons[r], self.tokens_lost[r]) for r in ranked[:n]]

    def to_dict(self, *, examples: bool = True) -> dict[str, Any]:
        cost = self.cost()
        d: dict[str, Any] = {
            "key": self.key,
            "requests": self.requests,
            "counted": self.counted,
            "no_usage": self.no_usage,
            "response_cache": self.response_cache,
            "incomplete": self.incomplete,
            "prompt_requests": self.prompt_requests,
            "hit_requests": self.hit_requests,
            "input_tokens": self.input_tokens,
            "cache_read_tokens": self.read_tokens,
            "cache_write_tokens": self.write_tokens,
            "uncached_tokens": self.uncached_tokens,
            "output_tokens": self.output_tokens,
            "hit_ratio": self.hit_ratio,
            "request_hit_ratio": self.request_hit_ratio,
            "cost": {"unit": cost.unit, "with_cache": cost.with_cache,
                     "without_cache": cost.without_cache, "saved": cost.saved},
            "cost_token_equivalents": {"with_cache": self.eq_with,
                                       "without_cache": self.eq_without,
                                       "saved": self.eq_without - self.eq_with},
            "cost_usd_priced": {"requests": self.usd_requests, "with_cache": self.usd_with,
                                "without_cache": self.usd_without,
                                "saved": self.usd_without - self.usd_with},
            "provider_cost": self.provider_cost,
            "missed_requests": self.missed_requests,
            "miss_reasons": [
                {"reason": r, "requests": n, "tokens_lost": lost,
                 **({"examples": [e._asdict() for e in self.examples.get(r, [])]}
                    if examples else {})}
                for r, n, lost in self.top_reasons()
            ],
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
        }
        if self.dry_run or self.dry_requests:
            d["dry_run"] = {
                "records": self.dry_run,
                "requests": self.dry_requests,
                "input_tokens": self.dry_input_tokens,
                "observed_read_tokens": self.dry_read_tokens,
                "predicted_read_tokens": self.dry_predicted_read,
                "observed_hit_ratio": self.dry_observed_ratio(),
                "predicted_hit_ratio": self.dry_predicted_ratio(),
                "saved_token_equivalents": self.dry_saved_eq,
                "saved_usd_priced": self.dry_saved_usd,
            }
        return d


def _keep_largest(kept: list[Example], example: Example, n: int) -> None:
    if len(kept) < n:
        kept.append(example)
        return
    smallest = min(range(len(kept)), key=lambda i: kept[i].tokens_lost)
    if example.tokens_lost > kept[smallest].tokens_lost:
        kept[smallest] = example


class Aggregator:
    """Adds records into a total and per-model/rule/conversation/verdict buckets.

    `series` keeps (ts, hit ratio, input tokens) per conversation for the hit-ratio-over-time
    chart; turn it off in a long-running proxy, where it would only grow.
    """

    def __init__(self, prices: PriceTable | None = None, *, max_examples: int = 3,
                 keep_series: bool = True) -> None:
        self.prices = prices or default_price_table()
        self.max_examples = max_examples
        self.keep_series = keep_series
        self.total = Bucket("total")
        self.by_model: dict[str, Bucket] = {}
        self.by_rule: dict[str, Bucket] = {}
        self.by_conversation: dict[str, Bucket] = {}
        self.by_reason: dict[str, Bucket] = {}
        self.series: dict[str, list[tuple[str, float, int]]] = {}
        self.conversation_model: dict[str, str] = {}  # last model seen, to label conversations

    def add(self, record: Mapping[str, Any]) -> None:
        if not isinstance(record, Mapping):
            return
        obs = observe(record, self.prices)
        model = _str(record.get("model")) or NONE_KEY
        rule = _str(record.get("rule")) or NONE_KEY
        conv = _str(record.get("affinity_id")) or NONE_KEY
        example = None
        if obs.missed and self.max_examples:
            detail = record.get("miss_detail")
            example = Example(obs.tokens_lost, obs.ts, _str(record.get("affinity_id")),
                              _str(record.get("model")), _str(record.get("rule")),
                              _str(record.get("flow_id")),
                              detail if isinstance(detail, str) else None)
        if model != NONE_KEY:
            self.conversation_model[conv] = model
        n = self.max_examples
        self.total.add(obs, example, n)
        for table, key in ((self.by_model, model), (self.by_rule, rule),
                           (self.by_conversation, conv), (self.by_reason, obs.verdict)):
            bucket = table.get(key)
            if bucket is None:
                bucket = table[key] = Bucket(key)
            bucket.add(obs, example, n)
        if self.keep_series and obs.counted and obs.input_tokens > 0 and obs.ts is not None:
            self.series.setdefault(conv, []).append(
                (obs.ts, obs.read_tokens / obs.input_tokens, obs.input_tokens))

    def add_all(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self.add(record)


def top_buckets(table: Mapping[str, Bucket], n: int | None = None) -> list[Bucket]:
    """Largest first by prompt tokens, then by requests; n=None or 0 keeps all."""
    ranked = sorted(table.values(), key=lambda b: (-b.input_tokens, -b.requests, b.key))
    return ranked[:n] if n else ranked


# --- rich rendering -----------------------------------------------------------------------

def fmt_tokens(n: float) -> str:
    n = float(n)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{1 if abs(n) >= 10 * size else 2}f}{unit}"
    return f"{n:.0f}"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r * 100:.1f}%"


def fmt_cost(value: float, unit: str) -> str:
    if unit == USD:
        sign = "-" if value < 0 else ""
        value = abs(value)
        return f"{sign}${value:,.2f}" if value >= 1 else f"{sign}${value:.4f}"
    return f"{fmt_tokens(value)} teq"


def short_id(value: str | None, n: int = 12) -> str:
    if not value:
        return NONE_KEY
    return value if len(value) <= n else value[:n] + "…"


def bucket_table(title: str, buckets: Iterable[Bucket], label: str, *,
                 id_like: bool = False) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    table.add_column(label, overflow="fold")
    for name in ("req", "hit tok", "hit req", "read", "write", "uncached", "output"):
        table.add_column(name, justify="right")
    table.add_column("cost cached", justify="right")
    table.add_column("uncached cost", justify="right")
    table.add_column("saved", justify="right", style="green")
    table.add_column("top miss")
    for b in buckets:
        cost = b.cost()
        top = b.top_reasons(1)
        extra = []
        if b.response_cache:
            extra.append(f"{b.response_cache} resp-cache")
        if b.no_usage:
            extra.append(f"{b.no_usage} no usage")
        req = f"{b.requests}" + (f" ({', '.join(extra)})" if extra else "")
        table.add_row(
            short_id(b.key) if id_like else b.key,
            req,
            fmt_ratio(b.hit_ratio),
            fmt_ratio(b.request_hit_ratio),
            fmt_tokens(b.read_tokens),
            fmt_tokens(b.write_tokens),
            fmt_tokens(b.uncached_tokens),
            fmt_tokens(b.output_tokens),
            fmt_cost(cost.with_cache, cost.unit),
            fmt_cost(cost.without_cache, cost.unit),
            fmt_cost(cost.saved, cost.unit),
            f"{top[0][0]} ×{top[0][1]}" if top else "",
        )
    return table


def reasons_table(bucket: Bucket, *, top: int | None = None, examples: bool = True) -> Table:
    table = Table(title="Miss reasons (by tokens lost: uncached + written)", box=box.SIMPLE_HEAD,
                  title_justify="left", title_style="bold")
    table.add_column("reason", style="yellow")
    table.add_column("req", justify="right")
    table.add_column("tokens lost", justify="right")
    table.add_column("share", justify="right")
    if examples:
        table.add_column("examples (ts · conversation · model · detail)", overflow="fold")
    lost_total = sum(bucket.tokens_lost.values()) or 1
    for reason, n, lost in bucket.top_reasons(top):
        row = [reason, str(n), fmt_tokens(lost), fmt_ratio(lost / lost_total)]
        if examples:
            ex = sorted(bucket.examples.get(reason, []), key=lambda e: -e.tokens_lost)
            row.append("\n".join(
                f"{e.ts or '?'} · {short_id(e.affinity_id)} · {e.model or '?'} · "
                f"{e.miss_detail or '-'}" for e in ex))
        table.add_row(*row)
    return table


def totals_line(b: Bucket) -> str:
    cost = b.cost()
    parts = [
        f"[bold]{b.requests}[/] requests",
        f"hit ratio [bold]{fmt_ratio(b.hit_ratio)}[/] of tokens, "
        f"[bold]{fmt_ratio(b.request_hit_ratio)}[/] of requests",
        f"read {fmt_tokens(b.read_tokens)} / write {fmt_tokens(b.write_tokens)} / "
        f"uncached {fmt_tokens(b.uncached_tokens)}",
        f"saved [green]{fmt_cost(cost.saved, cost.unit)}[/]",
    ]
    if b.usd_requests and cost.unit != USD:
        parts.append(f"[green]${b.usd_without - b.usd_with:,.2f}[/] on {b.usd_requests} "
                     "priced requests")
    if b.response_cache:
        parts.append(f"{b.response_cache} response-cache hits")
    if b.no_usage:
        parts.append(f"{b.no_usage} without usage")
    return " · ".join(parts)


def render_summary(agg: Aggregator, console: Console, *, top: int = 10) -> None:
    """The compact summary: totals, per model, and the top miss reasons."""
    if not agg.total.requests:
        console.print("affinity: no LLM requests recorded")
        return
    console.print(f"[bold]affinity[/] · {totals_line(agg.total)}")
    console.print(bucket_table("Per model", top_buckets(agg.by_model, top), "model"))
    if agg.total.miss_reasons:
        console.print(reasons_table(agg.total, top=min(top, 5), examples=False))
