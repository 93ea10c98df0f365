"""A mitmweb/console contentview for matched LLM flows.

For a request: what the rules did (rule, affinity ID and its source, headers and fields added,
breakpoints) and the prompt's segments in provider hash order with their sizes and where the
`cache_control` markers sit. For a response: the usage record and, for SSE, one line per event.
"""

import json
from typing import Any

from mitmproxy import contentviews

from affinity_addon.record.schema import META
from affinity_addon.request.prompt import MARKER_KEYS, iter_segments, text_of


def _marker(value: Any, mark: Any = None) -> str:
    if mark is not None:  # Converse: a cachePoint block after this one
        ttl = mark.get("ttl", "5m") if isinstance(mark, dict) else ""
        return f"  <== cachePoint {ttl}".rstrip()
    if isinstance(value, dict):
        for k in MARKER_KEYS:
            if k in value:
                cc = value[k]
                ttl = cc.get("ttl", "5m") if isinstance(cc, dict) else ""
                return f"  <== {k} {ttl}".rstrip()
    return ""


def _point_after(path: str) -> str:
    """Where a cachePoint inserted right after the block at `path` sits."""
    owner, _, index = path.rpartition("[")
    return f"{owner}[{int(index[:-1]) + 1}]" if index[:-1].isdigit() else path


def _request_view(body: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    added_paths = {m["path"] for m in meta.get("added", {}).get("markers", [])}
    lines = ["", f"prompt segments ({meta.get('api')}), provider hash order:"]
    for seg in iter_segments(body, meta.get("api") or ""):
        size = len(text_of(seg.value)) or len(json.dumps(seg.value, ensure_ascii=False))
        mark = _marker(seg.value, seg.mark)
        if mark and (seg.path in added_paths or _point_after(seg.path) in added_paths):
            mark += " (added)"
        role = f" {seg.role}" if seg.role else ""
        lines.append(f"  {seg.path:<34} {seg.kind:<12}{role:<11} {size:>8} chars{mark}")
    if isinstance(body.get("cache_control"), dict):
        lines.append("  cache_control (top level, automatic)"
                     + (" (added)" if "cache_control" in added_paths else ""))
    return lines


def _summary(meta: dict[str, Any]) -> list[str]:
    added = meta.get("added", {})
    lines = [
        f"rule:      {', '.join(meta.get('rules', [])) or '-'}"
        + ("   (dry run: nothing was sent changed)" if meta.get("dry_run") else ""),
        f"affinity:  {meta.get('affinity_id') or '-'}  (from {meta.get('affinity_source') or '-'})",
    ]
    for name, value in added.get("headers", {}).items():
        lines.append(f"+ header   {name}: {value}")
    for path, value in added.get("fields", {}).items():
        lines.append(f"+ field    {path} = {json.dumps(value)}")
    for m in added.get("markers", []):
        lines.append(f"+ marker   {m['path']} (ttl {m['ttl']})")
    for r in added.get("removed", []):
        fate = f", its cache_control {r['cache_control']}" if r.get("cache_control") else ""
        lines.append(f"- block    {r['path']} ({r['block']}, ~{r['tokens']} tokens{fate})")
    for k in meta.get("kept", []):
        lines.append(f"= kept     {k} (client's value)")
    if meta.get("usage"):
        lines.append(f"usage:     {json.dumps(meta['usage'])}  hit ratio {meta.get('hit_ratio')}")
    if meta.get("miss_reason"):
        lines.append(f"verdict:   {meta['miss_reason']}  {meta.get('miss_detail') or ''}".rstrip())
    said = meta.get("provider_diagnosis")
    if isinstance(said, dict) and said.get("result"):
        fits = said.get("agrees")
        agrees = "agrees" if fits is True else "disagrees" if fits is False else "not weighed"
        lines.append(f"provider:  {said.get('source')} says {said['result']} (compared to "
                     f"{said.get('compared_to') or '-'}; ours {agrees})")
    return lines


def _sse_view(data: bytes) -> list[str]:
    lines = ["", "events:"]
    for block in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        event, payload = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", "replace")
            elif line.startswith(b"data:"):
                payload.append(line[5:].strip().decode("utf-8", "replace"))
        if event or payload:
            text = "\n".join(payload)
            lines.append(f"  [{event or 'message'}] {text[:300]}{'…' if len(text) > 300 else ''}")
    return lines


class AffinityContentview(contentviews.Contentview):
    name = "LLM cache (affinity)"
    syntax_highlight = "yaml"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        flow = metadata.flow
        meta = flow.metadata.get(META, {}) if flow is not None else {}
        lines = _summary(meta)
        is_request = flow is not None and metadata.http_message is getattr(flow, "request", None)
        if is_request:
            body = json.loads(data)
            if isinstance(body, dict):
                lines += _request_view(body, meta)
        elif metadata.content_type == "text/event-stream":
            lines += _sse_view(data)
        return "\n".join(lines) + "\n"

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        flow = metadata.flow
        if flow is None or META not in getattr(flow, "metadata", {}) or not data:
            return -1
        return 2  # above the built-in JSON view (1) for matched LLM flows


contentviews.add(AffinityContentview())
