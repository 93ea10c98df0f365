"""What the simulator puts on the wire: usage objects, JSON bodies, SSE events, errors, encoders.

Each provider's usage convention is one function in `USAGE_STYLES` (Anthropic's `input_tokens`
excludes cache reads and writes; OpenAI-style `prompt_tokens` includes them; DeepSeek splits
hit/miss; Moonshot puts `cached_tokens` at the top level; Gemini uses `usageMetadata`). Response
APIs follow the providers' SDK types (anthropic-sdk-python `types/usage.py`, openai-python
`types/completion_usage.py` and `types/responses/response_usage.py`).
"""

import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import brotli

from tests.sim.render import ANTHROPIC, CONVERSE, GEMINI, OPENAI_CHAT, OPENAI_RESPONSES

REPLY_TEXT = "ok"
OUTPUT_TOKENS = 1
# OpenRouter-style cost figure: a Sonnet-like price list and Anthropic's multipliers.
_PRICE_IN, _PRICE_OUT = 3e-6, 15e-6
_READ, _WRITE_5M, _WRITE_1H = 0.1, 1.25, 2.0


@dataclass(frozen=True, slots=True)
class Counts:
    prompt: int  # every prompt token, cached or not
    read: int = 0
    write_5m: int = 0
    write_1h: int = 0
    output: int = OUTPUT_TOKENS

    @property
    def write(self) -> int:
        return self.write_5m + self.write_1h

    @property
    def uncached(self) -> int:
        return self.prompt - self.read - self.write


Usage = dict[str, Any]


def _anthropic(c: Counts) -> Usage:
    return {"input_tokens": c.uncached, "cache_creation_input_tokens": c.write,
            "cache_read_input_tokens": c.read,
            "cache_creation": {"ephemeral_5m_input_tokens": c.write_5m,
                               "ephemeral_1h_input_tokens": c.write_1h},
            "output_tokens": c.output, "service_tier": "standard"}


def _anthropic_compat(c: Counts) -> Usage:
    """Anthropic's field names as other providers' Anthropic-compatible endpoints send them: no
    5m/1h breakdown; automatic caches report no writes (Kimi Code: `cache_creation_input_tokens`
    always 0, per Leechael/pi-provider-kimi-code docs/caching.md; MiniMax's example response
    has just these four fields)."""
    return {"input_tokens": c.uncached, "cache_creation_input_tokens": c.write,
            "cache_read_input_tokens": c.read, "output_tokens": c.output}


def _chat_base(c: Counts) -> Usage:
    return {"prompt_tokens": c.prompt, "completion_tokens": c.output,
            "total_tokens": c.prompt + c.output}


