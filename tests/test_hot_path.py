"""What runs before a request leaves, and what waits (docs/architecture.md, "The hot path").

On mitmproxy's event loop the `request` hook only rewrites: the prefix fingerprint starts after
the hook has returned and runs in slices, one per loop turn; the `response` hook only hands the
flow on, and the usage, the verdict and the record follow once mitmproxy has sent the answer.
These are properties of the order of work, checked on a real loop, not timings.
"""

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.addonmanager import traverse
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.diagnosis import fingerprint as fp_module
from affinity_addon.mitm import scheduler as scheduler_module
from affinity_addon.mitm.config import DEFAULT_RULES
from affinity_addon.mitm.scheduler import Scheduler, Stepped
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


async def turns(a: Affinity, n: int = 3) -> None:
    """n loop turns with a hook in each, as a busy proxy has: the proxy is never quiet."""
    for _ in range(n):
        a.state.scheduler.touch()
        await asyncio.sleep(0)


async def idle(done: Callable[[], bool], timeout: float = 30.0) -> None:
    """Leave the loop idle (this task waits on a timer) until `done()`: an event, not a time,
    so a slow or loaded machine only takes longer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        assert loop.time() < deadline, "the deferred work never finished"
        # A long wait: this task waking every millisecond would itself keep the loop busy.
        await asyncio.sleep(0.02)


async def test_fingerprint_waits_for_the_request_to_leave_and_runs_in_slices(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fp_module, "STEP_BLOCKS", 4)  # 1 system + 21 messages: 6 slices
    # Only hooks hold the work back here: it is never overdue (10 turns of a loaded machine
    # can take longer than the 10 ms it may wait in production).
    monkeypatch.setattr(scheduler_module, "IDLE_WAIT", 60.0)
    a = Affinity()
    log = tmp_path / "a.jsonl"
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(log))
        f = flow(21)
        a.request(f)
        job = a.state.exchanges.get(f.id).fingerprint
        assert isinstance(job, Stepped) and job.steps is not None  # nothing done in the hook
        await turns(a, 10)
        assert job.result is None and len(a.state.scheduler.queue) == 1  # hooks came: it waits
        await idle(lambda: job.steps is None)
        assert job.steps is None and job.result is not None  # done while "upstream"
        assert len(job.result.blocks.all) == 22

        answer(f)
        a.responseheaders(f)
        a.response(f)
        assert not log.read_text() and "miss_reason" not in f.metadata[META]  # not yet
        await idle(lambda: not a.state.scheduler.queue)
        (record,) = [json.loads(line) for line in log.read_text().splitlines()]
        assert record["flow_id"] == f.id and record["usage"]["input_tokens"] == 310
        assert f.metadata[META]["miss_reason"] == record["miss_reason"] == "first-write"
        assert a.state.exchanges.get(f.id) is None and not a.state.scheduler.queue


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
    assert not len(a.state.exchanges) and not a.state.scheduler.queue


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
        assert "update" not in a.bundle.calls  # no part has it: mitmproxy finds nothing
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


@pytest.mark.expect_addon_error(r"request hook of .*broken.* failed \(RuntimeError: a part's bug\)")
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


async def test_deferred_work_waits_while_hooks_come_and_runs_in_slices(monkeypatch) -> None:
    # mitmproxy forwards a request in several loop turns right after its hooks; deferred work
    # that ran a slice in each of them would delay it by the whole job. It waits while the
    # proxy's hooks keep coming (each `touch` is one).
    loop = asyncio.get_running_loop()
    sched = Scheduler()
    order: list[str] = []

    def job() -> Iterator[None]:
        for k in range(3):
            order.append(f"slice{k}")
            yield

    def io(k: int) -> None:  # a request moving through the proxy: one hook per turn
        sched.touch()
        order.append(f"io{k}")
        if k < 4:
            loop.call_soon(io, k + 1)

    monkeypatch.setattr(scheduler_module, "IDLE_WAIT", 60.0)  # not overdue, however slow the turns
    sched.touch()  # deferred from inside a hook
    sched.defer(job())
    loop.call_soon(io, 0)
    await idle(lambda: len(order) == 8)
    assert order == ["io0", "io1", "io2", "io3", "io4", "slice0", "slice1", "slice2"]
    assert not sched.queue

    # A saturated proxy is never quiet: work that waited too long, or piled up, runs (until the
    # backlog is back under its bounds) even while hooks come; it cannot grow forever.
    monkeypatch.setattr(scheduler_module, "IDLE_WAIT", 0.0)
    order.clear()
    sched.touch()
    sched.defer(job())
    loop.call_soon(io, 0)
    await idle(lambda: len(order) == 8)
    assert order == ["slice0", "slice1", "slice2", "io0", "io1", "io2", "io3", "io4"]

    monkeypatch.setattr(scheduler_module, "IDLE_WAIT", 60.0)
    monkeypatch.setattr(scheduler_module, "IDLE_BACKLOG", 2)
    order.clear()
    sched.touch()
    sched.defer(job())
    sched.defer(job())
    loop.call_soon(io, 0)
    await idle(lambda: len(order) == 11)
    assert order == ["slice0", "slice1", "slice2", "io0", "io1", "io2", "io3", "io4",
                     "slice0", "slice1", "slice2"]


async def test_deferred_work_waits_while_the_loop_has_other_work(monkeypatch) -> None:
    # A 1 MB body goes upstream in many loop turns without a hook: socket callbacks that take
    # their time. A slice that finds other callbacks ran before it in its turn waits.
    monkeypatch.setattr(scheduler_module, "IDLE_WAIT", 60.0)  # never overdue here
    loop = asyncio.get_running_loop()
    sched = Scheduler()
    order: list[str] = []

    def job() -> Iterator[None]:
        for k in range(2):
            order.append(f"slice{k}")
            yield

    def io(k: int) -> None:  # a socket write: no hook, ~200 µs of work, then the next one
        end = time.perf_counter() + 0.0002
        while time.perf_counter() < end:
            pass
        order.append(f"io{k}")
        if k < 20:
            loop.call_soon(io, k + 1)

    loop.call_soon(io, 0)
    sched.defer(job())
    await idle(lambda: len(order) == 23)
    assert order[:21] == [f"io{k}" for k in range(21)] and order[21:] == ["slice0", "slice1"]


@pytest.mark.expect_addon_error(r"could not record this response \(RuntimeError: bug in a record\)")
async def test_a_failing_deferred_job_is_logged_and_the_next_runs(caplog) -> None:
    sched = Scheduler()
    done = []

    def broken() -> Iterator[None]:
        yield
        raise RuntimeError("bug in a record")

    sched.defer(broken())
    sched.defer(lambda: done.append(1))
    await idle(lambda: not sched.queue)
    assert done == [1] and not sched.queue and "bug in a record" in caplog.text
