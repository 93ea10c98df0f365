"""The demo's agent: who it plays, the requests of its session, and one streamed request."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .proxies import Proxy


@dataclass(frozen=True)
class Agent:
    title: str
    host: str  # the provider host the agent talks to
    provider: str  # the simulator provider that plays it
    base_path: str  # the SDK's base URL path
    model: str
    what: str  # what the addon adds for this provider


AGENTS = {
    "grok": Agent("a Grok coding agent on xAI", "api.x.ai", "xai", "/v1", "grok-4",
                  "x-grok-conv-id header: every turn lands on the server that holds its cache"),
    "openrouter-claude": Agent(
        "a Claude coding agent via OpenRouter", "openrouter.ai", "openrouter", "/api/v1",
        "anthropic/claude-sonnet-4.5",
        "cache_control breakpoints (Claude caches nothing unmarked) and a session_id"),
}


# --- the agent session -------------------------------------------------------------------------
# A plausible coding-agent transcript: the same requests an agent loop would send, with the
# model's tool calls scripted (the simulator answers every request with a short "ok").

SYSTEM_PROMPT = "\n".join([
    "You are Forge, an autonomous coding agent working inside the user's git repository.",
    "Work in small verified steps: search, read, edit, then run the tests.",
    *[f"Rule {i}: " + line for i, line in enumerate([
        "Never edit files outside the repository root; ask before deleting anything.",
        "Prefer the project's own helpers over new dependencies; match the surrounding style.",
        "Read a file before editing it, and edit the smallest region that fixes the problem.",
        "Run the narrowest relevant tests first, then the whole suite before you finish.",
        "Explain a non-obvious change in one short comment that says why, not what.",
        "When a tool fails, read its error output carefully before trying again.",
        "Keep secrets out of logs, commits and messages; never print environment variables.",
        "Summarize what you changed and how you verified it in at most five lines.",
    ] * 12, 1)],
    "Repository conventions: Python 3.12, pytest, ruff with line length 100, type hints on "
    "every public function, docstrings on modules and classes.",
    "Environment: cwd=/home/dev/shop, shell=bash, os=linux, git branch=main, tests=pytest -q.",
])

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": name, "description": desc,
        "parameters": {"type": "object", "properties": props,
                       "required": list(props)[:1]}}}
    for name, desc, props in [
        ("grep", "Search the repository for a regular expression; returns path:line:text.",
         {"pattern": {"type": "string", "description": "Python regular expression"},
          "path": {"type": "string", "description": "directory to search, default ."}}),
        ("read_file", "Read a UTF-8 text file; returns its content with line numbers.",
         {"path": {"type": "string", "description": "file path relative to the root"}}),
        ("edit_file", "Replace an exact, unique snippet of a file with new text.",
         {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}}),
        ("run", "Run a shell command in the repository; returns exit status and output.",
         {"command": {"type": "string", "description": "the command line"},
          "timeout": {"type": "integer", "description": "seconds, default 120"}}),
    ]
]

PRICING_PY = "\n".join(
    f"{i + 1:4d}  {line}" for i, line in enumerate([
        '"""Cart totals: subtotal, coupons, shipping and tax."""',
        "from decimal import Decimal",
        "",
        "def subtotal(items):",
        "    return sum(i.price * i.qty for i in items)",
        "",
        "def apply_coupon(total, coupon):",
        "    if coupon.kind == 'percent':",
        "        return total * coupon.value / 100  # BUG: the discount, not the new total",
        "    return max(total - coupon.value, Decimal(0))",
        "",
        "def cart_total(items, coupon=None, shipping=Decimal(0)):",
        "    total = subtotal(items)",
        "    if coupon:",
        "        total = apply_coupon(total, coupon)",
        "    return total + shipping",
    ] * 6))

# (what the agent's previous step was, for the table; the assistant message; the tool result)
STEPS: list[tuple[str, dict[str, Any], str]] = [
    ("grep apply_coupon", {"name": "grep", "arguments": {"pattern": "apply_coupon"}},
     "src/cart/pricing.py:7:def apply_coupon(total, coupon):\n"
     "src/cart/pricing.py:15:        total = apply_coupon(total, coupon)\n"
     "tests/test_pricing.py:12:    assert apply_coupon(Decimal(100), pct(10)) == Decimal(90)"),
    ("read src/cart/pricing.py", {"name": "read_file",
                                  "arguments": {"path": "src/cart/pricing.py"}}, PRICING_PY),
    ("run the coupon tests", {"name": "run",
                              "arguments": {"command": "pytest -q tests/test_pricing.py"}},
     "F.\nFAILED tests/test_pricing.py::test_percent_coupon - assert Decimal('10') == "
     "Decimal('90')\n1 failed, 1 passed in 0.04s"),
    ("edit apply_coupon", {"name": "edit_file", "arguments": {
        "path": "src/cart/pricing.py",
        "old": "return total * coupon.value / 100",
        "new": "return total - total * coupon.value / 100"}}, "ok: 1 replacement"),
    ("re-run the coupon tests", {"name": "run",
                                 "arguments": {"command": "pytest -q tests/test_pricing.py"}},
     "..\n2 passed in 0.03s"),
    ("run the whole suite", {"name": "run", "arguments": {"command": "pytest -q"}},
     "........................................\n40 passed in 0.61s"),
    ("git diff", {"name": "run", "arguments": {"command": "git diff --stat"}},
     " src/cart/pricing.py | 2 +-\n 1 file changed, 1 insertion(+), 1 deletion(-)"),
]
FIRST_USER = ("The checkout page shows the wrong total when a percent coupon is applied. "
              "Find the bug, fix it, and make sure the tests pass.")


def transcript(turn: int) -> list[dict[str, Any]]:
    """The messages of request `turn` (0-based): each turn appends a tool call and its result."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT},
                                      {"role": "user", "content": FIRST_USER}]
    for i, (_, call, result) in enumerate(STEPS[:turn]):
        call_id = f"call_{i:02d}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
    return messages


@dataclass
class Turn:
    tokens_in: int = 0
    cache_read: int = 0
    first_token_s: float = 0.0

    @property
    def ratio(self) -> float:
        return self.cache_read / self.tokens_in if self.tokens_in else 0.0


def ask(client: Any, agent: Agent, messages: list[dict[str, Any]]) -> Turn:
    """One streamed agent request, the way agents send them; returns the provider's usage."""
    t0 = time.perf_counter()
    first = None
    turn = Turn()
    stream = client.chat.completions.create(
        model=agent.model, messages=messages, tools=TOOLS, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            turn.tokens_in = chunk.usage.prompt_tokens
            details = chunk.usage.prompt_tokens_details
            turn.cache_read = (details.cached_tokens or 0) if details else 0
    turn.first_token_s = first or 0.0
    return turn


def record_for(proxy: Proxy, n: int, timeout: float = 3.0) -> dict[str, Any] | None:
    """The addon's n-th JSONL record (1-based); it lands right after the stream ends."""
    assert proxy.log is not None
    deadline = time.monotonic() + timeout
    while True:
        if proxy.log.exists():
            lines = [ln for ln in proxy.log.read_text().splitlines() if ln.strip()]
            if len(lines) >= n:
                return json.loads(lines[n - 1])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
