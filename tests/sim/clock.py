"""A manual clock for cache TTLs, so tests can expire a 5-minute cache without waiting."""

import threading


class SimClock:
    """Time in seconds that only moves when told to. Thread-safe: the server reads it per request."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"cannot move the clock backwards ({seconds} s)")
        with self._lock:
            self._now += seconds
            return self._now

    def __repr__(self) -> str:
        return f"SimClock({self.now()})"