def _openai_chat(c: Counts) -> Usage:
    return _chat_base(c) | {
        "prompt_tokens_details": {"cached_tokens": c.read, "cache_write_tokens": c.write,
                                  "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0}}


def _xai_chat(c: Counts) -> Usage:
    return _chat_base(c) | {
        "prompt_tokens_details": {"text_tokens": c.prompt, "audio_tokens": 0, "image_tokens": 0,
                                  "cached_tokens": c.read},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
        "num_sources_used": 0}


def _openrouter(c: Counts) -> Usage:
    cost = _PRICE_IN * (c.uncached + _READ * c.read + _WRITE_5M * c.write_5m
                        + _WRITE_1H * c.write_1h) + _PRICE_OUT * c.output
    cost = round(cost, 10)
    return _chat_base(c) | {
        "prompt_tokens_details": {"cached_tokens": c.read, "cache_write_tokens": c.write,
                                  "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
        "cost": cost, "is_byok": False,
        "cost_details": {"upstream_inference_cost": cost}}


def _deepseek(c: Counts) -> Usage:
    return _chat_base(c) | {"prompt_cache_hit_tokens": c.read,
                            "prompt_cache_miss_tokens": c.prompt - c.read,
                            "completion_tokens_details": {"reasoning_tokens": 0}}


def _moonshot(c: Counts) -> Usage:
    return _chat_base(c) | {"cached_tokens": c.read}


def _dashscope(c: Counts) -> Usage:
    return _chat_base(c) | {"prompt_tokens_details": {"cached_tokens": c.read}}


def _responses(c: Counts, write_field: bool = True) -> Usage:
    details: dict[str, int] = {"cached_tokens": c.read}
    if write_field:
        details["cache_write_tokens"] = c.write
    return {"input_tokens": c.prompt, "input_tokens_details": details,
            "output_tokens": c.output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": c.prompt + c.output}


def _gemini(c: Counts) -> Usage:
    usage: Usage = {"promptTokenCount": c.prompt, "candidatesTokenCount": c.output,
                    "totalTokenCount": c.prompt + c.output,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": c.prompt}]}
    if c.read:  # Gemini omits the cache fields entirely on a miss
        usage["cachedContentTokenCount"] = c.read
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": c.read}]
    return usage


def _converse(c: Counts) -> Usage:
    """Bedrock Converse `TokenUsage`: `inputTokens` is what was neither read nor written ("total
    input tokens = inputTokens + cacheReadInputTokens + cacheWriteInputTokens"), `cacheDetails`
    the writes per TTL, 1h before 5m (Bedrock prompt-caching guide; TokenUsage, CacheDetail in
    the bedrock-runtime API reference)."""
    usage: Usage = {"inputTokens": c.uncached, "outputTokens": c.output,
                    "totalTokens": c.prompt + c.output, "cacheReadInputTokens": c.read,
                    "cacheWriteInputTokens": c.write}
    details = [{"ttl": ttl, "inputTokens": n} for ttl, n in (("1h", c.write_1h), ("5m", c.write_5m))
               if n]
    if details:
        usage["cacheDetails"] = details
    return usage


USAGE_STYLES: dict[str, Callable[[Counts], Usage]] = {
    "anthropic": _anthropic,
    "anthropic-compat": _anthropic_compat,
    "openai-chat": _openai_chat,
    "xai-chat": _xai_chat,
    "openrouter": _openrouter,
    "deepseek": _deepseek,
    "moonshot": _moonshot,
    "dashscope": _dashscope,
    "openai-responses": _responses,
    # The Codex backend and xAI may omit cache_write_tokens: it is optional in the Responses usage.
    "codex": lambda c: _responses(c, write_field=False),
    "xai-responses": lambda c: _responses(c, write_field=False),
    "gemini": _gemini,
    "bedrock-converse": _converse,
}


# --- errors -------------------------------------------------------------------------------

_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                          403: "permission_error", 404: "not_found_error",
                          405: "invalid_request_error", 413: "request_too_large",
                          429: "rate_limit_error", 529: "overloaded_error"}
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "INVALID_ARGUMENT",
                  429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}

ERROR_STYLES: dict[str, Callable[[int, str, str], Any]] = {
    "anthropic": lambda status, msg, rid: {
        "type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"),
                                   "message": msg}, "request_id": rid},
    "openai": lambda status, msg, rid: {
        "error": {"message": msg, "type": "invalid_request_error" if status < 500 else "server_error",
                  "param": None, "code": None}},
    "codex": lambda status, msg, rid: {"detail": msg},
    "gemini": lambda status, msg, rid: {
        "error": {"code": status, "message": msg, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}},
    # Bedrock's REST-JSON errors: {"message": ...}, the type in the x-amzn-ErrorType header.
    "bedrock": lambda status, msg, rid: {"message": msg},
}


# --- bodies and events ----------------------------------------------------------------------

def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else dumps(data).decode()
    return f"{head}data: {payload}\n\n".encode()


@dataclass(frozen=True, slots=True)
class Ids:
    """Realistic ids for one reply, and the text the model "says" in it."""

    message: str  # msg_... (Anthropic message / Responses output item)
    completion: str  # chatcmpl-... / resp_... / Gemini responseId
    text: str = REPLY_TEXT  # tests set their own (x-sim-reply-text) to trace it through a proxy


Extra = dict[str, Any] | None  # top-level fields a reply adds (cache diagnostics)


def _anthropic_message(model: str, usage: Usage, ids: Ids, extra: Extra = None) -> dict[str, Any]:
    return {"id": ids.message, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": ids.text}], "stop_reason": "end_turn",
            "stop_sequence": None, **(extra or {}), "usage": usage}


def _anthropic_event_objects(model: str, usage: Usage, ids: Ids,
                             extra: Extra = None) -> list[dict[str, Any]]:
    # Cache diagnostics ride on message_start only, never updated later (docs/providers.md#anthropic).
    start = _anthropic_message(model, usage | {"output_tokens": 1}, ids, extra)
    start.update(content=[], stop_reason=None)
    # message_delta repeats the cumulative counters but has no 5m/1h breakdown.
    delta_usage = {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens",
                                         "cache_read_input_tokens", "output_tokens")}
    return [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": ids.text}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": delta_usage},
        {"type": "message_stop"},
    ]


