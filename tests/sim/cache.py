"""The simulated caches: a prompt's prefix identities and the documented cache models.

- Automatic prefix caching (OpenAI, xAI, DeepSeek, ...; OpenAI's guide [1]): a hit is the
  longest earlier prefix, token by token, counted in whole `step`-token chunks (128 on OpenAI:
  "hit in 128-token increments after 1,024"), and only when it is at least `minimum` tokens.
  Every chunk of every prompt is stored, per replica, until idle for the TTL.
- OpenAI breakpoints (GPT-5.6 and later, [1]): writes only at breakpoints, the implicit one on
  the latest message (unless `prompt_cache_options.mode` is "explicit") and the parts marked
  `prompt_cache_breakpoint: {"mode": "explicit"}`, at most 4; a read is the longest written
  breakpoint prefix of this prompt, with no lookback limit, from 1,024 tokens. So a changed
  suffix reads nothing even with thousands of shared tokens, as the guide warns.
- Anthropic markers [2]: only prefixes that ended at a `cache_control` block are written; a
  marker reads the longest live one within its 20-block lookback.
Prompts come from `render.render`: the identity of a prefix is the model plus the rendered
blocks (heads and text), so a marker moving between turns does not change it.

[1] https://developers.openai.com/api/docs/guides/prompt-caching
[2] https://platform.claude.com/docs/en/build-with-claude/prompt-caching
"""

import fnmatch
import hashlib
from dataclasses import dataclass

from tests.sim.render import CHARS_PER_TOKEN, Block

AUTO_MIN_TOKENS = 1024
AUTO_STEP = 128
LEAD_TOKENS = 256  # OpenAI hashes "the first ~256 prefix tokens" to pick a machine ([1])
LOOKBACK = 20  # a marker checks its own block boundary and the 19 before it
MAX_MARKERS = 4
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
NOT_CACHEABLE = frozenset({"thinking", "redacted_thinking", "reasoningContent"})
_PURGE_AT = 50_000  # entries per cache before expired ones are swept


# Minimum cacheable prefix per Claude model ([2] in the module docstring), first match wins.
# The specific 4.x/3.x rows must precede the `claude-*-5*` row that catches the 5.x family.
ANTHROPIC_MINIMUMS: tuple[tuple[str, int], ...] = (
    ("claude-opus-4-5*", 4096), ("claude-opus-4-6*", 4096), ("claude-haiku-4-5*", 4096),
    ("claude-opus-4-7*", 2048), ("claude-mythos-preview*", 2048), ("claude-3-5-haiku*", 2048),
    ("claude-sonnet-4-5*", 1024), ("claude-sonnet-4-6*", 1024), ("claude-opus-4-8*", 1024),
    ("claude-sonnet-5", 1024), ("claude-sonnet-5-2*", 1024), ("claude-3*", 1024),
    ("claude-*-5*", 512),
)
DEFAULT_MINIMUM = 1024


# Bedrock's own table ("Minimum number of tokens per cache checkpoint" and "Supported TTL" in the
# Bedrock prompt-caching guide, https://docs.aws.amazon.com/bedrock/latest/userguide/prompt-caching.html),
# on the model id without its region prefix and vendor (us.anthropic.claude-opus-4-7 ->
# claude-opus-4-7). The 1h TTL is listed for every Claude model in it but these two.
BEDROCK_MINIMUMS: tuple[tuple[str, int], ...] = (
    ("claude-fable-5*", 512), ("claude-mythos-5*", 512), ("claude-mythos-preview*", 4096),
    ("claude-opus-5*", 512), ("claude-opus-4-8*", 1024), ("claude-opus-4-7*", 4096),
    ("claude-opus-4-6*", 4096), ("claude-opus-4-5*", 4096), ("claude-sonnet-5*", 1024),
    ("claude-sonnet-4-6*", 1024), ("claude-sonnet-4-5*", 1024), ("claude-3-7-sonnet*", 1024),
    ("claude-3-5-sonnet*", 1024), ("claude-haiku-4-5*", 4096),
)
BEDROCK_5M_ONLY = ("claude-3-7-sonnet*", "claude-3-5-sonnet*")


def bedrock_model(model: str | None) -> str:
    """`arn:...:inference-profile/us.anthropic.claude-opus-4-7` -> `claude-opus-4-7`."""
    name = (model or "").lower().rsplit("/", 1)[-1]
    while "." in name.split("claude", 1)[0]:  # region prefix ("us."), vendor ("anthropic.")
        name = name.split(".", 1)[1]
    return name


def bedrock_minimum(model: str | None) -> int:
    name = bedrock_model(model)
    return next((m for g, m in BEDROCK_MINIMUMS if fnmatch.fnmatchcase(name, g)), DEFAULT_MINIMUM)


