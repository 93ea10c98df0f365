"""Walks a request body's prompt in the order providers hash it, one segment per cacheable unit.

Shared by the affinity ID (conversation root), the breakpoint planner and the prefix
fingerprints, so all three agree on what "the prefix" is. Order per API:
- anthropic: tools -> system -> messages (content blocks)
- openai-chat: tools -> messages (content parts)
- openai-responses: tools -> instructions -> input (content items)
- gemini: tools -> systemInstruction parts -> contents parts
- bedrock-converse: toolConfig.tools -> system -> messages (content blocks), "Cache checkpoints are
  processed in this order: tools -> system -> messages"
  (https://docs.aws.amazon.com/bedrock/latest/userguide/prompt-caching.html). Its blocks are
  one-key objects (`{"text": ...}`, `{"toolUse": ...}`), the key is the block's kind, and a
  `{"cachePoint": {...}}` block is no content of its own: it marks the block before it
  (`Segment.mark`).
Bodies of the wrong type anywhere are skipped, never raised on: clients send odd things.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import orjson

from affinity_addon.apis import ANTHROPIC, BEDROCK_CONVERSE, GEMINI, OPENAI_CHAT, OPENAI_RESPONSES

# Keys that mark cache breakpoints: they steer caching but are not part of the cached bytes.
MARKER_KEYS = frozenset({"cache_control", "prompt_cache_breakpoint"})
# Bedrock Converse's breakpoint: a block of its own, after the block it marks.
CACHE_POINT = "cachePoint"

SYSTEM_ROLES = frozenset({"system", "developer"})


@dataclass(slots=True, eq=False)  # not frozen: a frozen init costs ~1 us per segment
class Segment:
    path: str  # e.g. "tools[3]", "system[0]", "messages[2].content[1]", "messages[2].content", "instructions"
    section: str  # "tools", "system", "messages", "instructions", "input", "contents"
    kind: str  # block type ("text", "image", "tool_use", "thinking", ...), "tool", or "string"
    role: str | None
    message_index: int | None  # index in messages/input/contents, None for tools/system
    value: Any  # the JSON value itself (a dict, or a str for string content)
    # Converse: the `cachePoint` value of the block right after this one, which marks this one.
    mark: Any = None


def canonical(value: Any) -> bytes:
    """Stable bytes for a JSON value with cache markers removed (markers move turn to turn)."""
    # Fast paths for the bulk of any prompt, plain strings and text blocks: no JSON encoding of
    # large texts. A string and a one-part text list render the same prompt, so they hash the
    # same (the breakpoint planner turns one into the other to place a marker; Responses'
    # text part is `input_text`).
    if isinstance(value, str):
        return b"t\x00" + value.encode("utf-8", "surrogatepass")
    if isinstance(value, dict) and len(value) <= 3 and isinstance(value.get("text"), str)\
            and value.get("type", "text") in _TEXT_TYPES and all(k in _TEXT_KEYS for k in value):
        return b"t\x00" + value["text"].encode("utf-8", "surrogatepass")
    try:
        # orjson: ~10x faster than the stdlib for tool definitions and tool calls, which are
        # most of an agent's non-text blocks. Markers are stripped only where there are some.
        out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        if b"cache_" in out and any(needle in out for needle in _MARKER_NEEDLES):
            out = orjson.dumps(_strip_markers(value), option=orjson.OPT_SORT_KEYS)
        return b"j\x00" + out
    except (TypeError, orjson.JSONEncodeError):  # ints beyond 64 bits, lone surrogates
        return b"j\x00" + json.dumps(_strip_markers(value), sort_keys=True, separators=(",", ":"),
                                      ensure_ascii=False).encode("utf-8", "surrogatepass")


_TEXT_KEYS = frozenset({"type", "text"}) | MARKER_KEYS
_TEXT_TYPES = frozenset({"text", "input_text"})
_MARKER_NEEDLES = tuple(f'"{k}":'.encode() for k in MARKER_KEYS)
assert all(b"cache_" in n for n in _MARKER_NEEDLES)  # one scan rules them all out


def _strip_markers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_markers(v) for k, v in value.items() if k not in MARKER_KEYS}
    if isinstance(value, list):
        return [_strip_markers(v) for v in value]
    return value


def text_of(value: Any) -> str:
    """The text of a segment value, for length estimates; '' for non-text blocks."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        t = value.get("text")
        if isinstance(t, str):
            return t
        c = value.get("content")
        if isinstance(c, str):
            return c
    return ""


def _kind(block: Any, default: str) -> str:
    if isinstance(block, dict):
        t = block.get("type")
        if isinstance(t, str):
            return t
    if isinstance(block, str):
        return "string"
    return default


def _content(prefix: str, section: str, role: str | None, index: int | None,
             content: Any, key: str = "content") -> Iterator[Segment]:
    if isinstance(content, str):
        yield Segment(f"{prefix}.{key}", section, "string", role, index, content)
    elif isinstance(content, list):
        for j, block in enumerate(content):
            yield Segment(f"{prefix}.{key}[{j}]", section, _kind(block, "part"), role, index, block)


def is_cache_point(block: Any) -> bool:
    return isinstance(block, dict) and CACHE_POINT in block


def _union_blocks(prefix: str, section: str, role: str | None, index: int | None,
                  blocks: list[Any]) -> Iterator[Segment]:
    """Converse's one-key blocks: a block's kind is its key; a `cachePoint` block is the mark
    of the block before it (held back one step so it can carry it)."""
    held: Segment | None = None
    for j, block in enumerate(blocks):
        if is_cache_point(block):
            if held is not None:
                held.mark = block[CACHE_POINT]
            continue
        if held is not None:
            yield held
        kind = next(iter(block), "part") if isinstance(block, dict) else _kind(block, "part")
        held = Segment(f"{prefix}[{j}]", section, kind, role, index, block)
    if held is not None:
        yield held


