"""What runs before a request leaves, and what waits (docs/architecture.md, "The hot path").

On mitmproxy's event loop the `request` hook only rewrites: the prefix fingerprint starts after
the hook has returned and runs in slices, one per loop turn; the `response` hook only hands the
flow on, and the usage, the verdict and the record follow once mitmproxy has sent the answer.
These are properties of the order of work, checked on a real loop, not timings.
"""

import asyncio
import json
from pathlib import Path

from mitmproxy import http
from mitmproxy.addonmanager import traverse
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.diagnosis import fingerprint as fp_module
from affinity_addon.mitm.config import DEFAULT_RULES
from affinity_addon.mitm.state import Stepped
from affinity_addon.record.schema import META
from tests.driver import Affinity

SYSTEM = "You are a careful agent. " * 40
USAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
         "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
         "usage": {"input_tokens": 10, "output_tokens": 2, "cache_creation_input_tokens": 300,
                   "cache_read_input_tokens": 0}}


def flow(messages: int) -> http.HTTPFlow:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "system": SYSTEM,
            "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
                         for i in range(messages)]}
    return tflow.tflow(req=tutils.treq(
        method=b"POST", host="api.anthropic.com", port=443, scheme=b"https", authority=b"",
        path=b"/v1/messages", content=json.dumps(body).encode(),
        headers=http.Headers(content_type="application/json")))


def answer(f: http.HTTPFlow) -> None:
    f.response = tutils.tresp(content=json.dumps(USAGE).encode(),
                              headers=http.Headers(content_type="application/json"))


async def turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_fingerprint_waits_for_the_request_to_leave_and_runs_in_slices(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fp_module, "STEP_BLOCKS", 4)  # 1 system + 21 messages: 6 slices
    a = Affinity()
    log = tmp_path / "a.jsonl"
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(log))
        f = flow(21)
        a.request(f)
        job = a.state.pending[f.id]
        assert isinstance(job, Stepped) and job.steps is not None  # nothing done in the hook
        await turns(1)
        assert job.steps is not None and job.result is None  # one slice per loop turn
        await turns(10)
        assert job.steps is None and job.result is not None  # done while "upstream"
        assert len(job.result.blocks.all) == 22

        answer(f)
        a.responseheaders(f)
        a.response(f)
        assert not log.read_text() and "miss_reason" not in f.metadata[META]  # not yet
        await turns(2)
        (record,) = [json.loads(line) for line in log.read_text().splitlines()]
        assert record["flow_id"] == f.id and record["usage"]["input_tokens"] == 310
        assert f.metadata[META]["miss_reason"] == record["miss_reason"] == "first-write"
        assert f.id not in a.state.pending and not a.state.later


async def test_an_early_answer_finishes_the_fingerprint_and_shutdown_loses_no_record(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fp_module, "STEP_BLOCKS", 2)
    a = Affinity()
    log = tmp_path / "a.jsonl"
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(log))
        flows = [flow(15) for _ in range(3)]
        for f in flows:  # answered before any slice ran
            a.request(f)
            answer(f)
            a.responseheaders(f)
            a.response(f)
        assert not log.read_text()
        a.done()  # shutdown drains the queue: every record is written, each judged
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["flow_id"] for r in records] == [f.id for f in flows]
    assert all(r["miss_reason"] for r in records)
    assert not a.state.pending and not a.state.later


def test_mitmproxy_dispatches_to_one_addon_that_reaches_every_part(tmp_path: Path) -> None:
    # mitmproxy looks every hook up on every registered addon for every event: the parts are
    # one addon to it, and each hook goes only to the parts that have it, in list order.
    a = Affinity()
    log = tmp_path / "a.jsonl"
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(log))
        assert [x for x in traverse(tctx.master.addons.chain)
                if "affinity" in getattr(x, "name", "")] == [a.bundle]
        assert a.bundle.calls["request"] == (a.bundle.rewriter.request, a.bundle.metrics.request)
        assert a.bundle.calls["response"] == (a.bundle.recorder.response,)
        assert {"affinity.stats", "affinity.why", "affinity.reset", "affinity.reload"} <= set(
            tctx.master.commands.commands)
        f = flow(3)
        a.request(f)
        answer(f)
        a.responseheaders(f)
        a.response(f)
        a.done()
        assert "claude-sonnet-4-5" in tctx.master.commands.call("affinity.stats")
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["flow_id"] == f.id and record["miss_reason"] == "first-write"


def test_a_failing_part_leaves_the_others_their_hook(tmp_path: Path, caplog) -> None:
    a = Affinity()
    seen = []

    def broken(flow: http.HTTPFlow) -> None:
        raise RuntimeError("a part's bug")

    a.bundle.calls["request"] = (broken, a.bundle.rewriter.request, seen.append)
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES))
        f = flow(3)
        a.request(f)
    assert seen == [f] and META in f.metadata  # rewritten all the same
    assert "request hook of" in caplog.text and "a part's bug" in caplog.text