def bedrock_takes_1h(model: str | None) -> bool:
    name = bedrock_model(model)
    return not any(fnmatch.fnmatchcase(name, g) for g in BEDROCK_5M_ONLY)


def anthropic_minimum(model: str | None) -> int:
    name = (model or "").lower().removeprefix("anthropic/").split("[")[0].replace(".", "-")
    for glob, minimum in ANTHROPIC_MINIMUMS:
        if fnmatch.fnmatchcase(name, glob):
            return minimum
    return DEFAULT_MINIMUM


@dataclass(frozen=True, slots=True)
class Marker:
    index: int  # the marked block; its prefix ends at boundary index + 1
    ttl: str
    path: str  # Anthropic's error path form, e.g. "messages.0.content.4"


@dataclass(frozen=True, slots=True)
class Prompt:
    keys: tuple[bytes, ...]  # keys[i]: identity of the prefix made of blocks 0..i (and the model)
    ends: tuple[int, ...]  # ends[i]: tokens of blocks 0..i
    markers: tuple[Marker, ...]
    breakpoints: tuple[int, ...]  # blocks marked with an explicit OpenAI breakpoint
    chunks: tuple[bytes, ...]  # chunks[k]: identity of the first (k + 1) * step tokens
    step: int
    lead: bytes  # identity of the first LEAD_TOKENS tokens (all of them when shorter)

    @property
    def tokens(self) -> int:
        return self.ends[-1] if self.ends else 0

    def tokens_to(self, boundary: int) -> int:
        """Tokens in the first `boundary` blocks."""
        return self.ends[boundary - 1] if boundary > 0 else 0


def _chunk_keys(seed: bytes, blocks: list[Block], step: int,
                limit: int | None = None) -> tuple[list[bytes], bytes]:
    """Identities of the prompt cut every `step` tokens (a block's text is padded to whole
    tokens, so no token spans two blocks), and of everything up to `limit` chunks."""
    h = hashlib.sha256(seed)
    size = step * CHARS_PER_TOKEN
    keys: list[bytes] = []
    fed = 0  # padded characters hashed so far
    for b in blocks:
        h.update(b"\x1e" + b.head.encode() + b"\x1f")
        text = b.text + "\0" * (-len(b.text) % CHARS_PER_TOKEN)
        i = 0
        while i < len(text):
            take = min(len(text) - i, size - fed % size)
            h.update(text[i:i + take].encode("utf-8", "surrogatepass"))
            i += take
            fed += take
            if fed % size == 0:
                keys.append(h.copy().digest())
                if limit is not None and len(keys) >= limit:
                    return keys, keys[-1]
    return keys, h.digest()


def analyze(blocks: list[Block], model: str | None, step: int = AUTO_STEP,
            automatic: object = None) -> Prompt:
    """`automatic`: Anthropic's top-level `cache_control`, a marker on the last cacheable
    block that takes one of the 4 slots ([2])."""
    seed = f"{model or ''}\0".encode()
    digest = hashlib.sha256(seed)
    keys: list[bytes] = []
    ends: list[int] = []
    markers: list[Marker] = []
    last_cacheable: int | None = None
    total = 0
    for i, b in enumerate(blocks):
        data = (b.head + "\x1f" + b.text).encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
        keys.append(digest.copy().digest())
        total += b.tokens
        ends.append(total)
        if b.kind not in NOT_CACHEABLE:
            last_cacheable = i
        if isinstance(b.directive, dict):
            markers.append(Marker(i, str(b.directive.get("ttl", "5m")), b.path))
    if isinstance(automatic, dict):
        markers.append(Marker(last_cacheable if last_cacheable is not None else -1,
                              str(automatic.get("ttl", "5m")), "cache_control"))
    chunks, _ = _chunk_keys(seed, blocks, step)
    _, lead = _chunk_keys(seed, blocks, LEAD_TOKENS, limit=1)
    explicit = tuple(i for i, b in enumerate(blocks) if b.breakpoint)
    return Prompt(tuple(keys), tuple(ends), tuple(markers), explicit, tuple(chunks), step, lead)


def check_markers(prompt: Prompt) -> None:
    """Raise ValueError with Anthropic's own message for marker sets the API rejects."""
    if len(prompt.markers) > MAX_MARKERS:
        raise ValueError(f"A maximum of {MAX_MARKERS} blocks with cache_control may be provided. "
                         f"Found {len(prompt.markers)}.")
    seen_5m = False
    for m in prompt.markers:
        if m.ttl not in TTL_SECONDS:
            raise ValueError(f"{m.path}.cache_control.ttl: Input should be '5m' or '1h'")
        if m.ttl == "1h" and seen_5m:
            raise ValueError(f"{m.path}.cache_control.ttl: a ttl='1h' cache_control block must not "
                             "come after a ttl='5m' cache_control block. Note that blocks are "
                             "processed in the following order: `tools`, `system`, `messages`.")
        seen_5m = seen_5m or m.ttl == "5m"


