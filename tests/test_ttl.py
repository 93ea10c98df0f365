"""The TTL policy and the advisor, against hand computations."""

import sys
from collections import deque
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from affinity_addon.diagnosis.tracker import MissTracker
from affinity_addon.record.schema import Usage
from affinity_addon.ttl_policy import (
    FIVE_MINUTES,
    ONE_HOUR,
    FamilyPrior,
    Multipliers,
    Recent,
    Rhythm,
)
from affinity_addon.views.ttl import AUTO, Turn, advise, replay, summary_line

T0 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC).timestamp()


def rec(conv: str, start: float, prompt: int, read: int, write: int,
        model: str = "claude-sonnet-4-5", duration_ms: float = 1000.0,
        provider: str = "anthropic", host: str = "api.anthropic.com") -> dict:
    end = datetime.fromtimestamp(T0 + start + duration_ms / 1000, UTC)
    return {"ts": end.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z", "duration_ms": duration_ms,
            "affinity_id": conv, "model": model, "provider": provider, "host": host,
            "usage": {"input_tokens": prompt, "cache_read_tokens": read,
                      "cache_write_tokens": write, "output_tokens": 10}}


# Three turns: 60 s apart, then a 10-minute pause. Prefix 10000 -> 10500 -> 11000.
TURNS = [Turn(0, 10_000, 10_000), Turn(60, 10_500, 10_500), Turn(660, 11_000, 11_000)]


def test_replay_by_hand() -> None:
    m = Multipliers()
    # 5m: write 10000*1.25; read 10000*0.1 + write 500*1.25; expired: write 11000*1.25
    assert replay(TURNS, m, FIVE_MINUTES) == pytest.approx(12_500 + 1_625 + 13_750)
    # 1h: write 10000*2; read 1000 + write 500*2; read 10500*0.1 + write 500*2
    assert replay(TURNS, m, ONE_HOUR) == pytest.approx(20_000 + 2_000 + 2_050)
    # auto: 5m, 5m (no long gap yet), then 1h after the 10-minute gap, too late for that turn:
    # the 5m entry has expired, so turn 3 writes 11000 at 2.0.
    assert replay(TURNS, m, AUTO) == pytest.approx(12_500 + 1_625 + 22_000)


def test_advisor_figures_equal_the_hand_computation_in_dollars() -> None:
    records = [rec("c1", 0, 10_000, 0, 10_000), rec("c1", 60, 10_500, 10_000, 500),
               rec("c1", 660, 11_000, 0, 11_000),
               rec("fast", 0, 4_000, 0, 4_000), rec("fast", 30, 4_100, 4_000, 100),
               {"affinity_id": "x", "usage": None}, {"ts": "junk", "usage": {}}]
    advice = advise(records)
    totals = advice.total("usd")
    usd = 3.0 / 1e6  # Sonnet 4.5 base input price in the genai-prices table
    fast_5m = 4_000 * 1.25 + 4_000 * 0.1 + 100 * 1.25
    fast_1h = 4_000 * 2.0 + 4_000 * 0.1 + 100 * 2.0
    assert totals[FIVE_MINUTES] == pytest.approx((27_875 + fast_5m) * usd)
    assert totals[ONE_HOUR] == pytest.approx((24_050 + fast_1h) * usd)
    assert totals[AUTO] == pytest.approx((36_125 + fast_5m) * usd)
    assert advice.to_dict()["cheaper_on_1h"] == ["c1"]
    line = summary_line(advice)
    assert line is not None and line.startswith("TTL: all-5m $0.") and "1 of 2" in line


def test_models_without_a_1h_tier_are_left_out() -> None:
    # gpt-5's table entry has no 1h cache-write price: no TTL choice to replay.
    assert advise([rec("o", 0, 5000, 0, 0, model="gpt-5", provider="openai-chat",
                       host="api.openai.com")]).conversations == []


def test_rhythm_switches_to_1h_on_slow_turns_and_back() -> None:
    r = Rhythm()
    r.observe(None, 10_000)
    assert r.choose() == FIVE_MINUTES  # nothing known yet
    r.observe(30, 10_400)
    assert r.choose() == FIVE_MINUTES  # fast turns: 1h would only cost more
    r.observe(600, 10_800)
    assert r.choose() == ONE_HOUR  # one 10-minute pause pays for many 1h writes
    for i in range(8):
        r.observe(20, 11_000 + 500 * i)
    assert r.choose() == FIVE_MINUTES  # the rhythm changed: the window forgot the pause
    r2 = Rhythm()
    for gap in (7200, 7200, 7200):
        r2.observe(gap, 10_000)
    assert r2.choose() == FIVE_MINUTES  # gaps over an hour expire both: 1h only costs more


