"""Bodies and marker walks for the breakpoint planner's tests, written independently of the
module under test."""

import re
from typing import Any

from affinity_addon.request.breakpoint_spec import (
    AddedMarker,
    CacheControlSpec,
    parse_cache_control,
)
from affinity_addon.request.breakpoints import plan_breakpoints
from affinity_addon.request.prompt import iter_segments

CC = {"type": "ephemeral"}
CC1H = {"type": "ephemeral", "ttl": "1h"}
AGENT = parse_cache_control(True)
FILL = parse_cache_control({"client_markers": "fill"})
BIG = "lorem ipsum dolor sit amet " * 400  # ~2,700 tokens by the estimate
MODEL = "claude-sonnet-4-5"


def walk_markers(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(holder path, marker) in hash order; message-level after its blocks, top level last."""
    out: list[tuple[str, Any]] = []
    for section in ("tools", "system"):
        items = body.get(section)
        if isinstance(items, list):
            out += [(f"{section}[{i}]", it["cache_control"]) for i, it in enumerate(items)
                    if isinstance(it, dict) and "cache_control" in it]
    for i, msg in enumerate(body.get("messages") or []):
        content = msg.get("content")
        if isinstance(content, list):
            for j, block in enumerate(content):
                if isinstance(block, dict) and "cache_control" in block:
                    out.append((f"messages[{i}].content[{j}]", block["cache_control"]))
                inner = block.get("content") if isinstance(block, dict) else None
                if isinstance(inner, list):
                    out += [(f"messages[{i}].content[{j}].content[{k}]", p["cache_control"])
                            for k, p in enumerate(inner)
                            if isinstance(p, dict) and "cache_control" in p]
        if "cache_control" in msg:
            out.append((f"messages[{i}]", msg["cache_control"]))
    if "cache_control" in body:
        out.append(("cache_control", body["cache_control"]))
    return out


def ttl_order_ok(body: dict[str, Any]) -> bool:
    ttls = "".join("L" if v.get("ttl") == "1h" else "S" for _, v in walk_markers(body))
    return re.fullmatch("L*S*", ttls) is not None


def resolve(body: dict[str, Any], path: str) -> Any:
    obj: Any = body
    for name, idx in re.findall(r"([A-Za-z_]+)|\[(\d+)\]", path):
        obj = obj[int(idx)] if idx else obj[name]
    return obj


def positions(body: dict[str, Any], api: str) -> list[int]:
    """Segment indices of the block markers in a body."""
    paths = {p for p, _ in walk_markers(body)}
    return [i for i, seg in enumerate(iter_segments(body, api)) if seg.path in paths]


def tools(n: int, size: int = 400) -> list[dict[str, Any]]:
    return [{"name": f"tool{i}", "description": "d" * size,
             "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}}}
            for i in range(n)]


def text(t: str, cc: dict[str, str] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": t}
    if cc is not None:
        block["cache_control"] = dict(cc)
    return block


def plan(body: dict[str, Any], spec: CacheControlSpec = AGENT, api: str = "anthropic",
         model: str | None = MODEL) -> list[AddedMarker]:
    return plan_breakpoints(body, api, model, spec)


def tool_round(k: int, n: int) -> list[dict[str, Any]]:
    """An assistant turn with n parallel tool calls and the user turn with their results."""
    return [
        {"role": "assistant", "content": [{"type": "tool_use", "id": f"tu{k}_{j}", "name": "tool0",
                                           "input": {"x": j}} for j in range(n)]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"tu{k}_{j}",
                                      "content": f"result {k}.{j} " * 20} for j in range(n)]},
    ]