def _anthropic_events(model: str, usage: Usage, ids: Ids, body: dict[str, Any],
                      extra: Extra = None) -> list[bytes]:
    return [sse(e, e["type"]) for e in _anthropic_event_objects(model, usage, ids, extra)]


def _chat_completion(model: str, usage: Usage, ids: Ids) -> dict[str, Any]:
    return {"id": ids.completion, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_sim",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ids.text,
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": usage}


def _chat_events(model: str, usage: Usage, ids: Ids, body: dict[str, Any],
                 stream_usage: str) -> list[bytes]:
    opts = body.get("stream_options")
    requested = isinstance(opts, dict) and opts.get("include_usage") is True
    trailing = stream_usage == "always" or (stream_usage == "include_usage" and requested)
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj: dict[str, Any] = {"id": ids.completion, "object": "chat.completion.chunk",
                               "created": created, "model": model,
                               "system_fingerprint": "fp_sim", "choices": choices}
        if trailing:
            obj["usage"] = None  # OpenAI sends `usage: null` on every chunk before the last
        obj.update(extra)
        return sse(obj)

    finish: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    if stream_usage == "in_choice":  # Moonshot: usage sits next to finish_reason
        finish["usage"] = usage
    events = [
        chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"content": ids.text}, "logprobs": None,
                "finish_reason": None}]),
        chunk([finish]),
    ]
    if trailing:
        events.append(chunk([], usage=usage))
    events.append(sse("[DONE]"))
    return events


def _response_object(model: str, usage: Usage | None, ids: Ids, body: dict[str, Any],
                     done: bool, extra: Extra = None) -> dict[str, Any]:
    output = [{"type": "message", "id": ids.message, "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": ids.text, "annotations": []}]}]
    obj: dict[str, Any] = {
        "id": ids.completion, "object": "response", "created_at": int(time.time()),
        "status": "completed" if done else "in_progress", "error": None,
        "incomplete_details": None, "instructions": body.get("instructions"),
        "model": model, "output": output if done else [], "parallel_tool_calls": True,
        "tool_choice": "auto", "tools": [], "store": body.get("store", True),
        "usage": usage if done else None}
    if isinstance(body.get("prompt_cache_key"), str):
        obj["prompt_cache_key"] = body["prompt_cache_key"]
    for k, v in (extra or {}).items():
        # The diagnosis is part of the finished response (streaming: `response.completed`).
        obj[k] = v if done or k != "prompt_cache_diagnostics" else None
    return obj


def _responses_events(model: str, usage: Usage, ids: Ids, body: dict[str, Any],
                      extra: Extra = None) -> list[bytes]:
    item = {"type": "message", "id": ids.message, "status": "in_progress", "role": "assistant",
            "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    done_part = part | {"text": ids.text}
    pos = {"item_id": ids.message, "output_index": 0, "content_index": 0}
    steps: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": _response_object(model, None, ids, body, False,
                                                            extra)}),
        ("response.in_progress", {"response": _response_object(model, None, ids, body, False,
                                                                extra)}),
        ("response.output_item.added", {"output_index": 0, "item": item}),
        ("response.content_part.added", pos | {"part": part}),
        ("response.output_text.delta", pos | {"delta": ids.text}),
        ("response.output_text.done", pos | {"text": ids.text}),
        ("response.content_part.done", pos | {"part": done_part}),
        ("response.output_item.done", {"output_index": 0,
                                       "item": item | {"status": "completed",
                                                       "content": [done_part]}}),
        ("response.completed", {"response": _response_object(model, usage, ids, body, True,
                                                              extra)}),
    ]
    return [sse({"type": name, "sequence_number": n} | data, name)
            for n, (name, data) in enumerate(steps)]


def _gemini_chunk(model: str, text: str, usage: Usage, ids: Ids, final: bool) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"},
                                 "index": 0}
    if final:
        candidate["finishReason"] = "STOP"
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
            "responseId": ids.completion}


def _gemini_chunks(model: str, usage: Usage, ids: Ids) -> list[dict[str, Any]]:
    # Every chunk carries a usageMetadata; only the last one is complete (cached count included).
    first = {k: usage[k] for k in ("promptTokenCount",)} | {"candidatesTokenCount": 1,
                                                            "totalTokenCount":
                                                                usage["promptTokenCount"] + 1}
    return [_gemini_chunk(model, ids.text[:1], first, ids, False),
            _gemini_chunk(model, ids.text[1:], usage, ids, True)]


