"""The breakpoint planner's slot memo (prompt_slots.SlotMemo): a conversation's next request
measures only the messages it added, and plans exactly as a full walk would."""

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_addon.catalog.volatile import default_volatile
from affinity_addon.diagnosis.fingerprint import fingerprint
from affinity_addon.request import breakpoints
from affinity_addon.request import prompt_slots as ps
from affinity_addon.request.breakpoint_spec import (
    API_RULES,
    PlanHint,
    markers_for,
    parse_cache_control,
)
from affinity_addon.request.prompt import MESSAGES_KEY
from affinity_addon.request.prompt_slots import Prompt, SlotMemo, marker_sites
from tests.test_fingerprint_memo import BODIES, message, turns


def view(p: Prompt) -> tuple[Any, ...]:
    slots = tuple((s.index, s.path, s.seg.path, s.seg.section, s.seg.kind, s.seg.role,
                   s.seg.message_index, s.seg.value, s.eligible, s.convert, s.prefix_tokens,
                   s.volatile, s.digest) for s in p.slots)
    last = p.last_eligible.index if p.last_eligible else None
    return slots, p.end, last, tuple(p.markers)


def prompt(body: dict, api: str, memo: SlotMemo | None, digests: bool, agent: bool) -> Prompt:
    return Prompt(body, api, API_RULES[api], list(marker_sites(body)),
                  default_volatile() if agent else None, digests=digests, memo=memo)


PLANNED = [(api, body) for api, body in BODIES if api in API_RULES]


@pytest.mark.parametrize(("api", "body"), PLANNED)
@pytest.mark.parametrize(("digests", "agent"), [(True, True), (False, True), (False, False)])
def test_resumed_slots_are_the_full_walk(api, body, digests, agent):
    memo = SlotMemo()
    sequence = [body, *turns(api, body), body, *turns(api, body)]
    for b in sequence:
        assert view(prompt(b, api, memo, digests, agent)) == view(
            prompt(b, api, None, digests, agent))
    if turns(api, body):
        assert memo.hits >= len(sequence) // 2


def test_the_next_turn_measures_only_what_it_added(monkeypatch):
    seen: list[Any] = []
    canonical = ps.canonical
    monkeypatch.setattr(ps, "canonical", lambda v: seen.append(v) or canonical(v))
    memo = SlotMemo()
    body = {"model": "claude-sonnet-4-5", "system": [{"type": "text", "text": "sys " * 50}],
            "messages": [{"role": "user" if i % 2 == 0 else "assistant",
                          "content": [{"type": "text", "text": f"turn {i}"}]} for i in range(41)]}
    prompt(body, "anthropic", memo, True, True)
    full = len(seen)
    nxt = copy.deepcopy(body)
    nxt["messages"] += [{"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                        {"role": "user", "content": [{"type": "text", "text": "go"}]}]
    seen.clear()
    p = prompt(nxt, "anthropic", memo, True, True)
    assert memo.hits == 1 and full == 42
    assert seen == [{"type": "text", "text": "ok"}, {"type": "text", "text": "go"}]
    assert view(p) == view(prompt(nxt, "anthropic", None, True, True))


@pytest.mark.parametrize(("api", "body"), PLANNED)
def test_planned_markers_and_body_are_those_of_a_full_walk(api, body, monkeypatch):
    # With and without a hint (the previous request's block digests, as the tracker gives it).
    spec = parse_cache_control({"strategy": "agent"})
    with_memo, without = [], []
    for memo in (SlotMemo(), None):
        monkeypatch.setattr(breakpoints, "SLOT_MEMO", memo)
        out = with_memo if memo is not None else without
        previous = None
        for b in [body, *turns(api, body), body]:
            b = copy.deepcopy(b)
            hint = PlanHint((fingerprint(previous, api, None).plan_digests(),))\
                if previous is not None else None
            previous = copy.deepcopy(b)
            added = breakpoints.plan_breakpoints(b, api, b.get("model"), spec, hint)
            out.append((added, json.dumps(b, sort_keys=True)))
    assert with_memo == without


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(message, st.integers()), max_size=8),
       st.lists(st.one_of(message, st.integers()), max_size=4),
       st.integers(0, 8), st.sampled_from(["anthropic", "openai-chat"]), st.booleans())
