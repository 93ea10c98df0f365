"""The simulator as other providers' Anthropic-compatible endpoints (DeepSeek, Moonshot, Kimi
Code, Z.ai, MiniMax, DashScope; docs/providers.md): prefix caches from token 0, where the billing
block Claude Code puts first is prompt text, and explicit-or-implicit caches where markers
count."""

from typing import Any

import pytest

from tests.sim import SimClock, Simulator
from tests.sim_client import post_json

BILLING_BLOCK = "x-anthropic-billing-header: cc_version=2.1.197.{}; cc_entrypoint=cli;"


def compat_body(suffix: str | None, question: str, *, marker: bool = False) -> dict[str, Any]:
    """Claude Code's API: billing block, system prompt, tools, one user message."""
    system: list[dict[str, Any]] = [{"type": "text", "text": "Be careful. " * 400}]
    if suffix is not None:
        system.insert(0, {"type": "text", "text": BILLING_BLOCK.format(suffix)})
    if marker:
        system[-1]["cache_control"] = {"type": "ephemeral"}
    return {"model": "claude-sonnet-4-5", "max_tokens": 8, "system": system,
            "tools": [{"name": "Read", "description": "reads a file " * 200,
                       "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": question}]}


@pytest.mark.parametrize("path", ["/p/deepseek/anthropic/v1/messages",
                                  "/p/deepseek/anthropic/messages",
                                  "/p/moonshot/anthropic/v1/messages",
                                  "/p/kimi/coding/v1/messages",
                                  "/p/zai/api/anthropic/v1/messages"])
def test_compatible_endpoints_cache_by_prefix_from_token_zero(sim: Simulator, path: str) -> None:
    """The billing block is prompt text at token 0: a new conversation reads nothing of the
    system prompt and tools the last one cached; without the block it reads them all. No
    writes are reported, and markers change nothing."""
    headers = {"x-session-id": "s1"}  # Z.ai: one node, as its routing header asks
    s, r = post_json(sim, path, compat_body("14a", "first question"), **headers)
    assert s == 200 and r["usage"]["cache_read_input_tokens"] == 0
    _, r = post_json(sim, path, compat_body("191", "second conversation"), **headers)
    assert r["usage"]["cache_read_input_tokens"] == 0  # a different block at token 0
    assert r["usage"]["cache_creation_input_tokens"] == 0
    post_json(sim, path, compat_body(None, "third conversation"), **headers)
    _, r = post_json(sim, path, compat_body(None, "fourth conversation", marker=True), **headers)
    u = r["usage"]
    total = u["input_tokens"] + u["cache_read_input_tokens"]
    assert u["cache_read_input_tokens"] / total > 0.9 and u["cache_creation_input_tokens"] == 0
    assert set(u) == {"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                      "output_tokens"}


@pytest.mark.parametrize("path", ["/p/dashscope/apps/anthropic/v1/messages",
                                  "/p/minimax/anthropic/v1/messages"])
def test_explicit_markers_or_the_implicit_cache(sim: Simulator, path: str) -> None:
    _, r = post_json(sim, path, compat_body(None, "a", marker=True))
    assert r["usage"]["cache_creation_input_tokens"] > 0  # explicit: a write at the marker
    _, r = post_json(sim, path, compat_body(None, "b", marker=True))
    assert r["usage"]["cache_read_input_tokens"] > 0 == r["usage"]["cache_creation_input_tokens"]
    _, r = post_json(sim, path, compat_body(None, "c"))  # no marker: the implicit cache
    assert r["usage"]["cache_creation_input_tokens"] == 0


def test_zai_session_id_keeps_a_session_on_one_node(clock: SimClock) -> None:
    with Simulator(replicas=4, clock=clock, seed=1) as s:
        path = "/p/zai/api/anthropic/v1/messages"
        reads = [post_json(s, path, compat_body(None, "q"))[1]["usage"]["cache_read_input_tokens"]
                 for _ in range(12)]
        assert 0 in reads[1:]  # the load balancer's pick: some land on a cold node
        reads = [post_json(s, path, compat_body(None, "r"), x_session_id="conv-1")[1]["usage"]
                 ["cache_read_input_tokens"] for _ in range(6)]
        assert all(n > 0 for n in reads[1:])
