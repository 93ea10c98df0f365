"""Who a request is for and how that provider behaves: a data table, one row per provider.

Every behaviour difference (routing scheme, cache model, usage field names, streaming usage
placement, error JSON, body constraints) is a field of `Behaviour`. A provider row holds a base
`Behaviour`, per-path changes and per-model changes (OpenRouter routes `anthropic/*` with Claude's
marker semantics). Facts follow the shared providers.md reference (section numbers below), never
the addon's code.
"""

import fnmatch
import re
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from tests.sim.render import ANTHROPIC, GEMINI, OPENAI_CHAT, OPENAI_RESPONSES
from tests.sim.routing import SHARED, Routing, Signal


@dataclass(frozen=True, slots=True)
class Behaviour:
    shape: str = OPENAI_CHAT
    usage: str = "openai-chat"  # usage style, a key of wire.USAGE_STYLES
    stream_usage: str = "include_usage"  # chat SSE usage: "include_usage" | "always" | "in_choice"
    cache: str = "auto"  # "auto": automatic prefix cache; "markers": Anthropic cache_control
    routing: Routing = SHARED  # which replica serves a request (routing.py)
    ttl: float = 600.0  # automatic cache: idle seconds before an entry is gone
    auto_min: int = 1024  # automatic cache: smallest prefix that is ever a hit
    auto_step: int = 128  # automatic cache: hits count in whole chunks of this many tokens
    gpt_breakpoints: bool = False  # GPT-5.6+ models cache at breakpoints (cache.BreakpointCache)
    # Content-part types that may carry `prompt_cache_breakpoint`; one anywhere else is a 400.
    # None: not checked (a route that passes the body on).
    breakpoint_parts: frozenset[str] | None = None
    errors: str = "openai"  # error JSON style, a key of wire.ERROR_STYLES
    stream: bool | None = None  # None: the body's `stream` decides; else the path decides (Gemini)
    stream_required: bool = False
    forbidden: tuple[str, ...] = ()  # body keys, at any depth, answered with 400
    conflicts: tuple[tuple[str, str], ...] = ()  # dotted body paths that must not both be set


class Route(NamedTuple):
    pattern: re.Pattern[str]  # full match on the path; a `model` group names the model (Gemini)
    changes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    hosts: tuple[str, ...]
    base: Behaviour
    routes: tuple[Route, ...]
    by_model: tuple[tuple[str, dict[str, Any]], ...] = ()  # (glob, changes), first match wins


class Resolved(NamedTuple):
    behaviour: Behaviour
    path_model: str | None


def _route(pattern: str, **changes: Any) -> Route:
    return Route(re.compile(pattern), changes)


_CHAT = {"shape": OPENAI_CHAT}
_RESPONSES = {"shape": OPENAI_RESPONSES, "usage": "openai-responses"}
# §3, §4 and https://developers.openai.com/api/docs/guides/prompt-caching: explicit breakpoints
# go on these content parts, "a marker on an unsupported block gives 400".
_CHAT_BREAKPOINTS = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
_RESPONSES_BREAKPOINTS = frozenset({"input_text", "input_image", "input_file"})
_PCK = Signal("body", "prompt_cache_key")
_ANTHROPIC = Behaviour(shape=ANTHROPIC, usage="anthropic", cache="markers", errors="anthropic")


def _key(*signals: Signal) -> Routing:
    return Routing("key", signals)


_GROK_CONV = _key(Signal("header", "x-grok-conv-id"))

PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    # §1: caches are per workspace; no routing signal is documented.
    Provider("anthropic", ("api.anthropic.com",), _ANTHROPIC, (_route(r"/v1/messages"),)),
    # §3, §4: machine = hash(first ~256 tokens, prompt_cache_key); ~15 RPM per pair, then
    # overflow (per key on GPT-5.6+).
    Provider("openai", ("api.openai.com",),
             Behaviour(routing=Routing("prefix-key", (_PCK,)), gpt_breakpoints=True,
                       conflicts=(("prompt_cache_retention", "prompt_cache_options.ttl"),)),
             (_route(r"/v1/chat/completions", **_CHAT, breakpoint_parts=_CHAT_BREAKPOINTS),
              _route(r"/v1/responses", **_RESPONSES,
                     breakpoint_parts=_RESPONSES_BREAKPOINTS))),
    # §6: x-grok-conv-id (chat) / prompt_cache_key (Responses) pin a server; else random.
    Provider("xai", ("api.x.ai",), Behaviour(),
             (_route(r"/v1/chat/completions", usage="xai-chat", routing=_GROK_CONV),
              _route(r"/v1/responses", shape=OPENAI_RESPONSES, usage="xai-responses",
                     routing=_key(_PCK)))),
    # §7: sticky routing on the first system + first non-system message, ~10 min idle expiry.
    # Grok models keep xAI's own header routing (providers.md is silent on what OpenRouter
    # forwards; the shipped rules cite Hermes agent issue 22705).
    Provider("openrouter", ("openrouter.ai",),
             Behaviour(usage="openrouter", stream_usage="always", routing=Routing("sticky")),
             (_route(r"/api/v1/chat/completions"),),
             by_model=(("anthropic/*", {"cache": "markers"}),
                       ("x-ai/*", {"routing": _GROK_CONV}),
                       # §7: GPT-5.6+ breakpoints and cache options are passed through.
                       ("openai/*", {"gpt_breakpoints": True}))),
    # §5: "ChatGPT derives Responses cache affinity from the session-id header" (= the body's
    # prompt_cache_key). Without either: not documented, random here.
    Provider("codex", ("chatgpt.com",),
             Behaviour(shape=OPENAI_RESPONSES, usage="codex", errors="codex",
                       routing=_key(Signal("header", "session-id"), _PCK), stream_required=True,
                       forbidden=("prompt_cache_retention", "prompt_cache_options",
                                  "prompt_cache_breakpoint")),
             (_route(r"/backend-api/codex/responses"),)),
    # §8: a best-effort disk cache shared by everyone, cleared after hours to days unused.
    # (Its "cache prefix units" at message ends are approximated by the chunked prefix cache.)
    Provider("deepseek", ("api.deepseek.com",),
             Behaviour(usage="deepseek", ttl=4 * 3600.0),
             (_route(r"(/v1)?/chat/completions"),)),
    # §10: cache identity is a content-prefix hash in 256-token chunks; prompt_cache_key was
    # observed to be ignored. No minimum is documented beyond the chunk.
    Provider("moonshot", ("api.moonshot.ai", "api.moonshot.cn"),
             Behaviour(usage="moonshot", stream_usage="in_choice", auto_min=256, auto_step=256),
             (_route(r"/v1/chat/completions"),)),
    # §15: x-session-affinity (or body user / prompt_cache_key) routes to the same replica.
    Provider("fireworks", ("api.fireworks.ai",),
             Behaviour(routing=_key(Signal("header", "x-session-affinity"), _PCK,
                                    Signal("body", "user"))),
             (_route(r"(/inference)?/v1/chat/completions"),)),
    # §11: implicit cache, no affinity for chat; the 5-minute TTL is the explicit cache's.
    Provider("dashscope", ("dashscope-intl.aliyuncs.com", "dashscope.aliyuncs.com"),
             Behaviour(usage="dashscope", ttl=300.0),
             (_route(r"/compatible-mode/v1/chat/completions"),)),
    # §9: implicit caching, no affinity; minimum 2,048 tokens on 2.5, 4,096 on 3.x and later.
    Provider("gemini", ("generativelanguage.googleapis.com",),
             Behaviour(shape=GEMINI, usage="gemini", errors="gemini", auto_min=4096),
             (_route(r"/v1(beta|alpha)?/models/(?P<model>[^/:]+):generateContent", stream=False),
              _route(r"/v1(beta|alpha)?/models/(?P<model>[^/:]+):streamGenerateContent",
                     stream=True)),
             by_model=(("gemini-2.5-*", {"auto_min": 2048}),)),
    # Not a providers.md row: an Anthropic-compatible multi-account relay (each replica is an
    # account with its own cache) that pins a session by header, as the shipped example rule.
    Provider("proxy", (), replace(_ANTHROPIC, routing=_key(Signal("header", "x-session-id"),
                                                           Signal("header", "x-session-affinity"))),
             (_route(r"/v1/messages"),)),
)}

_BY_HOST = {host: p.name for p in PROVIDERS.values() for host in p.hosts}
_PREFIX = re.compile(r"/p/(?P<name>[^/]+)(?P<rest>/.*)?")


def provider_for(path: str, host: str | None, default: str) -> tuple[str, str]:
    """(provider name, path without the `/p/<provider>` prefix). Unknown names are kept: 404 later."""
    m = _PREFIX.fullmatch(path)
    if m:
        return m["name"], m["rest"] or "/"
    if host:
        name = _BY_HOST.get(host.split(":")[0].lower())
        if name:
            return name, path
    return default, path


def resolve(provider: str, path: str, model: str | None) -> Resolved | None:
    """The behaviour for this provider, path and model; None when the provider has no such path."""
    p = PROVIDERS.get(provider)
    if p is None:
        return None
    for route in p.routes:
        m = route.pattern.fullmatch(path)
        if m is None:
            continue
        behaviour = replace(p.base, **route.changes)
        path_model = m.groupdict().get("model")
        name = model or path_model or ""
        for glob, changes in p.by_model:
            if fnmatch.fnmatchcase(name, glob):
                behaviour = replace(behaviour, **changes)
                break
        return Resolved(behaviour, path_model)
    return None
