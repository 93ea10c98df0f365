"""Seeing key load: request rate per prompt_cache_key and per prompt family (report, --json,
live summary) and the `overflow` verdict. The logs are small and hand-computed."""

import json
import time
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from rich.console import Console

from affinity_addon.record.schema import META
from affinity_addon.views.cache_key_rates import (
    CacheKeyRates,
    Rate,
    cache_key_rates,
    family_of,
    short_key,
)
from affinity_addon.views.report import build_report, render_report, report_document
from tests.driver import Affinity
from tests.test_diagnosis import anthropic_body, entry, verdict

T0 = 1_800_000_000.0 - 1_800_000_000.0 % 60  # a minute boundary
FAM = "0123456789abcdef01234567"


def rec(t: float, key: str | None, buckets: int | None = None) -> dict[str, Any]:
    """A record whose request started at T0 + t (ts is its end, 500 ms later)."""
    ts = datetime.fromtimestamp(T0 + t + 0.5, UTC).isoformat().replace("+00:00", "Z")
    return {"v": 1, "ts": ts, "duration_ms": 500.0, "model": "gpt-5.6", "rule": "openai",
            "host": "api.openai.com",
            "affinity_id": f"c{t}", "usage": {"input_tokens": 100, "cache_read_tokens": 0,
                                               "cache_write_tokens": 0, "output_tokens": 1},
            "added": {"headers": {}, "fields": {"prompt_cache_key": key} if key else {},
                      "markers": []},
            "key": {"strategy": "family", "bucket": 0, "buckets": buckets} if buckets else None}


def team_log() -> list[dict[str, Any]]:
    """Minute 0: 20 requests on bucket 0 and 10 on bucket 1 of one family (2 buckets in use);
    minute 1: 6 on bucket 0. Plus a per-conversation key at 2 RPM and a record without a key."""
    log = [rec(i * 3, f"fam-{FAM}-0", 2) for i in range(20)]
    log += [rec(1 + i * 6, f"fam-{FAM}-1", 2) for i in range(10)]
    log += [rec(60 + i * 10, f"fam-{FAM}-0", 2) for i in range(6)]
    log += [rec(i * 30, "conv-42") for i in range(4)]
    log.append(rec(5, None))
    return sorted(log, key=lambda r: r["ts"])


def test_busiest_minute_per_key_and_family_and_the_buckets_it_calls_for():
    d = cache_key_rates(team_log()).to_dict()
    assert (d["keys"], d["families"], d["keys_overflow_likely"]) == (3, 1, 1)
    assert d["by_family"] == [{"family": FAM, "requests": 36, "busiest_rpm": 30,
                               "buckets_used": 2, "buckets_recommended": 4}]  # ceil(30 / 8)
    assert [(k["key"], k["requests"], k["busiest_rpm"], k["overflow_likely"])
            for k in d["by_key"]] == [(f"fam-{FAM}-0", 26, 20, True),
                                      (f"fam-{FAM}-1", 10, 10, False), ("conv-42", 4, 2, False)]
    assert "not counted" in d["note"]


def test_memory_is_bounded_and_late_keys_are_counted_as_untracked():
    rates = CacheKeyRates(max_tracked=2)
    for r in team_log():
        rates.add(r)
    assert set(rates.keys) == {f"fam-{FAM}-0", "conv-42"}  # bucket 1 came third (t = 1 s)
    assert rates.untracked == 10
    assert cache_key_rates([rec(0, None), {"added": "x"}, {}]).keys == {}
    # xAI routes a key per conversation, with no documented rate limit: not counted
    assert cache_key_rates([rec(0, "conv-1") | {"host": "api.x.ai"}]).keys == {}
    # two minutes later the quiet conversation key makes room; the hot family key stays
    rates.add(rec(200, "conv-43"))
    assert set(rates.keys) == {f"fam-{FAM}-0", "conv-43"} and rates.to_dict()["keys"] == 3


def test_sliding_minute_estimate():
    r = Rate()
    for i in range(30):
        r.add(T0 + i * 2)  # 30 in minute 0
    for i in range(6):
        r.add(T0 + 60 + i)  # 6 in minute 1
    assert r.busiest == 30 and r.requests == 36
    assert r.last_minute(T0 + 90) == 6 + 30 * 0.5  # half of minute 0 is still in the window
    assert r.last_minute(T0 + 150) == 6 * 0.5 and r.last_minute(T0 + 300) == 0.0


def test_family_keys_are_recognized():
    assert family_of(f"fam-{FAM}-3") == FAM and family_of("fam-xyz-1") is None
    assert family_of("conv-42") is None
    assert short_key(f"fam-{FAM}-3") == "fam-01234567…-3"


def write(tmp_path: Path, log: list[dict[str, Any]]) -> Path:
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in log))
    return path


def render(path: Path) -> str:
    buf = StringIO()
    render_report(build_report([path]), Console(file=buf, width=160, force_terminal=False))
    return buf.getvalue()


