"""`{family_key}`: one OpenAI `prompt_cache_key` per prompt family, sharded by load.

OpenAI picks a machine from a hash of the prompt's first ~256 tokens combined with
`prompt_cache_key`, and a prefix+key pair above ~15 requests a minute overflows to other machines
(on GPT-5.6+ the limit counts per key); the guide says to shard keys for high volume
(https://developers.openai.com/api/docs/guides/prompt-caching). So:
- one key per conversation sends turn 1 of every new conversation to a machine that never saw
  the agent's shared prompt (a solo agent loses its cross-conversation hits);
- no key (or one key per family) puts a whole team on one machine, and most of it overflows.
The family key is a keyed hash of what conversations share (model family, tools, system prompt),
plus a bucket chosen by a jump consistent hash of the conversation's affinity ID, so a
conversation keeps its bucket and a change of bucket count moves as few conversations as
possible. The bucket count follows this proxy's observed rate for the family: the busiest minute
of the last ten (times the number of gateway instances sharing the traffic), over TARGET_RPM (under the documented 15, with a margin). A solo agent gets one
bucket (the same machine for all its conversations, like no key); a team gets enough buckets
that each stays under the limit.
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


def family_hash(body: Mapping[str, Any], shape: str, key: str,
                system: list[Segment] | None = None, model: str | None = None) -> str:
    """Keyed hash of the shared prefix: model family, tool definitions, system prompt.
    `system`: the body's `root_segments(...)[0]`, when the caller has them; `model`: the
    request's model when its body has none (Bedrock, Vertex and Azure name it in the URL)."""
    h = hashlib.blake2b(key=key.encode()[:64], digest_size=12)
    h.update(model_family(body.get("model") or model).encode())
    for seg in iter_segments(dict(body), shape):
        if seg.section != "tools":
            break  # tools come first
        h.update(b"\x00t")
        h.update(canonical(seg.value))
    for seg in system if system is not None else root_segments(dict(body), shape)[0]:
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


class FamilyRates:
    """Requests per family per minute seen by this proxy, and the bucket count they call for.

    Counts are kept per 20 s slot for the last ten minutes (a ring of 30 integers per family),
    so a request costs O(1) however busy the family is. `instances`: how many proxies behind a
    load balancer share the traffic, each seeing about 1/N of it (the count is scaled back up)."""

    def __init__(self, instances: int = 1) -> None:
        self.instances = max(instances, 1)
        # family -> [its latest 20 s slot, counts of the last HOLD_SLOTS slots by slot % HOLD,
        # the busiest window ending before the latest slot]: a fixed ring of small integers,
        # so ten thousand quiet families cost ~2 MB, not ~30.
        self._slots: dict[str, list[Any]] = {}
        self._lock = threading.Lock()

    def buckets(self, family: str, now: float) -> int:
        """Count this request and return the bucket count for its family."""
        slot = int(now // _SLOT)
        with self._lock:
            entry = self._slots.get(family)
            if entry is None:
                if len(self._slots) >= MAX_FAMILIES:  # drop the families nobody sends any more
                    horizon = slot - HOLD_SLOTS
                    self._slots = {f: e for f, e in self._slots.items() if e[0] > horizon}
                entry = self._slots[family] = [slot, array("I", bytes(4 * HOLD_SLOTS)), 0]
            last, ring = entry[0], entry[1]
            if slot > last:  # a new slot: the ones skipped since and the new one start at zero
                for k in range(max(last + 1, slot - HOLD_SLOTS + 1), slot + 1):
                    ring[k % HOLD_SLOTS] = 0
                entry[0] = last = slot
                # The busiest window that ends before the new slot, once per slot: only the
                # window ending at the latest slot changes with each request.
                entry[2] = _busiest(ring, last - HOLD_SLOTS + 1, last - 1)
            # a flow that started a few ms out of order counts in the latest slot
            ring[last % HOLD_SLOTS] = min(ring[last % HOLD_SLOTS] + 1, 0xFFFFFFFF)
            first = last - HOLD_SLOTS + 1
            latest = sum(ring[k % HOLD_SLOTS]
                         for k in range(max(first, last - SLOTS_PER_MINUTE + 1), last + 1))
            busiest = max(entry[2], latest)
        return buckets_for(busiest * self.instances)


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


def family_key(body: Mapping[str, Any], shape: str, affinity_id: str, rates: FamilyRates,
               now: float, key: str, system: list[Segment] | None = None,
               model: str | None = None) -> tuple[str, int, int]:
    """(prompt_cache_key value, bucket, bucket count) for one request."""
    family = family_hash(body, shape, key, system, model)
    count = rates.buckets(family, now)
    bucket = jump_hash(int(keyed_hash(affinity_id.encode(), key)[:16], 16), count)
    return f"fam-{family}-{bucket}", bucket, count
