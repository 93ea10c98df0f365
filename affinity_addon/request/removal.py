"""`remove_blocks`: take a block the catalog names out of an Anthropic Messages system prompt.

Claude Code puts `x-anthropic-billing-header: cc_version=<version>.<3 hex from the first user
message>; cc_entrypoint=...;` first in `system`. api.anthropic.com reads it and removes it before
caching; "any other upstream receives it as part of the prompt"
(https://code.claude.com/docs/en/llm-gateway-protocol), at token 0, so every new conversation and
subagent there starts with a prompt of its own and reads none of the system prompt and tools the
previous one cached. LiteLLM, claude-code-router and CLIProxyAPI remove it for non-Anthropic
upstreams the same way: the whole block, nothing else.

What is removed is a whole text block whose text the named pattern matches and which holds
nothing else (one line): a block into which a gateway merged the header and more text is left
as it is, with a warning. A string `system` counts as one block. A `cache_control` marker on a
removed block moves to the block before it in the prompt (the previous system block, else the
last tool), which ends the same prefix minus the removed text, unless that block has one: then
it is dropped. The record says what went (path, name, size), never the text.
"""

from collections.abc import Sequence
from typing import Any

from affinity_addon.request.actions import RemoveBlock
from affinity_addon.tokens import estimate_tokens

HEAD = 4096  # patterns look at the start of a block (the catalog's own bound)
MARKER = "cache_control"


def _texts(system: Any) -> list[str]:
    """The texts of a system prompt's blocks (a string is one)."""
    if isinstance(system, str):
        return [system]
    if not isinstance(system, list):
        return []
    return [t for b in system if isinstance(b, dict) and isinstance(t := b.get("text"), str)]


def mentions(system: Any, specs: Sequence[RemoveBlock]) -> bool:
    """Does any block of the system prompt start like one to remove? (A cheap look first: most
    requests have nothing to remove, and their body must stay as it was.)"""
    return bool(specs) and bool(system) and any(
        s.pattern.search(t, 0, HEAD) for s in specs for t in _texts(system))


def _matching(text: str, specs: Sequence[RemoveBlock]) -> RemoveBlock | None:
    return next((s for s in specs if s.pattern.search(text, 0, HEAD)), None)


def _alone(text: str) -> bool:
    """The header line and nothing else (surrounding whitespace aside)."""
    return "\n" not in text.strip()


def _entry(path: str, spec: RemoveBlock, text: str) -> dict[str, Any]:
    return {"path": path, "block": spec.name, "tokens": estimate_tokens(len(text))}


def remove_blocks(body: dict[str, Any], specs: Sequence[RemoveBlock],
                  host: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Take the blocks out of `body` (in place). Returns (what was removed, as the record's
    `added.removed` says it; problems, one line each). Nothing happens on a host that reads the
    block (`RemoveBlock.kept_at`) or where the pattern matches no block."""
    active = [s for s in specs if not s.kept_at(host)]
    system = body.get("system")
    if not active or not system:
        return [], []
    if isinstance(system, str):
        spec = _matching(system, active)
        if spec is None:
            return [], []
        if not _alone(system):
            return [], [f"remove_blocks: system starts with {spec.name} but holds more text; "
                        "left in place"]
        del body["system"]
        return [_entry("system", spec, system)], []
    if not isinstance(system, list):
        return [], []
    removed: list[dict[str, Any]] = []
    problems: list[str] = []
    drop: set[int] = set()
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type", "text") != "text":
            continue
        text = block.get("text")
        if not isinstance(text, str):
            continue
        spec = _matching(text, active)
        if spec is None:
            continue
        if not _alone(text):
            problems.append(f"remove_blocks: system[{i}] starts with {spec.name} but holds "
                            "more text; left in place")
            continue
        drop.add(i)
        entry = _entry(f"system[{i}]", spec, text)
        if block.get(MARKER) is not None:
            entry[MARKER] = _move_marker(body, system, i, drop, block[MARKER])
        removed.append(entry)
    if not drop:
        return [], problems
    kept = [b for i, b in enumerate(system) if i not in drop]
    if kept:
        body["system"] = kept
    else:
        del body["system"]
    return removed, problems


def _move_marker(body: dict[str, Any], system: list[Any], i: int, drop: set[int],
                 marker: Any) -> str:
    """Put a removed block's marker on the block before it; where it went, as a path (after the
    removal), or "dropped"."""
    before = next((j for j in range(i - 1, -1, -1) if j not in drop), None)
    if before is not None:
        target = system[before]
        path = f"system[{before - sum(1 for j in drop if j < before)}]"
    else:
        tools = body.get("tools")
        if not isinstance(tools, list) or not tools:
            return "dropped"
        target = tools[-1]
        path = f"tools[{len(tools) - 1}]"
    if not isinstance(target, dict) or target.get(MARKER) is not None:
        return "dropped"
    target[MARKER] = marker
    return f"moved to {path}"
