"""Plans `cache_control` breakpoints for Anthropic Messages and OpenRouter-style chat bodies.

Providers with explicit caching (Anthropic, and Anthropic/Gemini/Qwen behind OpenRouter) only
cache up to a marked block, so an agent that sends no markers pays full price on every turn.
The planner adds markers without breaking what already works:

- at most 4 markers in a request, counting the client's own, which are never moved or removed
  (moving a breakpoint turn to turn is the classic way to lose every hit);
- deterministic positions, so turn N+1 reads what turn N wrote: the rolling marker goes on the
  newest block that is likely to stay, and when the new turn appended more than `lookback`
  blocks, a second one goes exactly where the previous turn's rolling marker was (the end of the
  messages before the last assistant reply, which the previous request did not have yet);
- real agents are not append-only: blocks they rebuild every turn (OpenClaw's trailing internal
  context, Qwen Code's date reminder; catalog/volatile.yaml) never carry the rolling marker, and
  with a `PlanHint` (the previous request of the conversation, from the tracker) a marker goes on
  the last block that stayed identical, so the next request reads what this one wrote;
- 1h markers before 5m ones; no marker on thinking blocks or empty text; no marker whose prefix
  is below the model's minimum cacheable length (it would cache nothing and use a slot);
- idempotent, and `strip_added` undoes a plan exactly (dry runs, reports).
"""

import fnmatch
import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cache, partial
from itertools import pairwise
from typing import Any, NamedTuple

import yaml

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.providers import PROVIDER_FACTS
from affinity_addon.models import normalize_model
from affinity_addon.request.prompt import (
    MARKER_KEYS,
    SYSTEM_ROLES,
    Segment,
    canonical,
    iter_segments,
    text_of,
)
from affinity_addon.request.volatile import Volatile, default_volatile
from affinity_addon.shapes import ANTHROPIC, OPENAI_CHAT
from affinity_addon.tokens import estimate_tokens

logger = logging.getLogger(__name__)

MAX_MARKERS = 4
# Blocks a breakpoint looks back for an earlier cache entry (catalog/providers.yaml).
DEFAULT_LOOKBACK = PROVIDER_FACTS.lookback_blocks.get(ANTHROPIC, 20)
DEFAULT_MIN_TOKENS = 1024

AGENT = "agent"
EXPLICIT = "explicit"
SKIP = "skip"
FILL = "fill"
TTLS = ("5m", "1h")
AUTO_TTL = "auto"  # per conversation, from its rhythm (ttl_policy.py), via the tracker's hint
PLACEMENT_KINDS = ("tools", "system", "last_user", "last_n", "auto")
TOP_LEVEL = "cache_control"  # path of Anthropic's automatic (top-level) marker

MINIMUMS_FILE = catalog_file("cache_minimums.yaml")

# Models that honour only the last breakpoint of a request (OpenRouter's Gemini route), matched
# against normalized names: one marker is all they can use.
LAST_MARKER_ONLY_MODELS = PROVIDER_FACTS.last_marker_only_models
ONE_HOUR_TTL_MODELS = PROVIDER_FACTS.one_hour_ttl_models

_NEVER_MARKED = frozenset({"thinking", "redacted_thinking"})


class _ShapeRules(NamedTuple):
    tool_markers: bool  # may a tools[] entry carry a marker
    markable: frozenset[str] | None  # block types that may carry one; None: all but _NEVER_MARKED
    keep_string_roles: frozenset[str]  # roles whose string content must stay a string


_SHAPES: dict[str, _ShapeRules] = {
    # Mid-conversation `role: system` messages (Claude Code) are a beta: leave their form alone.
    ANTHROPIC: _ShapeRules(True, None, frozenset({"system"})),
    # OpenRouter takes markers on text parts only. A string tool result becomes a one-part
    # text list like any other message (the chat format allows text parts on `role: tool`, and
    # OpenRouter carries them into Anthropic tool_result blocks): in an agent's tool loop the
    # newest messages are tool results, and the rolling marker must be able to follow them.
    OPENAI_CHAT: _ShapeRules(False, frozenset({"text"}), frozenset()),
}


# ---------------------------------------------------------------------------------------------
# Spec


DIGEST_SIZE = 8  # the block digest of diagnosis/fingerprint.py: role, NUL, canonical bytes
_ANY = bytes(DIGEST_SIZE)  # a block the fingerprint left out as volatile: matches anything


