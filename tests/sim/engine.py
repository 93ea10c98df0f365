"""The simulator's request handling without sockets: validate, route to a replica, apply the
provider's cache model and build the reply. The HTTP layer (server.py) only moves bytes; a
workload driver can call `Engine.handle` directly.

Virtual time: a request may carry `x-sim-time: <seconds>`, the sim-clock time it is served at
(TTLs, RPM windows and sticky pins use it); without it the shared `SimClock` says. An hour of a
team's traffic then runs in seconds, each request stamped with its own time, without moving the
clock other requests see.
"""

import hashlib
import json
import logging
import random
import re
import string
import threading
from dataclasses import dataclass, replace
from typing import Any

from tests.sim import cache, diagnostics, eventstream, render, sigv4, wire
from tests.sim.clock import SimClock
from tests.sim.providers import PROVIDERS, Behaviour, addressed_host, provider_for, resolve
from tests.sim.render import ANTHROPIC, GEMINI, OPENAI_CHAT, OPENAI_RESPONSES
from tests.sim.routing import Router, Signal, gpt_5_6_or_later

logger = logging.getLogger(__name__)

_ALNUM = string.ascii_letters + string.digits
_REPLY_IDS = {OPENAI_CHAT: ("chatcmpl-", 29), OPENAI_RESPONSES: ("resp_", 48), GEMINI: ("", 22)}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes = b""  # the JSON body (when `events` is None)
    events: tuple[bytes, ...] | None = None  # SSE: one encoded event per item


@dataclass(frozen=True, slots=True)
class Outcome:
    provider: str
    path: str
    replica: int  # -1 when the request was rejected before reaching a replica
    usage: dict[str, Any] | None
    reply: Reply
    ts: float  # sim clock time the request was served at


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _find_key(value: Any, names: tuple[str, ...]) -> str | None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k in names:
                return k
            found = _find_key(v, names)
            if found:
                return found
    elif isinstance(value, list):
        for v in value:
            found = _find_key(v, names)
            if found:
                return found
    return None


def _authorize(b: Behaviour, method: str, path: str, query: str,
               headers: list[tuple[str, str]], raw: bytes, host: str) -> None:
    """Who may call, as each cloud checks it: AWS recomputes the SigV4 signature from the bytes
    it received (a changed body fails: the payload's SHA-256 is signed) or takes a Bedrock API
    key as a bearer token; Vertex wants an OAuth bearer token; Azure an api-key or a bearer."""
    auth = _header(headers, "authorization") or ""
    if b.auth == "aws":
        if auth.startswith(sigv4.ALGORITHM):
            reason = sigv4.verify(method, path, query, headers, raw, host)
            if reason:
                raise RequestError(403, reason)
        elif not auth.startswith("Bearer ") or len(auth) <= 7:
            raise RequestError(403, "Missing Authentication Token")
    elif b.auth == "bearer" and (not auth.startswith("Bearer ") or len(auth) <= 7):
        raise RequestError(401, "Request is missing required authentication credential.")
    elif b.auth == "azure" and not (_header(headers, "api-key") or auth.startswith("Bearer ")):
        raise RequestError(401, "Access denied due to missing subscription key.")


BREAKPOINT = "prompt_cache_breakpoint"


def _misplaced_breakpoint(value: Any, parts: frozenset[str], where: str = "") -> str | None:
    """Where a `prompt_cache_breakpoint` sits that the API rejects: on anything but an allowed
    content part, or with a value other than {"mode": "explicit"}."""
    if isinstance(value, dict):
        if BREAKPOINT in value and (value.get("type") not in parts
                                    or value[BREAKPOINT] != {"mode": "explicit"}):
            return where or "(top level)"
        for k, v in value.items():
            found = _misplaced_breakpoint(v, parts, f"{where}.{k}" if where else k)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _misplaced_breakpoint(v, parts, f"{where}[{i}]")
            if found:
                return found
    return None