def _tools(body: dict[str, Any], api: str | None = None) -> Iterator[Segment]:
    if api == BEDROCK_CONVERSE:
        config = body.get("toolConfig")
        tools = config.get("tools") if isinstance(config, dict) else None
        if isinstance(tools, list):
            yield from _union_blocks("toolConfig.tools", "tools", None, None, tools)
        return
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            yield Segment(f"tools[{i}]", "tools", "tool", None, None, tool)


def _message(key: str, i: int, msg: dict[str, Any], api: str | None = None) -> Iterator[Segment]:
    role = msg.get("role") if isinstance(msg.get("role"), str) else None
    if api == BEDROCK_CONVERSE:
        content = msg.get("content")
        if isinstance(content, list):
            yield from _union_blocks(f"{key}[{i}].content", key, role, i, content)
    elif "content" in msg:
        yield from _content(f"{key}[{i}]", key, role, i, msg["content"])
    elif "parts" in msg:  # gemini contents
        yield from _content(f"{key}[{i}]", key, role, i, msg["parts"], "parts")
    else:  # Responses items without content (function_call, reasoning, ...)
        yield Segment(f"{key}[{i}]", key, _kind(msg, "item"), role, i, msg)


def _messages(body: dict[str, Any], key: str, api: str | None = None) -> Iterator[Segment]:
    msgs = body.get(key)
    if isinstance(msgs, str) and key == "input":  # Responses: a plain string is one user message
        yield Segment(key, key, "string", "user", 0, msgs)
        return
    if not isinstance(msgs, list):
        return
    for i, msg in enumerate(msgs):
        if isinstance(msg, dict):
            yield from _message(key, i, msg, api)


# Where each API keeps its conversation.
MESSAGES_KEY = {ANTHROPIC: "messages", OPENAI_CHAT: "messages", OPENAI_RESPONSES: "input",
                GEMINI: "contents", BEDROCK_CONVERSE: "messages"}


def _top_level_system(body: dict[str, Any], api: str) -> Iterator[Segment]:
    if api == BEDROCK_CONVERSE:
        system = body.get("system")
        if isinstance(system, list):
            yield from _union_blocks("system", "system", "system", None, system)
    elif api == ANTHROPIC:
        system = body.get("system")
        if isinstance(system, str):
            yield Segment("system", "system", "string", "system", None, system)
        elif isinstance(system, list):
            for i, block in enumerate(system):
                yield Segment(f"system[{i}]", "system", _kind(block, "text"), "system", None, block)
    elif api == OPENAI_RESPONSES:
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            yield Segment("instructions", "instructions", "string", "system", None, instructions)
    elif api == GEMINI:
        si = body.get("systemInstruction") or body.get("system_instruction")
        if isinstance(si, dict):
            yield from _content("systemInstruction", "system", "system", None, si.get("parts"), "parts")


# Every top-level field `head_segments` reads, in any API (tools; Anthropic's system,
# Responses' instructions, Gemini's system instruction): the head is a function of these alone.
HEAD_FIELDS = ("tools", "toolConfig", "system", "instructions", "systemInstruction",
               "system_instruction")


def head_segments(body: dict[str, Any], api: str) -> Iterator[Segment]:
    """The segments before the conversation: tools, then the top-level system prompt."""
    yield from _tools(body, api)
    if api in MESSAGES_KEY:
        yield from _top_level_system(body, api)


def message_segments(key: str, i: int, msg: dict[str, Any],
                     api: str | None = None) -> Iterator[Segment]:
    """The segments of message `i` of the conversation under `key`."""
    return _message(key, i, msg, api)


def iter_segments(body: dict[str, Any], api: str) -> Iterator[Segment]:
    yield from head_segments(body, api)
    if api in MESSAGES_KEY:
        yield from _messages(body, MESSAGES_KEY[api], api)


# The root is the first blocks of the system prompt and of the first user message: enough to
# tell conversations apart, and a client can't make the hash walk 50,000 blocks per request.
MAX_ROOT_BLOCKS = 256


def root_segments(body: dict[str, Any], api: str) -> tuple[list[Segment], list[Segment]]:
    """The conversation's root: (first system/developer/instructions content, first user message).

    These stay byte-identical on every turn of one conversation (turn N+1 only appends), which is
    what makes them a stateless conversation key, the way OpenRouter's sticky routing uses them.
    Visits only what it returns: tools and every message after the first user message are never
    walked, and the other messages before it cost one role lookup each (the client controls the
    body: 50,000 tools or assistant items must not cost a segment each on the event loop).
    """
    key = MESSAGES_KEY.get(api)
    if key is None:
        return [], []
    system = list(islice(_top_level_system(body, api), MAX_ROOT_BLOCKS))
    msgs = body.get(key)
    if isinstance(msgs, str):
        return system, [seg for seg in _messages(body, key, api) if seg.role == "user"]
    if not isinstance(msgs, list):
        return system, []
    first_system: list[Segment] = []  # the first system-role message that has content
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            continue
        role = msg.get("role")
        if role == "user":
            user = list(islice(_message(key, i, msg, api), MAX_ROOT_BLOCKS))
            if user:
                return system + first_system, user
        elif not first_system and isinstance(role, str) and role in SYSTEM_ROLES:
            first_system = list(islice(_message(key, i, msg, api), MAX_ROOT_BLOCKS))
    return system + first_system, []
