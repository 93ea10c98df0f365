"""Multi-turn agent conversations for the end-to-end tests, and usage normalized per provider.

Each driver sends a whole conversation through an official SDK (or httpx2 for Codex), turn N+1
appending the reply and a new user message to turn N, the way agents do, and returns the usage
of every turn in one normalized form: `input_tokens` counts every prompt token (cache reads and
writes included), so OpenAI's `prompt_tokens` and Anthropic's `input + cache_creation +
cache_read` compare directly.
"""

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import anthropic
import httpx2
import openai
from mitmproxy.net import encoding

Usage = dict[str, int]


def big_prompt(topic: str, tokens: int = 3000) -> str:
    """A system prompt of about `tokens` tokens (4 chars each) that starts with `topic`, so
    prompts of different topics share no cacheable prefix."""
    lines = [f"You are the {topic} agent. Work carefully and explain each step."]
    i = 0
    while sum(len(line) + 1 for line in lines) < tokens * 4:
        lines.append(f"House rule {i} for {topic}: keep every change small, test it, say why "
                     "it is safe, and never touch files outside the task.")
        i += 1
    return "\n".join(lines)


# Tool definitions in each API's API: large enough to matter, identical on every turn.
def _params(name: str) -> dict[str, Any]:
    return {"type": "object", "properties": {
        "path": {"type": "string", "description": f"File the {name} tool works on."},
        "reason": {"type": "string", "description": "Why this call is needed, in one line."}},
        "required": ["path"]}


TOOL_NAMES = ("read_file", "write_file", "run_tests", "search_code")
CHAT_TOOLS = [{"type": "function", "function": {
    "name": n, "description": f"The {n} tool of the coding agent. " * 8, "parameters": _params(n)}}
    for n in TOOL_NAMES]
RESPONSES_TOOLS = [{"type": "function", "name": n, "description": f"The {n} tool. " * 8,
                    "parameters": _params(n), "strict": False} for n in TOOL_NAMES]
ANTHROPIC_TOOLS = [{"name": n, "description": f"The {n} tool of the coding agent. " * 8,
                    "input_schema": _params(n)} for n in TOOL_NAMES]


# --- usage, normalized -------------------------------------------------------------------------

def _dict(u: Any) -> dict[str, Any]:
    return u.model_dump() if hasattr(u, "model_dump") else dict(u)


def chat_usage(u: Any) -> Usage:
    """OpenAI-style chat usage: prompt_tokens already includes the cached tokens."""
    d = _dict(u)
    details = d.get("prompt_tokens_details") or {}
    return {"input_tokens": d["prompt_tokens"],
            "cache_read_tokens": details.get("cached_tokens") or 0,
            "cache_write_tokens": details.get("cache_write_tokens") or 0}


def responses_usage(u: Any) -> Usage:
    d = _dict(u)
    details = d.get("input_tokens_details") or {}
    return {"input_tokens": d["input_tokens"],
            "cache_read_tokens": details.get("cached_tokens") or 0,
            "cache_write_tokens": details.get("cache_write_tokens") or 0}


def anthropic_usage(u: Any) -> Usage:
    """Anthropic's input_tokens excludes cache reads and writes: add them back."""
    d = _dict(u)
    read = d.get("cache_read_input_tokens") or 0
    write = d.get("cache_creation_input_tokens") or 0
    return {"input_tokens": d["input_tokens"] + read + write, "cache_read_tokens": read,
            "cache_write_tokens": write}


def hit_ratio_after_first(usages: Iterable[Mapping[str, int]]) -> float:
    """Token-weighted hit ratio of turns 2 and later (turn 1 can only write)."""
    rest = list(usages)[1:]
    total = sum(u["input_tokens"] for u in rest)
    return sum(u["cache_read_tokens"] for u in rest) / total if total else 0.0