class AutoCache:
    """One replica's automatic prefix cache: every chunk of every prompt, evicted when idle."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._last_use: dict[bytes, float] = {}
        self._swept = float("-inf")

    def serve(self, prompt: Prompt, now: float, minimum: int = AUTO_MIN_TOKENS) -> int:
        """Cached tokens for this prompt (0 below `minimum`); then the whole prompt is stored."""
        hit = 0
        for k in range(len(prompt.chunks) - 1, -1, -1):
            used = self._last_use.get(prompt.chunks[k])
            if used is not None and now - used < self.ttl:
                hit = (k + 1) * prompt.step
                break
        if len(self._last_use) > _PURGE_AT and now - self._swept > self.ttl:
            # at most once a TTL: a sweep on every request of a busy cache would be quadratic
            self._swept = now
            self._last_use = {k: t for k, t in self._last_use.items() if now - t < self.ttl}
        for key in prompt.chunks:
            self._last_use[key] = now
        return hit if hit >= minimum else 0


MAX_BREAKPOINT_WRITES = 4


class BreakpointCache:
    """One replica's GPT-5.6+ cache: entries only where a breakpoint ended a prefix."""

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[float, float]] = {}  # key -> (last use, ttl seconds)

    def serve(self, prompt: Prompt, implicit: bool, ttl: float, now: float) -> tuple[int, int]:
        """(read, written) tokens."""
        read_at = 0
        for boundary in range(len(prompt.keys), 0, -1):
            entry = self._entries.get(prompt.keys[boundary - 1])
            if entry is not None and now - entry[0] < entry[1] \
                    and prompt.tokens_to(boundary) >= AUTO_MIN_TOKENS:
                read_at = boundary
                self._entries[prompt.keys[boundary - 1]] = (now, entry[1])  # a hit refreshes
                break
        ends = [i + 1 for i in prompt.breakpoints]
        if implicit and prompt.keys:
            ends.append(len(prompt.keys))  # the latest message ends the prompt
        ends = sorted(set(ends))[-MAX_BREAKPOINT_WRITES:]
        if len(self._entries) > _PURGE_AT:
            self._entries = {k: e for k, e in self._entries.items() if now - e[0] < e[1]}
        done = read_at
        for end in ends:
            if prompt.tokens_to(end) < AUTO_MIN_TOKENS:
                continue
            self._entries[prompt.keys[end - 1]] = (now, ttl)
            done = max(done, end)
        return prompt.tokens_to(read_at), prompt.tokens_to(done) - prompt.tokens_to(read_at)


@dataclass(frozen=True, slots=True)
class MarkerUsage:
    read: int = 0
    write_5m: int = 0
    write_1h: int = 0

    @property
    def write(self) -> int:
        return self.write_5m + self.write_1h


class MarkerCache:
    """Anthropic-style explicit cache: entries exist only where a marker ended a prefix."""

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[float, float]] = {}  # key -> (last use, ttl seconds)

    def _alive(self, key: bytes, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and now - entry[0] < entry[1]

    def serve(self, prompt: Prompt, minimum: int, now: float) -> MarkerUsage:
        markers = [m for m in prompt.markers if m.index >= 0]
        read_at = 0
        for m in markers:
            end = m.index + 1
            for boundary in range(end, max(end - LOOKBACK, 0), -1):
                if boundary <= read_at:
                    break
                if self._alive(prompt.keys[boundary - 1], now):
                    read_at = boundary
                    break
        if read_at:  # a hit refreshes the entry's lifetime for free
            key = prompt.keys[read_at - 1]
            self._entries[key] = (now, self._entries[key][1])
        if len(self._entries) > _PURGE_AT:
            self._entries = {k: e for k, e in self._entries.items() if now - e[0] < e[1]}
        written = {"5m": 0, "1h": 0}
        done = read_at
        for m in markers:
            end = m.index + 1
            if prompt.tokens_to(end) < minimum:
                continue  # silently uncached, like the API
            key = prompt.keys[end - 1]
            ttl = TTL_SECONDS[m.ttl]
            if self._alive(key, now):
                ttl = max(ttl, self._entries[key][1])
            self._entries[key] = (now, ttl)
            if end > done:
                written[m.ttl] += prompt.tokens_to(end) - prompt.tokens_to(done)
                done = end
        return MarkerUsage(prompt.tokens_to(read_at), written["5m"], written["1h"])
