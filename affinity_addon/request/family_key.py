"""`{family_key}`: one OpenAI `prompt_cache_key` per prompt family, sharded by load.

OpenAI picks a machine from a hash of the prompt's first ~256 tokens combined with
`prompt_cache_key`, and a prefix+key pair above ~15 requests a minute overflows to other machines
(on GPT-5.6+ the limit counts per key); the guide says to shard keys for high volume
(https://developers.openai.com/api/docs/guides/prompt-caching). So:
- one key per conversation sends turn 1 of every new conversation to a machine that never saw
  the agent's shared prompt (a solo agent loses its cross-conversation hits);
- no key (or one key per family) puts a whole team on one machine, and most of it overflows.
The family key is a keyed hash of what conversations share (model family, tools, system prompt),
plus a bucket per conversation. The bucket count follows this proxy's observed rate for the
family: the busiest minute of the last ten (times the number of gateway instances sharing the
traffic), over TARGET_RPM (under the documented 15, with a margin); in the first minute of a
burst also the rate its conversations seen together project; never more than the conversations
seen together. A solo agent gets one bucket (the same machine for all its conversations, like no
key); a team gets enough buckets that each stays under the limit, counted as the family's whole
rate, as GPT-5.6+ counts a key's. A lone proxy gives a new conversation the least loaded bucket
and it keeps it; behind a load balancer each conversation takes the bucket a jump consistent hash
of its affinity ID picks, the same on every instance, and a change of bucket count moves as few
conversations as possible. Measured in docs/openai-caching.md.
"""

import hashlib
import threading
from array import array
from collections.abc import Mapping
from typing import Any

from affinity_addon.buckets import buckets_for
from affinity_addon.models import model_family
from affinity_addon.request.affinity_id import keyed_hash
from affinity_addon.request.prompt import Segment, canonical, iter_segments, root_segments

HOLD_MINUTES = 10  # how long a busy minute keeps its bucket count
_SLOT = 20.0
SLOTS_PER_MINUTE = 3
HOLD_SLOTS = HOLD_MINUTES * SLOTS_PER_MINUTE
MAX_FAMILIES = 10_000


def family_hash(body: Mapping[str, Any], api: str, secret: str,
                system: list[Segment] | None = None, model: str | None = None) -> str:
    """Keyed hash of the shared prefix: model family, tool definitions, system prompt.
    `system`: the body's `root_segments(...)[0]`, when the caller has them; `model`: the
    request's model when its body has none (Bedrock, Vertex and Azure name it in the URL)."""
    h = hashlib.blake2b(key=secret.encode()[:64], digest_size=12)
    h.update(model_family(body.get("model") or model).encode())
    for seg in iter_segments(dict(body), api):
        if seg.section != "tools":
            break  # tools come first
        h.update(b"\x00t")
        h.update(canonical(seg.value))
    for seg in system if system is not None else root_segments(dict(body), api)[0]:
        h.update(b"\x00s")
        h.update(canonical(seg.value))
    return h.hexdigest()


