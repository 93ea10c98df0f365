"""Ties fingerprints, cache profiles and usage into one verdict per response.

A conversation is looked up by the client's own conversation ID first (it survives a changed
system prompt, which must read as `prefix-changed`, not as a new conversation), then by the
keyed hash of its root (which survives an affinity header that a client or relay dropped: the
`routed-away` case). Entries are stored under both. Each remembers the routing signal that
reached the provider (the affinity value the rules sent, or the client's own).

Real agents send side requests under the same ID (memory extraction, titles, compaction,
subagents) with their own tools and system prompt: each (tools, system) pair is a thread of its
own, compared only with its own previous request. A request whose tools or system alone changed
still continues its thread (that is a prefix change to report). A conversation new to the
tracker is matched against recent ones by what lies outside its root (same tools, same first
message, its history continued), so a system prompt whose date rolled over reads as
`prefix-changed` against the conversation it continues, not as a new one.

For `ttl: auto`, each conversation keeps its rhythm (gaps and growth), and each prompt family (an
agent: model, tools, system prompt, as a keyed hash from the rewrite) the last gaps of its
conversations, which choose the first write of its next conversation (`ttl_policy.FamilyPrior`).
"""

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from affinity_addon.catalog.profiles import BY_API, profile_for
from affinity_addon.diagnosis.blockprint import Blocks, Fingerprint, PromptParts
from affinity_addon.diagnosis.fingerprint import (
    FingerprintMemo,
    fingerprint_steps,
    run_steps,
    volatile_for,
)
from affinity_addon.diagnosis.verdicts import (
    ConversationStore,
    Entry,
    Verdict,
    diagnose,
    entry_for,
    predict_hit_ratio,
)
from affinity_addon.durations import parse_duration
from affinity_addon.record.schema import Usage
from affinity_addon.request.breakpoint_spec import DIGEST_SIZE, PlanHint, min_tokens_for
from affinity_addon.ttl_policy import FamilyPrior, Rhythm


@dataclass(frozen=True, slots=True)
class Pending:
    """What the request side knew, waiting for the response's usage."""

    keys: tuple[str, ...]  # the client's own conversation ID first, then the root hash
    fingerprint: Fingerprint
    ts: float
    signal: str | None
    automatic: bool
    ttl_seconds: float
    min_tokens: int
    api: str
    family: str | None = None  # its prompt family, when the rewrite computed one (`ttl: auto`)
    # The fingerprint's blocks, as made while the request was upstream (None: unpack to judge).
    blocks: Blocks | None = None
    lookback: int | str | None = BY_API  # the route's marker lookback (cache profile)


THREADS = 8  # threads kept per conversation ID (main, memory, title, compaction, subagents)
LINEAGE = 4096  # recent threads indexed by (tools, first message), to find what a new ID continues
LINEAGE_SECONDS = 86_400.0  # a date rollover is at most a day after the previous request
# Unpacked fingerprints kept for the next turn's verdict (~350 bytes a block): the conversations
# in play right now, not every one the tracker remembers, so at most ~7 MB (the blocks bound
# it; the entries only cap the dict: a team's thousand short conversations all fit, and each
# verdict then skips decoding its previous request, ~15 µs).
UNPACKED_BLOCKS = 20_000
UNPACKED_ENTRIES = 1024
TRAILER = 2  # blocks an agent may drop from the end of its history (per-turn context)
FAMILIES = 1024  # prompt families whose recent gaps are kept (agents x models: a few)


@dataclass(frozen=True, slots=True)
class Stored:
    entry: Entry
    signal: str | None
    parts: PromptParts | None = None
    plan: bytes = b""  # the request's block digests, for the breakpoint planner's hint
    history: bytes = b""  # its message block digests after the system prompt, concatenated
    key: str = ""  # the conversation ID it was stored under (the client's, else the root's)
    response_id: str | None = None  # the provider's id of its response


def _continues(prev: Stored, history: bytes) -> bool:
    """Does a request with this message history continue `prev`'s conversation? All of the
    previous history (but a per-turn trailer) comes first, and more follows."""
    old = len(prev.history) // DIGEST_SIZE
    keep = max(1, old - TRAILER) if old > TRAILER else old
    size = keep * DIGEST_SIZE
    return old > 0 and len(history) > size and prev.history[:size] == history[:size]


