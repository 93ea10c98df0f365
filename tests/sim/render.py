"""How a provider reads a request body: the prompt it renders and caches, block by block.

Written from the public wire formats and provider docs, never from the addon, so the end-to-end
tests check the addon against an independent model of the provider. Order per API:
- Anthropic Messages: tools -> system -> messages (the cache prefix is "tools, system, and
  messages (in that order)" [1]), one block per tool, system block and content block;
- OpenAI Chat: tools -> messages (tools are part of the prefix [2]; the docs do not say where
  they sit, so they come first, as on Anthropic);
- OpenAI Responses: tools -> instructions -> input;
- Gemini: tools -> systemInstruction -> contents;
- Bedrock Converse: toolConfig.tools -> system -> messages ("Cache checkpoints are processed in
  this order: tools -> system -> messages", Bedrock's prompt-caching guide); every block is a
  one-key object (`{"text": ...}`, `{"toolUse": ...}`), and a `{"cachePoint": {...}}` block is
  no content: it is the cache directive of the block before it.
A block's `text` is what the model reads (its tokens); `head` names the section, role and message
start, which counts no tokens but is part of the identity (a user "x" is not an assistant "x").
Directives (`cache_control`, `prompt_cache_breakpoint`) steer caching and are never rendered, so
a marker moving between turns keeps the prefix; JSON keeps the client's key order (reordered keys
in tool schemas break the cache [2]).

[1] https://platform.claude.com/docs/en/build-with-claude/prompt-caching
[2] https://developers.openai.com/api/docs/guides/prompt-caching
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

# APIs, by their public wire format.
ANTHROPIC = "anthropic"
OPENAI_CHAT = "openai-chat"
OPENAI_RESPONSES = "openai-responses"
GEMINI = "gemini"
CONVERSE = "bedrock-converse"

DIRECTIVES = frozenset({"cache_control", "prompt_cache_breakpoint"})
SYSTEM_ROLES = frozenset({"system", "developer"})
_TEXT_TYPES = frozenset({"text", "input_text", "output_text"})
CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Block:
    head: str  # zero-token identity: section, role, and whether a message starts here
    text: str  # the rendered content
    kind: str  # block type ("text", "tool", "thinking", "tool_use", "json", ...)
    role: str  # "tools", "system", "user", "assistant", "tool", "model", ...
    message: int | None  # index in messages / input / contents; None for tools and system
    directive: Any  # the block's cache_control value, if any
    path: str  # Anthropic's error-path form: "messages.0.content.4", "system.1", "tools.3"
    breakpoint: bool = False  # OpenAI GPT-5.6+: `prompt_cache_breakpoint` on this part

    @property
    def tokens(self) -> int:
        return tokens(self.text)


def tokens(text: str) -> int:
    """The simulator's token count: 4 characters a token, rounded up, per block."""
    return -(-len(text) // CHARS_PER_TOKEN)


def dump(value: Any) -> str:
    """Compact JSON without directives, in the client's key order."""
    return json.dumps(strip(value), ensure_ascii=False, separators=(",", ":"))


def strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in DIRECTIVES}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def path_value(body: Any, dotted: str) -> Any:
    """`a.b.c` in nested dicts; None when any step is missing."""
    for part in dotted.split("."):
        if not isinstance(body, dict):
            return None
        body = body.get(part)
    return body


def _content_text(block: Any) -> tuple[str, str]:
    """(kind, text) of one content block or part; text blocks render as their text only."""
    if isinstance(block, str):
        return "text", block
    if isinstance(block, dict):
        kind = block.get("type")
        text = block.get("text")
        if isinstance(text, str) and (kind is None or kind in _TEXT_TYPES)\
                and all(k in DIRECTIVES or k in ("type", "text") for k in block):
            return "text", text
        return (kind if isinstance(kind, str) else "json"), dump(block)
    return "json", dump(block)


def _directive(value: Any) -> Any:
    return value.get("cache_control") if isinstance(value, dict) else None


def _breakpoint(value: Any) -> bool:
    mark = value.get("prompt_cache_breakpoint") if isinstance(value, dict) else None
    return isinstance(mark, dict) and mark.get("mode") == "explicit"


