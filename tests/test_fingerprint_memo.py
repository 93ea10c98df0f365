"""The incremental fingerprint: a conversation's next turn resumes from a checkpoint of an
earlier prompt it extends (so a long conversation is not walked whole on every turn). The result must be the fingerprint computed from scratch, field
for field, whatever the turn did; only the work differs."""

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_addon.diagnosis.fingerprint import (
    _CARRIES,
    CHECKPOINTS,
    FingerprintMemo,
    _walk,
    fingerprint,
    fingerprint_steps,
    run_steps,
)
from affinity_addon.diagnosis.tracker import MissTracker
from affinity_addon.request.prompt import MESSAGES_KEY, iter_segments
from tests.test_fingerprint import API_BY_PATH, CAPTURES, SYNTHETIC, anthropic_body


def flat_walk(body: dict[str, Any], api: str) -> Iterator[tuple]:
    """The prompt walk as the flat segment order has it (iter_segments), with contentless
    messages as carriers once the conversation has content: the reference the message-by-message
    walk must reproduce."""
    done: dict[str, int] = {}

    def carriers(section: str, upto: int | None) -> Iterator[tuple]:
        msgs = body.get(section)
        if not isinstance(msgs, list):
            return
        for i in range(done.get(section, -1) + 1, len(msgs) if upto is None else upto):
            if isinstance(msgs[i], dict):
                yield f"{section}[{i}]", i, id(msgs[i]), True, "carrier"

    for seg in iter_segments(body, api):
        mi = seg.message_index
        if mi is None:
            yield seg.path, mi, id(seg.value), False, None
            continue
        first = done.get(seg.section) != mi
        if first:
            yield from carriers(seg.section, mi)
            done[seg.section] = mi
        whole = seg.path in (seg.section, f"{seg.section}[{mi}]")
        envelope = None
        if first and not whole:
            envelope = {k: v for k, v in body[seg.section][mi].items()
                        if k not in ("content", "parts")}
        yield seg.path, mi, id(seg.value), first, envelope
    for section in list(done):
        yield from carriers(section, None)


def walked(body: dict[str, Any], api: str) -> list[tuple]:
    return [(seg.path, seg.message_index, id(seg.value), first,
             "carrier" if envelope is _CARRIES else envelope)
            for seg, first, envelope in _walk(body, api)]


def capture_bodies() -> list[tuple[str, dict]]:
    out = []
    for capture in CAPTURES:
        sent = json.loads(capture.read_text())
        out.append((API_BY_PATH.get(sent["path"].split("?")[0], "openai-chat"), sent["body"]))
    return out


ODD = [
    ("openai-chat", {"messages": [{"role": "assistant", "content": None, "tool_calls": []}, 5,
                                  {"role": "assistant"}]}),  # carriers only: none kept
    ("openai-chat", {"messages": [{"role": "assistant", "content": None},
                                  {"role": "user", "content": "x"},
                                  {"role": "assistant", "content": []}, "junk"]}),
    ("openai-responses", {"input": "hello", "instructions": "sys"}),
    ("gemini", {"contents": [{"role": "user", "parts": [{"text": "a"}]}, {"role": "model"}],
                "systemInstruction": {"parts": [{"text": "s"}]}}),
    ("unknown-api", {"tools": [{"name": "t"}], "messages": [{"role": "user", "content": "x"}]}),
    ("anthropic", {"messages": {"not": "a list"}, "system": "s"}),
]
BODIES = capture_bodies() + list(SYNTHETIC) + ODD


@pytest.mark.parametrize(("api", "body"), BODIES)
def test_message_walk_is_the_flat_walk(api, body):
    assert walked(body, api) == list(flat_walk(body, api))


def turns(api: str, body: dict) -> list[dict]:
    """What real agents do between two requests: append a turn, retry or edit the last
    message, move the cache marker, drop a per-turn trailer, insert into the middle, and a
    side request that shares only the head."""
    key = MESSAGES_KEY.get(api)
    msgs = body.get(key) if key else None
    if not isinstance(msgs, list) or not msgs:
        return []
    out = []
    for variant in range(7):
        b = copy.deepcopy(body)
        m = b[key]
        if variant == 0:
            m += [{"role": "assistant", "content": "done"}, {"role": "user", "content": "next"}]
        elif variant == 1:
            m[-1] = {"role": "user", "content": "edited"}
        elif variant == 2:
            m.pop()
        elif variant == 3:
            m.insert(len(m) // 2, {"role": "assistant", "content": None, "tool_calls": [{"id": "q"}]})
        elif variant == 4 and isinstance(m[-1], dict):  # the marker moves to a new last message
            m[-1] = json.loads(json.dumps(m[-1]).replace('"cache_control"', '"was_marked"'))
            m.append({"role": "user", "content": [{"type": "text", "text": "x",
                                                  "cache_control": {"type": "ephemeral"}}]})
        elif variant == 5:
            b[key] = m[:1]
        elif variant == 6:
            m.append(7)  # not a message: skipped, but it still counts as a position
            m.append({"role": "assistant", "content": None, "tool_calls": [{"id": "z"}]})
        out.append(b)
    return out


@pytest.mark.parametrize(("api", "body"), BODIES)
def test_resumed_fingerprint_is_the_full_one(api, body):
    memo = FingerprintMemo()
    sequence = [body, *turns(api, body), body, *turns(api, body)]
    for b in sequence:
        fp, blocks = run_steps(fingerprint_steps(b, api, b.get("model"), memo=memo, every=3))
        assert fp == fingerprint(b, api, b.get("model"))
        assert blocks == fp.unpack()
    if turns(api, body):  # a conversation: the later turns resumed
        assert memo.hits >= len(sequence) // 2


def test_next_turn_fingerprints_only_what_it_added(monkeypatch):
    """The work, not just the result: turn N+1 resumes after turn N's last message and
    canonicalises only the two messages it appended."""
    import affinity_addon.diagnosis.fingerprint as fp_module

    seen: list[Any] = []
    canonical = fp_module.canonical
    monkeypatch.setattr(fp_module, "canonical", lambda v: seen.append(v) or canonical(v))
    memo = FingerprintMemo()
    body = anthropic_body(turns=30, marker=False)
    run_steps(fingerprint_steps(body, "anthropic", "m", memo=memo))
    full = len(seen)
    nxt = copy.deepcopy(body)
    nxt["messages"] += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "go"}]
    seen.clear()
    fp, _ = run_steps(fingerprint_steps(nxt, "anthropic", "m", memo=memo))
    assert memo.hits == 1 and full > 40
    assert seen == ["ok", "go"]
    assert fp == fingerprint(nxt, "anthropic", "m")