class MissTracker:
    def __init__(self, capacity: int = 10_000) -> None:
        # Conversation ID -> its threads, most recent first.
        self.store: ConversationStore[tuple[Stored, ...]] = ConversationStore(capacity)
        self.lineage: ConversationStore[Stored] = ConversationStore(min(capacity, LINEAGE))
        # Conversation ID -> its gaps and growth, for `ttl: auto` (a few floats each).
        self.rhythms: ConversationStore[Rhythm] = ConversationStore(capacity)
        # Prompt family -> its conversations' last gaps, for the first write of the next one.
        self.families: ConversationStore[FamilyPrior] = ConversationStore(min(capacity, FAMILIES))
        # The latest stored fingerprints, unpacked: the next turn of a busy conversation is
        # judged against its previous request without decoding it again. Bounded by blocks.
        self.unpacked: dict[int, tuple[Fingerprint, Blocks]] = {}
        self.unpacked_blocks = 0
        # Checkpoints of recent prompts: a conversation's next turn fingerprints only its new
        # messages (the rest is resumed, with the same result).
        self.memo = FingerprintMemo()

    def _keep_unpacked(self, fp: Fingerprint, blocks: Blocks) -> None:
        # Keyed by identity, holding the fingerprint itself so that the id stays its own.
        old = self.unpacked.pop(id(fp), None)
        if old is not None:
            self.unpacked_blocks -= len(old[1].all)
        self.unpacked[id(fp)] = (fp, blocks)
        self.unpacked_blocks += len(blocks.all)
        while len(self.unpacked) > 1 and (self.unpacked_blocks > UNPACKED_BLOCKS
                                          or len(self.unpacked) > UNPACKED_ENTRIES):
            oldest = next(iter(self.unpacked))  # dicts keep insertion order: the oldest first
            self.unpacked_blocks -= len(self.unpacked.pop(oldest)[1].all)

    def _unpack(self, fp: Fingerprint) -> Blocks:
        hit = self.unpacked.pop(id(fp), None)
        if hit is not None and hit[0] is fp:
            self.unpacked_blocks -= len(hit[1].all)
            return hit[1]
        return fp.unpack()

    def hint(self, key: str | None, now: float | None = None,
             family: Callable[[], str | None] | None = None) -> PlanHint | None:
        """The planner's view of this conversation's previous requests (one per thread) and the
        cache TTL its rhythm calls for, counting the pause before this request (`now`). For a
        conversation new to the tracker, the TTL its prompt family's recent pauses call for.
        `family` computes the request's family; it is called only while the conversation has
        none on record (its verdict records the one computed here)."""
        if not key:
            return None
        threads = self.store.get(key)
        rhythm = self.rhythms.get(key)
        name = None
        if family is not None and (rhythm is None or rhythm.family is None):
            name = family()
        if not threads and rhythm is None:
            prior = self.families.get(name) if name else None
            return PlanHint((), prior.choose()) if prior is not None else None
        return PlanHint(tuple(t.plan for t in threads or () if t.plan),
                        rhythm.choose(now=now) if rhythm is not None else None)

    def _previous(self, p: "Pending", parts: PromptParts, now: float,
                  cur: Blocks) -> tuple[Stored | None, str]:
        """(the request this one is compared with, how it was found: same, changed, lineage,
        new-thread or new)."""
        threads = next((t for t in map(self.store.get, p.keys) if t), ())
        same = next((t for t in threads if t.parts is None or t.parts.family == parts.family), None)
        if same is not None:
            return same, "same"
        # One of tools/system changed: the same thread with a changed prefix. Both changed:
        # a side request, a thread of its own.
        for t in threads:
            if t.parts is not None and (t.parts.tools == parts.tools or t.parts.system
                                        == parts.system) and t.parts.opening == parts.opening:
                return t, "changed"
        if threads:
            return None, "new-thread"
        old = self.lineage.get(_lineage_key(parts))
        if (old is not None and now - old.entry.ts <= LINEAGE_SECONDS
                and _continues(old, p.fingerprint.history(cur))):
            return old, "lineage"
        return None, "new"

    def observe(self, body: dict[str, Any], *, api: str, model: str | None, host: str,
                keys: tuple[str, ...], signal: str | None, ts: float,
                family: str | None = None) -> Pending:
        return run_steps(self.observe_steps(body, api=api, model=model, host=host, keys=keys,
                                            signal=signal, ts=ts, family=family))

    def observe_steps(self, body: dict[str, Any], *, api: str, model: str | None, host: str,
                      keys: tuple[str, ...], signal: str | None, ts: float,
                      family: str | None = None) -> Generator[None, None, Pending]:
        """`observe` in steps (`fingerprint_steps`): the proxy runs one per event-loop turn."""
        prof = profile_for(host, api, model)
        # A block the provider at this host leaves out of the cached prefix is no prefix change
        # (Claude Code's billing block on api.anthropic.com); on any other host it is prompt text.
        fp, blocks = yield from fingerprint_steps(body, api, model, memo=self.memo,
                                                  volatile=volatile_for(host))
        ttl = prof.ttl_seconds
        if not prof.automatic and fp.last_ttl:
            try:
                ttl = parse_duration(fp.last_ttl)
            except ValueError:
                pass
        min_tokens = (prof.min_tokens if prof.min_tokens is not None
                      else min_tokens_for(model, host))
        return Pending(keys, fp, ts, signal, prof.automatic, ttl, min_tokens, api, family, blocks,
                       prof.lookback_blocks)

    def verdict(self, p: Pending, usage: Usage | None, now: float, *, response_cache: bool,
                dry_run: bool, load: Mapping[str, Any] | None = None,
                response_id: str | None = None) -> tuple[Verdict, float | None]:
        """`response_id`: the provider's id of this request's response, kept with it so that a
        later verdict can say which response it compared with (`Verdict.previous_id`)."""
        # Unpacked once per judgement (at observe time); the stored fingerprints stay packed.
        cur = p.blocks if p.blocks is not None else p.fingerprint.unpack()
        parts = p.fingerprint.parts(cur)
        history = p.fingerprint.history(cur)
        prev, how = self._previous(p, parts, now, cur)
        signal_changed = prev is not None and prev.signal != p.signal
        unpacked = (self._unpack(prev.entry.fingerprint) if prev else None, cur)
        v = diagnose(prev.entry if prev else None, p.fingerprint, usage, now, api=p.api,
                     automatic=p.automatic, min_tokens=p.min_tokens, ttl_seconds=p.ttl_seconds,
                     response_cache=response_cache, affinity_changed=signal_changed,
                     affinity_missing=p.signal is None, load=load, unpacked=unpacked,
                     lookback=p.lookback)
        v = _explain(v, how, prev, now)
        if prev is not None:
            v = replace(v, changed=_changes(prev, p.fingerprint, parts, history),
                        key_changed=signal_changed, previous_id=prev.response_id)
        predicted = None
        if dry_run:
            predicted = predict_hit_ratio(prev.entry if prev else None, p.fingerprint,
                                          min_tokens=p.min_tokens, automatic=p.automatic,
                                          api=p.api, unpacked=unpacked, lookback=p.lookback)
        if usage is not None and p.keys:
            rhythm = self.rhythms.get(p.keys[0]) or Rhythm()
            gap = rhythm.observe_at(p.ts, usage.cache_read_tokens + usage.cache_write_tokens)
            rhythm.family = p.family or rhythm.family  # known from its first request on
            self.rhythms.put(p.keys[0], rhythm)
            if rhythm.family and gap is not None:
                prior = self.families.get(rhythm.family) or FamilyPrior()
                prior.observe(gap)
                self.families.put(rhythm.family, prior)
        if not response_cache:
            entry = entry_for(p.fingerprint, p.ts, ttl_seconds=p.ttl_seconds,
                              automatic=p.automatic, unpacked=cur)
            stored = Stored(entry, p.signal, parts, p.fingerprint.plan_digests(cur), history,
                            p.keys[0] if p.keys else "", response_id)
            for key in p.keys:
                threads = self.store.get(key) or ()
                rest = tuple(t for t in threads if t is not prev and t.parts != parts)
                self.store.put(key, (stored, *rest)[:THREADS])
            self.lineage.put(_lineage_key(parts), stored)
            self._keep_unpacked(p.fingerprint, cur)
        return v, predicted


