"""`{family_key}`: one OpenAI `prompt_cache_key` per prompt family, sharded by load.

OpenAI picks a machine from a hash of the prompt's first ~256 tokens combined with
`prompt_cache_key`, and a prefix+key pair above ~15 requests a minute overflows to other machines
(on GPT-5.6+ the limit counts per key); the guide says to shard keys for high volume
(https://developers.openai.com/api/docs/guides/prompt-caching, providers.md §3). So:
- one key per conversation sends turn 1 of every new conversation to a machine that never saw
  the agent's shared prompt (a solo agent loses its cross-conversation hits);
- no key (or one key per family) puts a whole team on one machine, and most of it overflows.
The family key is a keyed hash of what conversations share (model family, tools, system prompt),
plus a bucket chosen by a jump consistent hash of the conversation's affinity ID, so a
conversation keeps its bucket and a change of bucket count moves as few conversations as
possible. The bucket count follows this proxy's observed rate for the family: the busiest minute
of the last ten, over TARGET_RPM (under the documented 15, with a margin). A solo agent gets one
bucket (the same machine for all its conversations, like no key); a team gets enough buckets
that each stays under the limit.
"""

import hashlib
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from affinity_addon.request.affinity_id import keyed_hash, model_family
from affinity_addon.request.prompt import canonical, iter_segments, root_segments

TARGET_RPM = 12
HOLD_SECONDS = 600.0  # how long a busy minute keeps its bucket count
MAX_BUCKETS = 64
_WINDOW = 60.0


def family_hash(body: Mapping[str, Any], shape: str, key: str) -> str:
    """Keyed hash of the shared prefix: model family, tool definitions, system prompt."""
    h = hashlib.blake2b(key=key.encode()[:64], digest_size=12)
    h.update(model_family(body.get("model")).encode())
    for seg in iter_segments(dict(body), shape):
        if seg.section != "tools":
            break  # tools come first
        h.update(b"\x00t")
        h.update(canonical(seg.value))
    for seg in root_segments(dict(body), shape)[0]:
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
    """Requests per family seen by this proxy, and the bucket count they call for."""

    def __init__(self) -> None:
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def buckets(self, family: str, now: float) -> int:
        """Count this request and return the bucket count for its family."""
        with self._lock:
            times = self._seen.setdefault(family, deque())
            if times and now < times[-1]:
                now = times[-1]  # flows may start out of order by a few ms
            times.append(now)
            while times[0] < now - HOLD_SECONDS:
                times.popleft()
            if len(self._seen) > 10_000:  # families nobody sends any more
                self._seen = {f: t for f, t in self._seen.items() if t[-1] >= now - HOLD_SECONDS}
            busiest, start = 0, 0
            for i, t in enumerate(times):  # the most requests in any 60 s window
                while times[start] < t - _WINDOW:
                    start += 1
                busiest = max(busiest, i - start + 1)
        return min(max(1, -(-busiest // TARGET_RPM)), MAX_BUCKETS)


def family_key(body: Mapping[str, Any], shape: str, affinity_id: str, rates: FamilyRates,
               now: float, key: str) -> tuple[str, int, int]:
    """(prompt_cache_key value, bucket, bucket count) for one request."""
    family = family_hash(body, shape, key)
    count = rates.buckets(family, now)
    bucket = jump_hash(int(keyed_hash(affinity_id.encode(), key)[:16], 16), count)
    return f"fam-{family}-{bucket}", bucket, count