def _message(section: str, index: int, role: str, content: Any,
             key: str = "content") -> Iterator[Block]:
    """A message's blocks; the first one's head opens the message."""
    first = True

    def head() -> str:
        nonlocal first
        h = f"{section}|{role}|{'start' if first else 'part'}"
        first = False
        return h

    if isinstance(content, list):
        for j, part in enumerate(content):
            kind, text = _content_text(part)
            yield Block(head(), text, kind, role, index, _directive(part),
                        f"{section}.{index}.{key}.{j}", _breakpoint(part))
    elif content is not None:
        kind, text = _content_text(content)
        yield Block(head(), text, kind, role, index, None, f"{section}.{index}.{key}")
    if first:  # a message without content still opens (and so changes) the prompt
        yield Block(head(), "", "empty", role, index, None, f"{section}.{index}")


def _system(section: str, content: Any, key: str = "") -> Iterator[Block]:
    """A system prompt outside the message list (Anthropic `system`, Gemini
    `systemInstruction.parts`): a string or a list of blocks, opened like a message."""
    where = f"{section}.{key}" if key else section
    if isinstance(content, str):
        yield Block(f"{section}|system|start", content, "text", "system", None, None, where)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            kind, text = _content_text(part)
            yield Block(f"{section}|system|{'start' if j == 0 else 'part'}", text, kind, "system",
                        None, _directive(part), f"{where}.{j}", _breakpoint(part))


def _tools(tools: Any) -> Iterator[Block]:
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            yield Block("tools", dump(tool), "tool", "tools", None, _directive(tool), f"tools.{i}")


def _anthropic(body: dict[str, Any]) -> Iterator[Block]:
    yield from _tools(body.get("tools"))
    yield from _system("system", body.get("system"))
    yield from _messages(body.get("messages"), "messages")


def _anthropic_system_first(body: dict[str, Any]) -> Iterator[Block]:
    """An Anthropic request on another provider's Anthropic-compatible endpoint, which serves it
    with its own model: the prompt that model reads (and its prefix cache keys on) opens with
    the system prompt, then the tool list, then the conversation (DeepSeek: "only requests with
    identical prefixes (starting from the 0th token)" hit, https://api-docs.deepseek.com/news/
    news0802; the system message is the first of its chat examples,
    https://api-docs.deepseek.com/guides/kv_cache). A block the client puts first in `system`,
    such as Claude Code's billing block, is token 0 there (Claude Code's gateway page: any
    upstream but Anthropic's "receives it as part of the prompt",
    https://code.claude.com/docs/en/llm-gateway-protocol)."""
    yield from _system("system", body.get("system"))
    yield from _tools(body.get("tools"))
    yield from _messages(body.get("messages"), "messages")


def _messages(messages: Any, section: str) -> Iterator[Block]:
    if not isinstance(messages, list):
        return
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            yield Block(f"{section}|?|start", dump(msg), "json", "?", i, None, f"{section}.{i}")
            continue
        role = msg.get("role") if isinstance(msg.get("role"), str) else msg.get("type", "item")
        role = str(role)
        rest = {k: v for k, v in msg.items() if k not in ("role", "content", "parts", "type")}
        if "content" in msg or "parts" in msg:
            key = "content" if "content" in msg else "parts"
            yield from _message(section, i, role, msg[key], key)
            if rest:  # tool_calls, tool_call_id, name, ...: rendered after the content
                yield Block(f"{section}|{role}|part", dump(rest), "json", role, i, None,
                            f"{section}.{i}")
        else:  # Responses items without content (function_call, reasoning, ...)
            yield Block(f"{section}|{role}|start", dump(msg), str(msg.get("type", "item")), role,
                        i, None, f"{section}.{i}")


def _chat(body: dict[str, Any]) -> Iterator[Block]:
    yield from _tools(body.get("tools"))
    yield from _messages(body.get("messages"), "messages")


