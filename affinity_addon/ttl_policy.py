"""When a 1-hour cache entry pays for itself, from a conversation's own rhythm.

Anthropic-style caches (direct, OpenRouter, Bedrock, Vertex) keep an entry 5 minutes after its
last use by default; `ttl: "1h"` costs more to write (2x base input instead of 1.25x), reads cost
0.1x either way, and every hit refreshes the entry
(https://platform.claude.com/docs/en/build-with-claude/prompt-caching, docs/providers.md#anthropic).
Per turn, with K the cached prefix and W the tokens the turn adds:

- a gap of at most 5 minutes: both TTLs read K; 1h pays (w1h - w5m) * W more for its write;
- a gap of 5 to 60 minutes: 5m has expired and writes K again at w5m, 1h reads it at r,
  so 1h saves (w5m - r) * K;
- a gap over an hour: both write again; 1h pays (w1h - w5m) * K more.

With p the chance that the next gap falls in (5 min, 1 h] and q that it is over an hour, 1h is
cheaper when  p * (w5m - r) * K  >  (1 - q) * (w1h - w5m) * W + q * (w1h - w5m) * K.
At Anthropic's prices (r = 0.1, w5m = 1.25, w1h = 2.0) and W = 5% of K, one gap in thirty is
enough. p, q and W/K are estimated from the conversation's last gaps and turns.

A conversation's first request knows no gap of its own, and writes its whole prefix (W = K):
1h pays when p * (w5m - r) > w1h - w5m, i.e. p > 0.65 at those prices. Its p comes from the
recent gaps of other conversations of the same prompt family (an agent: model, tools, system
prompt), a `FamilyPrior`; without one it starts on 5m.
"""

from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

SHORT_SECONDS = 300.0
LONG_SECONDS = 3600.0
FIVE_MINUTES, ONE_HOUR = "5m", "1h"
TTL_SECONDS = {FIVE_MINUTES: SHORT_SECONDS, ONE_HOUR: LONG_SECONDS}
WINDOW = 8  # recent gaps and turns that speak for the next one


class Recent:
    """The last `size` values, oldest first, in one array of doubles allocated up front.

    The tracker keeps two of these per conversation (10,000 by default) and the TTL advisor two
    per conversation it follows: a `deque(maxlen=8)` is 760 bytes before its first value, plus
    a 24-byte float object per value, so memory crept up while the windows filled (measured:
    RSS +2.7 MB from 40k to 80k requests over 10k conversations); this is 168 bytes, fixed."""

    __slots__ = ("_values", "_next", "_count")

    def __init__(self, size: int = 8) -> None:
        self._values = array("d", bytes(8 * size))
        self._next = self._count = 0

    def append(self, value: float) -> None:
        size = len(self._values)
        self._values[self._next] = value
        self._next = (self._next + 1) % size
        self._count = min(self._count + 1, size)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[float]:
        values, size = self._values, len(self._values)
        first = (self._next - self._count) % size
        return (values[(first + k) % size] for k in range(self._count))

    def __repr__(self) -> str:
        return f"Recent({list(self)})"


@dataclass(frozen=True, slots=True)
class Multipliers:
    """Prices of cached tokens as multiples of the base input price."""

    read: float = 0.1
    write_5m: float = 1.25
    write_1h: float = 2.0


@dataclass(slots=True)
class Rhythm:
    """A conversation's recent gaps and growth: a few floats, never text."""

    gaps: Recent = field(default_factory=lambda: Recent(WINDOW))
    growth: Recent = field(default_factory=lambda: Recent(WINDOW))
    last_prefix: int = 0
    last_start: float | None = None

    family: str | None = None  # its prompt family (a keyed hash): its gaps speak for the next

    def observe_at(self, start: float, prefix_tokens: int) -> float | None:
        """One more request that started at `start` (seconds) with this cacheable prefix; returns
        the gap since the previous one (None for the first)."""
        gap = None if self.last_start is None else max(start - self.last_start, 0.0)
        if self.last_start is None or start >= self.last_start:
            self.last_start = start
        self.observe(gap, prefix_tokens)
        return gap

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
        w = sum(self.growth) / len(self.growth) if self.growth else 1.0
        return ONE_HOUR if one_hour_pays(gaps, w, m) else FIVE_MINUTES


@dataclass(slots=True)
class FamilyPrior:
    """The last gaps within any conversation of one prompt family: what is known of a new
    conversation's rhythm before its first gap (a few floats, never text)."""

    gaps: Recent = field(default_factory=lambda: Recent(WINDOW))

    def observe(self, gap: float) -> None:
        if gap >= 0:
            self.gaps.append(gap)

    def choose(self, m: Multipliers = Multipliers()) -> str:
        """The TTL of a new conversation's first write, which writes its whole prefix (W = K)."""
        return ONE_HOUR if one_hour_pays(list(self.gaps), 1.0, m) else FIVE_MINUTES


def one_hour_pays(gaps: list[float], w: float, m: Multipliers) -> bool:
    """p * (w5m - r) > (1 - q) * (w1h - w5m) * w + q * (w1h - w5m), with p and q the shares of
    `gaps` in (5 min, 1 h] and over an hour, and w the share of the prefix a turn writes."""
    if not gaps or m.write_1h <= m.write_5m or m.write_5m <= m.read:
        return False
    n = len(gaps)
    p = sum(SHORT_SECONDS < g <= LONG_SECONDS for g in gaps) / n
    q = sum(g > LONG_SECONDS for g in gaps) / n
    extra = m.write_1h - m.write_5m
    return p * (m.write_5m - m.read) > (1 - q) * extra * w + q * extra
