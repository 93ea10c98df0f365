import copy

import pytest

from affinity_addon.diagnosis.blockprint import Fingerprint
from affinity_addon.diagnosis.fingerprint import fingerprint
from affinity_addon.diagnosis.verdicts import (
    REASONS,
    ConversationStore,
    Entry,
    Verdict,
    diagnose,
    entry_for,
    predict_hit_ratio,
)
from affinity_addon.durations import parse_duration
from affinity_addon.record.schema import Usage

MIN = 1024
TTL = 300.0


def system_text(date: str = "2026-11-23") -> str:
    return "You are a careful coding agent. " * 18 + f"Today's date: {date}. " + "Rules. " * 1200


def anthropic_body(turns: int = 2, *, date: str = "2026-11-23") -> dict:
    """Claude Code-like: tools, a marked system prompt, a marker on the newest user message."""
    messages: list[dict] = []
    for i in range(turns):
        messages.append({"role": "user", "content": [{"type": "text", "text": f"question {i}"}]})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": [
                {"type": "thinking", "thinking": f"thought {i}", "signature": f"sig{i}"},
                {"type": "text", "text": f"answer {i} " * 30}]})
    messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return {"model": "claude-sonnet-4-6", "max_tokens": 1000,
            "tools": [{"name": f"tool{i}", "description": f"does thing {i} " * 20,
                       "input_schema": {"type": "object"}} for i in range(4)],
            "system": [{"type": "text", "text": system_text(date),
                        "cache_control": {"type": "ephemeral"}}],
            "messages": messages}


def fp_of(body: dict, api: str = "anthropic") -> Fingerprint:
    return fingerprint(body, api, body.get("model"))


def usage_for(fp: Fingerprint, read: int = 0, write: int = 0) -> Usage:
    return Usage(input_tokens=fp.total_tokens, cache_read_tokens=read, cache_write_tokens=write)


def verdict(prev: Entry | None, body: dict, *, read: int = 0, write: int = 0, now: float = 10.0,
            api: str = "anthropic", automatic: bool = False, min_tokens: int = MIN,
            **kw) -> Verdict:
    fp = fp_of(body, api)
    return diagnose(prev, fp, usage_for(fp, read, write), now, api=api, automatic=automatic,
                    min_tokens=min_tokens, ttl_seconds=TTL, **kw)


def entry(body: dict, ts: float = 0.0, api: str = "anthropic", automatic: bool = False) -> Entry:
    return entry_for(fp_of(body, api), ts, ttl_seconds=TTL, automatic=automatic)


# --- entries and the store -------------------------------------------------------------------

def test_entry_counts_tokens_up_to_the_last_marker():
    body = anthropic_body(2)
    fp = fp_of(body)
    e = entry_for(fp, 5.0, ttl_seconds=TTL, automatic=False)
    assert e.marked and e.ts == 5.0 and e.cacheable_tokens == fp.total_tokens
    body["messages"].append({"role": "assistant", "content": [{"type": "text", "text": "x" * 400}]})
    e = entry(body)
    assert e.cacheable_tokens == fp.total_tokens  # the unmarked tail is not cacheable
    assert entry(body, automatic=True).cacheable_tokens == fp_of(body).total_tokens
    del body["system"][0]["cache_control"]
    del body["messages"][2]["content"][-1]["cache_control"]
    unmarked = entry(body)
    assert not unmarked.marked and unmarked.cacheable_tokens == 0


def test_store_is_a_bounded_lru():
    store = ConversationStore(1_000)
    fp = fp_of(anthropic_body(1))
    e = entry_for(fp, 0.0, ttl_seconds=TTL, automatic=False)
    for i in range(20_000):
        store.put(f"conv-{i}", e)
        if i == 500:
            assert store.get("conv-0") is e  # touched: survives the next evictions for a while
    assert len(store) == 1_000
    assert store.get("conv-19999") is e and "conv-18999" not in store
    assert store.get("conv-1") is None
    small = ConversationStore(2)
    small.put("a", e)
    small.put("b", e)
    small.get("a")
    small.put("c", e)
    assert "a" in small and "b" not in small and "c" in small
    with pytest.raises(ValueError, match="at least 1"):
        ConversationStore(0)


