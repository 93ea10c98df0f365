"""Aggregation of JSONL usage records (docs/log-format.md) by model, rule, conversation, verdict.

One `Aggregator` serves the proxy's live summary and `affinity report`, so both count the same
way. Records are dicts straight from `json.loads`: every field may be missing or of the wrong
type, and is then ignored rather than raised on.

What counts toward hit ratios: records with a `usage` object that are not OpenRouter
response-cache hits (those report zero usage by design). Records without usage (errors, cut
streams) and response-cache hits are counted separately, never as misses.
"""

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from affinity_addon.views.agreement import Agreement
from affinity_addon.views.observation import (
    NONE_KEY,
    NOT_MISSED,
    RESPONSE_CACHE,
    Example,
    Observation,
    observe,
)
from affinity_addon.views.pricing import (
    TOKEN_EQUIVALENTS,
    USD,
    CostEstimate,
    Price,
    PriceTable,
)
from affinity_addon.views.pricing import default_table as default_price_table
from affinity_addon.views.safe import MAX_KEYS, OTHER_KEY, label

logger = logging.getLogger(__name__)

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
    output_tokens: int = 0
    provider_cost: float = 0.0
    eq_with: float = 0.0
    # Dollars of the priced requests, by kind (catalog/prices.py KINDS), and without the cache.
    usd_input: float = 0.0
    usd_write_5m: float = 0.0
    usd_write_1h: float = 0.0
    usd_read: float = 0.0
    usd_output: float = 0.0
    usd_without: float = 0.0
    usd_requests: int = 0  # counted requests whose model someone prices
    unpriced_requests: int = 0  # ... and those nobody prices, by model:
    unpriced_models: Counter[str] = field(default_factory=Counter)
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
        ts = obs.ts
        if ts is not None:
            # ISO-8601 UTC strings of one format sort like the times they name.
            if self.first_ts is None or ts < self.first_ts:
                self.first_ts = ts
            if self.last_ts is None or ts > self.last_ts:
                self.last_ts = ts
        if obs.incomplete:
            self.incomplete += 1
        if obs.dry_run:
            self.dry_run += 1
        if not obs.counted:
            if obs.verdict == RESPONSE_CACHE:
                self.response_cache += 1
            else:
                self.no_usage += 1
            return
        self.counted += 1
        total = obs.input_tokens
        if total > 0:
            self.prompt_requests += 1
            if obs.read_tokens > 0:
                self.hit_requests += 1
        self.input_tokens += total
        self.read_tokens += obs.read_tokens
        self.write_tokens += obs.write_tokens
        self.output_tokens += obs.output_tokens
        self.provider_cost += obs.provider_cost
        self.eq_with += obs.eq_with
        usd = obs.usd
        if usd is not None:
            self.usd_requests += 1
            self.usd_input += usd.input
            self.usd_write_5m += usd.cache_write_5m
            self.usd_write_1h += usd.cache_write_1h
            self.usd_read += usd.cache_read
            self.usd_output += usd.output
            self.usd_without += usd.without_cache
        else:
            self.unpriced_requests += 1
            self.unpriced_models[obs.model or NONE_KEY] += 1
        if obs.verdict not in NOT_MISSED:
            self.miss_reasons[obs.verdict] += 1
            self.tokens_lost[obs.verdict] += obs.tokens_lost
            if example is not None and max_examples > 0:
                _keep_largest(self.examples.setdefault(obs.verdict, []), example, max_examples)
        if obs.predicted_read is not None:
            self.dry_requests += 1
            self.dry_input_tokens += total
            self.dry_read_tokens += obs.read_tokens
            self.dry_predicted_read += obs.predicted_read
            self.dry_saved_eq += obs.dry_saved_eq
            if obs.usd_scale is not None:
                self.dry_saved_usd += obs.dry_saved_eq * obs.usd_scale

    def merge(self, other: "Bucket", max_examples: int = 3) -> None:
        """Add another bucket's totals into this one (examples: keep the largest)."""
        self.requests += other.requests
        self.counted += other.counted
        self.no_usage += other.no_usage
        self.response_cache += other.response_cache
        self.incomplete += other.incomplete
        self.prompt_requests += other.prompt_requests
        self.hit_requests += other.hit_requests
        self.input_tokens += other.input_tokens
        self.read_tokens += other.read_tokens
        self.write_tokens += other.write_tokens
        self.output_tokens += other.output_tokens
        self.provider_cost += other.provider_cost
        self.eq_with += other.eq_with
        self.usd_input += other.usd_input
        self.usd_write_5m += other.usd_write_5m
        self.usd_write_1h += other.usd_write_1h
        self.usd_read += other.usd_read
        self.usd_output += other.usd_output
        self.usd_without += other.usd_without
        self.usd_requests += other.usd_requests
        self.unpriced_requests += other.unpriced_requests
        self.unpriced_models.update(other.unpriced_models)
        for reason, n in other.miss_reasons.items():
            self.miss_reasons[reason] += n
        for reason, n in other.tokens_lost.items():
            self.tokens_lost[reason] += n
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            for example in examples:
                _keep_largest(kept, example, max_examples)
        if other.dry_run or other.dry_requests:
            self.dry_run += other.dry_run
            self.dry_requests += other.dry_requests
            self.dry_input_tokens += other.dry_input_tokens
            self.dry_read_tokens += other.dry_read_tokens
            self.dry_predicted_read += other.dry_predicted_read
            self.dry_saved_eq += other.dry_saved_eq
            self.dry_saved_usd += other.dry_saved_usd
        if other.first_ts is not None and (self.first_ts is None or other.first_ts < self.first_ts):
            self.first_ts = other.first_ts
        if other.last_ts is not None and (self.last_ts is None or other.last_ts > self.last_ts):
            self.last_ts = other.last_ts

    @property
    def uncached_tokens(self) -> int:
        return self.input_tokens - self.read_tokens - self.write_tokens

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

    @property
    def usd_with(self) -> float:
        """Dollars of the priced requests as billed: prompt by kind, plus output."""
        return (self.usd_input + self.usd_write_5m + self.usd_write_1h + self.usd_read
                + self.usd_output)

    def cost(self) -> CostEstimate:
        """In USD over the priced requests when any is priced (the rest are `unpriced`, never
        guessed), else the prompt in input-token equivalents."""
        if self.usd_requests:
            return CostEstimate.of(self.usd_with, self.usd_without, USD)
        return CostEstimate.of(self.eq_with, float(self.input_tokens), TOKEN_EQUIVALENTS)

    def cost_usd(self) -> dict[str, Any]:
        """The report's `cost_usd` object: dollars by kind over the priced requests, and which
        models nobody prices."""
        return {"requests": self.usd_requests,
                "input": self.usd_input, "cache_write_5m": self.usd_write_5m,
                "cache_write_1h": self.usd_write_1h, "cache_read": self.usd_read,
                "output": self.usd_output, "with_cache": self.usd_with,
                "without_cache": self.usd_without, "saved": self.usd_without - self.usd_with,
                "unpriced_requests": self.unpriced_requests,
                "unpriced": sorted(self.unpriced_models)}

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
                                       "without_cache": self.input_tokens,
                                       "saved": self.input_tokens - self.eq_with},
            "cost_usd": self.cost_usd(),
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


