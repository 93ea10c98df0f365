"""Checkpoints of recent prompts, keyed by a chained hash of the prompt up to each one.

A conversation's next request shares all but its last few messages with the previous one: the
work per block (the fingerprint, the breakpoint planner's slots) resumes from the latest
checkpoint its own chain passes through and does only what the request added. The chain is one
orjson encoding and one hash per message (C speed, ~0.5 ms a MB). Keys are 64-bit hashes,
keyed per process; no text is kept.
"""

from collections.abc import Callable, Generator
from typing import Any

import orjson

from affinity_addon.request.prompt import HEAD_FIELDS


def run_steps[T](steps: Generator[None, None, T]) -> T:
    """Run stepped work (`fingerprint_steps`, `MissTracker.observe_steps`, `chain`) to the end,
    at once."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class PrefixMemo[CP]:
    """Bounded by entries and by `size(checkpoint)` summed over entries (the checkpoints of one
    prompt may share their contents: counted per entry, the bound is conservative)."""

    def __init__(self, max_entries: int, max_size: int, size: Callable[[CP], int]) -> None:
        self.max_entries, self.max_size, self._size = max_entries, max_size, size
        self.entries: dict[int, CP] = {}
        self.held = 0
        self.hits = self.misses = 0
        # What a context names by identity (rules, volatile patterns), held so that no other
        # object can take its id while a key names it.
        self._pinned: dict[int, object] = {}

    def chain(self, body: dict[str, Any], msgs: list[Any], context: tuple[Any, ...],
              step_bytes: int = 1 << 62) -> Generator[None, None, list[int] | None]:
        """keys[k]: the context, the prompt's head and its first k messages; None for a value
        JSON cannot encode. Yields after every `step_bytes` encoded."""
        ids = []
        for obj in context:
            if obj is not None and not isinstance(obj, str | bool | int):
                self._pinned.setdefault(id(obj), obj)
                obj = id(obj)
            ids.append(obj)
        try:
            data = orjson.dumps([body.get(k) for k in HEAD_FIELDS])
            key = hash((*ids, data))
            keys = [key]
            size = len(data)
            for msg in msgs:
                if size >= step_bytes:
                    size = 0
                    yield
                data = orjson.dumps(msg)
                key = hash((key, data))
                keys.append(key)
                size += len(data)
        except (TypeError, orjson.JSONEncodeError):  # ints beyond 64 bits, lone surrogates
            return None
        return keys

    def resume(self, keys: list[int]) -> tuple[int, CP] | None:
        """The latest checkpoint this prompt's chain passes through: (messages done, it)."""
        entries = self.entries
        for k in range(len(keys) - 1, 0, -1):
            cp = entries.pop(keys[k], None)
            if cp is not None:
                entries[keys[k]] = cp  # most recently used last
                self.hits += 1
                return k, cp
        self.misses += 1
        return None

    def keep(self, key: int, cp: CP) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.held -= self._size(old)
        self.entries[key] = cp
        self.held += self._size(cp)
        while len(self.entries) > 1 and (len(self.entries) > self.max_entries
                                         or self.held > self.max_size):
            self.held -= self._size(self.entries.pop(next(iter(self.entries))))
