"""Talking to the provider simulator directly (no proxy), for the simulator's own tests."""

import http.client
import json
from pathlib import Path
from typing import Any

from tests.sim import Simulator

ROOT = Path(__file__).resolve().parents[1]
BIG = "The quick brown fox jumps over the lazy dog. " * 120  # ~1,350 tokens as one segment


def post(sim: Simulator, path: str, body: Any, headers: dict[str, str] | None = None,
         raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", path, body=data,
                     headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_json(sim: Simulator, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    status, _, data = post(sim, path, body, {k.replace("_", "-"): v for k, v in headers.items()})
    return status, json.loads(data)


def sse_events(data: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE event."""
    events = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        name, payload = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                payload.append(line[6:])
        events.append((name, "\n".join(payload)))
    return events


def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    # Before GPT-5.6: automatic prefix caching in 128-token chunks (5.6+: breakpoints, below).
    return {"model": "gpt-5.5", "messages": messages, **extra}


def convo(n: int, system: str = BIG) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for i in range(n):
        msgs.append({"role": "user", "content": f"question {i}"})
        msgs.append({"role": "assistant", "content": f"answer {i}"})
    msgs.append({"role": "user", "content": f"question {n}"})
    return msgs



def control(url: str, method: str, path: str) -> tuple[int, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def anthropic_turn(n: int, model: str = "claude-sonnet-4-6") -> dict[str, Any]:
    msgs: list[dict[str, Any]] = []
    for i in range(n + 1):
        msgs.append({"role": "user", "content": [{"type": "text", "text": f"question {i}"}]})
        if i < n:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": f"a {i}"}]})
    msgs[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return {"model": model, "max_tokens": 16, "messages": msgs,
            "system": [{"type": "text", "text": BIG, "cache_control": {"type": "ephemeral"}}]}


def responses_turn(n: int, **extra: Any) -> dict[str, Any]:
    items: list[dict[str, Any]] = [{"role": "developer", "content": BIG}]
    for i in range(n + 1):
        items.append({"role": "user", "content": [{"type": "input_text", "text": f"q {i}"}]})
    return {"model": "gpt-5.5-codex", "input": items, **extra}


def sized(tokens: int) -> str:
    """A string whose canonical JSON (with quotes) estimates to exactly `tokens` tokens."""
    return "a" * (tokens * 4 - 2)


OPENAI = "/p/openai/v1/chat/completions"
