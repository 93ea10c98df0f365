"""The breakpoint planner's inputs: the rule's `cache_control` spec, the tracker's hint, model
minimums and per-model facts (catalog). Pure parsing; the planning is in `breakpoints.py`.
"""

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from affinity_addon.apis import ANTHROPIC, BEDROCK_CONVERSE, OPENAI_CHAT
from affinity_addon.catalog.minimums import minimums
from affinity_addon.catalog.platforms import platform_for
from affinity_addon.catalog.providers import PROVIDER_FACTS, BreakpointDialect
from affinity_addon.models import normalize_model

MAX_MARKERS = 4
# Blocks a breakpoint looks back for an earlier cache entry (catalog/providers.yaml).
DEFAULT_LOOKBACK = PROVIDER_FACTS.lookback_blocks.get(ANTHROPIC, 20)
DEFAULT_MIN_TOKENS = 1024

AGENT = "agent"
EXPLICIT = "explicit"
SKIP = "skip"
FILL = "fill"
TTLS = ("5m", "1h")
AUTO_TTL = "auto"  # per conversation, from its rhythm (ttl_policy.py), via the tracker's hint
PLACEMENT_KINDS = ("tools", "system", "last_user", "last_n", "auto")
TOP_LEVEL = "cache_control"  # path of Anthropic's automatic (top-level) marker


# Models that honour only the last breakpoint of a request (OpenRouter's Gemini route), matched
# against normalized names: one marker is all they can use.
LAST_MARKER_ONLY_MODELS = PROVIDER_FACTS.last_marker_only_models
ONE_HOUR_TTL_MODELS = PROVIDER_FACTS.one_hour_ttl_models

# Reasoning blocks (Anthropic's thinking, Converse's reasoningContent) take no marker.
NEVER_MARKED = frozenset({"thinking", "redacted_thinking", "reasoningContent"})


class ApiRules(NamedTuple):
    tool_markers: bool  # may a tools[] entry carry a marker
    markable: frozenset[str] | None  # block types that may carry one; None: all but NEVER_MARKED
    keep_string_roles: frozenset[str]  # roles whose string content must stay a string
    roles: frozenset[str] | None = None  # roles whose message parts may carry one; None: any
    text_type: str = "text"  # the type of the one text part a string content becomes
    # Converse: blocks are one-key objects (the key is the kind) and a marker is a block of its
    # own, `{"cachePoint": {...}}`, inserted after the block it marks.
    point_blocks: bool = False


API_RULES: dict[str, ApiRules] = {
    # Mid-conversation `role: system` messages (Claude Code) are a beta: leave their form alone.
    ANTHROPIC: ApiRules(True, None, frozenset({"system"})),
    # OpenRouter takes markers on text parts only. A string tool result becomes a one-part
    # text list like any other message (the chat format allows text parts on `role: tool`, and
    # OpenRouter carries them into Anthropic tool_result blocks): in an agent's tool loop the
    # newest messages are tool results, and the rolling marker must be able to follow them.
    OPENAI_CHAT: ApiRules(False, frozenset({"text"}), frozenset()),
    # Checkpoints go in `system`, `messages` and `toolConfig.tools`, at most 4 for Claude
    # (https://docs.aws.amazon.com/bedrock/latest/userguide/prompt-caching.html).
    BEDROCK_CONVERSE: ApiRules(True, None, frozenset(), point_blocks=True),
}


@dataclass(frozen=True, slots=True)
class Markers:
    """How a route marks a breakpoint: Anthropic's `cache_control` (the default, also what
    OpenRouter takes), or a provider's own form from catalog/providers.yaml
    `breakpoint_dialects` (`for_dialect`)."""

    key: str = "cache_control"  # the key a marked block carries
    value: Mapping[str, Any] | None = None  # fixed; None: {"type": "ephemeral"[, "ttl": "1h"]}
    ttl: str | None = None  # None: each marker carries its TTL (5m, 1h); else this, for all
    writes: int = MAX_MARKERS  # breakpoints a request may hold, an implicit one included
    implicit: bool = False  # the provider adds a breakpoint of its own (one of the writes)...
    implicit_off: tuple[str, str] | None = None  # ...unless this field has this value
    lookback: bool = True  # a breakpoint looks back only `spec.lookback` blocks
    top_level: bool = True  # the body may carry Anthropic's automatic top-level marker
    apis: Mapping[str, ApiRules] = field(default_factory=lambda: API_RULES)

    def marker(self, ttl: str) -> dict[str, Any]:
        if self.value is not None:
            return dict(self.value)
        # 5m is the default everywhere; some OpenAI-compatible routes reject an explicit ttl.
        return {"type": "ephemeral", "ttl": "1h"} if ttl == "1h" else {"type": "ephemeral"}


