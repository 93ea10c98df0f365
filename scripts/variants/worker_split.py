"""The addon with its deferred work (fingerprint, verdict, record) in a second process.

A measurement prototype for `scripts/bench --ceiling`, not a product mode. mitmproxy's event
loop keeps the request rewrite and hands each answered flow to a worker over a pipe: the
request's final body, the rewrite's outcome and the response (status, headers, body), pickled,
written once per loop turn. The worker runs the addon's own Rewriter._observe and Recorder on a
stand-in flow and writes the same JSONL records. What it leaves out, and a product split would
need: the planner's hints (the tracker lives in the worker), streams (the tap reads them on the
loop), WebSockets, errors, commands and mitmweb comments. As a script: the addon. Run with
`--worker LOG`: the worker, reading frames on stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

_root = str(Path(__file__).resolve().parent.parent.parent)
if _root not in sys.path:
    sys.path.insert(0, _root)

from affinity_addon.mitm import Affinity  # noqa: E402

FRAME = struct.Struct("<I")


class WorkerSplit(Affinity):
    def __init__(self) -> None:
        super().__init__()
        for hook in ("responseheaders", "response", "error", "websocket_message"):
            self.calls[hook] = ()
        self.calls["response"] = (self._handoff,)
        self.outcomes: dict[str, tuple[Any, str]] = {}
        self.rewriter._observe = self._stash  # type: ignore[method-assign]
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = bytearray()
        self.flushing = False

    def _stash(self, flow: Any, exchange: Any, outcome: Any, body: Any, host: str) -> None:
        self.outcomes[flow.id] = (outcome, host)

    def running(self) -> None:
        self.dispatchers["running"]()
        log = self.state.writer.path if self.state.writer else os.devnull
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", log],
                                     stdin=subprocess.PIPE)
        assert self.proc.stdin is not None
        self._frame(("init", self.state.ruleset, self.state.secret))
        os.write(self.proc.stdin.fileno(), self.buf)
        self.buf.clear()
        os.set_blocking(self.proc.stdin.fileno(), False)

    def _frame(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=5)
        self.buf += FRAME.pack(len(data))
        self.buf += data

    def _handoff(self, flow: Any) -> None:
        exchange = self.state.exchanges.end(flow.id)
        observed = self.outcomes.pop(flow.id, None)
        if exchange is None or self.proc is None or flow.response is None:
            return
        rq, rs = flow.request, flow.response
        self._frame((flow.id, observed, rq.raw_content, rq.timestamp_start, exchange.request,
                     exchange.load, rs.status_code, rs.headers.fields, rs.raw_content))
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        if self.proc is None or self.proc.stdin is None or self.proc.stdin.closed:
            return  # shut down (done() wrote the rest) or the worker is gone
        try:
            del self.buf[:os.write(self.proc.stdin.fileno(), self.buf)]
        except BlockingIOError:
            pass  # the pipe is full: the worker is behind, try again in a millisecond
        except OSError:  # the worker is gone: its records are lost, the proxy goes on
            self.buf.clear()
            self.proc = None
            return
        if self.buf:
            self.flushing = True
            asyncio.get_running_loop().call_later(0.001, self._flush)

    def done(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(self.proc.stdin.fileno(), True)
                os.write(self.proc.stdin.fileno(), self.buf)
                self.buf.clear()
                self.proc.stdin.close()
            self.proc.wait(30)
        self.dispatchers["done"]()


def worker(log: str) -> None:
    import orjson
    from mitmproxy import http

    from affinity_addon.mitm.exchange import Exchange
    from affinity_addon.mitm.recorder import Recorder
    from affinity_addon.mitm.rewriter import Rewriter
    from affinity_addon.mitm.state import State
    from affinity_addon.record.jsonl import JsonlWriter

    inp = sys.stdin.buffer

    def read() -> Any:
        head = inp.read(FRAME.size)
        if len(head) < FRAME.size:
            return None
        return pickle.loads(inp.read(FRAME.unpack(head)[0]))

    _, ruleset, secret = read()
    state = State(ruleset=ruleset, secret=secret, writer=JsonlWriter(log))
    rewriter, recorder = Rewriter(state), Recorder(state)
    while (msg := read()) is not None:
        flow_id, observed, body, ts, facts, load, status, fields, raw = msg
        flow = SimpleNamespace(
            id=flow_id, metadata={}, websocket=None, comment="", marked="",
            request=SimpleNamespace(timestamp_start=ts, pretty_host=facts.host),
            response=SimpleNamespace(status_code=status, headers=http.Headers(fields),
                                     raw_content=raw, stream=None))
        exchange = Exchange(facts, load=load)
        state.exchanges.start(flow_id, exchange)
        if observed is not None:
            rewriter._observe(flow, exchange, observed[0], orjson.loads(body),  # type: ignore[arg-type]
                              observed[1])
        recorder.responseheaders(flow)  # type: ignore[arg-type]
        recorder.response(flow)  # type: ignore[arg-type]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2])
else:
    addons = [WorkerSplit()]