def _validate(b: Behaviour, body: dict[str, Any]) -> None:
    if b.version is not None:
        # The docs name one value (bedrock-2023-05-31, vertex-2023-10-16); the anthropic SDK's
        # AnthropicBedrock and AnthropicVertex send the API's own dated version instead, and
        # work: a dated version is taken too.
        field, value = b.version
        sent = body.get(field)
        if sent != value and not (isinstance(sent, str) and _API_VERSION.fullmatch(sent)):
            raise RequestError(400, f"{field}: expected {value!r}")
    if not b.automatic_markers and "cache_control" in body:
        # Bedrock and Vertex take markers on blocks only
        raise RequestError(400, "cache_control: Extra inputs are not permitted")
    if b.stream_required and body.get("stream") is not True:
        raise RequestError(400, "Stream must be set to true")
    if b.forbidden:
        key = _find_key(body, b.forbidden)
        if key:
            raise RequestError(400, f"Unsupported parameter: {key}")
    if b.breakpoint_parts is not None:
        where = _misplaced_breakpoint(body, b.breakpoint_parts)
        if where:
            raise RequestError(400, f"Invalid '{where}.{BREAKPOINT}': a prompt cache breakpoint "
                               "is supported only on content parts of type "
                               f"{', '.join(sorted(b.breakpoint_parts))}.")
    for first, second in b.conflicts:
        if render.path_value(body, first) is not None and\
                render.path_value(body, second) is not None:
            raise RequestError(400, f"Only one of '{first}' and '{second}' may be set.")


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _api_key(headers: list[tuple[str, str]]) -> str:
    """Who is asking (the workspace or organization a fingerprint belongs to)."""
    key = _header(headers, "x-api-key") or _header(headers, "authorization") or ""
    return key.removeprefix("Bearer ").strip()


TIME_HEADER = "x-sim-time"
_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")
BREAKPOINT_TTL = 1800.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value: Any) -> float | None:
    """`prompt_cache_options.ttl` such as "30m"; None when absent or not understood."""
    if isinstance(value, str) and len(value) > 1 and value[-1] in _UNITS\
            and value[:-1].isdigit():
        return int(value[:-1]) * _UNITS[value[-1]]
    return None



@dataclass(frozen=True, slots=True)
class _Asked:
    """A request's cache diagnostics ask: the response id it compares with (None: opt-in)."""

    previous: str | None


def _asked(b: Behaviour, body: dict[str, Any], reject: bool) -> _Asked | None:
    """Validate the cache diagnostics field, as the API would (diagnostics.py)."""
    if b.diagnostics == "anthropic" and "diagnostics" in body:
        if reject:
            raise RequestError(*diagnostics.REJECTED["anthropic"])
        d = body["diagnostics"]
        if not isinstance(d, dict):
            raise RequestError(400, "diagnostics: Input should be a valid dictionary or object")
        prev = d.get("previous_message_id")
        if prev is not None and not isinstance(prev, str):
            raise RequestError(400, "diagnostics.previous_message_id: Input should be a valid "
                               "string")
        return _Asked(prev)
    if b.diagnostics == "openai":
        options = body.get("prompt_cache_options")
        if isinstance(options, dict) and "comparison_response_id" in options:
            if reject:
                raise RequestError(*diagnostics.REJECTED["openai"])
            cid = options["comparison_response_id"]
            if cid is not None and not isinstance(cid, str):
                raise RequestError(400, "Invalid type for "
                                   "'prompt_cache_options.comparison_response_id'")
            return _Asked(cid)
    return None


def _cache_identity(b: Behaviour, body: dict[str, Any], model: str) -> str:
    """What besides the prompt a cached prefix belongs to: the model, and the settings the
    providers name as reasons a prefix was not reused (Anthropic: `speed`, OpenAI Responses:
    service tier, text format, reasoning effort, verbosity; diagnostics.py)."""
    if b.diagnostics == "anthropic" and body.get("speed") not in (None, "standard"):
        return f"{model}\0speed={body.get('speed')}"
    if b.diagnostics == "openai":
        s = diagnostics.openai_settings(body)
        tail = [s["service_tier"], s["format"], s["verbosity"], s["effort"]]
        if any(v not in (None, "auto") for v in tail):
            return f"{model}\0{json.dumps(tail, sort_keys=True)}"
    return model


