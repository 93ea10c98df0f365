"""When a 1-hour cache entry pays for itself, from a conversation's own rhythm.

Anthropic-style caches (direct, OpenRouter, Bedrock, Vertex) keep an entry 5 minutes after its
last use by default; `ttl: "1h"` costs more to write (2x base input instead of 1.25x), reads cost
0.1x either way, and every hit refreshes the entry (providers.md §1). Per turn, with K the
cached prefix and W the tokens the turn adds:

- a gap of at most 5 minutes: both TTLs read K; 1h pays (w1h - w5m) * W more for its write;
- a gap of 5 to 60 minutes: 5m has expired and writes K again at w5m, 1h reads it at r,
  so 1h saves (w5m - r) * K;
- a gap over an hour: both write again; 1h pays (w1h - w5m) * K more.

With p the chance that the next gap falls in (5 min, 1 h] and q that it is over an hour, 1h is
cheaper when  p * (w5m - r) * K  >  (1 - q) * (w1h - w5m) * W + q * (w1h - w5m) * K.
At Anthropic's prices (r = 0.1, w5m = 1.25, w1h = 2.0) and W = 5% of K, one gap in thirty is
enough. p, q and W/K are estimated from the conversation's last gaps and turns.
"""

from collections import deque
from dataclasses import dataclass, field

SHORT_SECONDS = 300.0
LONG_SECONDS = 3600.0
FIVE_MINUTES, ONE_HOUR = "5m", "1h"
TTL_SECONDS = {FIVE_MINUTES: SHORT_SECONDS, ONE_HOUR: LONG_SECONDS}
WINDOW = 8  # recent gaps and turns that speak for the next one


@dataclass(frozen=True, slots=True)
class Multipliers:
    """Prices of cached tokens as multiples of the base input price."""

    read: float = 0.1
    write_5m: float = 1.25
    write_1h: float = 2.0


@dataclass(slots=True)
class Rhythm:
    """A conversation's recent gaps and growth: a few floats, never text."""

    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    growth: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    last_prefix: int = 0
    last_start: float | None = None

    def observe_at(self, start: float, prefix_tokens: int) -> None:
        """One more request that started at `start` (seconds) with this cacheable prefix."""
        gap = None if self.last_start is None else max(start - self.last_start, 0.0)
        if self.last_start is None or start >= self.last_start:
            self.last_start = start
        self.observe(gap, prefix_tokens)

    def observe(self, gap: float | None, prefix_tokens: int) -> None:
        """One more request: the time since the previous one and its cacheable prefix."""
        if gap is not None and gap >= 0:
            self.gaps.append(gap)
        if prefix_tokens > 0:
            added = max(prefix_tokens - self.last_prefix, 0) if self.last_prefix else prefix_tokens
            if self.last_prefix:
                self.growth.append(added / prefix_tokens)
            self.last_prefix = prefix_tokens

    def choose(self, m: Multipliers = Multipliers(), now: float | None = None) -> str:
        """The TTL for the entry this request writes; 5m until a gap says otherwise. `now`: the
        start of the request being planned, whose own gap is already known."""
        gaps = list(self.gaps)
        if now is not None and self.last_start is not None and now >= self.last_start:
            gaps = [*gaps[1 - WINDOW:], now - self.last_start]
        if not gaps or m.write_1h <= m.write_5m or m.write_5m <= m.read:
            return FIVE_MINUTES
        n = len(gaps)
        p = sum(SHORT_SECONDS < g <= LONG_SECONDS for g in gaps) / n
        q = sum(g > LONG_SECONDS for g in gaps) / n
        w = sum(self.growth) / len(self.growth) if self.growth else 1.0
        extra = m.write_1h - m.write_5m
        one_hour_pays = p * (m.write_5m - m.read) > (1 - q) * extra * w + q * extra
        return ONE_HOUR if one_hour_pays else FIVE_MINUTES