def _changes(prev: Stored, cur: Fingerprint, parts: PromptParts,
             history: bytes) -> frozenset[str] | None:
    """What changed since `prev` (verdicts.CHANGES): the model, the tool definitions, the
    leading system prompt, the request settings that are part of the prefix, and the messages
    (any earlier one changed, rather than only new ones appended)."""
    if prev.parts is None:
        return None
    old = prev.entry.fingerprint
    return frozenset(name for name, differs in (
        ("model", bool(old.model and cur.model and old.model != cur.model)),
        ("tools", prev.parts.tools != parts.tools),
        ("system", prev.parts.system != parts.system),
        ("messages", not history.startswith(prev.history)),
        ("settings", dict(old.settings) != dict(cur.settings)),
    ) if differs)


def _lineage_key(parts: PromptParts) -> str:
    return (parts.tools + parts.opening).hex()


_NEW = "new conversation"


def _explain(v: Verdict, how: str, prev: Stored | None, now: float) -> Verdict:
    """Say which earlier request a verdict is about when it is not simply the previous one."""
    detail = v.detail or ""
    if how == "new-thread" and detail.startswith(_NEW):
        return replace(v, detail="new thread in a known conversation (other tools and system "
                       "prompt: a side request such as memory extraction, a title or a "
                       "subagent)" + detail[len(_NEW):])
    if how == "lineage" and prev is not None and v.reason not in ("hit", "first-write"):
        short = prev.key if len(prev.key) <= 16 else prev.key[:16] + "…"
        return replace(v, detail=f"{detail}; continues conversation {short} from "
                       f"{now - prev.entry.ts:.0f} s earlier, whose affinity ID was different "
                       "(its root changed)")
    return v