def block_digest(role: str | None, canon: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    h.update((role or "").encode())
    h.update(b"\0")
    h.update(canon)
    return h.digest()


@dataclass(frozen=True, slots=True)
class PlanHint:
    """What the tracker knows of this conversation: for each recent request of it (one per
    thread: main conversation, side requests), its blocks' digests in prompt order, concatenated
    (DIGEST_SIZE bytes each). Plain bytes, so the planner stays a pure function of its input."""

    previous: tuple[bytes, ...] = ()
    ttl: str | None = None  # for `ttl: auto`: what the conversation's rhythm calls for


class Placement(NamedTuple):
    kind: str  # one of PLACEMENT_KINDS
    count: int = 1  # type: ignore[assignment]  # K for last_n (shadows tuple.count)


@dataclass(frozen=True, slots=True)
class CacheControlSpec:
    strategy: str = AGENT
    placements: tuple[Placement, ...] = ()
    ttl: str = "5m"
    client_markers: str = SKIP  # skip: leave requests with client markers alone; fill: free slots
    lookback: int = DEFAULT_LOOKBACK
    min_tokens: int | None = None  # None: by model, from catalog/cache_minimums.yaml
    last_marker_only: bool | None = None  # None: by model (LAST_MARKER_ONLY_MODELS)


@dataclass(frozen=True, slots=True)
class AddedMarker:
    path: str  # "tools[3]", "system[1]", "messages[5].content[0]" or "cache_control" (top level)
    ttl: str  # "5m" | "1h"
    converted: bool = False  # string content was turned into a one-part list to carry it


_SPEC_KEYS = ("strategy", "placements", "ttl", "client_markers", "lookback", "min_tokens",
              "last_marker_only")


def parse_cache_control(value: Any) -> CacheControlSpec:
    """Parses a rule's `cache_control:` value: true, "agent", "auto" or a mapping."""
    if value is True or value == AGENT:
        return CacheControlSpec()
    if value == "auto":
        return CacheControlSpec(strategy=EXPLICIT, placements=(Placement("auto"),))
    if value is False or value is None:
        raise ValueError("false/empty means no breakpoints: leave the key out instead")
    if not isinstance(value, dict):
        raise ValueError(f"expected true, \"auto\" or a mapping, got {value!r}")
    unknown = sorted(str(k) for k in value if k not in _SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; expected {', '.join(_SPEC_KEYS)}")

    placements = _parse_placements(value.get("placements"))
    strategy = value.get("strategy", EXPLICIT if placements else AGENT)
    if strategy not in (AGENT, EXPLICIT):
        raise ValueError(f"strategy must be agent or explicit, got {strategy!r}")
    if strategy == EXPLICIT and not placements:
        raise ValueError("strategy explicit needs a non-empty placements list")
    if strategy == AGENT and placements:
        raise ValueError("placements only apply to strategy: explicit")

    ttl = value.get("ttl", "5m")
    if ttl not in (*TTLS, AUTO_TTL):
        raise ValueError(f"ttl must be 5m, 1h or auto, got {ttl!r}")
    client = value.get("client_markers", SKIP)
    if client not in (SKIP, FILL):
        raise ValueError(f"client_markers must be skip or fill, got {client!r}")
    lookback = value.get("lookback", DEFAULT_LOOKBACK)
    if not _is_int(lookback) or lookback < 1:
        raise ValueError(f"lookback must be a positive integer, got {lookback!r}")
    min_tokens = value.get("min_tokens", "auto")
    if min_tokens == "auto":
        min_tokens = None
    elif not _is_int(min_tokens) or min_tokens < 0:
        raise ValueError(f"min_tokens must be auto or a non-negative integer, got {min_tokens!r}")
    last_only = value.get("last_marker_only")
    if last_only is not None and not isinstance(last_only, bool):
        raise ValueError(f"last_marker_only must be true or false, got {last_only!r}")
    return CacheControlSpec(strategy, placements, ttl, client, lookback, min_tokens, last_only)


def _parse_placements(raw: Any) -> tuple[Placement, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"placements must be a list, got {raw!r}")
    out: list[Placement] = []
    for item in raw:
        if isinstance(item, str) and item in PLACEMENT_KINDS and item != "last_n":
            out.append(Placement(item))
        elif isinstance(item, dict) and set(item) == {"last_n"}:
            k = item["last_n"]
            if not _is_int(k) or not 1 <= k <= MAX_MARKERS:
                raise ValueError(f"last_n must be an integer from 1 to {MAX_MARKERS}, got {k!r}")
            out.append(Placement("last_n", k))
        else:
            raise ValueError(f"unknown placement {item!r}; expected tools, system, last_user, "
                             "auto or {last_n: K}")
    return tuple(out)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# Model minimums


def parse_minimums(data: Any) -> tuple[tuple[str, int], ...]:
    """Validates the cache_minimums table: a mapping of model glob to token count."""
    if not isinstance(data, dict) or not data:
        raise ValueError("cache minimums must be a non-empty mapping of model glob to tokens")
    table: list[tuple[str, int]] = []
    for glob, tokens in data.items():
        if not isinstance(glob, str) or not _is_int(tokens) or tokens < 0:
            raise ValueError(f"bad cache minimum entry {glob!r}: {tokens!r}")
        table.append((glob.lower(), tokens))
    return tuple(table)


@cache
def _minimums() -> tuple[tuple[str, int], ...]:
    return parse_minimums(yaml.safe_load(MINIMUMS_FILE.read_text(encoding="utf-8")))


def min_tokens_for(model: str | None) -> int:
    """The model's minimum cacheable prefix, from catalog/cache_minimums.yaml (first glob wins)."""
    name = normalize_model(model) if isinstance(model, str) else ""
    for glob, tokens in _minimums():
        if fnmatch.fnmatchcase(name, glob):
            return tokens
    return DEFAULT_MIN_TOKENS


def auto_ttl(model: str | None, hint: PlanHint | None) -> str:
    """`ttl: auto`: 1h where the conversation's rhythm calls for it and the model takes it."""
    if hint is None or hint.ttl != "1h":
        return "5m"
    name = normalize_model(model) if isinstance(model, str) else ""
    return "1h" if any(fnmatch.fnmatchcase(name, g) for g in ONE_HOUR_TTL_MODELS) else "5m"


def _last_marker_only(model: str | None) -> bool:
    name = normalize_model(model) if isinstance(model, str) else ""
    return any(fnmatch.fnmatchcase(name, g) for g in LAST_MARKER_ONLY_MODELS)


# ---------------------------------------------------------------------------------------------
# Where markers are and could be


@dataclass(slots=True, eq=False)  # not frozen: one per prompt block, a frozen init is slow
class _Slot:
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


def _marker_sites(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
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
    return sum(1 for _ in _marker_sites(body))


def _eligible(seg: Segment, rules: _ShapeRules) -> tuple[bool, bool]:
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
        ok = bool(v.strip()) and not kept
        return ok, ok
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        return False, False
    kind = v["type"]
    if kind in _NEVER_MARKED or (rules.markable is not None and kind not in rules.markable):
        return False, False
    if kind == "text":
        text = v.get("text")
        return isinstance(text, str) and bool(text.strip()), False
    return True, False


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


class _Prompt:
    """The body's blocks in hash order, with the markers already on them."""

    def __init__(self, body: dict[str, Any], shape: str, rules: _ShapeRules,
                 sites: list[tuple[str, Any]], volatile: Volatile | None = None,
                 digests: bool = False) -> None:
        self.body = body
        self.slots: list[_Slot] = []
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
            slots.append(_Slot(index, seg, path, ok, convert, total, moving,
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

    def messages_in(self, predicate: Callable[[_Slot], bool]) -> list[_Slot]:
        return [s for s in self.slots if s.seg.section == "messages" and predicate(s)]


def _lookup(where: dict[str, int], holder: str) -> int:
    path = holder
    while path:
        if path in where:
            return where[path]
        path = path.rpartition(".")[0]  # a tool_result's inner block sits at the tool_result
    return 0


# ---------------------------------------------------------------------------------------------
# Planning


def _eligible_in(message_index: int, s: _Slot) -> bool:
    return s.eligible and s.seg.message_index == message_index


class _Planner:
    def __init__(self, prompt: _Prompt, spec: CacheControlSpec, minimum: int, free: int,
                 last_only: bool, hint: PlanHint | None = None) -> None:
        self.p = prompt
        self.hint = hint
        self.spec = spec
        self.minimum = minimum
        self.free = free
        self.last_only = last_only
        self.chosen: dict[int, tuple[_Slot | None, str]] = {}  # position -> (slot|None=top, ttl)
        self.taken = {m.position for m in prompt.markers}
        self.top_taken = prompt.end in self.taken
        if self.top_taken and prompt.last_eligible:
            self.taken.add(prompt.last_eligible.index)  # the automatic marker lands there
        fixed = prompt.markers
        # 1h markers must precede 5m ones: where may a new marker go, and with which TTL.
        self.last_1h = max((m.position for m in fixed if m.ttl == "1h"), default=-1)
        self.first_5m = min((m.position for m in fixed if m.ttl == "5m"), default=prompt.end + 1)
        self.last_fixed = max((m.position for m in fixed), default=-1)

    def _ttl(self, position: int) -> str | None:
        before_1h = position < self.last_1h
        after_5m = position > self.first_5m
        if before_1h and after_5m:
            return None  # the client's own markers already break the order
        return "1h" if before_1h else "5m" if after_5m else self.spec.ttl

    def offer(self, slot: _Slot | None, top: bool = False) -> bool:
        if len(self.chosen) >= self.free:
            return False
        if top:
            anchor = self.p.last_eligible
            if (self.top_taken or TOP_LEVEL in self.p.body or anchor is None
                    or anchor.index in self.taken):
                return False
            position, tokens = self.p.end, anchor.prefix_tokens
        else:
            if slot is None or not slot.eligible or slot.index in self.taken:
                return False
            position, tokens = slot.index, slot.prefix_tokens
        if tokens < self.minimum or (self.last_only and position <= self.last_fixed):
            return False
        ttl = self._ttl(position)
        if ttl is None:
            return False
        self.chosen[position] = (None if top else slot, ttl)
        self.taken.add(position)
        if top:
            assert anchor is not None  # a top-level marker is offered with its anchor block
            self.top_taken = True
            self.taken.add(anchor.index)
        return True

    # -- targets ----------------------------------------------------------------------------

    def last_in_messages(self) -> _Slot | None:
        found = self.p.messages_in(lambda s: s.eligible)
        return found[-1] if found else None

    def history(self) -> tuple[int, int, bool] | None:
        """Against the best-matching previous request of this conversation: (blocks that stayed
        identical, blocks that request had, did its last block move to our end)."""
        if self.hint is None or not self.hint.previous:
            return None
        best: tuple[int, int, bool] | None = None
        cur = self.p.slots
        for prev in self.hint.previous:
            count = len(prev) // DIGEST_SIZE
            n = 0
            while n < min(count, len(cur)):
                d = prev[n * DIGEST_SIZE:(n + 1) * DIGEST_SIZE]
                if d != cur[n].digest and d != _ANY:
                    break
                n += 1
            last = prev[(count - 1) * DIGEST_SIZE:count * DIGEST_SIZE] if count else b""
            moved = 0 < n < count and bool(cur) and cur[-1].digest == last and len(cur) > count
            if best is None or n > best[0]:
                best = (n, count, moved)
        return best

    def newest_stable(self, moved_trailer: bool) -> _Slot | None:
        """The newest block likely to be in the next request at the same place: not a known
        volatile block, nor a trailer the previous request also had at its end."""
        end = self.p.end - 1 if moved_trailer else self.p.end
        found = self.p.messages_in(lambda s: s.eligible and not s.volatile and s.index < end)
        return found[-1] if found else None

    def before_volatile(self) -> _Slot | None:
        """Turn 1: the last block before the first volatile one, which the next turn may move."""
        first = next((s.index for s in self.p.slots if s.volatile), None)
        if first is None:
            return None
        found = [s for s in self.p.slots[:first] if s.eligible]
        return found[-1] if found else None

    def last_identical(self, common: int) -> _Slot | None:
        found = [s for s in self.p.slots[:common] if s.eligible]
        return found[-1] if found else None

    def stable_read(self, seen: tuple[int, int, bool] | None, rolling: _Slot | None) -> _Slot | None:
        """Where this request reads what the previous one wrote when that is not simply the
        newest block: the last block that stayed identical since (with history), or on turn 1
        the last block before one that the next turn may move."""
        if self.last_only or rolling is None:
            return None  # only one marker counts: it must be the newest, or nothing new is cached
        if seen is None:
            stable = self.before_volatile()
            return stable if stable and stable.index < rolling.index else None
        common, count, _ = seen
        stable = self.last_identical(common)
        if stable and (common < count or rolling.index - stable.index > self.spec.lookback):
            return stable
        return None

    def previous_tail(self) -> _Slot | None:
        """Where the previous request's rolling marker was: the end of the messages before the
        last assistant reply (that reply is the previous request's answer)."""
        messages = self.p.body.get("messages")
        if not isinstance(messages, list):
            return None
        replies = [i for i, m in enumerate(messages[:-1])
                   if isinstance(m, dict) and m.get("role") == "assistant"]
        if not replies:
            return None
        last_reply = replies[-1]
        found = self.p.messages_in(
            lambda s: s.eligible and s.seg.message_index is not None
            and s.seg.message_index < last_reply)
        return found[-1] if found else None

    def system_end(self) -> _Slot | None:
        if any(s.seg.section == "system" for s in self.p.slots):
            found = [s for s in self.p.slots if s.seg.section == "system" and s.eligible]
            return found[-1] if found else None
        # Chat bodies: the leading system/developer messages are the system prompt. Count them
        # first, then one pass over the slots (was one pass per leading message: 8,000 system
        # messages took 3 s, issue 13).
        messages = self.p.body.get("messages")
        leading = 0
        for msg in messages if isinstance(messages, list) else []:
            role = msg.get("role") if isinstance(msg, dict) else None
            if not isinstance(role, str) or role not in SYSTEM_ROLES:
                break
            leading += 1
        found = self.p.messages_in(
            lambda s: s.eligible and s.seg.message_index is not None
            and s.seg.message_index < leading)
        return found[-1] if found else None

    def last_tool(self) -> _Slot | None:
        found = [s for s in self.p.slots if s.seg.section == "tools" and s.eligible]
        return found[-1] if found else None

    def last_user(self) -> _Slot | None:
        users = self.p.messages_in(lambda s: s.seg.role == "user")
        if not users:
            return None
        end = users[-1].index
        found = self.p.messages_in(lambda s: s.eligible and s.index <= end)
        return found[-1] if found else None

    def last_n(self, k: int) -> list[_Slot]:
        """The last eligible block of each of the last k messages, newest first."""
        messages = self.p.body.get("messages")
        n = len(messages) if isinstance(messages, list) else 0
        out = []
        for i in range(n - 1, max(n - k, 0) - 1, -1):
            found = self.p.messages_in(partial(_eligible_in, i))
            if found:
                out.append(found[-1])
        return out

    # -- strategies -------------------------------------------------------------------------

    def agent(self) -> None:
        # Priority when slots are short: the read (the last block that stayed identical since
        # the previous request, when that request's rolling marker is no longer at our end of
        # the shared prefix), the rolling marker (next turn reads it), the previous turn's one
        # when the new turn is too long to reach it, then the stable system and tool prefixes
        # (they survive conversation edits), then lookback bridges.
        seen = self.history()
        rolling = self.newest_stable(seen is not None and seen[2]) or self.last_in_messages()
        self.offer(self.stable_read(seen, rolling))
        self.offer(rolling)
        tail = self.previous_tail()
        if seen is None and rolling and tail and rolling.index - tail.index > self.spec.lookback:
            self.offer(tail)
        self.offer(self.system_end())
        self.offer(self.last_tool())
        if not self.last_only:
            self.bridge_gaps()

    def bridge_gaps(self) -> None:
        """Spends free slots on intermediates where markers are more than `lookback` apart.

        An intermediate sits at the last eligible block at or before a multiple of `lookback`:
        a fixed grid keeps it in place while the conversation grows, so it is read back next turn.
        """
        step = self.spec.lookback
        while len(self.chosen) < self.free:
            marks = sorted(p for p in self.taken if p < self.p.end)
            gaps = [(a, b) for a, b in pairwise(marks) if b - a > step]
            for a, b in reversed(gaps):
                grid = (b - 1) // step * step
                inside = [s for s in self.p.slots[a + 1:grid + 1] if s.eligible]
                if any(self.offer(s) for s in reversed(inside)):
                    break
            else:
                return

    def explicit(self) -> None:
        offers: list[tuple[_Slot | None, bool]] = []
        for placement in self.spec.placements:
            if placement.kind == "tools":
                offers.append((self.last_tool(), False))
            elif placement.kind == "system":
                offers.append((self.system_end(), False))
            elif placement.kind == "last_user":
                offers.append((self.last_user(), False))
            elif placement.kind == "last_n":
                offers += [(s, False) for s in self.last_n(placement.count)]
            elif placement.kind == "auto":
                offers.append((None, True))
        if self.last_only:  # only the latest marker counts: offer the latest first
            offers.sort(key=lambda o: self.p.end if o[1] else o[0].index if o[0] else -1,
                        reverse=True)
        for slot, top in offers:
            self.offer(slot, top)


# Planning costs ~10 us per prompt block on the event loop. A body may hold this many blocks
# (~10 ms), or one per 384 bytes if that is more (~25 ms per MB): agent sessions' blocks average
# well above that, while a body of 50,000 tiny messages took a second before (issue 13). Over
# it, no markers are added (the request goes on with a warning).
MAX_PLAN_BLOCKS = 1024
BYTES_PER_BLOCK = 384


def block_count(body: dict[str, Any], shape: str) -> int:
    """How many blocks the planner would measure, counted without building them (~0.1 us each)."""
    n = 0
    for key in ("tools", "system"):
        v = body.get(key)
        n += len(v) if isinstance(v, list) else 1
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else None
            n += len(c) if isinstance(c, list) else 1
    return n


def plan_limit(body_size: int) -> int:
    return max(MAX_PLAN_BLOCKS, body_size // BYTES_PER_BLOCK)


def plan_breakpoints(body: dict[str, Any], shape: str, model: str | None,
                     spec: CacheControlSpec, hint: PlanHint | None = None,
                     volatile: Volatile | None = None) -> list[AddedMarker]:
    """Adds cache_control markers to `body` in place; returns what was added, in prompt order.

    `hint`: the previous requests of this conversation (tracker), for the agent strategy."""
    rules = _SHAPES.get(shape)
    if rules is None or not isinstance(body, dict):
        return []
    found = _marker_sites(body)
    first = next(found, None)
    if spec.client_markers == SKIP and first is not None:
        return []  # before measuring the prompt: most agent traffic stops here
    sites = [] if first is None else [first, *found]
    agent = spec.strategy == AGENT
    with_hint = agent and hint is not None and bool(hint.previous)
    prompt = _Prompt(body, shape, rules, sites,
                     (volatile or default_volatile()) if agent else None, digests=with_hint)
    free = MAX_MARKERS - len(prompt.markers)
    last_only = spec.last_marker_only if spec.last_marker_only is not None \
        else _last_marker_only(model)
    if last_only:
        free = min(free, 1)
    if free <= 0:
        return []
    if spec.ttl == AUTO_TTL:
        spec = replace(spec, ttl=auto_ttl(model, hint))
    minimum = spec.min_tokens if spec.min_tokens is not None else min_tokens_for(model)
    planner = _Planner(prompt, spec, minimum, free, last_only, hint if with_hint else None)
    if spec.strategy == AGENT:
        planner.agent()
    else:
        planner.explicit()
    added = [_apply(body, slot, ttl) for _, (slot, ttl) in sorted(planner.chosen.items())]
    if added:
        logger.debug("planned %d breakpoint(s): %s", len(added),
                     ", ".join(f"{m.path}/{m.ttl}" for m in added))
    return added


def _marker(ttl: str) -> dict[str, str]:
    # 5m is the default everywhere; some OpenAI-compatible routes reject an explicit ttl.
    return {"type": "ephemeral", "ttl": "1h"} if ttl == "1h" else {"type": "ephemeral"}


def _apply(body: dict[str, Any], slot: _Slot | None, ttl: str) -> AddedMarker:
    if slot is None:
        body[TOP_LEVEL] = _marker(ttl)
        return AddedMarker(TOP_LEVEL, ttl)
    if not slot.convert:
        slot.seg.value["cache_control"] = _marker(ttl)
        return AddedMarker(slot.path, ttl)
    part = {**_text_part(slot.seg.value), "cache_control": _marker(ttl)}
    if slot.seg.message_index is None:
        body["system"] = [part]
    else:
        body["messages"][slot.seg.message_index]["content"] = [part]
    return AddedMarker(slot.path, ttl, converted=True)


# ---------------------------------------------------------------------------------------------
# Undo

_PATH_TOKEN = re.compile(r"([A-Za-z_]+)|\[(\d+)\]")


def _path_keys(path: str) -> list[str | int]:
    return [int(i) if i else name for name, i in _PATH_TOKEN.findall(path)]


def strip_added(body: dict[str, Any], added: list[AddedMarker]) -> None:
    """Removes the markers `plan_breakpoints` added, folding converted strings back."""
    for m in reversed(added):
        keys = _path_keys(m.path)
        if keys == [TOP_LEVEL]:
            body.pop(TOP_LEVEL, None)
            continue
        try:
            parent: Any = body
            for k in keys[:-2]:
                parent = parent[k]
            holder = parent[keys[-2]]
            block = holder[keys[-1]]
            block.pop("cache_control", None)
            if m.converted:
                parent[keys[-2]] = block["text"]
        except (KeyError, IndexError, TypeError):
            logger.warning("cannot strip breakpoint at %s: the body changed", m.path)
