"""The cache_control option of a rule: its forms and errors, the per-model minimums, counting
the markers a body carries."""

from typing import Any

import pytest

from affinity_addon.catalog.minimums import parse_minimums
from affinity_addon.models import normalize_model
from affinity_addon.request.breakpoint_spec import (
    CacheControlSpec,
    Placement,
    min_tokens_for,
    parse_cache_control,
)
from affinity_addon.request.prompt_slots import count_markers
from tests.breakpoint_helpers import CC, text

# ---------------------------------------------------------------------------------------------
# parsing


def test_parse_forms() -> None:
    assert parse_cache_control(True) == CacheControlSpec()
    assert parse_cache_control("auto") == CacheControlSpec(strategy="explicit",
                                                           placements=(Placement("auto"),))
    spec = parse_cache_control({"placements": ["tools", "system", {"last_n": 2}, "auto"],
                                "ttl": "1h", "client_markers": "fill", "lookback": 10,
                                "min_tokens": 0, "last_marker_only": True})
    assert spec == CacheControlSpec("explicit", (Placement("tools"), Placement("system"),
                                                 Placement("last_n", 2), Placement("auto")),
                                    "1h", "fill", 10, 0, True)
    assert parse_cache_control({"min_tokens": "auto"}).min_tokens is None
    assert parse_cache_control({"strategy": "agent", "ttl": "1h"}).ttl == "1h"


@pytest.mark.parametrize("value, reason", [
    (False, "leave the key out"),
    ("sometimes", "expected true"),
    (3, "expected true"),
    ({"strategy": "clever"}, "strategy must be"),
    ({"strategy": "explicit"}, "needs a non-empty placements"),
    ({"strategy": "agent", "placements": ["tools"]}, "only apply to strategy: explicit"),
    ({"placements": ["everything"]}, "unknown placement"),
    ({"placements": [{"last_n": 0}]}, "last_n must be"),
    ({"placements": [{"last_n": True}]}, "last_n must be"),
    ({"placements": "tools"}, "must be a list"),
    ({"ttl": "10m"}, "ttl must be"),
    ({"client_markers": "replace"}, "client_markers must be"),
    ({"lookback": 0}, "lookback must be"),
    ({"min_tokens": -1}, "min_tokens must be"),
    ({"min_tokens": "lots"}, "min_tokens must be"),
    ({"last_marker_only": "yes"}, "last_marker_only must be"),
    ({"tll": "1h"}, "unknown key"),
])
def test_parse_errors(value: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_cache_control(value)


# ---------------------------------------------------------------------------------------------
# minimums table


@pytest.mark.parametrize("model, tokens", [
    ("claude-sonnet-4-5-20250929", 1024),
    ("anthropic/claude-sonnet-4.5", 1024),
    ("claude-haiku-4-5-20251001", 4096),
    ("anthropic/claude-haiku-4.5", 4096),
    ("anthropic/claude-opus-4.5", 4096),
    ("us.anthropic.claude-opus-4-6-v1:0", 4096),
    ("claude-opus-4-7", 2048),
    ("claude-opus-4-8[1m]", 1024),
    ("claude-opus-4-1-20250805", 1024),
    ("claude-opus-5", 512),
    ("claude-3-5-haiku-20241022", 2048),
    ("google/gemini-2.5-flash", 2048),
    ("google/gemini-3-flash-preview", 4096),
    ("qwen3-coder-plus", 1024),
    ("qwen/qwen3-max", 1024),
    ("gpt-5", 1024),
    (None, 1024),
])
def test_min_tokens_for(model: str | None, tokens: int) -> None:
    assert min_tokens_for(model) == tokens


def test_normalize_model() -> None:
    assert normalize_model("Anthropic/Claude-Sonnet-4.5") == "claude-sonnet-4-5"
    assert normalize_model("us.anthropic.claude-sonnet-4-5-v1:0") == "claude-sonnet-4-5-v1:0"
    assert normalize_model("qwen3.6-plus") == "qwen3-6-plus"


def test_parse_minimums_rejects_bad_tables() -> None:
    assert parse_minimums({"Claude-*": 5, "*": 0}) == (("claude-*", 5), ("*", 0))
    for bad in ([], {}, {"x": "many"}, {"x": -1}, {"x": True}):
        with pytest.raises(ValueError):
            parse_minimums(bad)


# ---------------------------------------------------------------------------------------------
# counting


def test_count_markers_everywhere() -> None:
    body = {
        "cache_control": CC,
        "tools": [{"name": "a", "cache_control": CC}, {"name": "b"}],
        "system": [text("s", CC)],
        "messages": [
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": [text("r", CC)]},
                text("q", CC)]},
            {"role": "user", "content": "x", "cache_control": CC},
        ],
    }
    assert count_markers(body, "anthropic") == 6
    assert count_markers({"messages": "odd"}, "openai-chat") == 0
