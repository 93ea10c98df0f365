"""Agent workloads on virtual time (`x-sim-time`), so half an hour of a team's traffic runs in
seconds: straight into the simulator's `Engine` (no sockets, no proxy), or over HTTP through a
proxy (`HttpUpstream`; a mitmdump that loads `tests/sim/clock_addon.py` takes the same time).

Three APIs of OpenAI traffic, all sharing one ~8k-token agent prompt (tools + system):
- solo: one agent, 6 conversations one after another, ~3 requests a minute;
- team: 24 agents at once, ~70 requests a minute in all on the same prefix, for ~30 minutes;
- burst: the same team's first 100 seconds (72 requests a minute), then it stops.
Each is run with a key strategy for `prompt_cache_key`:
- `none`: no key (what a plain SDK script sends);
- `conversation`: one key per conversation (what the addon's `{affinity_id}` adds);
- `family:N`: one key per prompt family (model family + tools + system), sharded into N
  buckets by a consistent (jump) hash of the conversation, so each bucket stays under the
  documented ~15 RPM when N is large enough;
- `balanced:N`: an oracle that knows N from the first request and deals conversations out
  to the buckets in turn (perfectly even): what no key strategy can beat by much.
The measure is the token-weighted hit ratio over ALL turns, first turns included.

    python -m tests.sim.workload            # the table for both workloads and all strategies
    python -m tests.sim.workload gpt-5.6 --system-breakpoint   # GPT-5.6+, stable prefix marked
"""

import hashlib
import http.client
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from tests.sim.clock import SimClock
from tests.sim.engine import TIME_HEADER, Engine

PATH = "/p/openai/v1/chat/completions"
CHARS = 4  # the simulator's characters per token


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    agents: int  # running at the same time
    rpm: float  # requests a minute, all agents together
    turns: int  # requests per conversation
    conversations: int | None = None  # per agent; None: until `duration`
    duration: float = 0.0  # seconds of traffic when `conversations` is None
    system_tokens: int = 7000
    tool_tokens: int = 1000
    tools: int = 8  # tool definitions sharing `tool_tokens`
    model: str = "gpt-5.5"  # before GPT-5.6: automatic prefix caching (5.6+: breakpoints)
    system_breakpoint: bool = False  # GPT-5.6+: an explicit breakpoint ends the system prompt
    burst: bool = False  # every agent stops at `duration`, mid-conversation or not
    replicas: int = 8
    seed: int = 1


SOLO = Workload("solo", agents=1, rpm=3, turns=8, conversations=6)
TEAM = Workload("team", agents=24, rpm=70, turns=10, duration=1800)
# The team's first 100 seconds, then everyone stops: ~120 requests, most of them while a proxy
# that counts the rate has seen less than a minute of it.
BURST = Workload("burst", agents=24, rpm=72, turns=10, duration=100, burst=True)


@dataclass
class Result:
    workload: str
    strategy: str
    prompt: int = 0
    read: int = 0
    first_prompt: int = 0
    first_read: int = 0
    requests: int = 0
    overflowed: int = 0
    keys: set[str] = field(default_factory=set)

    @property
    def ratio(self) -> float:
        return self.read / self.prompt if self.prompt else 0.0

    @property
    def first_ratio(self) -> float:
        return self.first_read / self.first_prompt if self.first_prompt else 0.0

    def line(self) -> str:
        return (f"{self.workload:<6} {self.strategy:<14} all turns {self.ratio:.2f}   "
                f"first turns {self.first_ratio:.2f}   requests {self.requests:>5}   "
                f"overflowed {self.overflowed:>5}   keys {len(self.keys)}")