def _converse_body(usage: Usage, ids: Ids) -> dict[str, Any]:
    return {"output": {"message": {"role": "assistant", "content": [{"text": ids.text}]}},
            "stopReason": "end_turn", "usage": usage, "metrics": {"latencyMs": 42}}


EVENTSTREAM = "application/vnd.amazon.eventstream"
# Not an LLM API: an OAuth 2.0 token endpoint (refresh-token grant, form-encoded), where Google's
# auth libraries get the bearer token a Vertex client then sends.
OAUTH_TOKEN = "oauth-token"


Builder = Callable[[str, Usage, Ids, dict[str, Any], str, Extra], Any]

# Per API: (non-streaming JSON body, SSE events). Gemini's JSON is the non-SSE stream form
# (an array of chunks) only when asked for by `json_body(..., stream=True)`.
_JSON: dict[str, Builder] = {
    ANTHROPIC: lambda model, usage, ids, body, _, extra: _anthropic_message(model, usage, ids,
                                                                            extra),
    OPENAI_CHAT: lambda model, usage, ids, body, _, extra: _chat_completion(model, usage, ids),
    OPENAI_RESPONSES: lambda model, usage, ids, body, _, extra: _response_object(
        model, usage, ids, body, True, extra),
    GEMINI: lambda model, usage, ids, body, _, extra: _gemini_chunk(model, ids.text, usage, ids,
                                                                    True),
    CONVERSE: lambda model, usage, ids, body, _, extra: _converse_body(usage, ids),
}
_SSE: dict[str, Builder] = {
    ANTHROPIC: lambda model, usage, ids, body, _, extra: _anthropic_events(model, usage, ids,
                                                                           body, extra),
    OPENAI_CHAT: lambda model, usage, ids, body, stream_usage, extra: _chat_events(
        model, usage, ids, body, stream_usage),
    OPENAI_RESPONSES: lambda model, usage, ids, body, _, extra: _responses_events(
        model, usage, ids, body, extra),
    GEMINI: lambda model, usage, ids, body, _, extra: [sse(c) for c in _gemini_chunks(
        model, usage, ids)],
}


def json_body(api: str, model: str, usage: Usage, ids: Ids, body: dict[str, Any],
              stream: bool = False, extra: Extra = None) -> Any:
    """The non-streaming reply; with `stream`, Gemini's non-SSE stream (a JSON array).
    `extra`: top-level fields the reply adds (cache diagnostics)."""
    if stream and api == GEMINI:
        return _gemini_chunks(model, usage, ids)
    return _JSON[api](model, usage, ids, body, "", extra)


def sse_events(api: str, model: str, usage: Usage, ids: Ids, body: dict[str, Any],
               stream_usage: str, extra: Extra = None) -> list[bytes]:
    return _SSE[api](model, usage, ids, body, stream_usage, extra)


# --- response compression ----------------------------------------------------------------------

class _Gzip:
    def __init__(self) -> None:
        self._c = zlib.compressobj(wbits=31)

    def chunk(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._c.flush()


class _Brotli:
    def __init__(self) -> None:
        self._c = brotli.Compressor()

    def chunk(self, data: bytes) -> bytes:
        return self._c.process(data) + self._c.flush()

    def finish(self) -> bytes:
        return self._c.finish()


class _Zstd:
    # mitmproxy 12.2 ships `zstandard`, 12.3 `backports.zstd` / `compression.zstd` (3.14+).
    def __init__(self) -> None:
        try:
            from compression import zstd  # type: ignore[import-not-found]
        except ImportError:
            try:
                from backports import zstd  # type: ignore[import-not-found,no-redef]
            except ImportError:
                zstd = None
        if zstd is not None:
            c = zstd.ZstdCompressor()
            self._chunk = lambda d: c.compress(d, mode=zstd.ZstdCompressor.FLUSH_BLOCK)
            self._finish = lambda: c.flush(mode=zstd.ZstdCompressor.FLUSH_FRAME)
        else:
            import zstandard

            obj = zstandard.ZstdCompressor().compressobj()
            self._chunk = lambda d: obj.compress(d) + obj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
            self._finish = lambda: obj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)

    def chunk(self, data: bytes) -> bytes:
        return self._chunk(data)

    def finish(self) -> bytes:
        return self._finish()


ENCODERS: dict[str, Callable[[], Any]] = {"gzip": _Gzip, "br": _Brotli, "zstd": _Zstd}