def _responses(body: dict[str, Any]) -> Iterator[Block]:
    yield from _tools(body.get("tools"))
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        yield from _system("instructions", instructions)
    items = body.get("input")
    if isinstance(items, str):  # a plain string is one user message
        yield Block("input|user|start", items, "text", "user", 0, None, "input")
    else:
        yield from _messages(items, "input")


def _gemini(body: dict[str, Any]) -> Iterator[Block]:
    yield from _tools(body.get("tools"))
    si = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(si, dict):
        yield from _system("systemInstruction", si.get("parts"), "parts")
    yield from _messages(body.get("contents"), "contents")


def _converse_block(head: str, role: str, message: int | None, item: Any,
                    path: str) -> Block:
    kind = next(iter(item), "json") if isinstance(item, dict) else "json"
    text = item.get("text") if isinstance(item, dict) else None
    if kind == "text" and isinstance(text, str) and len(item) == 1:
        return Block(head, text, "text", role, message, None, path)
    return Block(head, dump(item), str(kind), role, message, None, path)


def _converse(body: dict[str, Any]) -> Iterator[Block]:
    blocks: list[Block] = []

    def add(items: Any, section: str, role: str, message: int | None, path: str) -> None:
        if not isinstance(items, list):
            return
        first = True
        for j, item in enumerate(items):
            if isinstance(item, dict) and "cachePoint" in item:
                if blocks:  # the checkpoint caches everything up to the block before it
                    blocks[-1] = replace(blocks[-1], directive=item["cachePoint"])
                continue
            head = "tools" if section == "tools" else\
                f"{section}|{role}|{'start' if first else 'part'}"
            first = False
            blocks.append(_converse_block(head, role, message, item, f"{path}.{j}"))

    config = body.get("toolConfig")
    add(config.get("tools") if isinstance(config, dict) else None, "tools", "tools", None,
        "toolConfig.tools")
    add(body.get("system"), "system", "system", None, "system")
    messages = body.get("messages")
    for i, msg in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(msg, dict):
            add(msg.get("content"), "messages", str(msg.get("role", "?")), i,
                f"messages.{i}.content")
    yield from blocks


SYSTEM_FIRST = "system-first"  # `render(order=...)`: an Anthropic body, system prompt first

_RENDERERS = {ANTHROPIC: _anthropic, OPENAI_CHAT: _chat, OPENAI_RESPONSES: _responses,
              GEMINI: _gemini, CONVERSE: _converse}


def render(body: dict[str, Any], api: str, order: str | None = None) -> list[Block]:
    """The prompt as the provider of this API reads it (`order=SYSTEM_FIRST`: an
    Anthropic-compatible endpoint of another provider)."""
    if order == SYSTEM_FIRST and api == ANTHROPIC:
        return list(_anthropic_system_first(body))
    return list(_RENDERERS[api](body))


def conversation_root(blocks: list[Block]) -> str | None:
    """OpenRouter's sticky-routing identity: the first system/developer message plus the
    first non-system message, rendered; None when there is neither.
    https://openrouter.ai/docs/guides/best-practices/prompt-caching"""
    system: list[Block] = []
    other: list[Block] = []
    system_key: tuple[str, int | None] | None = None
    other_key: int | None = None
    for b in blocks:
        if b.role == "tools":
            continue
        section = b.head.split("|", 1)[0]
        if b.role in SYSTEM_ROLES:
            key = (section, b.message)
            if system_key is None:
                system_key = key
            if key == system_key:
                system.append(b)
        elif b.message is not None:
            if other_key is None:
                other_key = b.message
            if b.message == other_key:
                other.append(b)
    if not (system or other):
        return None
    return json.dumps([[b.head, b.text] for b in system] + [None]
                      + [[b.head, b.text] for b in other], ensure_ascii=False)


def stripped(body: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """`body` without the system text blocks that start with one of `prefixes`, as an API that
    removes them before reading the prompt sees it (the body itself is left alone)."""
    system = body.get("system")
    if not prefixes or not isinstance(system, list):
        return body
    kept = [b for b in system if not (isinstance(b, dict) and isinstance(b.get("text"), str)
                                      and b["text"].startswith(prefixes))]
    return body if len(kept) == len(system) else {**body, "system": kept}
