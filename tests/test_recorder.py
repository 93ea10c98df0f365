"""The product's Recorder (affinity_addon/mitm/recorder.py) on the addon's State, wired as
`addon.py` wires it: a streamed answer goes through its StreamTap as mitmproxy streams it, a JSON
answer is read after the hook on a running loop, Codex WebSocket frames become records."""

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.mitm.config import DEFAULT_RULES
from affinity_addon.mitm.recorder import Recorder
from affinity_addon.response.stream_tap import StreamTap
from tests.driver import Affinity
from tests.test_stream_tap import EXPECTED, encoded, fixture


@contextlib.contextmanager
def recorder(tmp: Path) -> Iterator[tuple[Affinity, Path]]:
    """The product's Recorder on the addon's State, as `addon.py` wires it (tests.driver sends
    each hook through mitmproxy's dispatch to the bundle), with the shipped rules and a log."""
    log = tmp / "records.jsonl"
    a = Affinity()
    assert isinstance(a.bundle.recorder, Recorder) and a.bundle.recorder.state is a.state
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(log))
        yield a, log


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def anthropic_flow() -> http.HTTPFlow:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]}
    return tflow.tflow(req=tutils.treq(
        method=b"POST", host="api.anthropic.com", port=443, scheme=b"https", authority=b"",
        path=b"/v1/messages", headers=http.Headers(content_type="application/json"),
        content=json.dumps(body).encode()))


def test_recorder_taps_a_stream_as_mitmproxy_streams_it(tmp_path: Path) -> None:
    wire = encoded("anthropic.sse", "br")
    with recorder(tmp_path) as (a, log):
        f = anthropic_flow()
        a.request(f)
        f.response = tutils.tresp(headers=http.Headers(
            content_type="text/event-stream", content_encoding="br"), content=None)
        a.responseheaders(f)
        stream = f.response.stream
        assert isinstance(stream, StreamTap)  # mitmproxy calls it with every chunk it forwards
        out = [stream(wire[i:i + 7]) for i in range(0, len(wire), 7)] + [stream(b"")]
        assert b"".join(out) == wire
        a.response(f)
        assert not len(a.state.exchanges) and not a.state.scheduler.queue  # nothing left behind for the flow
    (rec,) = records(log)
    assert rec["flow_id"] == f.id and rec["stream"] is True
    assert {k: rec["usage"][k] for k in EXPECTED["anthropic.sse"]["usage"]} \
        == EXPECTED["anthropic.sse"]["usage"]
    assert rec["complete"] is True  # the stream ended with its terminal event
    assert f.response.headers["content-encoding"] == "br"
    assert f.response.text == fixture("anthropic.sse").decode()  # the kept body, for mitmweb


async def test_recorder_reads_a_json_response_after_the_hook_on_a_running_loop(
        tmp_path: Path) -> None:
    # On mitmproxy's loop the Recorder reads the body and writes the record after the hook has
    # returned (the response is on its way by then), in idle turns of the loop.
    with recorder(tmp_path) as (a, log):
        f = anthropic_flow()
        a.request(f)
        f.response = tutils.tresp(headers=http.Headers(content_type="application/json"),
                                  content=fixture("anthropic.json"))
        f.response.encode("gzip")
        a.responseheaders(f)
        a.response(f)
        assert records(log) == [] and a.state.scheduler.queue  # deferred, not done in the hook
        for _ in range(500):  # idle turns until the deferred work is done
            if not a.state.scheduler.queue:
                break
            await asyncio.sleep(0.02)
        assert not a.state.scheduler.queue and not len(a.state.exchanges)
    (rec,) = records(log)
    assert rec["stream"] is False and rec["complete"] is True
    assert {k: rec["usage"][k] for k in EXPECTED["anthropic.json"]["usage"]} \
        == EXPECTED["anthropic.json"]["usage"]


def test_recorder_reads_websocket_frames(tmp_path: Path) -> None:
    from mitmproxy import websocket

    with recorder(tmp_path) as (a, log):
        f = tflow.twebsocketflow(messages=False)
        f.request.host, f.request.port, f.request.scheme = "chatgpt.com", 443, "https"
        f.request.path = "/backend-api/codex/responses"
        resp, f.response = f.response, None
        a.request(f)  # the upgrade request
        f.response = resp
        a.responseheaders(f)
        a.response(f)
        assert f.websocket is not None
        f.websocket.messages.append(websocket.WebSocketMessage(
            1, True, b'{"type":"response.create","input":[]}'))
        a.websocket_message(f)  # a client frame: not a response
        for line in fixture("codex_ws.jsonl").splitlines():
            f.websocket.messages.append(websocket.WebSocketMessage(1, False, line))
            a.websocket_message(f)
    terminal = [json.loads(line)["type"] for line in fixture("codex_ws.jsonl").splitlines()
                if json.loads(line).get("type") in ("response.completed", "response.failed",
                                                     "response.incomplete")]
    recs = records(log)
    assert len(terminal) == 2 and len(recs) == 2  # one record per terminal server frame
    assert all(r["transport"] == "websocket" and r["stream"] for r in recs)
    assert {k: recs[-1]["usage"][k] for k in EXPECTED["codex_ws.jsonl"]["usage"]} \
        == EXPECTED["codex_ws.jsonl"]["usage"]