def test_report_text_and_json_show_the_rates(tmp_path):
    path = write(tmp_path, team_log())
    text = render(path)
    assert "Request rate per prompt_cache_key (busiest minute)" in text
    assert "family 01234567…" in text and "2 -> 4" in text and "recommended 4" in text
    assert "fam-01234567…-0" in text and "overflow likely" in text
    doc = report_document(build_report([path]))
    assert doc["key_rates"]["by_family"][0]["buckets_recommended"] == 4
    # no prompt_cache_key traffic: no table
    assert "prompt_cache_key" not in render(write(tmp_path, [rec(0, None)]))


# --- the overflow verdict ------------------------------------------------------------------------

HOT = {"key_rpm": 22.0, "family_rpm": 22.0, "buckets": 1}


def test_overflow_replaces_routed_away_when_the_key_was_hot():
    prev = entry(anthropic_body(1))
    v = verdict(prev, anthropic_body(2), load=HOT)
    assert v.reason == "overflow" and "~22 requests in the last minute" in v.detail
    assert "1 bucket(s)" in v.detail and v.expected_cacheable_tokens == prev.cacheable_tokens
    assert verdict(prev, anthropic_body(2), load={"key_rpm": 15.0}).reason == "routed-away"
    assert verdict(prev, anthropic_body(2), load=None).reason == "routed-away"
    assert verdict(prev, anthropic_body(2), load=HOT | {"limit": 30}).reason == "routed-away"
    # a family at 48 RPM over 2 buckets: 24 a key, even when the key itself was not tracked
    spread = {"key_rpm": None, "family_rpm": 48.0, "buckets": 2}
    assert verdict(prev, anthropic_body(2), load=spread).reason == "overflow"
    # a changed or missing key is the cause then; a hit, an expired TTL or a first request too
    assert verdict(prev, anthropic_body(2), load=HOT, affinity_changed=True).reason == "routed-away"
    assert verdict(prev, anthropic_body(2), load=HOT, affinity_missing=True).reason == "routed-away"
    assert verdict(prev, anthropic_body(2), load=HOT, read=5000).reason == "hit"
    assert verdict(prev, anthropic_body(2), load=HOT, now=10_000.0).reason == "ttl-expired"
    assert verdict(None, anthropic_body(2), load=HOT, write=3000).reason == "first-write"
    assert verdict(prev, anthropic_body(2)).reason == "routed-away"  # no load: no evidence


SYSTEM = " ".join(f"Rule {i}: keep the change small and tested." for i in range(200))


def body(conv: int, turns: int) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"conversation {conv} question {i}"})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": f"answer {i} " * 20})
    return {"model": "gpt-5.6", "messages": messages}


def send(a: Affinity, b: dict[str, Any], t: float) -> dict[str, Any]:
    f = tflow.tflow(req=tutils.treq(
        method=b"POST", host="api.openai.com", port=443, scheme=b"https", authority=b"",
        path=b"/v1/chat/completions", content=json.dumps(b).encode(),
        headers=http.Headers(content_type="application/json")))
    f.request.timestamp_start = t
    a.request(f)
    exchange = a.state.exchanges.get(f.id)
    assert exchange is not None
    usage = {"prompt_tokens": 2400, "completion_tokens": 5,
             "prompt_tokens_details": {"cached_tokens": 0}}  # nothing read, every time
    f.response = tutils.tresp(headers=http.Headers(content_type="application/json"),
                              content=json.dumps({"choices": [], "usage": usage}).encode())
    a.responseheaders(f)
    a.response(f)
    return {**f.metadata[META], "load": exchange.load}  # the key's rate when it was sent


def run_team(tmp_path: Path, others: int) -> tuple[dict[str, Any], Affinity]:
    """Conversation 0's second turn reads nothing, after `others` requests of other
    conversations on the same (constant) key within the minute."""
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n  - name: one-key\n    match: {host: api.openai.com}\n"
                     "    set_fields: {prompt_cache_key: team-key}\n")
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(rules), affinity_log="",
                       affinity_summary=False)
        base = (time.time() - 200) // 60 * 60 + 1  # one minute, within the 10-minute TTL
        send(a, body(0, 1), base)
        for c in range(others):
            send(a, body(c + 1, 1), base + 1 + c)
        return send(a, body(0, 2), base + 30), a


def test_a_miss_on_a_hot_key_is_an_overflow_in_process(tmp_path):
    meta, a = run_team(tmp_path, 20)
    assert meta["load"]["key_rpm"] == 22.0
    assert meta["miss_reason"] == "overflow", meta["miss_detail"]
    assert "~22 requests in the last minute" in meta["miss_detail"]
    buf = StringIO()
    a.bundle.commands._summary(Console(file=buf, width=200))
    assert "Keys: 1 prompt_cache_key(s), busiest 22 RPM; 1 above ~15 RPM" in buf.getvalue()
    meta, _ = run_team(tmp_path, 3)
    assert meta["load"]["key_rpm"] == 5.0 and meta["miss_reason"] == "routed-away"