OLDER_KEY = "(older conversations)"


class Aggregator:
    """Adds records into a total and per-model/rule/host/conversation/verdict buckets.

    Each record is added twice: to its (model, rule, host, conversation) cell and to its
    verdict's bucket; the per-model, per-rule, per-host, per-conversation and total views are
    merged from those on first access after an add. That halves the work per line of a big
    log. Miss examples are kept for the total and per verdict only.

    `series` keeps (ts, hit ratio, input tokens) per conversation for the hit-ratio-over-time
    chart; turn it off in a long-running proxy, where it would only grow.
    """

    def __init__(self, prices: PriceTable | None = None, *, max_examples: int = 3,
                 keep_series: bool = True, max_conversations: int | None = None) -> None:
        self.prices = prices or default_price_table()
        # A long-running proxy sees unboundedly many conversations: past this many cells the
        # oldest are folded into one "(older)" conversation per model and rule.
        self.max_conversations = max_conversations
        self._price_memo: dict[tuple[str | None, str | None, str | None], Price] = {}
        self.max_examples = max_examples
        self.keep_series = keep_series
        self.by_reason: dict[str, Bucket] = {}
        self.series: dict[str, list[tuple[str, float, int]]] = {}
        self.conversation_model: dict[str, str] = {}  # last model seen, to label conversations
        # The provider's own diagnosis against ours, by (its answer, our verdict).
        self.agreement = Agreement()
        self._cells: dict[tuple[str, str, str, str], Bucket] = {}
        self._models: set[str] = set()
        self._rules: set[str] = set()
        self._hosts: set[str] = set()
        self._views: tuple[Bucket, dict[str, Bucket], dict[str, Bucket], dict[str, Bucket],
                           dict[str, Bucket]] | None = None

    def add(self, record: Mapping[str, Any]) -> None:
        if not isinstance(record, Mapping):
            return
        obs = observe(record, self._price_of, self.prices.priced)
        get = record.get
        self.agreement.add(record)
        # Every string is cut and made printable, and past MAX_KEYS distinct models or rules the
        # rest count as "(other)": the stats grow with the number of requests, not their size.
        model = obs.model = self._bounded(self._models, label(get("model")))
        rule = self._bounded(self._rules, label(get("rule")))
        host = self._bounded(self._hosts, label(get("host"), 253))
        conv = label(get("affinity_id"), 80)
        if obs.verdict not in self.by_reason and len(self.by_reason) >= MAX_KEYS:
            obs.verdict = OTHER_KEY
        example = None
        n = self.max_examples
        if n and obs.verdict not in NOT_MISSED:
            example = Example(obs.tokens_lost, obs.ts, conv, model, rule,
                              label(get("flow_id"), 64), label(get("miss_detail"), 400))
        conv = conv or NONE_KEY
        key = (model or NONE_KEY, rule or NONE_KEY, host or NONE_KEY, conv)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = Bucket(conv)
            if self.max_conversations and len(self._cells) > self.max_conversations:
                self._fold_oldest()
        cell.add(obs)
        bucket = self.by_reason.get(obs.verdict)
        if bucket is None:
            bucket = self.by_reason[obs.verdict] = Bucket(obs.verdict)
        bucket.add(obs, example, n)
        self._views = None
        if model is not None:
            self.conversation_model[conv] = model
        if self.keep_series and obs.input_tokens > 0 and obs.ts is not None:
            self.series.setdefault(conv, []).append(
                (obs.ts, obs.read_tokens / obs.input_tokens, obs.input_tokens))

    @staticmethod
    def _bounded(seen: set[str], value: str | None) -> str | None:
        if value is None or value in seen:
            return value
        if len(seen) >= MAX_KEYS:
            return OTHER_KEY
        seen.add(value)
        return value

    def _fold_oldest(self) -> None:
        for key in self._cells:
            if key[3] != OLDER_KEY:
                break
        else:
            return
        old = self._cells.pop(key)
        self.conversation_model.pop(key[3], None)
        self.series.pop(key[3], None)
        into_key = (key[0], key[1], key[2], OLDER_KEY)
        into = self._cells.get(into_key)
        if into is None:
            into = self._cells[into_key] = Bucket(OLDER_KEY)
        into.merge(old, self.max_examples)

    def _price_of(self, model: str | None, api: str | None, host: str | None) -> Price:
        # A log has few distinct (model, api, host): memoize before the table lowercases.
        key = (model, api, host)
        price = self._price_memo.get(key)
        if price is None:
            if len(self._price_memo) >= MAX_KEYS:  # client-chosen model strings: keep it bounded
                self._price_memo.clear()
            price = self._price_memo[key] = self.prices.price_for(model, api, host)
        return price

    def add_all(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self.add(record)

    def _merged(self) -> tuple[Bucket, dict[str, Bucket], dict[str, Bucket], dict[str, Bucket],
                               dict[str, Bucket]]:
        if self._views is None:
            n = self.max_examples
            total = Bucket("total")
            for bucket in self.by_reason.values():
                total.merge(bucket, n)
            views: list[dict[str, Bucket]] = [{}, {}, {}, {}]
            for cell_key, cell in self._cells.items():
                for view, key in zip(views, cell_key, strict=True):
                    found = view.get(key)
                    if found is None:
                        found = view[key] = Bucket(key)
                    found.merge(cell, n)
            self._views = (total, views[0], views[1], views[2], views[3])
        return self._views

    @property
    def total(self) -> Bucket:
        return self._merged()[0]

    @property
    def by_model(self) -> dict[str, Bucket]:
        return self._merged()[1]

    @property
    def by_rule(self) -> dict[str, Bucket]:
        return self._merged()[2]

    @property
    def by_host(self) -> dict[str, Bucket]:
        """Per request host as the client sent it: each provider (and each Anthropic-compatible
        endpoint) caches on its own terms."""
        return self._merged()[3]

    @property
    def by_conversation(self) -> dict[str, Bucket]:
        return self._merged()[4]
