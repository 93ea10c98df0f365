"""Plans cache breakpoints: `cache_control` for Anthropic Messages (also on Bedrock and Vertex)
and OpenRouter-style chat bodies, `cachePoint` blocks for Bedrock Converse, and a host's own form
where the catalog names one (`breakpoint_spec.Markers`: OpenAI's `prompt_cache_breakpoint` on
GPT-5.6+ Chat and Responses bodies).

Providers with explicit caching (Anthropic, and Anthropic/Gemini/Qwen behind OpenRouter) only
cache up to a marked block, so an agent that sends no markers pays full price on every turn;
GPT-5.6+ writes only at breakpoints, its own one on the latest message, so a prompt whose end
changes every turn reads nothing. The planner adds markers without breaking what already works:

- at most 4 markers in a request, counting the client's own, which are never moved or removed
  (moving a breakpoint turn to turn is the classic way to lose every hit), and the provider's own
  implicit one where it has one;
- deterministic positions, so turn N+1 reads what turn N wrote: the rolling marker goes on the
  newest block that is likely to stay, and when the new turn appended more than `lookback`
  blocks, a second one goes exactly where the previous turn's rolling marker was (the end of the
  messages before the last assistant reply, which the previous request did not have yet);
- real agents are not append-only: blocks they rebuild every turn (OpenClaw's trailing internal
  context, Qwen Code's date reminder; catalog/volatile.yaml) never carry the rolling marker, and
  with a `PlanHint` (the previous request of the conversation, from the tracker) a marker goes on
  the last block that stayed identical, so the next request reads what this one wrote;
- 1h markers before 5m ones; no marker on thinking blocks or empty text; no marker whose prefix
  is below the model's minimum cacheable length (it would cache nothing and use a slot); a
  cloud's own minimums and 1h models, and never a top-level marker where the cloud refuses it
  (catalog/platforms.yaml);
- idempotent, and `strip_added` undoes a plan exactly (dry runs, reports).
"""

import logging
import re
from dataclasses import replace
from functools import partial
from itertools import pairwise
from typing import Any

from affinity_addon.catalog.platforms import platform_for
from affinity_addon.catalog.volatile import Volatile, default_volatile
from affinity_addon.jsonpath import get_path, parse_path
from affinity_addon.request.breakpoint_spec import (
    AGENT,
    ANY_DIGEST,
    AUTO_TTL,
    CACHE_CONTROL,
    DIGEST_SIZE,
    SKIP,
    TOP_LEVEL,
    AddedMarker,
    ApiRules,
    CacheControlSpec,
    Markers,
    PlanHint,
    auto_ttl,
    last_marker_only,
    min_tokens_for,
    takes_one_hour,
)
from affinity_addon.request.prompt import (
    CACHE_POINT,
    MARKER_KEYS,
    MESSAGES_KEY,
    SYSTEM_ROLES,
)
from affinity_addon.request.prompt_slots import (
    Prompt,
    Slot,
    SlotMemo,
    marker_sites,
    resolve,
    text_part,
)

logger = logging.getLogger(__name__)

# The slots of recent prompts: a conversation's next request measures only what it added.
SLOT_MEMO = SlotMemo()

# ---------------------------------------------------------------------------------------------
# Planning


def _eligible_in(message_index: int, s: Slot) -> bool:
    return s.eligible and s.seg.message_index == message_index