@given(st.integers(min_value=1, max_value=9),
       st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=40))
def test_recent_keeps_what_a_bounded_deque_keeps(size: int, values: list[float]) -> None:
    recent, want = Recent(size), deque(maxlen=size)
    for v in values:
        recent.append(v)
        want.append(v)
        assert list(recent) == list(want) and len(recent) == len(want)
        assert bool(recent) == bool(want) and sum(recent) == sum(want)


def test_a_rhythm_takes_the_same_memory_before_and_after_its_windows_fill() -> None:
    r = Rhythm()
    before = sys.getsizeof(r.gaps._values) + sys.getsizeof(r.growth._values)
    for i in range(20):
        r.observe(30.5 + i, 1000 + 100 * i)
    assert len(r.gaps) == len(r.growth) == 8
    assert sys.getsizeof(r.gaps._values) + sys.getsizeof(r.growth._values) == before < 400


def test_family_prior_by_hand() -> None:
    # A first write writes the whole prefix: 1h pays when p * (1.25 - 0.1) > 2.0 - 1.25, p > 0.65.
    prior = FamilyPrior()
    assert prior.choose() == FIVE_MINUTES  # nothing known
    for gap in (30,) * 3 + (600,) * 5:
        prior.observe(gap)
    assert prior.choose() == FIVE_MINUTES  # p = 5/8 = 0.625
    prior.observe(900)
    assert prior.choose() == ONE_HOUR  # the window keeps the last 8: p = 6/8
    for _ in range(3):
        prior.observe(7200)
    assert prior.choose() == FIVE_MINUTES  # p = 5/8, q = 3/8 (over an hour expires both)


def _turn(tracker: MissTracker, conv: str, ts: float, family: str | None, turn: int) -> None:
    body = {"model": "claude-sonnet-4-5", "system": "You help.",
            "messages": [{"role": "user", "content": f"{conv} step {i}"} for i in range(turn + 1)]}
    p = tracker.observe(body, api="anthropic", model="claude-sonnet-4-5",
                        host="api.anthropic.com", keys=(conv,), signal=None, ts=ts, family=family)
    tracker.verdict(p, Usage(input_tokens=5000, cache_write_tokens=5000), ts + 1,
                    response_cache=False, dry_run=False)


def test_a_new_conversation_starts_on_its_familys_rhythm() -> None:
    tracker = MissTracker()
    asked: list[str] = []

    def family(name: str):
        return lambda: asked.append(name) or name

    assert tracker.hint("a", family=family("slow")) is None  # unknown family: 5m (no hint)
    ts = 0.0
    for turn in range(4):  # conversation a: 10-minute pauses; its family is on record from turn 1
        _turn(tracker, "a", ts, "slow" if turn == 0 else None, turn)
        ts += 600
    assert tracker.rhythms.get("a").family == "slow"
    asked.clear()
    tracker.hint("a", now=ts, family=family("slow"))
    assert asked == []  # a known conversation's family is not hashed again
    hint = tracker.hint("b", now=ts, family=family("slow"))
    assert hint is not None and hint.ttl == ONE_HOUR and hint.previous == ()
    assert tracker.hint("c", now=ts, family=family("fast")) is None  # another family: 5m
    for turn in range(4):  # conversation d of family "fast": 30-second pauses
        _turn(tracker, "d", ts, "fast" if turn == 0 else None, turn)
        ts += 30
    hint = tracker.hint("e", now=ts, family=family("fast"))
    assert hint is not None and hint.ttl == FIVE_MINUTES
    assert len(tracker.families) == 2


def test_report_shows_what_the_ttl_cost(tmp_path, capsys) -> None:
    import json

    from affinity_addon.__main__ import main

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [
        rec("c1", 0, 10_000, 0, 10_000), rec("c1", 60, 10_500, 10_000, 500),
        rec("c1", 660, 11_000, 0, 11_000)]))
    assert main(["report", str(log), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ttl"]["totals"]["usd"]["5m"] == pytest.approx(27_875 * 3e-6)
    assert doc["ttl"]["totals"]["usd"]["1h"] == pytest.approx(24_050 * 3e-6)
    assert doc["ttl"]["cheaper_on_1h"] == ["c1"]
    assert main(["report", str(log), "--plain", "--width", "160"]) == 0
    out = capsys.readouterr().out
    assert "What the TTL cost you" in out
    assert "TTL: all-5m $0.08 · all-1h $0.07 · auto $0.11; 1 of 1 conversation(s)" in out
