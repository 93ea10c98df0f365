"""Builds the per-response record (docs/log-format.md) and the one-line mitmweb comment.

Only names, numbers and IDs go in: never header values other than the ones the rules added,
never prompt text.
"""

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from affinity_addon.catalog.prices import record_cost
from affinity_addon.record.schema import Record, RequestFacts, Usage
from affinity_addon.tokens import format_tokens

# Marker for flows that missed the cache, so `~marked` (or `~marker`) finds them in mitmweb.
MISS_MARKER = ":red_circle:"
PARTIAL_MARKER = ":warning:"


_second: tuple[int, str] = (-1, "")


def iso(ts: float) -> str:
    """UTC, milliseconds, `Z`: each second's text is made once (strftime cost a tenth of a
    record)."""
    global _second
    sec = int(ts // 1)
    if _second[0] != sec:
        _second = (sec, datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{min(int((ts - sec) * 1000), 999):03d}Z"


def build(
    *,
    request: RequestFacts,
    flow_id: str,
    status: int | None,
    usage: Usage | None,
    usage_raw: dict[str, Any] | None,
    stream: bool,
    transport: str,
    complete: bool,
    error: str | None,
    started: float | None,
    response_cache: bool,
    extras: Mapping[str, Any] | None = None,
    verdict: Mapping[str, Any] | None = None,
    predicted_hit_ratio: float | None = None,
    provider_diagnosis: Mapping[str, Any] | None = None,
    usage_problem: str | None = None,
    instance: str | None = None,
    now: float | None = None,
) -> Record:
    """The record of one response, whole: the request's facts, the response's usage, the
    verdict (`Verdict.to_log()`: miss_reason, miss_detail, expected_cacheable_tokens), when there
    is one, and the provider's own diagnosis, when the request asked for it. Where our reason is
    `unknown`, the detail says what the provider answered."""
    now = time.time() if now is None else now
    extras = extras or {}
    judged = verdict or {}
    detail = judged.get("miss_detail")
    said = provider_diagnosis.get("result") if provider_diagnosis else None
    if judged.get("miss_reason") == "unknown" and said:
        missed = provider_diagnosis.get("missed_tokens") if provider_diagnosis else None
        told = f"the provider says {said}" + (f" (~{missed} tokens missed)" if missed else "")
        detail = f"{detail}; {told}" if detail else told
    model = request.model or extras.get("model")
    return Record(
        ts=iso(now),
        flow_id=flow_id,
        rule=request.rule,
        rules=list(request.rules),
        api=request.api,
        host=request.host,
        path=request.path,
        method=request.method,
        model=model,
        affinity_id=request.affinity_id,
        affinity_source=request.affinity_source,
        cache_key_bucket=(dict(request.cache_key_bucket) if request.cache_key_bucket
                          else None),
        stream=stream,
        transport=transport,
        status=status,
        complete=complete,
        error=error,
        duration_ms=round((now - started) * 1000, 1) if started else None,
        usage=usage,
        usage_raw=usage_raw,
        hit_ratio=round(usage.hit_ratio, 4) if usage and usage.hit_ratio is not None else None,
        cost_usd=record_cost(request.host, request.api, model, usage, now),
        response_cache=response_cache,
        added=request.to_json()["added"],
        dry_run=request.dry_run,
        rewrite_skipped=request.rewrite_skipped,
        miss_reason=judged.get("miss_reason"),
        miss_detail=detail,
        expected_cacheable_tokens=judged.get("expected_cacheable_tokens"),
        predicted_hit_ratio=predicted_hit_ratio,
        provider_diagnosis=dict(provider_diagnosis) if provider_diagnosis else None,
        usage_problem=usage_problem,
        instance=instance or None,
    )


def comment(record: Record) -> str:
    """e.g. `cache 45.1k read / 1.20k write · 97% · aff 3f2a… · miss: prefix-changed (...)`"""
    parts: list[str] = []
    u = record.usage
    if record.response_cache:
        parts.append("response cache HIT")
    elif u:
        parts.append(f"cache {format_tokens(u.cache_read_tokens)} read / "
                     f"{format_tokens(u.cache_write_tokens)} write of {format_tokens(u.input_tokens)}")
        if record.hit_ratio is not None:
            parts.append(f"{record.hit_ratio * 100:.0f}%")
    else:
        parts.append("no usage")
    if record.affinity_id:
        parts.append(f"aff {record.affinity_id[:8]}…")
    added = record.added
    n_added = len(added.get("headers", {})) + len(added.get("fields", {}))
    if n_added or added.get("markers") or added.get("removed"):
        what = " ".join(filter(None, (
            f"+{n_added} ids" if n_added else "",
            f"+{len(added['markers'])} bp" if added.get("markers") else "",
            f"-{len(added['removed'])} block" if added.get("removed") else "")))
        parts.append(("dry " if record.dry_run else "") + what)
    if record.rewrite_skipped:
        parts.append(f"unchanged: {record.rewrite_skipped}")
    reason = record.miss_reason
    if reason and reason != "hit":
        detail = record.miss_detail
        parts.append(f"miss: {reason}" + (f" ({detail})" if detail else ""))
    said = record.provider_diagnosis
    if said and said.get("result"):
        agrees = said.get("agrees")
        parts.append(f"{said.get('source')} says {said['result']}"
                     + (" (agrees)" if agrees is True else " (DISAGREES)" if agrees is False
                        else ""))
    if not record.complete:
        parts.append("incomplete")
    return " · ".join(parts)


def marker(record: Record) -> str:
    if not record.complete:
        return PARTIAL_MARKER
    reason = record.miss_reason
    if reason is not None:
        return "" if reason in ("hit", "response-cache") else MISS_MARKER
    u = record.usage
    if u and not record.response_cache and u.input_tokens > 0 and u.cache_read_tokens == 0:
        return MISS_MARKER
    return ""
