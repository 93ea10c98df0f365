"""At simulator level: which `prompt_cache_key` strategy wins on OpenAI's documented routing
(machine = hash(first ~256 tokens, key), ~15 RPM per pair, then overflow), for a solo agent
and for a team. Token-weighted hit ratio over ALL turns, first turns included. Run with
`-s` to see the numbers; `python -m tests.sim.workload` prints the whole table.
"""

from dataclasses import replace

import pytest

from tests.sim import workload
from tests.sim.workload import SOLO, TEAM, Result, jump_hash, run


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], Result]:
    out = {}
    for w, names in ((SOLO, ("none", "conversation", "family:1", "family:8", "family:auto")),
                     (TEAM, ("none", "conversation", "family:8", "family:auto"))):
        for name in names:
            r = run(w, name)
            print("\n" + r.line(), end="")
            out[(w.name, name)] = r
    print()
    return out


def test_solo_agent_loses_with_a_key_per_conversation(results):
    none, conv = results[("solo", "none")], results[("solo", "conversation")]
    assert none.requests == conv.requests == SOLO.conversations * SOLO.turns
    # Without a key every conversation lands where the shared prompt is warm: even turn 1
    # reads it. One key per conversation sends each turn 1 to a machine chosen by its key.
    assert none.first_ratio > 0.75 and conv.first_ratio < none.first_ratio - 0.3
    assert none.ratio >= conv.ratio + 0.03
    assert none.overflowed == conv.overflowed == 0  # 3 RPM never overflows
    # one family key without shards is "no key" with a key: same machine, same numbers
    assert results[("solo", "family:1")].ratio == pytest.approx(none.ratio)


def test_team_overflows_without_a_key(results):
    none, conv = results[("team", "none")], results[("team", "conversation")]
    assert none.overflowed > none.requests / 2  # ~70 RPM on one prefix, 15 stay home
    assert conv.overflowed == 0 and conv.ratio >= none.ratio + 0.1
    # sharding one family key into 8 buckets keeps each under the limit, most of the time
    fam = results[("team", "family:8")]
    assert fam.ratio > none.ratio + 0.1 and len(fam.keys) == 8
    # but 8 fixed buckets cost the solo agent what a key per conversation costs it
    assert results[("solo", "family:8")].ratio < results[("solo", "none")].ratio


def test_family_key_with_buckets_from_the_observed_rate_never_loses(results):
    for w in ("solo", "team"):
        auto, none = results[(w, "family:auto")], results[(w, "none")]
        assert auto.ratio >= none.ratio and auto.ratio >= 0.90, (w, auto.line())
    assert len(results[("solo", "family:auto")].keys) == 1


def test_jump_hash_moves_few_conversations():
    keys = range(5000)
    for n in (1, 4, 7):
        before = [jump_hash(k, n) for k in keys]
        after = [jump_hash(k, n + 1) for k in keys]
        moved = [a for b, a in zip(before, after, strict=True) if a != b]
        assert all(a == n for a in moved)  # only into the new bucket
        assert abs(len(moved) / len(keys) - 1 / (n + 1)) < 0.03
        assert set(before) == set(range(n))


def test_driver_line_and_strategies():
    small = workload.Workload("tiny", agents=2, rpm=6, turns=3, conversations=2)
    r = run(small, "conversation")
    assert r.requests == 12 and len(r.keys) == 4  # 2 agents x 2 conversations
    assert r.line().split()[:4] == ["tiny", "conversation", "all", "turns"]
    with pytest.raises(ValueError, match="unknown strategy"):
        workload.strategy("per-user")


def test_gpt_5_6_first_turns_need_a_breakpoint_at_the_end_of_the_shared_prompt():
    # GPT-5.6+ writes only at breakpoints (implicit: the latest message), so turn 1 of a new
    # conversation reads nothing of the shared prompt unless something marks where it ends.
    plain = run(replace(SOLO, model="gpt-5.6"), "none")
    marked = run(replace(SOLO, model="gpt-5.6", system_breakpoint=True), "none")
    assert plain.first_read == 0 and marked.first_ratio > 0.75
    assert marked.ratio > plain.ratio + 0.05


def test_clock_addon_puts_a_flow_on_the_workloads_time():
    from mitmproxy.test import tflow

    from tests.sim.clock_addon import VirtualClock

    clock = VirtualClock()
    f = tflow.tflow()
    f.request.headers["x-sim-time"] = "120.5"
    upload = f.request.timestamp_end - f.request.timestamp_start
    clock.requestheaders(f)
    clock.request(f)
    assert f.request.timestamp_start == 120.5
    assert f.request.timestamp_end - 120.5 == pytest.approx(upload)
    for value in (None, "soon", "nan", "inf", "-1"):  # no (usable) virtual time: wall time stays
        g = tflow.tflow()
        if value is not None:
            g.request.headers["x-sim-time"] = value
        start, end = g.request.timestamp_start, g.request.timestamp_end
        clock.requestheaders(g)
        clock.request(g)
        assert (g.request.timestamp_start, g.request.timestamp_end) == (start, end), value