def test_any_edit_of_any_history_resumes_to_the_full_walk(history, extra, cut, api, digests):
    key = MESSAGES_KEY[api]
    memo = SlotMemo()
    first = {"system": "s", key: history}
    second = {"system": "s", key: history[:cut] + extra}
    for b in (first, second, first):
        assert view(prompt(b, api, memo, digests, True)) == view(
            prompt(b, api, None, digests, True))


def test_memo_is_bounded_and_keeps_no_body():
    memo = SlotMemo(max_entries=5, max_slots=60)
    for conv in range(20):
        body = {"messages": [{"role": "user", "content": f"conversation {conv} turn {t}"}
                             for t in range(10)]}
        prompt(body, "openai-chat", memo, True, True)
        assert len(memo.entries) <= 5 and memo.slots <= 60 + 11
    for cp in memo.entries.values():
        assert all(s.seg.value is None for s in cp.slots)  # paths and sizes, no text


def test_values_json_cannot_encode_are_walked_in_full():
    memo = SlotMemo()
    body = {"messages": [{"role": "user", "content": "x", "n": 1 << 70}]}
    for _ in range(2):
        assert view(prompt(body, "openai-chat", memo, True, True)) == view(
            prompt(body, "openai-chat", None, True, True))
    assert not memo.entries


# --- GPT-5.6 breakpoints (api.openai.com): the same memo, another dialect -----------------------

GPT = markers_for("api.openai.com", "gpt-5.6")
assert GPT is not None
GPT_PLANNED = [(api, body) for api, body in BODIES if api in GPT.apis]


def gpt_prompt(body: dict, api: str, memo: SlotMemo | None) -> Prompt:
    assert GPT is not None
    return Prompt(body, api, GPT.apis[api],
                  list(marker_sites(body, MESSAGES_KEY[api])), default_volatile(),
                  digests=True, memo=memo)


@pytest.mark.parametrize(("api", "body"), GPT_PLANNED)
def test_gpt_5_6_plans_and_slots_are_those_of_a_full_walk(api, body, monkeypatch):
    assert GPT is not None
    assert any(s == "openai-responses" for s, _ in GPT_PLANNED)
    spec = parse_cache_control({"strategy": "agent"})
    with_memo, without = [], []
    for memo in (SlotMemo(), None):
        monkeypatch.setattr(breakpoints, "SLOT_MEMO", memo)
        out = with_memo if memo is not None else without
        previous = None
        for b in [body, *turns(api, body), body]:
            b = copy.deepcopy(b)
            view_of = view(gpt_prompt(b, api, None))
            hint = PlanHint((fingerprint(previous, api, None).plan_digests(),))\
                if previous is not None else None
            previous = copy.deepcopy(b)
            added = breakpoints.plan_breakpoints(b, api, "gpt-5.6", spec, hint, markers=GPT)
            out.append((view_of, added, json.dumps(b, sort_keys=True)))
    assert with_memo == without


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(message, st.integers()), max_size=8),
       st.lists(st.one_of(message, st.integers()), max_size=4),
       st.integers(0, 8), st.sampled_from(["openai-chat", "openai-responses"]))
def test_gpt_5_6_any_edit_of_any_history_resumes_to_the_full_walk(history, extra, cut, api):
    key = MESSAGES_KEY[api]
    memo = SlotMemo()
    first = {"instructions": "s", key: history}
    second = {"instructions": "s", key: history[:cut] + extra}
    for b in (first, second, first):
        assert view(gpt_prompt(b, api, memo)) == view(gpt_prompt(b, api, None))
