"""A body's prompt as the planner sees it: its blocks in provider hash order (slots), their sizes,
and the cache_control markers the client already put on them.
"""

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

from affinity_addon.apis import BEDROCK_CONVERSE
from affinity_addon.catalog.volatile import Volatile
from affinity_addon.request.breakpoint_spec import (
    NEVER_MARKED,
    ApiRules,
    block_digest,
)
from affinity_addon.request.prefix_memo import PrefixMemo, run_steps
from affinity_addon.request.prompt import (
    CACHE_POINT,
    MARKER_KEYS,
    MESSAGES_KEY,
    Segment,
    canonical,
    head_segments,
    is_cache_point,
    iter_segments,
    message_segments,
    text_of,
)
from affinity_addon.tokens import estimate_tokens

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Where markers are and could be


@dataclass(slots=True, eq=False)  # not frozen: one per prompt block, a frozen init is slow
class Slot:
    index: int  # position in hash order (prompt.iter_segments)
    # Where and what the block is; its `value` is left out (None): slots outlive their request
    # in the SlotMemo, and must not keep its body alive. `Prompt.value` looks it up.
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


def _point_sites(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Converse's `cachePoint` blocks, each held by the block before it in its list (the list's
    owner when it comes first: a path no slot has, so it counts at the prompt's start)."""
    config = body.get("toolConfig")
    # (list path, its items, who holds a point at its very start)
    lists: list[tuple[str, Any, str]] = [
        ("toolConfig.tools", config.get("tools") if isinstance(config, dict) else None,
         "toolConfig"),
        ("system", body.get("system"), "toolConfig")]
    messages = body.get("messages")
    if isinstance(messages, list):
        lists += [(f"messages[{i}].content", m.get("content"),
                   f"messages[{i - 1}]" if i else "system")
                  for i, m in enumerate(messages) if isinstance(m, dict)]
    for path, items, first in lists:
        if not isinstance(items, list):
            continue
        for j, item in enumerate(items):
            if is_cache_point(item):
                yield (f"{path}[{j - 1}]" if j else first), item[CACHE_POINT]


def marker_sites(body: dict[str, Any], key: str = "messages",
                 points: bool = False) -> Iterator[tuple[str, Any]]:
    """(holder path, marker value) of every marker; "" is the body itself (top level). `key`:
    where the API keeps its conversation (`messages`, Responses `input`); `points`: markers
    are Converse's `cachePoint` blocks."""
    if points:
        yield from _point_sites(body)
        return
    yield from _held("", body)
    for section in ("tools", "system"):
        items = body.get(section)
        if isinstance(items, list):
            for i, item in enumerate(items):
                if _marked(item):
                    yield from _held(f"{section}[{i}]", item)
    messages = body.get(key)
    if not isinstance(messages, list):
        return
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        if _marked(msg):  # OpenRouter also takes message-level markers
            yield from _held(f"{key}[{i}]", msg)
        content = msg.get("content")
        if not isinstance(content, list):
            content = msg.get("output")  # a Responses tool output's parts
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                if _marked(part):
                    yield from _held(f"{key}[{i}].output[{j}]", part)
            continue
        for j, block in enumerate(content):
            if _marked(block):
                yield from _held(f"{key}[{i}].content[{j}]", block)
            inner = block.get("content") if isinstance(block, dict) else None
            if isinstance(inner, list):  # tool_result content blocks carry their own
                for k, part in enumerate(inner):
                    if _marked(part):
                        yield from _held(f"{key}[{i}].content[{j}].content[{k}]", part)


def count_markers(body: dict[str, Any], api: str) -> int:
    """Every marker in tools, system, messages (and tool results) and at the top level."""
    if not isinstance(body, dict):
        return 0
    return sum(1 for _ in marker_sites(body, MESSAGES_KEY.get(api, "messages"),
                                       points=api == BEDROCK_CONVERSE))


def _has_text(s: str) -> bool:
    """`bool(s.strip())` without copying the text: stops at its first non-space character
    (strip() copied every block of a 1 MB prompt, a third of the planner's walk)."""
    return bool(s) and not s.isspace()


def _eligible(seg: Segment, rules: ApiRules) -> tuple[bool, bool]:
    """(may carry a marker, must be converted to a one-part list first)."""
    v = seg.value
    if isinstance(v, dict) and "cache_control" in v and v["cache_control"] is None:
        return False, False  # an explicit null: marking it would not be undoable exactly
    if rules.point_blocks:  # Converse: the walker named each block by its one key
        if not isinstance(v, dict) or seg.kind in NEVER_MARKED:
            return False, False
        if seg.section == "tools":
            return rules.tool_markers and "toolSpec" in v, False
        if seg.kind == "text":
            text = v.get("text")
            return isinstance(text, str) and _has_text(text), False
        return True, False
    if seg.section == "tools":
        return rules.tool_markers and isinstance(v, dict) and not v.get("defer_loading"), False
    if rules.roles is not None and seg.message_index is not None and seg.role not in rules.roles:
        return False, False  # a role whose parts take no marker (or an item without a role)
    if isinstance(v, str):
        if seg.path != "system" and not seg.path.endswith(".content"):
            # A bare string inside a block list, Responses `instructions` or a string `input`:
            # no part to put a marker on.
            return False, False
        kept = seg.message_index is not None and seg.role in rules.keep_string_roles
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


def text_part(text: str, kind: str = "text") -> dict[str, Any]:
    return {"type": kind, "text": text}


class Prompt:
    """The body's blocks in hash order, with the markers already on them.

    With a `memo`, the slots of the messages an earlier request of the conversation had too
    are taken from its checkpoint (the same blocks measure the same), and only the rest is
    walked: the result is the same slots either way."""

    def __init__(self, body: dict[str, Any], api: str, rules: ApiRules,
                 sites: list[tuple[str, Any]], volatile: Volatile | None = None,
                 digests: bool = False, memo: "SlotMemo | None" = None) -> None:
        self.body = body
        slots: list[Slot] = []
        total = 0
        start = 0
        section = MESSAGES_KEY.get(api)
        self.key = section or "messages"  # where the conversation is
        msgs = body.get(section) if section else None
        self.messages: list[Any] | None = msgs if isinstance(msgs, list) else None
        keys = None
        if memo is not None and isinstance(msgs, list):
            keys = run_steps(memo.chain(body, msgs, (api, rules, volatile, digests)))
        if keys is not None:
            found = memo.resume(keys) if memo is not None else None
            if found is not None:
                start, cp = found
                slots = list(cp.slots[:cp.n])
                total = cp.total
        cuts: list[tuple[int, int, int]] = []  # (message count, slots, total) to keep
        cut_from = max(1, len(keys) - CHECKPOINTS) if keys is not None else 1 << 62
        assert section is not None or start == 0
        segments: Iterable[Segment] = (
            chain(head_segments(body, api) if start == 0 else (),
                  self._messages(section, api, msgs, start, cuts, cut_from, slots,
                                 lambda: total))
            if isinstance(msgs, list) and section is not None else iter_segments(body, api))
        for seg in segments:
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
            moving = (volatile is not None and seg.section == self.key
                      and volatile.block(text_of(v)))
            slots.append(Slot(len(slots), Segment(seg.path, seg.section, seg.kind, seg.role,
                                                  seg.message_index, None),
                              path, ok, convert, total, moving,
                              block_digest(seg.role, canon) if canon is not None and digests
                              else b""))
        self.slots: list[Slot] = slots
        if keys is not None and memo is not None:
            kept = tuple(slots)
            if isinstance(msgs, list) and len(keys) - 1 == len(msgs):
                cuts.append((len(msgs), len(slots), total))
            for m, n, t in cuts:
                memo.keep(keys[m], _Checkpoint(kept, n, t))
        self.end = len(self.slots)
        eligible = [s for s in self.slots if s.eligible]
        self.last_eligible = eligible[-1] if eligible else None
        self.markers = self._markers(sites) if sites else []

    def _messages(self, section: str, api: str, msgs: list[Any], start: int,
                  cuts: list[tuple[int, int, int]], cut_from: int, slots: list[Slot],
                  total: Callable[[], int]) -> Iterator[Segment]:
        """The segments of messages `start`... and the checkpoints before the last few: the
        slots and tokens so far, read when the walk reaches each message."""
        for i in range(start, len(msgs)):
            if i >= cut_from:
                cuts.append((i, len(slots), total()))
            msg = msgs[i]
            if isinstance(msg, dict):
                yield from message_segments(section, i, msg, api)

    def _markers(self, sites: list[tuple[str, Any]]) -> list[_Marker]:
        where = {s.seg.path: s.index for s in self.slots}
        last_of: dict[int, int] = {}
        for s in self.slots:
            if s.seg.message_index is not None and s.seg.section == self.key:
                last_of[s.seg.message_index] = s.index
        last = 0
        for i in range(len(self.messages) if self.messages is not None else 0):
            last = last_of.get(i, last)  # a message without blocks: its nearest earlier block
            where.setdefault(f"{self.key}[{i}]", last)
        out = []
        for holder, value in sites:
            pos = self.end if holder == "" else _lookup(where, holder)
            out.append(_Marker(pos, _marker_ttl(value)))
        return out

    def messages_in(self, predicate: Callable[[Slot], bool]) -> list[Slot]:
        return [s for s in self.slots if s.seg.section == self.key and predicate(s)]


def _lookup(where: dict[str, int], holder: str) -> int:
    path = holder
    while path:
        if path in where:
            return where[path]
        path = path.rpartition(".")[0]  # a tool_result's inner block sits at the tool_result
    return 0


# ---------------------------------------------------------------------------------------------
# The next request of a conversation: measure only what it added

CHECKPOINTS = 3  # kept per prompt: after all its messages, before the last and the one before


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    slots: tuple[Slot, ...]  # a prompt's slots, shared by its checkpoints
    n: int  # how many of them the checkpoint covers
    total: int  # estimated tokens up to there


class SlotMemo(PrefixMemo[_Checkpoint]):
    """Checkpoints of recent prompts' slots (prefix_memo): a conversation's next request
    resumes from the latest one its own chain passes through. Slots keep paths, sizes and
    digests, never text; the walk the chain saves canonicalises, measures and classifies every
    block (~2 ms a MB). ~300 bytes a slot: at most ~18 MB, counted per entry (a prompt's three
    checkpoints share one tuple), ~8 MB measured at the bound."""

    def __init__(self, max_entries: int = 1024, max_slots: int = 60_000) -> None:
        super().__init__(max_entries, max_slots, lambda cp: cp.n)

    @property
    def slots(self) -> int:
        return self.held


_PATH_TOKEN = re.compile(r"([A-Za-z_]+)|\[(\d+)\]")


def resolve(body: Any, path: str) -> Any:
    """The value at a slot path ("messages[3].content[1]", "system", "tools[2]")."""
    value = body
    for name, i in _PATH_TOKEN.findall(path):
        value = value[int(i)] if i else value[name]
    return value