def jump_hash(key: int, buckets: int) -> int:
    """Lamping & Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm" (2014)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (1 << 31) / ((key >> 33) + 1))
    return b


# What the proxy knows of a family before a minute of its traffic has been counted: its
# conversations seen together, and how often one conversation sends (the gap between two of its
# requests, learned per family: the prior for its next burst; PRIOR_GAP before any is seen).
# A family quiet for IDLE seconds starts a burst with its next request; for FIRST_MINUTE seconds
# its rate is also projected as the conversations together times one conversation's rate, so a
# team is sharded while it starts instead of a minute later. And the bucket count never exceeds
# the conversations seen together: one conversation cannot be split, so a solo agent keeps one
# key whatever its rate.
IDLE = 60.0
FIRST_MINUTE = 60.0
PRIOR_GAP = 20.0  # s between two requests of one conversation: ~3 RPM, an agent's turn
MIN_GAP = 2.0  # a side request right after the main one is no 30-RPM conversation
MAX_GAP = 120.0  # a conversation quiet longer than this has ended or paused: no gap sample
GAP_WEIGHT = 0.2  # of each new gap in the family's running estimate
LIVE = 60.0  # a conversation seen this recently loads its bucket (the overflow window)
MAX_CONVERSATIONS = 256  # remembered per family (their buckets), the least recent dropped
HOLD = HOLD_MINUTES * 60.0


class _Family:
    """One family's counts: the 20 s ring of requests, and its recent conversations (when
    each was last seen and its bucket) for the burst projection and the placement."""

    __slots__ = ("slot", "ring", "before", "last", "burst", "seen", "gap", "projected",
                 "projected_until", "together", "together_until")

    def __init__(self, slot: int) -> None:
        self.slot = slot  # the latest 20 s slot
        self.ring = array("I", bytes(4 * HOLD_SLOTS))  # counts of the last HOLD_SLOTS slots
        self.before = 0  # the busiest window ending before the latest slot
        self.last = float("-inf")  # when its latest request came
        self.burst = 0.0  # when its current burst started
        # conversation -> [last seen, bucket (-1: none yet), first seen], least recent first
        self.seen: dict[int, list[Any]] = {}
        self.gap = PRIOR_GAP  # seconds between two requests of one conversation
        # the busiest projection of a burst and the most conversations seen together, each
        # held for HOLD_MINUTES like the busiest minute
        self.projected = 0.0
        self.projected_until = 0.0
        self.together = 1
        self.together_until = 0.0


class FamilyRates:
    """Requests per family per minute seen by this proxy, the bucket count they call for, and
    each conversation's bucket.

    Counts are kept per 20 s slot for the last ten minutes (a ring of 30 integers per family),
    so a request costs O(1) however busy the family is; the family's conversations are
    looked over only when one arrives and once per slot (`_observe`). A new conversation goes to
    the bucket with the fewest live conversations (its jump-hash bucket on a tie) and keeps it:
    a team that arrives while the count grows is spread evenly, and nobody moves when it grows.
    `instances`: how many proxies behind a load balancer share the traffic, each seeing about
    1/N of it (counts are scaled back up; the projection assumes each conversation stays on one
    instance); their buckets must agree without talking, so there every conversation takes its
    jump-hash bucket."""

    def __init__(self, instances: int = 1, balanced: bool | None = None) -> None:
        self.instances = max(instances, 1)
        # each new conversation to the least loaded bucket (by default on a lone instance)
        self.balanced = self.instances == 1 if balanced is None else balanced
        self._families: dict[str, _Family] = {}
        self._lock = threading.Lock()

    def buckets(self, family: str, now: float, conversation: int | None = None) -> int:
        """Count this request and return the bucket count for its family. `conversation`: a
        number that names the request's conversation (for the projection and the cap)."""
        return self.place(family, now, conversation)[1]

    def place(self, family: str, now: float, conversation: int | None = None
              ) -> tuple[int, int]:
        """Count this request; (its conversation's bucket, the family's bucket count)."""
        slot = int(now // _SLOT)
        with self._lock:
            entry = self._families.get(family)
            if entry is None:
                if len(self._families) >= MAX_FAMILIES:  # drop the families nobody sends any more
                    horizon = slot - HOLD_SLOTS
                    self._families = {f: e for f, e in self._families.items()
                                      if e.slot > horizon}
                entry = self._families[family] = _Family(slot)
            last, ring = entry.slot, entry.ring
            new_slot = slot > last
            if new_slot:  # a new slot: the ones skipped since and the new one start at zero
                for k in range(max(last + 1, slot - HOLD_SLOTS + 1), slot + 1):
                    ring[k % HOLD_SLOTS] = 0
                entry.slot = last = slot
                # The busiest window that ends before the new slot, once per slot: only the
                # window ending at the latest slot changes with each request.
                entry.before = _busiest(ring, last - HOLD_SLOTS + 1, last - 1)
            # a flow that started a few ms out of order counts in the latest slot
            ring[last % HOLD_SLOTS] = min(ring[last % HOLD_SLOTS] + 1, 0xFFFFFFFF)
            first = last - HOLD_SLOTS + 1
            latest = sum(ring[k % HOLD_SLOTS]
                         for k in range(max(first, last - SLOTS_PER_MINUTE + 1), last + 1))
            busiest: float = max(entry.before, latest)
            if conversation is None:
                return 0, buckets_for(busiest * self.instances)
            _observe(entry, conversation, now, new_slot)
            if now < entry.projected_until:
                busiest = max(busiest, entry.projected)
            together = entry.together if now < entry.together_until else 1
            count = min(buckets_for(busiest * self.instances), together * self.instances)
            return _bucket(entry, conversation, now, count, self.balanced), count


def _observe(e: _Family, conversation: int, now: float, new_slot: bool) -> None:
    """Learn the gap from this conversation's previous request and mark it seen; when it is
    new, or once a slot: how many conversations are together, and in the first minute of a
    burst the rate they project."""
    seen = e.seen.pop(conversation, None)
    # when this conversation sent before, if it is going on (else a new one)
    prev: float | None = seen[0] if seen is not None and now - seen[0] <= MAX_GAP else None
    if prev is not None:
        e.gap += GAP_WEIGHT * (max(now - prev, MIN_GAP) - e.gap)
    if now - e.last >= IDLE:  # quiet for a while: a new burst starts
        e.burst = now
    e.last = max(e.last, now)
    # (a conversation back after a pause keeps its bucket, and counts as starting again)
    e.seen[conversation] = ([now, -1, now] if seen is None else [now, seen[1], now]
                            if prev is None else [max(prev, now), seen[1], seen[2]])
    if len(e.seen) > MAX_CONVERSATIONS:
        del e.seen[next(iter(e.seen))]
    if prev is not None and not new_slot:
        return  # a conversation going on: once a slot is enough to learn of the others
    # Together: for a conversation going on, the others that sent since its previous request
    # (they interleave with it); for a new one, the others that started in the last half gap,
    # twice (each starts within a gap of it, half of them before it). A solo agent's
    # conversations follow one another, so it is one conversation, never more.
    within = together = 0
    for c, (t, _, start) in e.seen.items():
        if now - t <= e.gap:
            within += 1
        if c == conversation:
            continue
        if prev is not None:
            together += t > prev
        else:
            together += 2 * (now - start <= e.gap / 2)
    together += 1
    if together >= e.together or now >= e.together_until:
        e.together, e.together_until = together, now + HOLD
    if now - e.burst < FIRST_MINUTE:  # each conversation seen in the last gap sends once a gap
        rpm = within * 60.0 / e.gap
        if rpm >= e.projected or now >= e.projected_until:
            e.projected, e.projected_until = rpm, now + HOLD


def _bucket(e: _Family, conversation: int, now: float, count: int, balanced: bool) -> int:
    """The conversation's bucket: the one it has, else the one with the fewest live
    conversations (its jump-hash bucket when that is one of them); not `balanced`: its
    jump-hash bucket."""
    own = jump_hash(conversation, count)
    mine = e.seen[conversation]
    if not balanced or count == 1:
        mine[1] = own
        return own
    if 0 <= mine[1] < count:
        return int(mine[1])
    load = [0] * count
    for t, b, _ in e.seen.values():
        if 0 <= b < count and now - t <= LIVE:
            load[b] += 1
    fewest = min(load)
    mine[1] = own if load[own] == fewest else load.index(fewest)
    return int(mine[1])


def _busiest(ring: array, first: int, last: int) -> int:
    """The busiest 60 s, as any 3 consecutive 20 s slots, among the windows ending at slots
    first..last (a window starting before `first` counts only its slots from `first` on):
    close to a sliding window, and additive, so instances that each see 1/N of the traffic
    agree with one seeing all."""
    busiest = window = 0
    for k in range(first, last + 1):
        window += ring[k % HOLD_SLOTS]
        if k - SLOTS_PER_MINUTE >= first:
            window -= ring[(k - SLOTS_PER_MINUTE) % HOLD_SLOTS]
        busiest = max(busiest, window)
    return busiest


def family_key(body: Mapping[str, Any], api: str, affinity_id: str, rates: FamilyRates,
               now: float, secret: str, system: list[Segment] | None = None,
               model: str | None = None) -> tuple[str, int, int]:
    """(prompt_cache_key value, bucket, bucket count) for one request."""
    family = family_hash(body, api, secret, system, model)
    conversation = int(keyed_hash(affinity_id.encode(), secret)[:16], 16)
    bucket, count = rates.place(family, now, conversation)
    return f"fam-{family}-{bucket}", bucket, count
