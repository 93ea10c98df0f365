"""Who a request is for and how that provider behaves: a data table, one row per provider.

Every behaviour difference (routing scheme, cache model, usage field names, streaming usage
placement, error JSON, body constraints) is a field of `Behaviour`. A provider row holds a base
`Behaviour`, per-path changes and per-model changes (OpenRouter routes `anthropic/*` with Claude's
marker semantics). Facts follow the providers' public docs, never the addon's code; each row's source is in
docs/providers.md (one section per provider, every fact with its URL).
"""

import fnmatch
import re
from dataclasses import dataclass, replace
from typing import Any, NamedTuple
from urllib.parse import unquote

from tests.sim.render import (
    ANTHROPIC,
    CONVERSE,
    GEMINI,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    SYSTEM_FIRST,
)
from tests.sim.routing import SHARED, Routing, Signal


@dataclass(frozen=True, slots=True)
class Behaviour:
    api: str = OPENAI_CHAT
    usage: str = "openai-chat"  # usage style, a key of wire.USAGE_STYLES
    stream_usage: str = "include_usage"  # chat SSE usage: "include_usage" | "always" | "in_choice"
    # "auto": automatic prefix cache; "markers": Anthropic cache_control; "explicit-or-auto":
    # markers when the request has any, else the automatic cache (one mode a request)
    cache: str = "auto"
    marker_min: int | None = None  # explicit cache minimum (None: Anthropic's, by model)
    order: str | None = None  # render order (render.SYSTEM_FIRST: another provider's Anthropic API)
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
    framing: str = "sse"  # how a stream goes on the wire: "sse" | "eventstream" (AWS)
    # Who may call: None (anyone), "aws" (SigV4 checked against the payload, or a Bedrock API
    # key as a bearer token), "bearer" (an OAuth access token), "azure" (api-key or bearer)
    auth: str | None = None
    version: tuple[str, str] | None = None  # (body field, the only value taken)
    automatic_markers: bool = True  # is Anthropic's top-level `cache_control` taken
    minimums: str = "anthropic"  # which table of marker minimums: "anthropic" | "bedrock"

    diagnostics: str | None = None  # cache diagnostics offered: "anthropic" | "openai" (diagnostics.py)
    # Leading system blocks the API removes before it reads the prompt (prefixes, render.py).
    strips: tuple[str, ...] = ()


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


_CHAT = {"api": OPENAI_CHAT}
_RESPONSES = {"api": OPENAI_RESPONSES, "usage": "openai-responses"}
# https://developers.openai.com/api/docs/guides/prompt-caching: explicit breakpoints
# go on these content parts, "a marker on an unsupported block gives 400".
_CHAT_BREAKPOINTS = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
_RESPONSES_BREAKPOINTS = frozenset({"input_text", "input_image", "input_file"})
_PCK = Signal("body", "prompt_cache_key")
_ANTHROPIC = Behaviour(api=ANTHROPIC, usage="anthropic", cache="markers", errors="anthropic")


def _key(*signals: Signal) -> Routing:
    return Routing("key", signals)


def _compat(**changes: Any) -> dict[str, Any]:
    """Another provider's Anthropic-compatible endpoint: Anthropic's wire format served by the
    provider's own model and cache (docs/providers.md), the prompt in its model's order (system first)."""
    return {"api": ANTHROPIC, "usage": "anthropic-compat", "errors": "anthropic",
            "order": SYSTEM_FIRST} | changes


_GROK_CONV = _key(Signal("header", "x-grok-conv-id"))

PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    # caches are per workspace; no routing signal is documented. Cache diagnostics on the
    # Claude API only (docs/providers.md), not on third-party endpoints.
    # Claude Code's billing block: "Anthropic's API removes" it; any other upstream "receives it
    # as part of the prompt" (https://code.claude.com/docs/en/llm-gateway-protocol).
    Provider("anthropic", ("api.anthropic.com",),
             replace(_ANTHROPIC, diagnostics="anthropic",
                     strips=("x-anthropic-billing-header:",)),
             (_route(r"/v1/messages"),)),
    # machine = hash(first ~256 tokens, prompt_cache_key); ~15 RPM per pair, then
    # overflow (per key on GPT-5.6+).
    Provider("openai", ("api.openai.com",),
             Behaviour(routing=Routing("prefix-key", (_PCK,)), gpt_breakpoints=True,
                       conflicts=(("prompt_cache_retention", "prompt_cache_options.ttl"),)),
             (_route(r"/v1/chat/completions", **_CHAT, breakpoint_parts=_CHAT_BREAKPOINTS),
              # cache diagnostics on the Responses API only.
              _route(r"/v1/responses", **_RESPONSES, diagnostics="openai",
                     breakpoint_parts=_RESPONSES_BREAKPOINTS))),
    # x-grok-conv-id (chat) / prompt_cache_key (Responses) pin a server; else random.
    Provider("xai", ("api.x.ai",), Behaviour(),
             (_route(r"/v1/chat/completions", usage="xai-chat", routing=_GROK_CONV),
              _route(r"/v1/responses", api=OPENAI_RESPONSES, usage="xai-responses",
                     routing=_key(_PCK)))),
    # sticky routing on the first system + first non-system message, ~10 min idle expiry.
    # Grok models keep xAI's own header routing (OpenRouter's docs are silent on what it
    # forwards; the shipped rules cite https://github.com/NousResearch/hermes-agent/issues/22705).
    Provider("openrouter", ("openrouter.ai",),
             Behaviour(usage="openrouter", stream_usage="always", routing=Routing("sticky")),
             (_route(r"/api/v1/chat/completions"),),
             by_model=(("anthropic/*", {"cache": "markers"}),
                       ("x-ai/*", {"routing": _GROK_CONV}),
                       # GPT-5.6+ breakpoints and cache options are passed through.
                       ("openai/*", {"gpt_breakpoints": True}))),
    # "ChatGPT derives Responses cache affinity from the session-id header" (= the body's
    # prompt_cache_key). Without either: not documented, random here.
    Provider("codex", ("chatgpt.com",),
             Behaviour(api=OPENAI_RESPONSES, usage="codex", errors="codex",
                       routing=_key(Signal("header", "session-id"), _PCK), stream_required=True,
                       forbidden=("prompt_cache_retention", "prompt_cache_options",
                                  "prompt_cache_breakpoint")),
             (_route(r"/backend-api/codex/responses"),)),
    # a best-effort disk cache shared by everyone, cleared after hours to days unused.
    # (Its "cache prefix units" at message ends are approximated by the chunked prefix cache,
    # in its 64-token storage unit: "content less than 64 tokens will not be cached",
    # https://api-docs.deepseek.com/news/news0802.) The `/anthropic` endpoint is served by the
    # same cache; its compatibility table lists `cache_control` as "Ignored"
    # (https://api-docs.deepseek.com/guides/anthropic_api).
    Provider("deepseek", ("api.deepseek.com",),
             Behaviour(usage="deepseek", ttl=4 * 3600.0, auto_min=64, auto_step=64),
             (_route(r"(/v1)?/chat/completions"),
              _route(r"/anthropic(/v1)?/messages", **_compat()))),
    # cache identity is a content-prefix hash in 256-token chunks; prompt_cache_key was
    # observed to be ignored. No minimum is documented beyond the chunk. Its `/anthropic`
    # endpoint: markers are not documented, so the automatic cache alone.
    Provider("moonshot", ("api.moonshot.ai", "api.moonshot.cn"),
             Behaviour(usage="moonshot", stream_usage="in_choice", auto_min=256, auto_step=256),
             (_route(r"/v1/chat/completions"),
              _route(r"/anthropic/v1/messages", **_compat()))),
    # Kimi Code (docs/providers.md): the same content-prefix cache for `/coding/v1/messages` and
    # `/coding/v1/chat/completions`, `cache_control` ignored, an entry living 300 to 1,800 s
    # (Leechael/pi-provider-kimi-code docs/caching.md).
    Provider("kimi", ("api.kimi.com",),
             Behaviour(usage="moonshot", stream_usage="in_choice", auto_min=256, auto_step=256,
                       ttl=600.0),
             (_route(r"/coding/v1/chat/completions"),
              _route(r"/coding/v1/messages", **_compat()))),
    # implicit caching (https://docs.z.ai/guides/capabilities/cache), no affinity
    # documented; Zhipu support advised OpenClaw that `X-Session-Id` keeps a session on one
    # inference node (openclaw/openclaw PR 68079): without it, the load balancer's pick.
    Provider("zai", ("api.z.ai", "open.bigmodel.cn"),
             Behaviour(usage="dashscope", routing=_key(Signal("header", "x-session-id"))),
             (_route(r"/api(/coding)?/paas/v4/chat/completions"),
              _route(r"/api/anthropic/v1/messages", **_compat()))),
    # passive caching from 512 tokens, and Anthropic-style explicit markers on its
    # Anthropic API, prefixes built "tools -> system -> messages" as Anthropic's, 20 blocks back,
    # 1.25x writes (https://platform.minimax.io/docs/api-reference/anthropic-api-compatible-cache);
    # which of the two serves a marked request is not said: the explicit one here, as on
    # DashScope.
    Provider("minimax", ("api.minimax.io", "api.minimaxi.com"),
             Behaviour(auto_min=512, ttl=300.0),
             (_route(r"/anthropic/v1/messages",
                     **_compat(cache="explicit-or-auto", marker_min=512, order=None)),)),
    # x-session-affinity (or body user / prompt_cache_key) routes to the same replica.
    Provider("fireworks", ("api.fireworks.ai",),
             Behaviour(routing=_key(Signal("header", "x-session-affinity"), _PCK,
                                    Signal("body", "user"))),
             (_route(r"(/inference)?/v1/chat/completions"),)),
    # implicit cache, no affinity for chat; the 5-minute TTL is the explicit cache's.
    # `/apps/anthropic`: explicit cache at markers (from 1,024 tokens) or implicit (from 256),
    # one mode a request (https://www.alibabacloud.com/help/en/model-studio/context-cache); its
    # markers work as Anthropic's (20 blocks back, Claude Code's own placement serves it: the
    # explicit-cache best-practice page), so the prompt is in Anthropic's order here.
    Provider("dashscope", ("dashscope-intl.aliyuncs.com", "dashscope.aliyuncs.com"),
             Behaviour(usage="dashscope", ttl=300.0, auto_min=256),
             (_route(r"/compatible-mode/v1/chat/completions"),
              _route(r"/apps/anthropic/v1/messages",
                     **_compat(cache="explicit-or-auto", marker_min=1024, order=None)))),
    # implicit caching, no affinity; minimum 2,048 tokens on 2.5, 4,096 on 3.x and later.
    Provider("gemini", ("generativelanguage.googleapis.com",),
             Behaviour(api=GEMINI, usage="gemini", errors="gemini", auto_min=4096),
             (_route(r"/v1(beta|alpha)?/models/(?P<model>[^/:]+):generateContent", stream=False),
              _route(r"/v1(beta|alpha)?/models/(?P<model>[^/:]+):streamGenerateContent",
                     stream=True)),
             by_model=(("gemini-2.5-*", {"auto_min": 2048}),)),
    # Amazon Bedrock (bedrock-runtime, bedrock-mantle): InvokeModel and its stream (Claude's own
    # body, anthropic_version bedrock-2023-05-31, the model in the URL), Converse and
    # ConverseStream (cachePoint blocks), and the Anthropic-native /anthropic/v1/messages. Streams
    # are AWS event streams. Caches are per account, markers only, with Bedrock's own minimums
    # and no top-level automatic marker (Bedrock prompt-caching guide). SigV4 signs the payload.
    Provider("bedrock", (),
             replace(_ANTHROPIC, errors="bedrock", auth="aws", framing="eventstream",
                     automatic_markers=False, minimums="bedrock"),
             (_route(r"/model/(?P<model>[^/]+)/invoke", stream=False,
                     version=("anthropic_version", "bedrock-2023-05-31")),
              _route(r"/model/(?P<model>[^/]+)/invoke-with-response-stream", stream=True,
                     version=("anthropic_version", "bedrock-2023-05-31")),
              _route(r"/model/(?P<model>[^/]+)/converse", stream=False, api=CONVERSE,
                     usage="bedrock-converse"),
              _route(r"/model/(?P<model>[^/]+)/converse-stream", stream=True, api=CONVERSE,
                     usage="bedrock-converse"),
              _route(r"/anthropic/v1/messages", framing="sse", errors="anthropic"))),
    # Google Cloud Vertex AI: Claude through :rawPredict / :streamRawPredict (Anthropic's body
    # with anthropic_version vertex-2023-10-16, the model in the URL, SSE as on the API), Gemini
    # through :generateContent. An OAuth bearer token; no top-level automatic marker.
    Provider("vertex", (),
             replace(_ANTHROPIC, auth="bearer", automatic_markers=False,
                     version=("anthropic_version", "vertex-2023-10-16"), errors="gemini"),
             (_route(r"/v1[a-z0-9]*/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/"
                     r"(?P<model>[^/:]+):rawPredict", stream=False),
              _route(r"/v1[a-z0-9]*/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/"
                     r"(?P<model>[^/:]+):streamRawPredict", stream=True),
              _route(r"/v1[a-z0-9]*/projects/[^/]+/locations/[^/]+/publishers/google/models/"
                     r"(?P<model>[^/:]+):generateContent", stream=False, api=GEMINI,
                     usage="gemini", cache="auto", auto_min=2048, version=None),
              _route(r"/v1[a-z0-9]*/projects/[^/]+/locations/[^/]+/publishers/google/models/"
                     r"(?P<model>[^/:]+):streamGenerateContent", stream=True, api=GEMINI,
                     usage="gemini", cache="auto", auto_min=2048, version=None))),
    # Google's OAuth 2.0 token endpoint (oauth2.googleapis.com/token): what Application Default
    # Credentials refresh against before a Vertex request
    # (https://developers.google.com/identity/protocols/oauth2/web-server#offline).
    Provider("google-oauth", (), Behaviour(api="oauth-token"), (_route(r"/token"),)),
    # Azure OpenAI / Foundry: OpenAI's chat and Responses formats under /openai/deployments/<d>/
    # and /openai/v1/; routing by a hash of the prefix combined with prompt_cache_key, ~15
    # requests a minute per pair (Azure's prompt-caching page).
    Provider("azure", (),
             Behaviour(routing=Routing("prefix-key", (_PCK,)), auth="azure",
                       gpt_breakpoints=True),
             (_route(r"/openai/deployments/(?P<model>[^/]+)/chat/completions", **_CHAT),
              _route(r"/openai/v1/chat/completions", **_CHAT),
              _route(r"/openai/v1/responses", **_RESPONSES))),
    # No public provider: an Anthropic-compatible multi-account relay (each replica is an
    # account with its own cache) that pins a session by header, as the shipped example rule.
    Provider("proxy", (), replace(_ANTHROPIC, routing=_key(Signal("header", "x-session-id"),
                                                           Signal("header", "x-session-affinity"))),
             (_route(r"/v1/messages"),)),
)}

_BY_HOST = {host: p.name for p in PROVIDERS.values() for host in p.hosts}
# `/p/<provider>/...`, or `/p/<provider>@<host>/...` naming the host the client addressed (a
# proxy's map-remote rewrites the Host header; SigV4 signed the original one).
_PREFIX = re.compile(r"/p/(?P<name>[^/@]+)(?:@(?P<host>[^/]+))?(?P<rest>/.*)?")


def addressed_host(path: str, headers_host: str | None) -> str:
    """The host the client addressed: from the `/p/<provider>@<host>` prefix, else Host."""
    m = _PREFIX.fullmatch(path)
    return (m["host"] if m and m["host"] else None) or headers_host or ""


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
        if path_model:  # Bedrock's ids arrive percent-encoded (us.anthropic...-v1%3A0)
            path_model = unquote(path_model)
        name = model or path_model or ""
        for glob, changes in p.by_model:
            if fnmatch.fnmatchcase(name, glob):
                behaviour = replace(behaviour, **changes)
                break
        return Resolved(behaviour, path_model)
    return None
