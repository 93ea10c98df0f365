"""The bench's request bodies: one template per latency scenario and the conversations of the load.

Synthetic but agent-shaped: a long system prompt, tools, and many turns of tool calls with
file-sized results. The text is random code-ish words (never anyone's real prompt).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"

_WORD_TEXT = ("def return self value index buffer request response token cache stream parse error "
          "config module import class async await yield lambda struct impl trait match none "
          "result option vector string bytes offset length header field path route client "
          "server socket timeout retry backoff session affinity prefix hash digest encode "
          "decode json yaml schema model usage input output read write flush close open")
_WORDS = tuple(_WORD_TEXT.split())


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n))


def code_block(rng: random.Random, lines: int) -> str:
    out = []
    for i in range(lines):
        indent = "    " * rng.randrange(4)
        out.append(f"{indent}{words(rng, rng.randrange(3, 11))}  # {i}")
    return "\n".join(out)


STEP = "__STEP_000000__"  # fixed-width placeholder for the per-request varying part


def _tools_openai(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {
        "name": f"tool_{i}_{rng.choice(_WORDS)}", "description": words(rng, 40),
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": words(rng, 12)},
            "content": {"type": "string", "description": words(rng, 12)}},
            "required": ["path"]}}} for i in range(n)]


def openai_body(size: int, seed: int = 1) -> bytes:
    """An OpenAI chat body of about `size` bytes with a STEP placeholder in the last message."""
    rng = random.Random(seed)
    big = size >= 100_000
    system = words(rng, 6000 if big else 120)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                      {"role": "user", "content": words(rng, 30)}]
    # gpt-5.5: the rows measure the prompt_cache_key splice. On GPT-5.6+ the shipped rules also
    # plan breakpoints (a re-encode, like the Anthropic planner row measures).
    body: dict[str, Any] = {"model": "gpt-5.5", "messages": messages,
                            "tools": _tools_openai(rng, 24 if big else 1)}
    turn = 0
    total = len(json.dumps(body))
    while total < size - 100:
        call_id = f"call_{turn:04d}"
        new: list[dict[str, Any]]  # the two messages of this turn
        new = [{"role": "assistant", "content": None, "tool_calls": [{
                    "id": call_id, "type": "function",
                    "function": {"name": "read_file",
                                 "arguments": json.dumps({"path": f"src/mod_{turn}.py"})}}]},
               {"role": "tool", "tool_call_id": call_id,
                "content": code_block(rng, rng.randrange(60, 160) if big else 2)}]
        messages += new
        total += len(json.dumps(new))
        turn += 1
    messages.append({"role": "user", "content": f"Now run the tests ({STEP})."})
    return json.dumps(body, separators=(",", ":")).encode()


def anthropic_body(size: int, seed: int = 2) -> bytes:
    """An Anthropic Messages body without any cache_control: the planner must add markers."""
    rng = random.Random(seed)
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5", "max_tokens": 4096,
        "system": [{"type": "text", "text": words(rng, 6000)}],
        "tools": [{"name": f"tool_{i}", "description": words(rng, 40),
                   "input_schema": {"type": "object", "properties": {
                       "path": {"type": "string", "description": words(rng, 12)}}}}
                  for i in range(24)],
        "messages": [{"role": "user", "content": [{"type": "text", "text": words(rng, 30)}]}]}
    messages = body["messages"]
    turn = 0
    total = len(json.dumps(body))
    while total < size - 200:
        tid = f"toolu_{turn:04d}"
        new = [{"role": "assistant", "content": [
                   {"type": "text", "text": words(rng, 12)},
                   {"type": "tool_use", "id": tid, "name": "read_file",
                    "input": {"path": f"src/mod_{turn}.py"}}]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": tid,
                    "content": code_block(rng, rng.randrange(60, 160))}]}]
        messages += new
        total += len(json.dumps(new))
        turn += 1
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "Done."}]})
    messages.append({"role": "user", "content": [{"type": "text",
                                                  "text": f"Now run the tests ({STEP})."}]})
    return json.dumps(body, separators=(",", ":")).encode()


def stepped(template: bytes) -> Callable[[int], bytes]:
    placeholder = STEP.encode()
    assert template.count(placeholder) == 1
    head, tail = template.split(placeholder)
    return lambda i: head + f"__STEP_{i:06d}__".encode() + tail


_CONV_SYSTEM = "You are a coding agent working in a git repository. " * 8


def conversation_body(c: int, t: int) -> bytes:
    """Turn `t` of conversation `c`: small, and only appended to from turn to turn."""
    messages = [{"role": "system", "content": f"{_CONV_SYSTEM}Project #{c}."},
                {"role": "user", "content": f"Fix issue {c} in module {c % 97}."}]
    for j in range(t):
        messages += [{"role": "assistant", "content": f"Step {j} done."},
                     {"role": "user", "content": f"Continue with step {j + 1}."}]
    return json.dumps({"model": "gpt-5.5", "messages": messages},  # the splice (see above)
                      separators=(",", ":")).encode()


TURNS = 10  # a conversation's turns before its agent starts a new session on the same prompt


def conversations_body(conversations: int) -> Callable[[int], bytes]:
    # Request k is the next turn of conversation c = k % C, every conversation stays in play, and
    # their turns are staggered (c starts at turn c % TURNS and wraps after the last): from the
    # first C requests on, the mix of conversation lengths, and so the addon's state for them, is
    # the same at every moment. Any RSS growth after that is a leak, not a longer history.
    def body(k: int) -> bytes:
        c = k % conversations
        return conversation_body(c, (k // conversations + c) % TURNS)

    return body
