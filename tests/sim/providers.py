"""Who a request is for and how that provider behaves: a data table, one row per provider.

Every behaviour difference (affinity signal, cache model, usage field names, streaming usage
placement, error JSON, body constraints) is a field of `Behaviour`. A provider row holds a base
`Behaviour`, per-path changes and per-model changes (OpenRouter routes `anthropic/*` with Claude's
marker semantics). Facts follow the shared providers.md reference, never the addon's code.
"""

import fnmatch
import re
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from affinity_addon.shapes import ANTHROPIC, GEMINI, OPENAI_CHAT, OPENAI_RESPONSES


class Signal(NamedTuple):
    """One place a provider reads its routing key from."""

    source: str  # "header" (name), "body" (top-level field name) or "root" (first system + first user)
    name: str = ""


@dataclass(frozen=True, slots=True)
class Behaviour:
    shape: str = OPENAI_CHAT
    usage: str = "openai-chat"  # usage style, a key of wire.USAGE_STYLES
    stream_usage: str = "include_usage"  # chat SSE usage: "include_usage" | "always" | "in_choice"
    cache: str = "auto"  # "auto": automatic prefix cache; "markers": Anthropic cache_control
    affinity: tuple[Signal, ...] = ()  # tried in order; none present -> random replica
    shared: bool = False  # one cache for every replica (Anthropic per workspace, DeepSeek disk)
    ttl: float = 600.0  # automatic cache: idle seconds before an entry is gone
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
_PCK = Signal("body", "prompt_cache_key")
_ANTHROPIC = Behaviour(shape=ANTHROPIC, usage="anthropic", cache="markers", errors="anthropic")

PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    # Caches are per workspace: one shared cache, nothing to route on.
    Provider("anthropic", ("api.anthropic.com",), replace(_ANTHROPIC, shared=True),
             (_route(r"/v1/messages"),)),
    Provider("openai", ("api.openai.com",),
             Behaviour(affinity=(_PCK,),
                       conflicts=(("prompt_cache_retention", "prompt_cache_options.ttl"),)),
             (_route(r"/v1/chat/completions", **_CHAT),
              _route(r"/v1/responses", **_RESPONSES))),
    Provider("xai", ("api.x.ai",), Behaviour(),
             (_route(r"/v1/chat/completions", usage="xai-chat",
                     affinity=(Signal("header", "x-grok-conv-id"),)),
              _route(r"/v1/responses", shape=OPENAI_RESPONSES, usage="xai-responses",
                     affinity=(_PCK,)))),
    # Sticky routing: a hash of the first system + first non-system message picks the upstream.
    Provider("openrouter", ("openrouter.ai",),
             Behaviour(usage="openrouter", stream_usage="always", affinity=(Signal("root"),)),
             (_route(r"/api/v1/chat/completions"),),
             by_model=(("anthropic/*", {"cache": "markers"}),
                       ("x-ai/*", {"affinity": (Signal("header", "x-grok-conv-id"),)}))),
    Provider("codex", ("chatgpt.com",),
             Behaviour(shape=OPENAI_RESPONSES, usage="codex", errors="codex",
                       affinity=(Signal("header", "session-id"), _PCK), stream_required=True,
                       forbidden=("prompt_cache_retention", "prompt_cache_options",
                                  "prompt_cache_breakpoint")),
             (_route(r"/backend-api/codex/responses"),)),
    # A best-effort disk cache shared by everyone: no affinity exists or is needed.
    Provider("deepseek", ("api.deepseek.com",),
             Behaviour(usage="deepseek", shared=True, ttl=4 * 3600.0),
             (_route(r"(/v1)?/chat/completions"),)),
    # Cache identity is a content-prefix hash (prompt_cache_key observed to be ignored).
    Provider("moonshot", ("api.moonshot.ai", "api.moonshot.cn"),
             Behaviour(usage="moonshot", stream_usage="in_choice", shared=True),
             (_route(r"/v1/chat/completions"),)),
    Provider("fireworks", ("api.fireworks.ai",),
             Behaviour(affinity=(Signal("header", "x-session-affinity"), _PCK,
                                 Signal("body", "user"))),
             (_route(r"(/inference)?/v1/chat/completions"),)),
    Provider("dashscope", ("dashscope-intl.aliyuncs.com", "dashscope.aliyuncs.com"),
             Behaviour(usage="dashscope", shared=True, ttl=300.0),
             (_route(r"/compatible-mode/v1/chat/completions"),)),
    Provider("gemini", ("generativelanguage.googleapis.com",),
             Behaviour(shape=GEMINI, usage="gemini", errors="gemini", shared=True),
             (_route(r"/v1(beta|alpha)?/models/(?P<model>[^/:]+):generateContent", stream=False),
              _route(r"/v1(beta|alpha)?/models/(?P<model>[^/:]+):streamGenerateContent",
                     stream=True))),
    # An Anthropic-compatible multi-account relay: each replica is an account with its own cache.
    Provider("proxy", (), replace(_ANTHROPIC, affinity=(Signal("header", "x-session-id"),
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