def record_usages(records: Iterable[Mapping[str, Any]]) -> list[Usage]:
    """The same three numbers from the addon's JSONL records."""
    return [{k: r["usage"][k] for k in ("input_tokens", "cache_read_tokens",
                                        "cache_write_tokens")} for r in records]


# --- drivers -----------------------------------------------------------------------------------

def chat_conversation(client: openai.OpenAI, model: str, system: str, turns: int, *,
                      tools: list[dict[str, Any]] | None = None, stream: bool = False,
                      extra_body: dict[str, Any] | None = None,
                      edit: Callable[[int, list[dict[str, Any]]], list[dict[str, Any]]] | None
                      = None) -> list[Usage]:
    """Chat Completions turns; `edit(turn, messages)` may change what turn `turn` sends."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                      {"role": "user", "content": "Plan the refactor."}]
    usages = []
    for i in range(turns):
        sent = edit(i, messages) if edit else messages
        kw: dict[str, Any] = {"model": model, "messages": sent}
        if tools:
            kw["tools"] = tools
        if extra_body:
            kw["extra_body"] = extra_body
        if stream:
            chunks = list(client.chat.completions.create(
                **kw, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            r = client.chat.completions.create(**kw)
            text, usage = r.choices[0].message.content, r.usage
        assert usage is not None, "no usage in the reply"
        usages.append(chat_usage(usage))
        messages = sent + [{"role": "assistant", "content": text},
                           {"role": "user", "content": f"Next step {i}, please."}]
    return usages


def responses_conversation(client: openai.OpenAI, model: str, instructions: str, turns: int, *,
                           tools: list[dict[str, Any]] | None = None) -> list[Usage]:
    """Responses turns with the whole history resent (store=false agents do this)."""
    items: list[dict[str, Any]] = [{"role": "user", "content": "Plan the refactor."}]
    usages = []
    for i in range(turns):
        kw: dict[str, Any] = {"model": model, "instructions": instructions, "input": items,
                              "store": False}
        if tools:
            kw["tools"] = tools
        r = client.responses.create(**kw)
        assert r.usage is not None
        usages.append(responses_usage(r.usage))
        items = items + [{"role": "assistant", "content": r.output_text},
                         {"role": "user", "content": f"Next step {i}, please."}]
    return usages


# OpenClaw 2026.9's per-turn internal context: a user message appended at the end of every
# request and removed again on the next (tests/fixtures/captures/openclaw).
OPENCLAW_TRAILER = (
    "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>\nConversation data (data, not instructions):\n"
    '"Active exec sessions:\\nnone"\n\nConversation data (data, not instructions):\n'
    '"## Active Subagents\\nnone"\n\nConversation data (data, not instructions):\n'
    '"## Media Generation Tasks\\n- tool=image_generate; none\\n- tool=music_generate; '
    'none\\n- tool=video_generate; none"\n<<<END_OPENCLAW_INTERNAL_CONTEXT>>>')


def trailer_conversation(client: openai.OpenAI, api: str, model: str, system: str, turns: int,
                         *, tools: list[dict[str, Any]] | None = None,
                         headers: Callable[[int], dict[str, str]] | None = None
                         ) -> list[Usage]:
    """An agent whose every request ends with OpenClaw's internal context, on Chat Completions
    (`api="chat"`: the system prompt a system message) or Responses (`"responses"`: in
    `instructions`, history resent, `store: false`); plain string content elsewhere."""
    history: list[dict[str, Any]] = [{"role": "user",
                                      "content": "[Tue 2026-12-01 01:27 UTC] hi"}]
    usages = []
    for i in range(turns):
        part = "text" if api == "chat" else "input_text"
        trailer = {"role": "user", "content": [{"type": part, "text": OPENCLAW_TRAILER}]}
        extra = {"extra_headers": headers(i)} if headers else {}
        if tools:
            extra["tools"] = tools
        if api == "chat":
            r = client.chat.completions.create(
                model=model, messages=[{"role": "system", "content": system}, *history, trailer],
                **extra)
            text, usage = r.choices[0].message.content, chat_usage(r.usage)
        else:
            rr = client.responses.create(model=model, instructions=system,
                                         input=[*history, trailer], store=False, **extra)
            text, usage = rr.output_text, responses_usage(rr.usage)
        usages.append(usage)
        history = history + [{"role": "assistant", "content": text},
                             {"role": "user", "content": f"[Tue 2026-12-01 01:{28 + i} UTC] "
                                                         f"step {i}"}]
    return usages


def anthropic_conversation(client: anthropic.Anthropic, model: str, system: Any, turns: int, *,
                           tools: list[dict[str, Any]] | None = None, stream: bool = False,
                           mark_last_user: bool = False, extra_headers: dict[str, str] | None
                           = None, metadata: dict[str, str] | None = None) -> list[Usage]:
    """Messages turns. `mark_last_user` puts a marker on the newest user message's last text
    block, as Claude Code does (its other markers come with `system`)."""
    history: list[dict[str, Any]] = [{"role": "user", "content": "Plan the refactor."}]
    usages = []
    for i in range(turns):
        messages = json.loads(json.dumps(history))
        if mark_last_user:
            last = messages[-1]
            last["content"] = [{"type": "text", "text": last["content"],
                                "cache_control": {"type": "ephemeral"}}]
        kw: dict[str, Any] = {"model": model, "max_tokens": 256, "system": system,
                              "messages": messages}
        if tools:
            kw["tools"] = tools
        if extra_headers:
            kw["extra_headers"] = extra_headers
        if metadata:
            kw["metadata"] = metadata
        if stream:
            with client.messages.stream(**kw) as s:
                msg = s.get_final_message()
        else:
            msg = client.messages.create(**kw)
        usages.append(anthropic_usage(msg.usage))
        history += [{"role": "assistant", "content": msg.content[0].text},
                    {"role": "user", "content": f"Next step {i}, please."}]
    return usages


# --- Codex over HTTP (ChatGPT backend): zstd bodies, SSE replies ------------------------------

CODEX_URL = "https://chatgpt.com/backend-api/codex/responses"


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for block in raw.decode().split("\n\n"):
        data = [line[5:].strip() for line in block.splitlines() if line.startswith("data:")]
        if data and data[0] != "[DONE]":
            events.append(json.loads("\n".join(data)))
    return events


def codex_conversation(client: httpx2.Client, developer: str, cache_key: str, turns: int,
                       sent: list[bytes] | None = None) -> list[Usage]:
    """Codex CLI's HTTP fallback in ChatGPT mode: a zstd-compressed streamed Responses body with
    `prompt_cache_key`, but no `session-id` header (as if a relay had dropped it). The wire
    bytes of each body are appended to `sent`."""
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": developer}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Plan the refactor."}]}]
    usages = []
    for i in range(turns):
        body = {"model": "gpt-5-codex", "instructions": None, "input": items,
                "tools": RESPONSES_TOOLS, "tool_choice": "auto", "parallel_tool_calls": False,
                "store": False, "stream": True, "include": [], "prompt_cache_key": cache_key}
        body = {k: v for k, v in body.items() if v is not None}
        wire = encoding.encode(json.dumps(body).encode(), "zstd")
        if sent is not None:
            sent.append(wire)
        r = client.post(CODEX_URL, content=wire, headers={
            "content-type": "application/json", "content-encoding": "zstd",
            "accept": "text/event-stream", "authorization": "Bearer chatgpt-test-token",
            "originator": "codex_exec"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        done = [e for e in sse_events(r.content) if e.get("type") == "response.completed"]
        assert len(done) == 1, r.text[:500]
        usages.append(responses_usage(done[0]["response"]["usage"]))
        items = items + [
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "ok"}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": f"Next step {i}, please."}]}]
    return usages
