"""A body's prompt as the planner sees it: its blocks in provider hash order (slots), their sizes,
and the cache_control markers the client already put on them.
"""

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from affinity_addon.request.breakpoint_spec import (
    NEVER_MARKED,
    ShapeRules,
    block_digest,
)
from affinity_addon.request.prompt import (
    MARKER_KEYS,
    Segment,
    canonical,
    iter_segments,
    text_of,
)
from affinity_addon.request.volatile import Volatile
from affinity_addon.tokens import estimate_tokens

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Where markers are and could be


@dataclass(slots=True, eq=False)  # not frozen: one per prompt block, a frozen init is slow
class Slot:
    index: int  # position in hash order (prompt.iter_segments)
    seg: Segment
    path: str  # where a marker goes (a string's path gains "[0]" once converted)
    eligible: bool
    convert: bool
    prefix_tokens: int  # estimated tokens up to and including this block
    volatile: bool = False  # rebuilt every turn (catalog/volatile.yaml): never a rolling spot
    digest: bytes = b""  # block_digest, only when planning with a hint


class _Marker(NamedTuple):
    position: int  # slot index; len(slots) for the top-level marker
    ttl: str


def _marker_ttl(value: Any) -> str:
    return "1h" if isinstance(value, dict) and value.get("ttl") == "1h" else "5m"


def _held(path: str, item: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(item, dict):
        for key in MARKER_KEYS:
            if item.get(key) is not None:
                yield path, item[key]


def _marked(item: Any) -> bool:
    # Two hash lookups in C: this runs for every block of every request.
    return isinstance(item, dict) and ("cache_control" in item or "prompt_cache_breakpoint" in item)


def marker_sites(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(holder path, marker value) of every marker; "" is the body itself (top level)."""
    yield from _held("", body)
    for section in ("tools", "system"):
        items = body.get(section)
        if isinstance(items, list):
            for i, item in enumerate(items):
                if _marked(item):
                    yield from _held(f"{section}[{i}]", item)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        if _marked(msg):  # OpenRouter also takes message-level markers
            yield from _held(f"messages[{i}]", msg)
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for j, block in enumerate(content):
            if _marked(block):
                yield from _held(f"messages[{i}].content[{j}]", block)
            inner = block.get("content") if isinstance(block, dict) else None
            if isinstance(inner, list):  # tool_result content blocks carry their own
                for k, part in enumerate(inner):
                    if _marked(part):
                        yield from _held(f"messages[{i}].content[{j}].content[{k}]", part)


def count_markers(body: dict[str, Any], shape: str) -> int:
    """Every marker in tools, system, messages (and tool results) and at the top level."""
    if not isinstance(body, dict):
        return 0
    return sum(1 for _ in marker_sites(body))


def _has_text(s: str) -> bool:
    """`bool(s.strip())` without copying the text: stops at its first non-space character
    (strip() copied every block of a 1 MB prompt, a third of the planner's walk)."""
    return bool(s) and not s.isspace()


def _eligible(seg: Segment, rules: ShapeRules) -> tuple[bool, bool]:
    """(may carry a marker, must be converted to a one-part list first)."""
    v = seg.value
    if isinstance(v, dict) and "cache_control" in v and v["cache_control"] is None:
        return False, False  # an explicit null: marking it would not be undoable exactly
    if seg.section == "tools":
        return rules.tool_markers and isinstance(v, dict) and not v.get("defer_loading"), False
    if isinstance(v, str):
        if seg.path.endswith("]"):
            return False, False  # a bare string inside a block list: no place for a marker
        kept = seg.section == "messages" and seg.role in rules.keep_string_roles
        ok = _has_text(v) and not kept
        return ok, ok
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        return False, False
    kind = v["type"]
    if kind in NEVER_MARKED or (rules.markable is not None and kind not in rules.markable):
        return False, False
    if kind == "text":
        text = v.get("text")
        return isinstance(text, str) and _has_text(text), False
    return True, False


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


class Prompt:
    """The body's blocks in hash order, with the markers already on them."""

    def __init__(self, body: dict[str, Any], shape: str, rules: ShapeRules,
                 sites: list[tuple[str, Any]], volatile: Volatile | None = None,
                 digests: bool = False) -> None:
        self.body = body
        self.slots: list[Slot] = []
        total = 0
        slots = self.slots
        for index, seg in enumerate(iter_segments(body, shape)):
            ok, convert = _eligible(seg, rules)
            v = seg.value
            canon = None
            if isinstance(v, str):
                # Measured as the one-part text block it may become (canonical() renders both
                # alike), so planning twice sees the same sizes; without building that block.
                size = 2 + len(v.encode("utf-8", "surrogatepass"))
                path = seg.path + "[0]"
                if digests:
                    canon = canonical(v)
            else:
                canon = canonical(v)
                size = len(canon)
                path = seg.path
            total += estimate_tokens(size)
            moving = (volatile is not None and seg.section == "messages"
                      and volatile.block(text_of(v)))
            slots.append(Slot(index, seg, path, ok, convert, total, moving,
                               block_digest(seg.role, canon) if canon is not None and digests
                               else b""))
        self.end = len(self.slots)
        eligible = [s for s in self.slots if s.eligible]
        self.last_eligible = eligible[-1] if eligible else None
        self.markers = self._markers(sites) if sites else []

    def _markers(self, sites: list[tuple[str, Any]]) -> list[_Marker]:
        where = {s.seg.path: s.index for s in self.slots}
        last_of: dict[int, int] = {}
        for s in self.slots:
            if s.seg.message_index is not None and s.seg.section == "messages":
                last_of[s.seg.message_index] = s.index
        messages = self.body.get("messages")
        last = 0
        for i in range(len(messages) if isinstance(messages, list) else 0):
            last = last_of.get(i, last)  # a message without blocks: its nearest earlier block
            where.setdefault(f"messages[{i}]", last)
        out = []
        for holder, value in sites:
            pos = self.end if holder == "" else _lookup(where, holder)
            out.append(_Marker(pos, _marker_ttl(value)))
        return out

    def messages_in(self, predicate: Callable[[Slot], bool]) -> list[Slot]:
        return [s for s in self.slots if s.seg.section == "messages" and predicate(s)]


def _lookup(where: dict[str, int], holder: str) -> int:
    path = holder
    while path:
        if path in where:
            return where[path]
        path = path.rpartition(".")[0]  # a tool_result's inner block sits at the tool_result
    return 0