def test_values_json_cannot_encode_are_fingerprinted_in_full():
    body = {"messages": [{"role": "user", "content": "x", "n": 1 << 70}]}
    memo = FingerprintMemo()
    for _ in range(2):
        fp, _ = run_steps(fingerprint_steps(body, "openai-chat", None, memo=memo))
        assert fp == fingerprint(body, "openai-chat", None)
    assert memo.hits == 0 and not memo.entries


def test_memo_is_bounded_by_entries_and_blocks():
    memo = FingerprintMemo(max_entries=10, max_blocks=200)
    for c in range(50):
        body = anthropic_body(turns=3 + c % 5, marker=False)
        body["system"][0]["text"] += f" conversation {c}"
        run_steps(fingerprint_steps(body, "anthropic", "m", memo=memo))
        assert len(memo.entries) <= 10
        assert memo.blocks <= 200 or len(memo.entries) == 1
        assert memo.blocks == sum(len(cp.blocks) for cp in memo.entries.values())
    assert len(memo.entries) >= CHECKPOINTS - 1


def test_the_tracker_fingerprints_incrementally():
    tracker = MissTracker()
    body = anthropic_body(turns=10, marker=False)
    for t in range(3):
        body["messages"] += [{"role": "assistant", "content": f"a{t}"},
                             {"role": "user", "content": f"u{t}"}]
        p = tracker.observe(body, api="anthropic", model="m", host="api.anthropic.com",
                            keys=("conv",), signal=None, ts=float(t))
        assert p.fingerprint == fingerprint(body, "anthropic", "m")
        tracker.verdict(p, None, float(t), response_cache=False,
                        dry_run=False)
    assert tracker.memo.hits == 2


message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"])},
    optional={"content": st.one_of(st.none(), st.text(max_size=20), st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "tool_use"])},
                              optional={"text": st.text(max_size=10),
                                        "cache_control": st.just({"type": "ephemeral"})}),
        max_size=3)),
        "tool_calls": st.just([{"id": "c"}]), "reasoning_content": st.text(max_size=5)})


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(message, st.integers()), max_size=8),
       st.lists(st.one_of(message, st.integers()), max_size=4),
       st.integers(0, 8), st.sampled_from(["anthropic", "openai-chat", "openai-responses"]))
def test_any_edit_of_any_history_resumes_to_the_full_fingerprint(history, extra, cut, api):
    key = MESSAGES_KEY[api]
    memo = FingerprintMemo()
    first = {"system": "s", "instructions": "i", key: history}
    second = {"system": "s", "instructions": "i", key: history[:cut] + extra}
    for b in (first, second, first):
        fp, blocks = run_steps(fingerprint_steps(b, api, None, memo=memo, every=2))
        assert fp == fingerprint(b, api, None)
        assert blocks == fp.unpack()


@pytest.mark.parametrize(("api", "body"), BODIES)
def test_the_head_is_read_from_head_fields_alone(api, body):
    """The memo keys the head by HEAD_FIELDS: any other top-level field must not change it."""
    from affinity_addon.request.prompt import HEAD_FIELDS, head_segments

    head = [(s.path, s.value) for s in head_segments(body, api)]
    rest = {k: v for k, v in body.items() if k in HEAD_FIELDS}
    assert [(s.path, s.value) for s in head_segments(rest, api)] == head


def test_long_prompts_are_fingerprinted_in_slices_of_bytes(monkeypatch):
    # A slice ends after 64 KB of content (or 256 blocks), in the chain of message hashes as in
    # the walk: on a 1 MB prompt, neither holds the event loop for over a millisecond.
    import affinity_addon.diagnosis.fingerprint as fp_module

    body = anthropic_body(turns=40, marker=False)
    for m in body["messages"]:
        m["content"][-1]["text"] = "x" * 3000 if m["content"][-1]["type"] == "text" else "y"

    def slices(memo: FingerprintMemo | None) -> tuple[int, Any]:
        steps = fingerprint_steps(body, "anthropic", "m", memo=memo)
        n = 0
        try:
            while True:
                next(steps)
                n += 1
        except StopIteration as done:
            return n, done.value[0]

    size = len(json.dumps(body))
    n_walk, fp_walk = slices(None)  # the walk alone
    n_both, fp_both = slices(FingerprintMemo())  # the chain, then the walk
    assert n_walk >= size // (64 << 10) - 1 and n_both >= 2 * n_walk - 1
    monkeypatch.setattr(fp_module, "STEP_BYTES", 16 << 10)
    assert slices(None)[0] >= 4 * n_walk - 1
    assert fp_walk == fp_both == fingerprint(body, "anthropic", "m")
