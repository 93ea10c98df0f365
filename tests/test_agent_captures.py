"""Real agents are not append-only (they drop, move and re-add messages between turns): the
planner's stable-block placement, side-request threads, lineage of a conversation whose root changed, root IDs across resume, and verdicts that
agree with the usage. Bodies come from tests/fixtures/captures (what the agents sent)."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_addon.apis import ANTHROPIC, OPENAI_CHAT
from affinity_addon.catalog.volatile import parse_volatile
from affinity_addon.diagnosis.fingerprint import fingerprint
from affinity_addon.diagnosis.tracker import MissTracker
from affinity_addon.record.schema import Usage
from affinity_addon.request import affinity_id
from affinity_addon.request.breakpoint_spec import CacheControlSpec, PlanHint
from affinity_addon.request.breakpoints import plan_breakpoints

CAPTURES = Path(__file__).resolve().parent / "fixtures" / "captures"
AGENT = CacheControlSpec()


def capture(folder: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text())["body"] for p in sorted((CAPTURES / folder).glob("*.json"))]


def marked(added: list[Any]) -> list[str]:
    return [m.path for m in added]


def hint_from(*bodies: dict[str, Any]) -> PlanHint:
    return PlanHint(tuple(fingerprint(b, OPENAI_CHAT, b.get("model")).plan_digests()
                          for b in bodies))


# --- planner -----------------------------------------------------------------------------------

def test_openclaw_turn_one_skips_the_internal_context_trailer() -> None:
    body = copy.deepcopy(capture("openclaw")[0])  # system, user, internal context
    added = plan_breakpoints(body, OPENAI_CHAT, body["model"], AGENT)
    assert marked(added) == ["messages[0].content[0]", "messages[1].content[0]"]


def test_openclaw_with_history_marks_the_last_stable_and_the_newest_real_message() -> None:
    turns = capture("openclaw")
    sent = []
    for i, raw in enumerate(turns):
        body = copy.deepcopy(raw)
        hint = hint_from(sent[-1]) if sent else None
        paths = marked(plan_breakpoints(body, OPENAI_CHAT, body["model"], AGENT, hint))
        last = len(body["messages"]) - 1
        assert f"messages[{last}].content[0]" not in paths  # the trailer moves every turn
        assert f"messages[{last - 1}].content[0]" in paths  # the newest real user message
        if i:
            # ...and the one the previous turn marked, which this turn reads back.
            assert f"messages[{last - 3}].content[0]" in paths, paths
        sent.append(body)


def test_unknown_trailer_is_learned_from_the_previous_turn() -> None:
    """No volatile pattern for it: the block that was the previous request's last and is our
    last again (moved, not kept in place) is not where the rolling marker goes."""
    trailer = {"role": "user", "content": "per-turn context " * 50}
    base = [{"role": "system", "content": "system " * 2000}]
    t1 = {"model": "anthropic/claude-sonnet-4.5", "messages": base + [
        {"role": "user", "content": "q1 " * 100}, trailer]}
    t2 = copy.deepcopy(t1)
    t2["messages"][-1:] = [{"role": "assistant", "content": "a1 " * 100},
                           {"role": "user", "content": "q2 " * 100}, trailer]
    no_patterns = parse_volatile({"blocks": []})
    sent1 = copy.deepcopy(t1)
    plan_breakpoints(sent1, OPENAI_CHAT, t1["model"], AGENT, volatile=no_patterns)
    paths = marked(plan_breakpoints(t2, OPENAI_CHAT, t2["model"], AGENT, hint_from(sent1),
                                    volatile=no_patterns))
    assert "messages[4].content[0]" not in paths
    assert "messages[3].content[0]" in paths and "messages[1].content[0]" in paths


def test_qwen_turn_one_marks_before_the_date_reminder_that_moves_on_resume() -> None:
    body = copy.deepcopy(capture("qwen-code-openrouter")[0])
    paths = marked(plan_breakpoints(body, OPENAI_CHAT, body["model"], AGENT))
    # messages[1]: skills, environment, tool list, the date reminder (content[3]), "hi".
    assert "messages[1].content[2]" in paths and "messages[1].content[4]" in paths
    assert "messages[1].content[3]" not in paths


def test_append_only_conversation_plans_as_without_a_hint() -> None:
    msgs = [{"role": "system", "content": "s " * 5000}, {"role": "user", "content": "u " * 300}]
    t1 = {"model": "claude-sonnet-4-6", "messages": msgs}
    t2 = {"model": "claude-sonnet-4-6", "messages": msgs + [
        {"role": "assistant", "content": "a " * 300}, {"role": "user", "content": "v " * 300}]}
    sent = copy.deepcopy(t1)
    plan_breakpoints(sent, ANTHROPIC, t1["model"], AGENT)
    fp = fingerprint(sent, ANTHROPIC, t1["model"])
    with_hint, without = copy.deepcopy(t2), copy.deepcopy(t2)
    a = plan_breakpoints(with_hint, ANTHROPIC, t2["model"], AGENT, PlanHint((fp.plan_digests(),)))
    b = plan_breakpoints(without, ANTHROPIC, t2["model"], AGENT)
    assert marked(a) == marked(b)


# --- root IDs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder, threads", [
    ("openclaw", 1), ("openclaw-default", 1),
    ("qwen-code-openrouter", 2), ("qwen-code-openai", 2),  # main and memory extraction
])
def test_root_id_is_identical_across_turns_and_resume(folder: str, threads: int) -> None:
    config = affinity_id.AffinityConfig()
    ids = [affinity_id.root_id(b, OPENAI_CHAT, config, "k") for b in capture(folder)]
    for t in range(threads):
        assert len(set(ids[t::threads])) == 1, ids
    assert len(set(ids)) == threads


def test_root_id_survives_a_date_rollover_and_keeps_conversations_apart() -> None:
    config = affinity_id.AffinityConfig()

    def body(date: str, question: str = "hi") -> dict[str, Any]:
        return {"model": "gpt-4.1", "messages": [
            {"role": "system", "content": f"You help. Today is {date}."},
            {"role": "user", "content": question}]}

    a = affinity_id.root_id(body("2026-11-30"), OPENAI_CHAT, config, "k")
    assert a == affinity_id.root_id(body("2026-12-01"), OPENAI_CHAT, config, "k")
    assert a != affinity_id.root_id(body("2026-12-01", "other"), OPENAI_CHAT, config, "k")
    no_mask = affinity_id.parse_affinity_config({"root_mask": []})
    assert (affinity_id.root_id(body("2026-11-30"), OPENAI_CHAT, no_mask, "k")
            != affinity_id.root_id(body("2026-12-01"), OPENAI_CHAT, no_mask, "k"))


def test_root_mask_rejects_a_bad_regex() -> None:
    with pytest.raises(ValueError, match="root_mask"):
        affinity_id.parse_affinity_config({"root_mask": ["("]})


# --- tracker: threads, lineage, verdicts ---------------------------------------------------------

def observe(tracker: MissTracker, body: dict[str, Any], keys: tuple[str, ...], ts: float,
            read: int = 0, write: int = 0) -> Any:
    p = tracker.observe(body, api=OPENAI_CHAT, model=body.get("model"), host="api.openai.com",
                        keys=keys, signal=keys[0], ts=ts)
    total = p.fingerprint.total_tokens
    usage = Usage(input_tokens=total, cache_read_tokens=read, cache_write_tokens=write)
    verdict, _ = tracker.verdict(p, usage, ts + 1, response_cache=False,
                                 dry_run=False)
    return verdict


def test_side_requests_are_threads_of_their_own() -> None:
    tracker = MissTracker()
    main1, side1, main2, side2 = capture("qwen-code-openai")
    key = ("qwen-code:session",)
    assert observe(tracker, main1, key, 0).reason == "first-write"
    side = observe(tracker, side1, key, 10)
    assert side.reason == "first-write" and side.detail.startswith("new thread")
    v = observe(tracker, main2, key, 20, read=14000)
    assert v.reason == "partial" and "messages[1].content[3]" in v.detail  # vs main 1
    v = observe(tracker, side2, key, 30, read=10000)
    assert v.reason == "partial" and "messages[1].content[3]" in v.detail  # vs side 1
    assert len(tracker.hint(key[0]).previous) == 2


def test_no_hit_carries_a_prefix_change() -> None:
    tracker = MissTracker()
    main1, _, main2, _ = capture("qwen-code-openai")
    observe(tracker, main1, ("k",), 0)
    v = observe(tracker, main2, ("k",), 20, read=12000)
    assert v.reason == "partial"
    assert "~" in v.detail and "lost" in v.detail and v.expected_cacheable_tokens > 12000


def test_a_new_id_that_continues_a_known_conversation_is_prefix_changed() -> None:
    tracker = MissTracker()
    system = "You are a helpful assistant. " * 40 + "Today is Monday, 30 November."
    first = {"role": "user", "content": "Summarize the ledger rules. " * 400}
    t1 = {"model": "gpt-4.1", "messages": [{"role": "system", "content": system}, first]}
    t2 = {"model": "gpt-4.1", "messages": [
        {"role": "system", "content": system.replace("Monday, 30", "Tuesday, 1")}, first,
        {"role": "assistant", "content": "Done."}, {"role": "user", "content": "More?"}]}
    observe(tracker, t1, ("aff-day1",), 0)
    v = observe(tracker, t2, ("aff-day2",), 60)
    assert v.reason == "prefix-changed"
    assert v.detail.startswith("system-changed: messages[0].content changed at ~char")
    assert "continues conversation aff-day1 from 61 s earlier" in v.detail
    # A new conversation that merely starts the same way is new.
    fresh = observe(MissTracker(), t1, ("x",), 0)
    assert fresh.reason == "first-write"
    again = {"model": "gpt-4.1", "messages": t1["messages"][:1] + [first]}
    tracker2 = MissTracker()
    observe(tracker2, t1, ("a",), 0)
    assert observe(tracker2, again, ("b",), 10).reason == "first-write"


def test_last_marker_only_models_get_the_newest_stable_block() -> None:
    turns = capture("openclaw")
    sent = copy.deepcopy(turns[0])
    plan_breakpoints(sent, OPENAI_CHAT, "google/gemini-2.5-pro", AGENT)
    body = copy.deepcopy(turns[1])
    paths = marked(plan_breakpoints(body, OPENAI_CHAT, "google/gemini-2.5-pro", AGENT,
                                    hint_from(sent)))
    assert paths == [f"messages[{len(body['messages']) - 2}].content[0]"]


@settings(max_examples=60, deadline=None)
@given(turns=st.integers(2, 6), change=st.integers(-1, 12), share=st.floats(0.0, 1.2))
def test_verdicts_agree_with_the_reads(turns: int, change: int, share: float) -> None:
    """Whatever the edit and whatever was read: a `hit` never names a prefix change, a read
    after a prefix change is never a plain hit with a detail, and nothing read is never a hit."""
    def body(n: int, edited: int | None) -> dict[str, Any]:
        msgs = [{"role": "system", "content": "rules " * 1500}]
        for i in range(n):
            msgs.append({"role": "user", "content": f"q{i} " * 200 + ("edited" if i == edited else "")})
            msgs.append({"role": "assistant", "content": f"a{i} " * 200})
        msgs.append({"role": "user", "content": "now"})
        return {"model": "gpt-4.1", "messages": msgs}

    tracker = MissTracker()
    observe(tracker, body(turns, None), ("k",), 0)
    cur = body(turns + 1, change if change >= 0 else None)
    total = fingerprint(cur, OPENAI_CHAT, "gpt-4.1").total_tokens
    v = observe(tracker, cur, ("k",), 10, read=int(total * min(share, 1.0)))
    if v.reason == "hit":
        assert v.reported_read_tokens and "prefix changed" not in (v.detail or "")
    if v.reported_read_tokens == 0:
        assert v.reason not in ("hit", "partial")
    if v.reason == "partial":
        assert "lost" in v.detail


def test_volatile_catalog_parses_and_rejects_bad_data() -> None:
    from affinity_addon.catalog.volatile import default_volatile

    shipped = default_volatile()
    assert shipped.block("<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>\nConversation data")
    assert shipped.block("<system-reminder>\nThe current date is: Tuesday")
    assert not shipped.block("hi")
    # one pattern, by name, for every use of it (the fingerprint, rule actions)
    billing = shipped.pattern("claude-code-billing")
    assert billing.search("x-anthropic-billing-header: cc_version=2.1.197.14a; cc_entrypoint=cli;")
    assert shipped.uncached() == {"system": (billing.pattern,)}
    for bad in ({"blocks": ["("]}, {"blocks": "x"}, {"other": []}, [],
                {"blocks": [{"name": "a", "pattern": "("}]},
                {"blocks": [{"name": "a", "pattern": "x"}, {"name": "a", "pattern": "y"}]},
                {"blocks": [{"name": "a", "pattern": "x", "uncached_in": ["nowhere"]}]}):
        with pytest.raises(ValueError):
            parse_volatile(bad)
