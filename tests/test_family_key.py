"""`{family_key}`: one OpenAI prompt_cache_key per prompt family, in as many buckets
as the proxy's observed rate needs; the default for api.openai.com.

The workload test runs the real addons of `addon.py` with the shipped rules, in process, in
front of the simulator's engine, on virtual time: each flow's `timestamp_start` is the request's
sim time, which is the clock the addon's rate count uses. The team (and the solo agent again)
runs through a real mitmdump in tests/test_e2e_family_key.py, where tests/sim/clock_addon.py
puts each flow on the same virtual time. Run with `-s` to see the numbers.
"""

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.mitm.config import DEFAULT_RULES
from affinity_addon.record.schema import META
from affinity_addon.request.family_key import FamilyRates, family_hash, family_key
from tests.driver import Affinity
from tests.sim.workload import SOLO, Result, run

BODY = {"model": "gpt-5.6", "tools": [{"type": "function", "function": {"name": "read"}}],
        "messages": [{"role": "system", "content": "You are the agent."},
                     {"role": "user", "content": "Task one."}]}


def with_(**changes: Any) -> dict[str, Any]:
    return json.loads(json.dumps(BODY)) | changes


def test_family_is_what_conversations_share():
    other_task = with_(messages=[BODY["messages"][0], {"role": "user", "content": "Task two."}])
    assert family_hash(BODY, "openai-chat", "k") == family_hash(other_task, "openai-chat", "k")
    assert family_hash(BODY, "openai-chat", "k") == \
        family_hash(with_(model="gpt-5.6-2026-09-01"), "openai-chat", "k")  # a dated snapshot
    for changed in (with_(model="gpt-4.1"), with_(tools=[]),
                    with_(messages=[{"role": "system", "content": "Other."}, BODY["messages"][1]])):
        assert family_hash(changed, "openai-chat", "k") != family_hash(BODY, "openai-chat", "k")
    assert family_hash(BODY, "openai-chat", "k") != family_hash(BODY, "openai-chat", "k2")


def test_bucket_count_follows_the_busiest_minute():
    rates = FamilyRates()
    assert [rates.buckets("f", 20.0 * i) for i in range(30)] == [1] * 30  # 3 RPM
    busy = [rates.buckets("g", 600 + 60 * i / 70) for i in range(140)]  # 70 RPM
    assert busy[-1] == 9 and busy == sorted(busy)
    # after the rush the count holds for ten minutes, then falls back
    assert rates.buckets("g", 600 + 120 + 300) == 9
    assert rates.buckets("g", 600 + 120 + 700) == 1


class SixBuckets(FamilyRates):
    def buckets(self, family: str, now: float) -> int:
        return 6


def test_key_is_stable_per_conversation_and_spreads_a_team():
    rates = SixBuckets()
    keys = {family_key(BODY, "openai-chat", f"conv-{c}", rates, 0.0, "k")[0] for c in range(200)}
    assert len(keys) == 6 and all(k.startswith("fam-") for k in keys)
    a = family_key(BODY, "openai-chat", "conv-1", rates, 1.0, "k")
    assert a == family_key(BODY, "openai-chat", "conv-1", rates, 2.0, "k")
    assert 0 <= a[1] < a[2] == 6 and a[0].endswith(f"-{a[1]}")


@pytest.fixture(scope="module")
def addon() -> Iterator[Affinity]:
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log="",
                       affinity_summary=False, affinity_diagnose=False)
        yield a


def through(addon: Affinity, records: list[dict[str, Any]]):
    def send(body: dict[str, Any], now: float) -> dict[str, Any]:
        f = tflow.tflow(req=tutils.treq(
            method=b"POST", host="api.openai.com", port=443, scheme=b"https", authority=b"",
            path=b"/v1/chat/completions", content=json.dumps(body).encode(),
            headers=http.Headers(content_type="application/json", authorization="Bearer sk-t")))
        f.request.timestamp_start = now
        addon.request(f)
        records.append(f.metadata[META])
        return json.loads(f.request.content)
    return send


def test_default_rules_never_below_no_key_and_above_90_percent(addon):
    workload = SOLO
    addon.state.family_rates = FamilyRates()
    records: list[dict[str, Any]] = []
    results: dict[str, Result] = {name: run(workload, name) for name in ("none", "conversation")}
    results["addon (default rules)"] = run(workload, "none", through(addon, records))
    for name, r in results.items():
        print(f"\n{r.line().replace(r.strategy.ljust(14), name.ljust(22))}", end="")
    print()
    got, none = results["addon (default rules)"], results["none"]
    assert got.requests == none.requests
    assert got.ratio >= none.ratio and got.ratio >= 0.90, got.line()
    assert all(rec["rule"] == "openai" and rec["key"]["strategy"] == "family" for rec in records)
    buckets = max(rec["key"]["buckets"] for rec in records)
    assert buckets == 1 and len(got.keys) == 1  # one machine for all its conversations


def test_client_key_is_kept(addon):
    records: list[dict[str, Any]] = []
    sent = through(addon, records)(with_(prompt_cache_key="mine"), 0.0)
    assert sent["prompt_cache_key"] == "mine" and records[0]["key"] is None


@given(st.lists(st.tuples(st.integers(0, 900), st.sampled_from("ab")), max_size=300),
       st.integers(1, 3))
@settings(max_examples=200, deadline=None)
def test_bucket_count_is_the_busiest_minute_of_the_last_ten(gaps, instances):
    # The count is kept incrementally (one window per request, the rest once per 20 s slot);
    # it must equal the definition: the busiest 3 consecutive 20 s slots among the last 30,
    # counting each request in the latest slot seen (a late one counts there too).
    rates = FamilyRates(instances=instances)
    seen: dict[str, list[int]] = {}  # family -> the slot each of its requests counted in
    t = 1_000_000.0
    for gap, fam in gaps:
        t += gap / 10
        now = t - 25 if gap % 7 == 0 else t  # now and then a flow that started out of order
        slot = max([int(now // 20), *seen.get(fam, [])])
        seen.setdefault(fam, []).append(slot)
        first = slot - 29
        counts = [sum(1 for s in seen[fam] if s == k) for k in range(first, slot + 1)]
        busiest = max(sum(counts[max(0, i - 2):i + 1]) for i in range(len(counts)))
        assert rates.buckets(fam, now) == min(max(1, -(-busiest * instances // 8)), 64)