class _Planner:
    def __init__(self, prompt: Prompt, spec: CacheControlSpec, minimum: int, free: int,
                 last_only: bool, hint: PlanHint | None = None,
                 markers: Markers = CACHE_CONTROL) -> None:
        self.p = prompt
        self.hint = hint
        self.spec = spec
        self.minimum = minimum
        self.free = free
        self.last_only = last_only
        self.top_level = markers.top_level
        # None: a breakpoint finds an earlier entry however far back it is
        self.lookback: int | None = spec.lookback if markers.lookback else None
        self.chosen: dict[int, tuple[Slot | None, str]] = {}  # position -> (slot|None=top, ttl)
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

    def offer(self, slot: Slot | None, top: bool = False) -> bool:
        if len(self.chosen) >= self.free:
            return False
        if top:
            anchor = self.p.last_eligible
            if (not self.top_level or self.top_taken or TOP_LEVEL in self.p.body or anchor is None
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

    def last_in_messages(self) -> Slot | None:
        """The last block that may carry a marker, a volatile one never: it moves or changes by
        the next turn, so a marker there writes what nothing will read (and on GPT-5.6+ the
        implicit breakpoint already sits on the latest message)."""
        found = self.p.messages_in(lambda s: s.eligible and not s.volatile)
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
                if d != cur[n].digest and d != ANY_DIGEST:
                    break
                n += 1
            last = prev[(count - 1) * DIGEST_SIZE:count * DIGEST_SIZE] if count else b""
            moved = 0 < n < count and bool(cur) and cur[-1].digest == last and len(cur) > count
            if best is None or n > best[0]:
                best = (n, count, moved)
        return best

    def newest_stable(self, moved_trailer: bool) -> Slot | None:
        """The newest block likely to be in the next request at the same place: not a known
        volatile block, nor a trailer the previous request also had at its end."""
        end = self.p.end - 1 if moved_trailer else self.p.end
        found = self.p.messages_in(lambda s: s.eligible and not s.volatile and s.index < end)
        return found[-1] if found else None

    def before_volatile(self) -> Slot | None:
        """Turn 1: the last block before the first volatile one, which the next turn may move."""
        first = next((s.index for s in self.p.slots if s.volatile), None)
        if first is None:
            return None
        found = [s for s in self.p.slots[:first] if s.eligible]
        return found[-1] if found else None

    def last_identical(self, common: int) -> Slot | None:
        found = [s for s in self.p.slots[:common] if s.eligible]
        return found[-1] if found else None

    def stable_read(self, seen: tuple[int, int, bool] | None, rolling: Slot | None) -> Slot | None:
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
        if stable and (common < count or (self.lookback is not None
                                          and rolling.index - stable.index > self.lookback)):
            return stable
        return None

    def previous_tail(self) -> Slot | None:
        """Where the previous request's rolling marker was: the newest stable block before the
        last assistant reply (that reply is the previous request's answer)."""
        messages = self.p.messages
        if messages is None:
            return None
        replies = [i for i, m in enumerate(messages[:-1])
                   if isinstance(m, dict) and m.get("role") == "assistant"]
        if not replies:
            return None
        last_reply = replies[-1]
        found = self.p.messages_in(
            lambda s: s.eligible and not s.volatile and s.seg.message_index is not None
            and s.seg.message_index < last_reply)
        return found[-1] if found else None

    def system_end(self) -> Slot | None:
        if any(s.seg.section == "system" for s in self.p.slots):
            found = [s for s in self.p.slots if s.seg.section == "system" and s.eligible]
            return found[-1] if found else None
        # Chat bodies: the leading system/developer messages are the system prompt. Count them
        # first, then one pass over the slots (was one pass per leading message: 8,000 system
        # messages took 3 s).
        leading = 0
        for msg in self.p.messages or []:
            role = msg.get("role") if isinstance(msg, dict) else None
            if not isinstance(role, str) or role not in SYSTEM_ROLES:
                break
            leading += 1
        found = self.p.messages_in(
            lambda s: s.eligible and s.seg.message_index is not None
            and s.seg.message_index < leading)
        return found[-1] if found else None

    def last_tool(self) -> Slot | None:
        found = [s for s in self.p.slots if s.seg.section == "tools" and s.eligible]
        return found[-1] if found else None

    def last_user(self) -> Slot | None:
        users = self.p.messages_in(lambda s: s.seg.role == "user")
        if not users:
            return None
        end = users[-1].index
        found = self.p.messages_in(lambda s: s.eligible and s.index <= end)
        return found[-1] if found else None

    def last_n(self, k: int) -> list[Slot]:
        """The last eligible block of each of the last k messages, newest first."""
        n = len(self.p.messages or [])
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
        if self.lookback is None:
            # No lookback limit: the previous request's rolling spot is marked again all the
            # same, so this request reads it at a breakpoint of its own whether the provider
            # matches only at this request's breakpoints or at any earlier one (the OpenAI guide
            # says "working backward through eligible breakpoints"); writing an entry that is
            # already there adds nothing.
            self.offer(tail)
        elif seen is None and rolling and tail and rolling.index - tail.index > self.lookback:
            self.offer(tail)
        self.offer(self.system_end())
        self.offer(self.last_tool())
        if not self.last_only and self.lookback is not None:
            self.bridge_gaps(self.lookback)

    def bridge_gaps(self, step: int) -> None:
        """Spends free slots on intermediates where markers are more than `step` (the lookback)
        blocks apart.

        An intermediate sits at the last eligible block at or before a multiple of `step`:
        a fixed grid keeps it in place while the conversation grows, so it is read back next turn.
        """
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
        offers: list[tuple[Slot | None, bool]] = []
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
# well above that, while a body of 50,000 tiny messages took a second before. Over
# it, no markers are added (the request goes on with a warning).
MAX_PLAN_BLOCKS = 1024
BYTES_PER_BLOCK = 384


def block_count(body: dict[str, Any], api: str) -> int:
    """How many blocks the planner would measure, counted without building them (~0.1 us each)."""
    n = 0
    config = body.get("toolConfig")  # Converse keeps its tools there
    for v in (body.get("tools"), body.get("system"),
              config.get("tools") if isinstance(config, dict) else None):
        n += len(v) if isinstance(v, list) else 1
    messages = body.get(MESSAGES_KEY.get(api, "messages"))
    if isinstance(messages, list):
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else None
            n += len(c) if isinstance(c, list) else 1
    return n


def plan_limit(body_size: int) -> int:
    return max(MAX_PLAN_BLOCKS, body_size // BYTES_PER_BLOCK)


def plan_breakpoints(body: dict[str, Any], api: str, model: str | None,
                     spec: CacheControlSpec, hint: PlanHint | None = None,
                     volatile: Volatile | None = None,
                     markers: Markers = CACHE_CONTROL,
                     host: str | None = None) -> list[AddedMarker]:
    """Adds breakpoint markers to `body` in place; returns what was added, in prompt order.

    `hint`: the previous requests of this conversation (tracker), for the agent strategy.
    `markers`: the route's form of a breakpoint (`breakpoint_spec.markers_for`).
    `host`: where the request goes: a cloud with rules of its own (catalog/platforms.yaml) has
    its minimums and 1h models."""
    rules = markers.apis.get(api)
    if rules is None or not isinstance(body, dict):
        return []
    key = MESSAGES_KEY.get(api, "messages")
    found = marker_sites(body, key, points=rules.point_blocks)
    first = next(found, None)
    implicit = markers.implicit
    if markers.implicit_off is not None:
        off_field, off_value = markers.implicit_off
        if get_path(body, parse_path(off_field)) == off_value:
            implicit = False
            if spec.client_markers == SKIP:
                return []  # the client placed (or turned off) every breakpoint itself
    if spec.client_markers == SKIP and first is not None:
        return []  # before measuring the prompt: most agent traffic stops here
    sites = [] if first is None else [first, *found]
    agent = spec.strategy == AGENT
    with_hint = agent and hint is not None and bool(hint.previous)
    prompt = Prompt(body, api, rules, sites,
                     (volatile or default_volatile()) if agent else None, digests=with_hint,
                     memo=SLOT_MEMO)
    free = markers.writes - len(prompt.markers) - (1 if implicit else 0)
    last_only = spec.last_marker_only if spec.last_marker_only is not None\
        else last_marker_only(model)
    if last_only:
        free = min(free, 1)
    if free <= 0:
        return []
    platform = platform_for(host)
    if markers.ttl is not None:  # one lifetime for every breakpoint: no order to keep
        spec = replace(spec, ttl="5m")
    elif spec.ttl == AUTO_TTL:
        spec = replace(spec, ttl=auto_ttl(model, hint, host))
    elif spec.ttl == "1h" and platform is not None and not takes_one_hour(model, host):
        spec = replace(spec, ttl="5m")  # the platform would refuse the request
    minimum = spec.min_tokens if spec.min_tokens is not None else min_tokens_for(model, host)
    if platform is not None and not platform.automatic_cache_control:
        markers = replace(markers, top_level=False)
    planner = _Planner(prompt, spec, minimum, free, last_only, hint if with_hint else None,
                       markers)
    if spec.strategy == AGENT:
        planner.agent()
    else:
        planner.explicit()
    chosen = sorted(planner.chosen.items())
    if rules.point_blocks:
        inserted: dict[str, int] = {}
        added = [_insert_point(body, slot, ttl, inserted) for _, (slot, ttl) in chosen
                 if slot is not None]
    else:
        added = [_apply(body, slot, ttl, markers, rules) for _, (slot, ttl) in chosen]
    if added:
        logger.debug("planned %d breakpoint(s): %s", len(added),
                     ", ".join(f"{m.path}/{m.ttl}" for m in added))
    return added


def _apply(body: dict[str, Any], slot: Slot | None, ttl: str, markers: Markers,
           rules: ApiRules) -> AddedMarker:
    label = markers.ttl or ttl
    if slot is None:
        body[TOP_LEVEL] = markers.marker(ttl)
        return AddedMarker(TOP_LEVEL, label)
    value = resolve(body, slot.seg.path)  # a slot keeps the block's path, not the block
    if not slot.convert:
        value[markers.key] = markers.marker(ttl)
        return AddedMarker(slot.path, label)
    part = {**text_part(value, rules.text_type), markers.key: markers.marker(ttl)}
    holder, _, name = slot.seg.path.rpartition(".")  # "system", "input[3].content", ...
    (resolve(body, holder) if holder else body)[name] = [part]
    return AddedMarker(slot.path, label, converted=True)


_LIST_INDEX = re.compile(r"^(.*)\[(\d+)\]$")


def cache_point(ttl: str) -> dict[str, Any]:
    """A Converse checkpoint: "default" is its only type; a ttl of 5 minutes is the default and
    is left out ("when ttl value not specified the default behavior of 5 minutes caching
    applies": https://docs.aws.amazon.com/bedrock/latest/userguide/prompt-caching.html)."""
    point: dict[str, Any] = {"type": "default"}
    if ttl == "1h":
        point["ttl"] = "1h"
    return {CACHE_POINT: point}


def _insert_point(body: dict[str, Any], slot: Slot, ttl: str,
                  inserted: dict[str, int]) -> AddedMarker:
    """Converse: a cachePoint block right after the slot's block. Slots come in prompt order,
    so the earlier insertions of the same list shift this one by their count."""
    m = _LIST_INDEX.match(slot.seg.path)
    assert m is not None  # Converse blocks always sit in a list
    owner, index = m[1], int(m[2])
    at = index + 1 + inserted.get(owner, 0)
    resolve(body, owner).insert(at, cache_point(ttl))
    inserted[owner] = inserted.get(owner, 0) + 1
    return AddedMarker(f"{owner}[{at}]", ttl, inserted=True)


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
            if m.inserted:
                if isinstance(block, dict) and CACHE_POINT in block:
                    del holder[keys[-1]]
                    continue
                raise KeyError(m.path)
            for k in MARKER_KEYS:  # the block had none before the plan (never re-marked)
                block.pop(k, None)
            if m.converted:
                parent[keys[-2]] = block["text"]
        except (KeyError, IndexError, TypeError):
            logger.warning("cannot strip breakpoint at %s: the body changed", m.path)
