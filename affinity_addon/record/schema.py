"""The record's types: normalized cache usage, what the request side did, the record itself.

Usage and the request's facts are immutable; the record is built once, from them and the
response, and never changed after. All of it is plain data, JSON-friendly: the JSONL log and
`flow.metadata` (which mitmproxy must be able to save) get its JSON form.
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
# What the addon publishes there is a view for people and other addons (mitmweb, `affinity.why`,
# saved flows): the request's facts once it has gone, with the usage and verdict once the
# record is written. The pipeline itself never reads it back.
META = "affinity"

NOTHING_ADDED: dict[str, Any] = {"headers": {}, "fields": {}, "markers": []}


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the rules did to one request, as the client sent it (host, path and method before
    map-remote or other addons change the URL): the request side's part of the record."""

    rule: str
    rules: tuple[str, ...]
    api: str | None
    model: str | None  # cut to a real model name's length (client-chosen)
    affinity_id: str | None
    affinity_source: str | None
    dry_run: bool
    # {"headers": {...}, "fields": {...}, "markers": [{path, ttl}]}, and "removed": [{path,
    # block, tokens}] when a rule took a block out of the prompt
    added: dict[str, Any]
    kept: tuple[str, ...]  # the client's own values a rule left alone ("header:x", "field:y")
    body_write: str  # none | splice | reserialize
    warning: str | None
    host: str
    path: str
    method: str
    cache_key_bucket: dict[str, Any] | None  # how {family_key} chose the cache key
    # Why the rules' changes were computed but not sent outside a dry run ("signed (aws-sigv4)")
    rewrite_skipped: str | None = None
    # What the request asked the provider's cache diagnostics: {source, compared_to, by}
    # (`request/provider_link.Ask`); None when it asked nothing.
    diagnostics: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        added = {"headers": dict(self.added.get("headers", {})),
                 "fields": dict(self.added.get("fields", {})),
                 "markers": list(self.added.get("markers", []))}
        if self.added.get("removed"):
            added["removed"] = [dict(r) for r in self.added["removed"]]
        return {
            "rule": self.rule, "rules": list(self.rules), "api": self.api,
            "model": self.model, "affinity_id": self.affinity_id,
            "affinity_source": self.affinity_source, "dry_run": self.dry_run,
            "added": added,
            "kept": list(self.kept), "body_write": self.body_write, "warning": self.warning,
            "host": self.host, "path": self.path, "method": self.method,
            "cache_key_bucket": dict(self.cache_key_bucket) if self.cache_key_bucket else None,
            "rewrite_skipped": self.rewrite_skipped,
            "diagnostics": dict(self.diagnostics) if self.diagnostics else None,
        }

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
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
    api: str | None  # the API the request speaks (was `provider` in older logs)
    host: str
    path: str
    method: str
    model: str | None
    affinity_id: str | None
    affinity_source: str | None
    cache_key_bucket: dict[str, Any] | None  # how {family_key} chose the cache key
    stream: bool
    transport: str
    status: int | None
    complete: bool
    error: str | None
    duration_ms: float | None
    usage: Usage | None
    usage_raw: dict[str, Any] | None
    hit_ratio: float | None
    # Dollars by kind of token (catalog/prices.py), or None when nobody prices the model.
    cost_usd: dict[str, Any] | None
    response_cache: bool
    added: dict[str, Any]
    dry_run: bool
    rewrite_skipped: str | None = None  # why `added` was not sent: the body is signed
    miss_reason: str | None = None
    miss_detail: str | None = None
    expected_cacheable_tokens: int | None = None
    predicted_hit_ratio: float | None = None
    # The provider's own answer: {source, compared_to, result, missed_tokens, agrees}.
    provider_diagnosis: dict[str, Any] | None = None
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