def _signal(signal: Signal, headers: list[tuple[str, str]], body: dict[str, Any]) -> str | None:
    value = _header(headers, signal.name) if signal.source == "header" else body.get(signal.name)
    return value if isinstance(value, str) and value else None


def _time(headers: list[tuple[str, str]], clock: SimClock) -> float:
    value = _header(headers, TIME_HEADER)
    if value is None:
        return clock.now()
    try:
        return float(value)
    except ValueError:
        raise RequestError(400, f"bad {TIME_HEADER} header: {value!r}") from None


class Engine:
    def __init__(self, replicas: int, clock: SimClock, seed: int, default_provider: str,
                 auto_ttl: float | None = None) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, not {replicas}")
        if default_provider not in PROVIDERS:
            raise ValueError(f"unknown default provider {default_provider!r}; "
                             f"known: {', '.join(PROVIDERS)}")
        self.replicas = replicas
        self.clock = clock
        self.seed = seed
        self.default_provider = default_provider
        self.auto_ttl = auto_ttl
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._router = Router(self.replicas, self.seed)
            # Ids come from their own generator so routing stays a function of the seed alone.
            self._id_rng = random.Random(f"ids-{self.seed}")
            self._auto: dict[tuple[str, int], cache.AutoCache] = {}
            self._marker: dict[tuple[str, int], cache.MarkerCache] = {}
            self._breakpoints: dict[tuple[str, int], cache.BreakpointCache] = {}
            self.diagnoses = diagnostics.Diagnoses()

    def _id(self, n: int) -> str:
        return "".join(self._id_rng.choice(_ALNUM) for _ in range(n))

    def _ids(self, api: str) -> wire.Ids:
        with self._lock:
            message = "msg_01" + self._id(22)
            if api == ANTHROPIC:  # the message is the whole reply
                return wire.Ids(message, message)
            prefix, length = _REPLY_IDS.get(api, _REPLY_IDS[OPENAI_CHAT])
            return wire.Ids(message, prefix + self._id(length))

    def request_id(self) -> str:
        with self._lock:
            return "req_011C" + self._id(20)

    def _route(self, provider: str, b: Behaviour, headers: list[tuple[str, str]],
               body: dict[str, Any], prompt: cache.Prompt, blocks: list[render.Block],
               model: str, now: float) -> int:
        """The replica this request lands on; called with the lock held."""
        key = next((v for s in b.routing.signals if (v := _signal(s, headers, body))), None)
        root = None
        if b.routing.scheme == "sticky":  # per account, per model, per conversation
            text = render.conversation_root(blocks)
            if text is not None:
                account = _header(headers, "authorization") or ""
                root = hashlib.sha256("\0".join((account, model, text)).encode()).digest()
        return self._router.route(provider, b.routing, key, prompt.lead, root, model, now)

    @property
    def overflowed(self) -> int:
        """Requests an RPM limit sent away from their home machine since the last reset."""
        return self._router.overflowed

    def fail(self, raw_path: str, headers: list[tuple[str, str]], status: int,
             message: str) -> Outcome:
        """An error reply in the provider's own style, without serving (fault injection)."""
        provider, path = provider_for(raw_path, _header(headers, "host"), self.default_provider)
        resolved = resolve(provider, path, None)
        spec = PROVIDERS.get(provider)
        errors = resolved.behaviour.errors if resolved else spec.base.errors if spec else "openai"
        payload = wire.ERROR_STYLES[errors](status, message, self.request_id())
        reply = Reply(status, "application/json", wire.dumps(payload))
        return Outcome(provider, path, -1, None, reply, self.clock.now())

    def handle(self, method: str, raw_path: str, query: str, headers: list[tuple[str, str]],
               body: Any, body_error: str | None = None, *,
               reply_text: str | None = None, diagnosis: str | None = None,
               reject_diagnostics: bool = False, raw: bytes | None = None) -> Outcome:
        """Serve one request. `body` is the decoded JSON; `body_error` says why there is none;
        `raw` the body's bytes as received (what a signature covers).

        `reply_text` replaces what the model says (tests trace it through a proxy);
        `diagnosis` forces the cache diagnostics answer, `reject_diagnostics` refuses the field
        (the `x-sim-fault` knobs of diagnostics.py).
        """
        provider, path = provider_for(raw_path, _header(headers, "host"), self.default_provider)
        spec = PROVIDERS.get(provider)
        errors = spec.base.errors if spec else "openai"
        model = body.get("model") if isinstance(body, dict) else None
        resolved = resolve(provider, path, model if isinstance(model, str) else None)
        now = self.clock.now()
        try:
            now = _time(headers, self.clock)
            if resolved is None:
                raise RequestError(404, f"no route for {method} {path} on provider {provider!r}")
            b = resolved.behaviour
            errors = b.errors
            if method != "POST":
                raise RequestError(405, f"method {method} not allowed on {path}")
            if b.auth is not None:
                _authorize(b, method, path, query, headers,
                           raw if raw is not None else wire.dumps(body),
                           addressed_host(raw_path, _header(headers, "host")))
            if b.api == wire.OAUTH_TOKEN:  # Google's token endpoint, for Vertex clients
                token = {"access_token": "ya29.sim-" + self.request_id()[8:], "expires_in": 3599,
                         "token_type": "Bearer"}
                return Outcome(provider, path, 0, None,
                               Reply(200, "application/json", wire.dumps(token)), now)
            if not isinstance(body, dict):
                raise RequestError(400, body_error or "request body must be a JSON object")
            _validate(b, body)
            asked = _asked(b, body, reject_diagnostics)
            model_name = model if isinstance(model, str) else (resolved.path_model or "unknown")
            blocks = render.render(render.stripped(body, b.strips), b.api, b.order)
            automatic = body.get("cache_control") if b.cache == "markers" else None
            prompt = cache.analyze(blocks, _cache_identity(b, body, model_name), b.auto_step,
                                   automatic)
            if b.cache == "markers" or (b.cache == "explicit-or-auto" and prompt.markers):
                try:
                    cache.check_markers(prompt)
                except ValueError as e:
                    raise RequestError(400, str(e)) from None
                if b.minimums == "bedrock" and not cache.bedrock_takes_1h(model_name)\
                        and any(m.ttl == "1h" for m in prompt.markers):
                    raise RequestError(400, f"The model {model_name} does not support a 1h "
                                            "cache TTL")
            with self._lock:
                replica = self._route(provider, b, headers, body, prompt, blocks, model_name,
                                      now)
                counts = self._serve(provider, replica, b, prompt, model_name, body, now)
        except RequestError as e:
            logger.debug("%s %s on %s rejected: %s %s", method, path, provider, e.status, e)
            rid = self.request_id()
            payload = wire.ERROR_STYLES[errors](e.status, str(e), rid)
            reply = Reply(e.status, "application/json", wire.dumps(payload))
            return Outcome(provider, path, -1, None, reply, now)

        usage = wire.USAGE_STYLES[b.usage](counts)
        ids = self._ids(b.api)
        if reply_text is not None:
            ids = replace(ids, text=reply_text)
        extra = self._diagnose(b, body, headers, blocks, model_name, ids, counts, asked,
                               diagnosis)
        stream = b.stream if b.stream is not None else body.get("stream") is True
        if stream and b.framing == "eventstream":
            frames = eventstream.eventstream_frames(b.api, model_name, usage, ids)
            reply = Reply(200, wire.EVENTSTREAM, events=tuple(frames))
        elif b.api == GEMINI and stream and "alt=sse" not in query.split("&"):
            # Gemini without alt=sse streams a JSON array of the same chunks.
            data = wire.json_body(b.api, model_name, usage, ids, body, stream=True)
            reply = Reply(200, "application/json", wire.dumps(data))
        elif stream:
            events = wire.sse_events(b.api, model_name, usage, ids, body, b.stream_usage,
                                     extra)
            reply = Reply(200, "text/event-stream", events=tuple(events))
        else:
            data = wire.json_body(b.api, model_name, usage, ids, body, extra=extra)
            reply = Reply(200, "application/json", wire.dumps(data))
        return Outcome(provider, path, replica, usage, reply, now)

    def _diagnose(self, b: Behaviour, body: dict[str, Any], headers: list[tuple[str, str]],
                  blocks: list[render.Block], model: str, ids: wire.Ids, counts: wire.Counts,
                  asked: "_Asked | None", forced: str | None) -> dict[str, Any] | None:
        """The reply's cache diagnostics fields, and the request's fingerprint kept for the
        next comparison (diagnostics.py)."""
        if b.diagnostics == "anthropic":
            if asked is None:  # no `diagnostics` object: nothing is stored, nothing answered
                return None
            print_ = diagnostics.fingerprint(
                _api_key(headers), diagnostics._h([model, body.get("speed") or "standard"]),
                blocks,
                diagnostics.anthropic_settings(body, _header(headers, "anthropic-beta")))
            answer = self.diagnoses.anthropic(asked.previous, print_, forced)
            self.diagnoses.keep(ids.message, print_)
            return {"diagnostics": answer}
        if b.diagnostics == "openai":
            print_ = diagnostics.fingerprint(_api_key(headers), diagnostics._h(model), blocks,
                                             diagnostics.openai_settings(body))
            supported = gpt_5_6_or_later(model)
            extra: dict[str, Any] = {}
            if supported:
                options = body.get("prompt_cache_options")
                options = options if isinstance(options, dict) else {}
                extra["prompt_cache_options"] = {
                    "mode": options.get("mode", "implicit"), "ttl": options.get("ttl", "30m"),
                    "comparison_response_id": asked.previous if asked else None}
            if asked is not None and asked.previous is not None:
                extra["prompt_cache_diagnostics"] = self.diagnoses.openai(
                    asked.previous, print_, counts.read, supported, forced)
            elif supported:
                extra["prompt_cache_diagnostics"] = None
            self.diagnoses.keep(ids.completion, print_)  # any response may be compared with
            return extra
        return None

    def _serve(self, provider: str, replica: int, b: Behaviour, prompt: cache.Prompt,
               model: str, body: dict[str, Any], now: float) -> wire.Counts:
        if b.cache == "markers" or (b.cache == "explicit-or-auto" and prompt.markers):
            # "explicit-or-auto": one mode a request, explicit when a block carries a marker
            # (DashScope's context cache; MiniMax's explicit cache on its Anthropic API).
            mc = self._marker.setdefault((provider, replica), cache.MarkerCache())
            minimum = (cache.bedrock_minimum(model) if b.minimums == "bedrock"
                       else cache.anthropic_minimum(model))
            got = mc.serve(prompt, b.marker_min or minimum, now)
            return wire.Counts(prompt.tokens, got.read, got.write_5m, got.write_1h)
        if b.gpt_breakpoints and gpt_5_6_or_later(model):
            options = body.get("prompt_cache_options")
            options = options if isinstance(options, dict) else {}
            ttl = _duration(options.get("ttl"))
            bc = self._breakpoints.setdefault((provider, replica), cache.BreakpointCache())
            # "The `ttl` defaults to `30m`" (openai SDK `PromptCacheOptions`)
            read, written = bc.serve(prompt, options.get("mode") != "explicit",
                                     self.auto_ttl or ttl or BREAKPOINT_TTL, now)
            return wire.Counts(prompt.tokens, read, written)
        ac = self._auto.get((provider, replica))
        if ac is None:
            ac = self._auto[(provider, replica)] = cache.AutoCache(
                self.auto_ttl if self.auto_ttl is not None else b.ttl)
        return wire.Counts(prompt.tokens, ac.serve(prompt, now, b.auto_min))