def test_parse_duration_reads_provider_ttls():
    assert parse_duration("5m") == 300 and parse_duration("1h") == 3600 and parse_duration("30s") == 30
    assert parse_duration("24h") == 86400
    for bad in ("", "5", "m5", "5 minutes", None):
        with pytest.raises(ValueError, match="bad duration"):
            parse_duration(bad)


# --- verdicts, in the order of the table -----------------------------------------------------

def test_response_cache_wins_over_zero_usage():
    fp = fp_of(anthropic_body(2))
    v = diagnose(entry(anthropic_body(1)), fp, Usage(), 5.0, api="anthropic",
                 automatic=False, min_tokens=MIN, ttl_seconds=TTL, response_cache=True)
    assert v.reason == "response-cache" and v.reported_read_tokens == 0


def test_no_usage_is_unknown_with_a_reason():
    fp = fp_of(anthropic_body(2))
    v = diagnose(entry(anthropic_body(1)), fp, None, 5.0, api="anthropic", automatic=False,
                 min_tokens=MIN, ttl_seconds=TTL)
    assert v.reason == "unknown" and "no usage" in v.detail and v.reported_read_tokens is None


def test_first_write_then_hit():
    t1, t2 = anthropic_body(1), anthropic_body(2)
    first = verdict(None, t1, write=3000)
    assert first.reason == "first-write" and "new conversation" in first.detail
    prev = entry(t1)
    v = verdict(prev, t2, read=prev.cacheable_tokens, write=200)
    assert v.reason == "hit" and v.detail is None
    assert v.expected_cacheable_tokens == prev.cacheable_tokens
    assert v.reported_read_tokens == prev.cacheable_tokens


def test_partial_hit_gives_both_numbers():
    prev = entry(anthropic_body(1))
    v = verdict(prev, anthropic_body(2), read=300)
    assert v.reason == "partial"
    lost = prev.cacheable_tokens - 300
    assert v.detail == f"read 300 of ~{prev.cacheable_tokens} expected tokens, ~{lost} lost"


def test_date_change_in_system_prompt_is_prefix_changed():
    prev_body = anthropic_body(2)
    prev = entry(prev_body)
    v = verdict(prev, anthropic_body(3, date="2026-11-24"), write=4000)
    assert v.reason == "prefix-changed"
    assert v.detail == "system-changed: system[0].text changed at ~char 512"
    tools_tokens = sum(b.tokens for b in prev.fingerprint.blocks[:4])
    assert v.expected_cacheable_tokens == tools_tokens  # partial change: the common part


@pytest.mark.parametrize(("edit", "detail"), [
    (lambda b: b["tools"].reverse(), "tools-reordered: tools reordered"),
    (lambda b: b["messages"].insert(1, {"role": "user", "content": [{"type": "text", "text": "?"}]}),
     "message-inserted: 1 message(s) inserted at messages[1]"),
    (lambda b: b["messages"][2]["content"].insert(0, {"type": "image", "source": {
        "type": "url", "url": "https://example.invalid/a.png"}}),
     "image-added: 1 image(s) added at messages[2].content[0]"),
    (lambda b: b["messages"][1]["content"].pop(0),
     "thinking-removed: thinking block removed at messages[1].content[0]"),
    (lambda b: b.update(model="claude-opus-4-8"),
     "model-switched: model switched from claude-sonnet-4-6 to claude-opus-4-8"),
])
def test_prefix_changes_name_the_path_and_kind(edit, detail):
    prev = entry(anthropic_body(3))
    cur = anthropic_body(4)
    edit(cur)
    v = verdict(prev, cur, write=3000)
    assert v.reason == "prefix-changed"
    assert v.detail.startswith(detail)