CACHE_CONTROL = Markers()


def for_dialect(d: BreakpointDialect) -> Markers:
    """The planner's form of a catalog dialect: no lookback limit, no top-level marker (the
    dialects listed have neither), the TTL the request's own options give."""
    return Markers(
        d.field, d.value, d.ttl, d.writes, implicit=d.implicit_off is not None,
        implicit_off=d.implicit_off, lookback=False, top_level=False,
        apis={name: ApiRules(False, spec.parts, frozenset(), spec.roles, spec.text_part)
              for name, spec in d.apis.items()})


_DIALECTS = {d.name: for_dialect(d) for d in PROVIDER_FACTS.breakpoint_dialects}


def markers_for(host: str | None, model: str | None) -> Markers | None:
    """The breakpoint form for a request to `host`; None when the host has a form of its own
    that `model` does not take (no breakpoints at all)."""
    d = PROVIDER_FACTS.breakpoint_dialect(host) if host else None
    if d is None:
        return CACHE_CONTROL
    return _DIALECTS[d.name] if d.fits(model) else None


# ---------------------------------------------------------------------------------------------
# Spec


DIGEST_SIZE = 8  # the block digest of diagnosis/fingerprint.py: role, NUL, canonical bytes
ANY_DIGEST = bytes(DIGEST_SIZE)  # a block the fingerprint left out as volatile: matches anything


def block_digest(role: str | None, canon: bytes) -> bytes:
    """A block's identity for comparisons within this process (planner hints, verdicts).

    Python's own hash (SipHash, keyed per process) runs ~5x faster than BLAKE2b, and a
    fingerprint's digests are never compared across processes or written anywhere; 64 bits
    make a collision (one misreported diagnosis) vanishingly rare. Never zero: ANY_DIGEST
    means "matches anything"."""
    return (hash((role or "", canon)) & _MASK64 or 1).to_bytes(DIGEST_SIZE, "little")


_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class PlanHint:
    """What the tracker knows of this conversation: for each recent request of it (one per
    thread: main conversation, side requests), its blocks' digests in prompt order, concatenated
    (DIGEST_SIZE bytes each). Plain bytes, so the planner stays a pure function of its input."""

    previous: tuple[bytes, ...] = ()
    ttl: str | None = None  # for `ttl: auto`: what the conversation's rhythm calls for


class HintFor(Protocol):
    """What the tracker knows of a conversation (`MissTracker.hint`): its previous requests and
    the TTL its rhythm, or its prompt family's (`family()` makes the family on demand), calls
    for."""

    def __call__(self, key: str | None, *,
                 family: Callable[[], str | None] | None = None) -> PlanHint | None: ...


class Placement(NamedTuple):
    kind: str  # one of PLACEMENT_KINDS
    count: int = 1  # type: ignore[assignment]  # K for last_n (shadows tuple.count)


@dataclass(frozen=True, slots=True)
class CacheControlSpec:
    strategy: str = AGENT
    placements: tuple[Placement, ...] = ()
    ttl: str = "5m"
    client_markers: str = SKIP  # skip: leave requests with client markers alone; fill: free slots
    lookback: int = DEFAULT_LOOKBACK
    min_tokens: int | None = None  # None: by model, from catalog/cache_minimums.yaml
    last_marker_only: bool | None = None  # None: by model (LAST_MARKER_ONLY_MODELS)


@dataclass(frozen=True, slots=True)
class AddedMarker:
    path: str  # "tools[3]", "system[1]", "messages[5].content[0]" or "cache_control" (top level)
    ttl: str  # "5m" | "1h"
    converted: bool = False  # string content was turned into a one-part list to carry it
    inserted: bool = False  # `path` is a Converse cachePoint block the plan inserted


_SPEC_KEYS = ("strategy", "placements", "ttl", "client_markers", "lookback", "min_tokens",
              "last_marker_only")