def jump_hash(key: int, buckets: int) -> int:
    """Lamping & Veach's jump consistent hash: going from N to N+1 buckets moves only the
    conversations that land in the new bucket."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (1 << 31) / ((key >> 33) + 1))
    return b


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


# (family, conversation, now) -> prompt_cache_key
Strategy = Callable[[str, str, float], str | None]
TARGET_RPM = 12  # per bucket: under the documented ~15 with a margin
HOLD = 600.0  # auto: the bucket count follows the busiest minute of the last 10


def _auto_buckets() -> Callable[[str, float], int]:
    """One proxy's own view: buckets = busiest minute of the family / TARGET_RPM, rounded up."""
    seen: dict[str, list[float]] = {}

    def buckets(family: str, now: float) -> int:
        times = seen.setdefault(family, [])
        times.append(now)
        while times and times[0] < now - HOLD:
            times.pop(0)
        busiest, j = 0, 0
        for i, t in enumerate(times):  # the most requests in any 60 s window
            while times[j] < t - 60:
                j += 1
            busiest = max(busiest, i - j + 1)
        return max(1, -(-busiest // TARGET_RPM))

    return buckets


def strategy(name: str) -> Strategy:
    if name == "none":
        return lambda family, conv, now: None
    if name == "conversation":
        return lambda family, conv, now: f"conv-{conv}"
    if name == "family:auto":
        count = _auto_buckets()
        return lambda family, conv, now:\
            f"fam-{family}-{jump_hash(int(_digest(conv), 16), count(family, now))}"
    if name.startswith("balanced:"):  # an oracle: N buckets from the first request, filled in turn
        n = int(name.split(":", 1)[1])
        assigned: dict[str, int] = {}
        return lambda family, conv, now:\
            f"fam-{family}-{assigned.setdefault(conv, len(assigned) % n)}"
    if name.startswith("family:"):
        n = int(name.split(":", 1)[1])
        return lambda family, conv, now:\
            f"fam-{family}-{jump_hash(int(_digest(conv), 16), n)}"
    raise ValueError(f"unknown strategy {name!r}")


def _text(rng: random.Random, tokens: int, topic: str) -> str:
    words = ("check", "the", "build", "file", "test", "change", "small", "safe", "diff", "run")
    out, size = [topic], len(topic)
    while size < tokens * CHARS:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[: tokens * CHARS]


def _shared(w: Workload) -> tuple[str, list[dict[str, Any]]]:
    rng = random.Random(f"shared-{w.seed}")
    system = _text(rng, w.system_tokens, "You are the team's coding agent.")
    per_tool = max(w.tool_tokens // max(w.tools, 1), 1)
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": _text(rng, per_tool, f"tool {i}"),
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}
        for i in range(w.tools)]
    return system, tools


@dataclass
class _Conversation:
    id: str
    messages: list[dict[str, Any]]
    turn: int = 0


Through = Callable[[dict[str, Any], float], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Sent:
    usage: dict[str, Any]  # as the provider reported it (Chat Completions)
    key: str | None  # the prompt_cache_key the provider saw, when the sender can know it


class Upstream(Protocol):
    """Where a workload's requests go, each served at its virtual time `now`."""

    def send(self, body: dict[str, Any], now: float) -> Sent: ...

    @property
    def overflowed(self) -> int: ...


class EngineUpstream:
    """A fresh simulator engine, called directly: no sockets, no proxy."""

    def __init__(self, w: Workload) -> None:
        self.engine = Engine(w.replicas, SimClock(), w.seed, "openai")

    def send(self, body: dict[str, Any], now: float) -> Sent:
        out = self.engine.handle("POST", PATH, "", [(TIME_HEADER, f"{now:.3f}")], body)
        assert out.usage is not None, out.reply.body
        key = body.get("prompt_cache_key")
        return Sent(out.usage, key if isinstance(key, str) else None)

    @property
    def overflowed(self) -> int:
        return self.engine.overflowed


class HttpUpstream:
    """POST /v1/chat/completions to `base_url` over one keep-alive connection (stdlib only):
    e.g. a mitmdump in reverse mode for api.openai.com, mapped to the simulator. The key the
    provider saw is not known here (a proxy may set it); `overflowed()` asks whoever knows.
    `epoch` is added to every request's time, so runs through one proxy can each have a clock
    of their own (a day apart, the proxy's rate windows have forgotten the run before)."""

    def __init__(self, base_url: str, overflowed: Callable[[], int] = lambda: 0,
                 epoch: float = 0.0, timeout: float = 30.0) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"HttpUpstream needs an http:// URL, not {base_url!r}")
        self._conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
        self._path = url.path.rstrip("/") + "/v1/chat/completions"
        self._overflowed = overflowed
        self.epoch = epoch

    def send(self, body: dict[str, Any], now: float) -> Sent:
        data = json.dumps(body).encode()
        headers = {"content-type": "application/json", "authorization": "Bearer sk-sim-0",
                   TIME_HEADER: f"{self.epoch + now:.3f}"}
        for attempt in (1, 2):  # a keep-alive connection the other side closed: once more
            try:
                self._conn.request("POST", self._path, data, headers)
                resp = self._conn.getresponse()
                reply = resp.read()
                break
            except (ConnectionError, http.client.BadStatusLine):
                self._conn.close()
                if attempt == 2:
                    raise
        if resp.status != 200:
            raise RuntimeError(f"upstream answered {resp.status}: {reply[:300]!r}")
        return Sent(json.loads(reply)["usage"], None)

    @property
    def overflowed(self) -> int:
        return self._overflowed()

    def close(self) -> None:
        self._conn.close()


def run(w: Workload, strategy_name: str, through: Through | None = None,
        upstream: Upstream | None = None) -> Result:
    """Drive workload `w` with one key strategy (what the client sends) against `upstream`, by
    default a fresh simulator engine. `through(body, now)` returns the body as it reaches the
    provider (e.g. after a proxy's rewrite, in process)."""
    upstream = upstream if upstream is not None else EngineUpstream(w)
    key_for = strategy(strategy_name)
    system, tools = _shared(w)
    family = _digest(w.model.split("-")[0], json.dumps(tools), system)
    rng = random.Random(f"traffic-{w.seed}")
    gap = 60.0 * w.agents / w.rpm  # seconds between one agent's requests
    result = Result(w.name, strategy_name)
    # (time, agent) of each agent's next request, and each agent's open conversation
    queue = [(rng.uniform(0, gap), a) for a in range(w.agents)]
    current: dict[int, _Conversation] = {}
    started = [0] * w.agents
    while queue:
        queue.sort()
        now, agent = queue.pop(0)
        conv = current.get(agent)
        if w.burst and now >= w.duration:
            continue
        if conv is None:
            if (w.conversations is not None and started[agent] >= w.conversations) or\
                    (w.conversations is None and now >= w.duration):
                continue
            started[agent] += 1
            cid = f"{agent}-{started[agent]}"
            marked = [{"type": "text", "text": system,
                       "prompt_cache_breakpoint": {"mode": "explicit"}}]
            conv = current[agent] = _Conversation(cid, [
                {"role": "system", "content": marked if w.system_breakpoint else system},
                {"role": "user", "content": _text(rng, 150, f"Task {cid}:")}])
        body: dict[str, Any] = {"model": w.model, "messages": conv.messages}
        if tools:
            body["tools"] = tools
        key = key_for(family, conv.id, now)
        if key is not None:
            body["prompt_cache_key"] = key
        if through is not None:
            body = through(body, now)
        sent = upstream.send(body, now)
        if sent.key is not None:
            result.keys.add(sent.key)
        prompt = sent.usage["prompt_tokens"]
        read = sent.usage["prompt_tokens_details"]["cached_tokens"]
        result.prompt += prompt
        result.read += read
        result.requests += 1
        if conv.turn == 0:
            result.first_prompt += prompt
            result.first_read += read
        conv.turn += 1
        if conv.turn >= w.turns:
            del current[agent]
        else:  # the reply (a tool call) and the tool's output
            conv.messages = conv.messages + [
                {"role": "assistant", "content": _text(rng, 80, f"Step {conv.turn}:")},
                {"role": "user", "content": _text(rng, rng.randint(200, 1200), "Output:")}]
        queue.append((now + gap * rng.uniform(0.8, 1.2), agent))
    result.overflowed = upstream.overflowed
    return result


STRATEGIES = ("none", "conversation", "family:1", "family:2", "family:4", "family:8",
              "family:auto")


def main(argv: list[str]) -> int:
    """`[model] [--system-breakpoint]`"""
    model = next((a for a in argv if not a.startswith("--")), None)
    for w in (SOLO, TEAM, BURST):
        w = Workload(**{**{f: getattr(w, f) for f in w.__dataclass_fields__},
                        "model": model or w.model,
                        "system_breakpoint": "--system-breakpoint" in argv})
        for name in STRATEGIES:
            print(run(w, name).line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
