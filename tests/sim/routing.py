"""Which replica (machine, server, upstream) serves a request: each provider's documented scheme.

- `shared`: one cache for every replica, nothing to route on (Anthropic per workspace [1];
  DeepSeek's disk cache [2]; Gemini, Moonshot, DashScope: no affinity documented).
- `key`: a per-conversation signal pins a server; without one the load balancer picks at
  random (xAI `x-grok-conv-id` / Responses `prompt_cache_key` [3]: "without it you often land
  on a cold server"; Fireworks `x-session-affinity` [4]; Codex `session-id` [5]).
- `prefix-key`: OpenAI [6]: the machine is a hash of the prompt's first ~256 tokens
  combined with `prompt_cache_key` (absent key: the prefix alone). A prefix+key pair gets about
  15 requests a minute on its machine; the rest overflow to other machines (which one is not
  documented: here a seeded random other one). On GPT-5.6 and later the 15 RPM count is per key
  across all its prefixes.
- `sticky`: OpenRouter [7]: per account, per model, per conversation, where the conversation
  is a hash of the first system/developer message + the first non-system message; the first
  request is load balanced (random here) and the pin expires after ~10 minutes idle.

[1] https://platform.claude.com/docs/en/build-with-claude/prompt-caching
[2] https://api-docs.deepseek.com/guides/kv_cache
[3] https://docs.x.ai/developers/advanced-api-usage/prompt-caching/maximizing-cache-hits
[4] https://docs.fireworks.ai/guides/prompt-caching
[5] https://github.com/openai/codex/pull/44862
[6] https://developers.openai.com/api/docs/guides/prompt-caching
[7] https://openrouter.ai/docs/guides/best-practices/prompt-caching
"""

import hashlib
import random
import re
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

RPM_WINDOW = 60.0


class Signal(NamedTuple):
    """One place a provider reads its routing key from."""

    source: str  # "header" or "body" (a top-level field)
    name: str


@dataclass(frozen=True, slots=True)
class Routing:
    scheme: str = "shared"  # "shared" | "key" | "prefix-key" | "sticky"
    signals: tuple[Signal, ...] = ()  # tried in order; the first present one is the key
    rpm: int = 15  # prefix-key: requests a minute a pair (or key) takes before overflowing
    sticky_idle: float = 600.0  # sticky: idle seconds before a pin is forgotten


SHARED = Routing()

_GPT = re.compile(r"(?:^|/)gpt-(\d+)(?:\.(\d+))?")


def gpt_5_6_or_later(model: str) -> bool:
    """GPT-5.6 and later count the 15 RPM per key across all prefixes and cache at
    breakpoints ([6] in the module docstring)."""
    m = _GPT.search(model.lower())
    return bool(m) and (int(m[1]), int(m[2] or 0)) >= (5, 6)


def _hash(*parts: bytes) -> int:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big") + p)
    return int.from_bytes(h.digest()[:8], "big")


class Router:
    """Routing state of one simulator: RPM windows and sticky pins, seeded randomness."""

    def __init__(self, replicas: int, seed: int) -> None:
        self.replicas = replicas
        self._rng = random.Random(seed)
        self._home_served: dict[tuple[str, bytes, bytes | None], deque[float]] = {}
        self._pins: dict[tuple[str, bytes], tuple[int, float]] = {}
        self.overflowed = 0  # requests that left their home machine (for tests and reports)

    def route(self, provider: str, routing: Routing, key: str | None, lead: bytes,
              root: bytes | None, model: str, now: float) -> int:
        """The replica for one request. `key`: the signal's value; `lead`: identity of the first
        ~256 tokens; `root`: OpenRouter's conversation identity (account and model included)."""
        if routing.scheme == "shared" or self.replicas == 1:
            return 0
        if routing.scheme == "key":
            if key:
                return _hash(key.encode()) % self.replicas
            return self._rng.randrange(self.replicas)
        if routing.scheme == "prefix-key":
            return self._prefix_key(provider, routing, key, lead, model, now)
        if routing.scheme == "sticky":
            return self._sticky(provider, routing, root, now)
        raise ValueError(f"unknown routing scheme {routing.scheme!r}")

    def _prefix_key(self, provider: str, routing: Routing, key: str | None, lead: bytes,
                    model: str, now: float) -> int:
        kb = key.encode() if key else None
        home = _hash(lead, kb or b"") % self.replicas
        counted = (provider, b"", kb) if kb and gpt_5_6_or_later(model) else (provider, lead, kb)
        served = self._home_served.setdefault(counted, deque())
        while served and served[0] <= now - RPM_WINDOW:
            served.popleft()
        if len(served) < routing.rpm:
            served.append(now)
            return home
        self.overflowed += 1
        other = self._rng.randrange(self.replicas - 1)
        return other if other < home else other + 1

    def _sticky(self, provider: str, routing: Routing, root: bytes | None, now: float) -> int:
        if root is None:
            return self._rng.randrange(self.replicas)
        pin = self._pins.get((provider, root))
        if pin is not None and now - pin[1] < routing.sticky_idle:
            replica = pin[0]
        else:
            replica = self._rng.randrange(self.replicas)
        self._pins[(provider, root)] = (replica, now)
        return replica
