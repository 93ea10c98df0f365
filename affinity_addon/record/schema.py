"""The record's types: normalized cache usage (and, later, the response record itself).

Everything here is immutable and JSON-friendly, so it can go into `flow.metadata` and JSONL.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    """Normalized cache usage of one response.

    `input_tokens` counts every prompt token, including cache reads and writes, whatever the
    provider's own convention (Anthropic excludes cached tokens from its `input_tokens`, OpenAI
    includes them).
    """

    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    cache_write_5m_tokens: int | None = None
    cache_write_1h_tokens: int | None = None
    cost: float | None = None  # the provider's own cost figure (OpenRouter `usage.cost`), if any
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def uncached_tokens(self) -> int:
        return max(self.input_tokens - self.cache_read_tokens - self.cache_write_tokens, 0)

    @property
    def hit_ratio(self) -> float | None:
        """Token-weighted share of the prompt read from cache; None when there was no prompt."""
        if self.input_tokens <= 0:
            return None
        return min(self.cache_read_tokens / self.input_tokens, 1.0)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "output_tokens": self.output_tokens,
        }
        if self.cache_write_5m_tokens is not None:
            d["cache_write_5m_tokens"] = self.cache_write_5m_tokens
        if self.cache_write_1h_tokens is not None:
            d["cache_write_1h_tokens"] = self.cache_write_1h_tokens
        if self.cost is not None:
            d["cost"] = self.cost
        return d


# flow.metadata key of a matched flow: plain data only (mitmproxy must be able to save flows).
META = "affinity"

FORMAT_VERSION = 1


@dataclass(slots=True)
class Record:
    """One line of the JSONL log (docs/log-format.md): one completed or failed matched response.

    Built once per response by `record.build`, written by the JSONL writer, shown as the flow
    comment, aggregated by the views. Only names, numbers and IDs: never prompt text, never a
    header value other than the ones the rules added.
    """

    ts: str
    flow_id: str
    rule: str | None
    rules: list[str]
    provider: str | None
    host: str
    path: str
    method: str
    model: str | None
    affinity_id: str | None
    affinity_source: str | None
    key: dict[str, Any] | None  # how {family_key} chose the cache key: strategy, bucket(s)
    stream: bool
    transport: str
    status: int | None
    complete: bool
    error: str | None
    duration_ms: float | None
    usage: Usage | None
    usage_raw: dict[str, Any] | None
    hit_ratio: float | None
    response_cache: bool
    added: dict[str, Any]
    dry_run: bool
    miss_reason: str | None = None
    miss_detail: str | None = None
    expected_cacheable_tokens: int | None = None
    predicted_hit_ratio: float | None = None
    provider_miss_reason: str | None = None
    usage_problem: str | None = None  # why usage could not be read, when it could not
    instance: str | None = None  # which proxy instance served it (gateways)
    v: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSONL object, fields in the documented order."""
        d: dict[str, Any] = {"v": self.v}
        for name in RECORD_FIELDS[1:]:
            value = getattr(self, name)
            d[name] = value.to_dict() if isinstance(value, Usage) else value
        return d


# Field order of a JSONL line: `v` first, then as declared.
RECORD_FIELDS: tuple[str, ...] = ("v", *(f for f in Record.__dataclass_fields__ if f != "v"))