def test_ttl_gap_with_a_controlled_clock():
    prev = entry(anthropic_body(1), ts=1_000.0)
    assert verdict(prev, anthropic_body(2), now=1_000.0 + TTL - 1).reason == "routed-away"
    v = verdict(prev, anthropic_body(2), now=1_000.0 + TTL + 1, write=3000)
    assert v.reason == "ttl-expired"
    assert v.detail == "301 s since the previous request, above the 300 s TTL"
    long = entry_for(prev.fingerprint, 1_000.0, ttl_seconds=3600, automatic=False)
    assert verdict(long, anthropic_body(2), now=1_000.0 + 1_800).reason == "routed-away"


def test_dropped_affinity_is_routed_away():
    prev = entry(anthropic_body(1))
    v = verdict(prev, anthropic_body(2), write=3000, affinity_changed=True)
    assert v.reason == "routed-away"
    assert "affinity ID changed" in v.detail
    assert v.expected_cacheable_tokens == prev.cacheable_tokens
    v = verdict(prev, anthropic_body(2), write=3000)
    assert v.reason == "routed-away" and "missing or not honoured" in v.detail


def test_short_prompt_is_below_minimum_and_next_turn_a_first_write():
    short = {"model": "m", "system": [{"type": "text", "text": "be brief",
                                       "cache_control": {"type": "ephemeral"}}],
             "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    v = verdict(None, short)
    assert v.reason == "below-minimum" and f"{MIN}-token minimum" in v.detail
    prev = entry(short)
    longer = copy.deepcopy(short)
    longer["messages"].append({"role": "assistant", "content": "x " * 3000})
    longer["messages"].append({"role": "user", "content": [
        {"type": "text", "text": "more", "cache_control": {"type": "ephemeral"}}]})
    v = verdict(prev, longer, write=1600)
    assert v.reason == "first-write" and "below the 1024-token minimum" in v.detail


def _tool_loop(steps: int) -> dict:
    body = anthropic_body(1)
    del body["messages"][0]["content"][-1]["cache_control"]
    for i in range(steps):
        body["messages"].append({"role": "assistant", "content": [
            {"type": "tool_use", "id": f"t{i}", "name": "bash", "input": {"cmd": f"step {i}"}}]})
        body["messages"].append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"t{i}", "content": f"output {i}"}]})
    body["messages"][-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return body


def test_long_tool_loop_is_lookback_exceeded():
    prev_body = _tool_loop(2)
    prev = entry(prev_body)
    within = _tool_loop(10)  # 16 new blocks since the last breakpoint
    assert verdict(prev, within).reason == "routed-away"
    v = verdict(prev, _tool_loop(15))  # 26 blocks
    assert v.reason == "lookback-exceeded"
    assert "26 blocks after the previous one" in v.detail and "looks back only 20" in v.detail
    # APIs without a lookback limit do not get this verdict
    assert verdict(prev, _tool_loop(15), api="openai-chat").reason != "lookback-exceeded"


def test_partial_hit_mentions_lookback():
    v = verdict(entry(_tool_loop(2)), _tool_loop(15), read=200)
    assert v.reason == "partial" and "looks back only 20" in v.detail


def test_request_without_markers_is_unknown():
    body = anthropic_body(2)
    del body["system"][0]["cache_control"]
    del body["messages"][-1]["content"][-1]["cache_control"]
    v = verdict(entry(anthropic_body(1)), body)
    assert v.reason == "unknown" and "asks for no caching" in v.detail


def test_verdict_log_fields_are_ours_only():
    v = verdict(entry(anthropic_body(1)), anthropic_body(2, date="2026-11-24"))
    assert v.reason == "prefix-changed"
    assert v.to_log() == {"miss_reason": "prefix-changed", "miss_detail": v.detail,
                          "expected_cacheable_tokens": v.expected_cacheable_tokens}
    assert v.reason in REASONS


# --- automatic caching (OpenAI APIs) -------------------------------------------------------

def responses_body(turns: int, date: str = "2026-11-23") -> dict:
    items: list[dict] = [{"role": "developer", "content": [
        {"type": "input_text", "text": system_text(date)}]}]
    for i in range(turns):
        items.append({"role": "user", "content": [{"type": "input_text", "text": f"q{i}"}]})
        items.append({"type": "reasoning", "id": f"rs_{i}", "encrypted_content": "e" * 200})
        items.append({"role": "assistant", "content": [{"type": "output_text", "text": f"a{i}"}]})
    return {"model": "gpt-5.6", "prompt_cache_key": "conv", "input": items}


def test_responses_automatic_caching_verdicts():
    kw = {"api": "openai-responses", "automatic": True}
    prev = entry(responses_body(1), api="openai-responses", automatic=True)
    assert verdict(prev, responses_body(2), read=prev.cacheable_tokens - 100, **kw).reason == "hit"
    assert verdict(prev, responses_body(2), **kw).reason == "routed-away"
    v = verdict(prev, responses_body(2, date="2026-11-24"), **kw)
    assert v.reason == "prefix-changed"
    assert "input[0].content[0].text changed at ~char 512" in v.detail
    dropped = responses_body(2)
    del dropped["input"][2]
    v = verdict(prev, dropped, **kw)
    assert v.reason == "prefix-changed" and v.detail.startswith("thinking-removed")


def test_changes_the_providers_name_that_the_prompt_does_not_show():
    # Anthropic's fast mode is another model variant ("model or speed differs"), OpenAI's
    # reasoning effort a setting of the cached prefix: neither is routing.
    fast = {**anthropic_body(2), "speed": "fast"}
    v = verdict(entry(anthropic_body(1)), fast)
    assert v.reason == "prefix-changed" and v.detail == (
        "model-switched: model switched from claude-sonnet-4-6 to claude-sonnet-4-6 (speed fast)")
    standard = {**anthropic_body(2), "speed": "standard"}  # the default: no change
    assert verdict(entry(anthropic_body(1)), standard,
                   read=entry(anthropic_body(1)).cacheable_tokens).reason == "hit"
    kw = {"api": "openai-responses", "automatic": True}
    prev = entry(responses_body(1), api="openai-responses", automatic=True)
    effort = {**responses_body(2), "reasoning": {"effort": "high", "summary": "auto"}}
    v = verdict(prev, effort, **kw)
    assert v.reason == "prefix-changed" and v.detail.startswith("settings-changed: "
                                                                "reasoning.effort changed")
    summary = {**responses_body(2), "reasoning": {"summary": "auto"}}  # no effort either way
    assert verdict(prev, summary, **kw).reason == "routed-away"


def test_reported_prompt_size_calibrates_estimates():
    prev = entry(responses_body(1), api="openai-responses", automatic=True)
    fp = fp_of(responses_body(2), "openai-responses")
    usage = Usage(input_tokens=fp.total_tokens * 2, cache_read_tokens=10)
    v = diagnose(prev, fp, usage, 1.0, api="openai-responses", automatic=True,
                 min_tokens=MIN, ttl_seconds=TTL)
    assert v.expected_cacheable_tokens == pytest.approx(2 * prev.cacheable_tokens, abs=1)


# --- dry-run prediction ----------------------------------------------------------------------

def test_predict_hit_ratio():
    t1, t2 = anthropic_body(1), anthropic_body(2)
    prev = entry(t1)
    assert predict_hit_ratio(None, fp_of(t1), min_tokens=MIN, automatic=False) == 0.0
    ratio = predict_hit_ratio(prev, fp_of(t2), min_tokens=MIN, automatic=False)
    assert ratio == pytest.approx(prev.cacheable_tokens / fp_of(t2).total_tokens)
    assert 0.8 < ratio < 1.0
    dated = fp_of(anthropic_body(2, date="2026-11-24"))
    changed = predict_hit_ratio(prev, dated, min_tokens=0, automatic=False)
    tools_tokens = sum(b.tokens for b in dated.blocks if b.section == "tools")
    assert changed == pytest.approx(tools_tokens / dated.total_tokens)  # only the tools survive
    assert predict_hit_ratio(prev, fp_of(t2), min_tokens=10**6, automatic=False) == 0.0
    assert predict_hit_ratio(entry(_tool_loop(2)), fp_of(_tool_loop(15)), min_tokens=MIN,
                             automatic=False, api="anthropic") == 0.0
    empty = fingerprint({"messages": []}, "openai-chat", None)
    assert predict_hit_ratio(prev, empty, min_tokens=MIN, automatic=True) is None