def parse_cache_control(value: Any) -> CacheControlSpec:
    """Parses a rule's `cache_control:` value: true, "agent", "auto" or a mapping."""
    if value is True or value == AGENT:
        return CacheControlSpec()
    if value == "auto":
        return CacheControlSpec(strategy=EXPLICIT, placements=(Placement("auto"),))
    if value is False or value is None:
        raise ValueError("false/empty means no breakpoints: leave the key out instead")
    if not isinstance(value, dict):
        raise ValueError(f"expected true, \"auto\" or a mapping, got {value!r}")
    unknown = sorted(str(k) for k in value if k not in _SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; expected {', '.join(_SPEC_KEYS)}")

    placements = _parse_placements(value.get("placements"))
    strategy = value.get("strategy", EXPLICIT if placements else AGENT)
    if strategy not in (AGENT, EXPLICIT):
        raise ValueError(f"strategy must be agent or explicit, got {strategy!r}")
    if strategy == EXPLICIT and not placements:
        raise ValueError("strategy explicit needs a non-empty placements list")
    if strategy == AGENT and placements:
        raise ValueError("placements only apply to strategy: explicit")

    ttl = value.get("ttl", "5m")
    if ttl not in (*TTLS, AUTO_TTL):
        raise ValueError(f"ttl must be 5m, 1h or auto, got {ttl!r}")
    client = value.get("client_markers", SKIP)
    if client not in (SKIP, FILL):
        raise ValueError(f"client_markers must be skip or fill, got {client!r}")
    lookback = value.get("lookback", DEFAULT_LOOKBACK)
    if not _is_int(lookback) or lookback < 1:
        raise ValueError(f"lookback must be a positive integer, got {lookback!r}")
    min_tokens = value.get("min_tokens", "auto")
    if min_tokens == "auto":
        min_tokens = None
    elif not _is_int(min_tokens) or min_tokens < 0:
        raise ValueError(f"min_tokens must be auto or a non-negative integer, got {min_tokens!r}")
    last_only = value.get("last_marker_only")
    if last_only is not None and not isinstance(last_only, bool):
        raise ValueError(f"last_marker_only must be true or false, got {last_only!r}")
    return CacheControlSpec(strategy, placements, ttl, client, lookback, min_tokens, last_only)


def _parse_placements(raw: Any) -> tuple[Placement, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"placements must be a list, got {raw!r}")
    out: list[Placement] = []
    for item in raw:
        if isinstance(item, str) and item in PLACEMENT_KINDS and item != "last_n":
            out.append(Placement(item))
        elif isinstance(item, dict) and set(item) == {"last_n"}:
            k = item["last_n"]
            if not _is_int(k) or not 1 <= k <= MAX_MARKERS:
                raise ValueError(f"last_n must be an integer from 1 to {MAX_MARKERS}, got {k!r}")
            out.append(Placement("last_n", k))
        else:
            raise ValueError(f"unknown placement {item!r}; expected tools, system, last_user, "
                             "auto or {last_n: K}")
    return tuple(out)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# Model minimums


def min_tokens_for(model: str | None, host: str | None = None) -> int:
    """The model's minimum cacheable prefix: the host's platform's own number
    (catalog/platforms.yaml), else catalog/cache_minimums.yaml (first glob wins)."""
    name = normalize_model(model) if isinstance(model, str) else ""
    platform = platform_for(host)
    own = platform.minimum(name) if platform is not None else None
    if own is not None:
        return own
    for glob, tokens in minimums():
        if fnmatch.fnmatchcase(name, glob):
            return tokens
    return DEFAULT_MIN_TOKENS


def takes_one_hour(model: str | None, host: str | None = None) -> bool:
    """Does the model take a 1h cache TTL (on this host's platform, when it has its own list)?"""
    name = normalize_model(model) if isinstance(model, str) else ""
    platform = platform_for(host)
    globs = (platform.one_hour_ttl_models if platform is not None
             and platform.one_hour_ttl_models is not None else ONE_HOUR_TTL_MODELS)
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def auto_ttl(model: str | None, hint: PlanHint | None, host: str | None = None) -> str:
    """`ttl: auto`: 1h where the conversation's rhythm calls for it and the model takes it."""
    if hint is None or hint.ttl != "1h":
        return "5m"
    return "1h" if takes_one_hour(model, host) else "5m"


def last_marker_only(model: str | None) -> bool:
    name = normalize_model(model) if isinstance(model, str) else ""
    return any(fnmatch.fnmatchcase(name, g) for g in LAST_MARKER_ONLY_MODELS)
