"""The simulator's HTTP side: a threaded HTTP/1.1 server on 127.0.0.1 with keep-alive, chunked
SSE flushed per event, optional response compression, fault injection (`faults.py`), a recorded
request log, a digest of every response body it sent, and a control API.
"""

import contextlib
import hashlib
import json
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, parse_qsl, urlsplit

from mitmproxy.net import encoding

from tests.sim import wire
from tests.sim.clock import SimClock
from tests.sim.engine import Engine, Outcome, Reply
from tests.sim.faults import FAULT_HEADER, Faults, parse_faults

logger = logging.getLogger(__name__)

# Test-only knobs, read from request headers.
DELAY_HEADER = "x-sim-event-delay-ms"
COMPRESS_HEADER = "x-sim-compress"
REPLY_TEXT_HEADER = "x-sim-reply-text"  # what the model says (default wire.REPLY_TEXT)
# Sent with every reply: a sequence number (the key of `Simulator.responses`) and the SHA-256 of
# the whole body the simulator is about to send, as encoded on the wire (chunk framing aside), so
# a client behind a proxy can check it got exactly those bytes.
RESPONSE_ID_HEADER = "x-sim-response-id"
DIGEST_HEADER = "x-sim-body-sha256"
# Never echoed by the control API: a subprocess's request log may end up in CI output.
_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "cookie",
                             "x-goog-api-key", "proxy-authorization"})
_SECRET_PARAMS = frozenset({"key", "api_key", "token"})  # Gemini takes `?key=`


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str  # without the /p/<provider> prefix and without the query
    query: str  # the raw query string, "" when none
    headers: list[tuple[str, str]]  # as received, in order
    raw_body: bytes  # as received (still compressed when Content-Encoding says so)
    body: Any  # decoded JSON, or None
    provider: str
    replica: int  # -1 when the request was rejected before reaching a replica
    status: int
    usage: dict[str, Any] | None  # the usage object the reply carried
    ts: float  # sim clock time

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def to_json(self, bodies: bool = False) -> dict[str, Any]:
        query = "&".join(f"{k}=<redacted>" if k.lower() in _SECRET_PARAMS else f"{k}={v}"
                         for k, v in parse_qsl(self.query, keep_blank_values=True))
        d: dict[str, Any] = {
            "method": self.method, "path": self.path, "query": query,
            "headers": [[k, "<redacted>" if k.lower() in _SECRET_HEADERS else v]
                        for k, v in self.headers],
            "body_size": len(self.raw_body), "provider": self.provider,
            "replica": self.replica, "status": self.status, "usage": self.usage, "ts": self.ts}
        if bodies:
            d["body"] = self.body
        return d


@dataclass(frozen=True, slots=True)
class SentResponse:
    """What the simulator actually wrote for one reply."""

    id: int  # the x-sim-response-id it carried
    status: int
    sha256: str  # of the body bytes written (encoded, without chunk framing)
    size: int
    complete: bool  # the whole body went out and the message was ended properly

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "sha256": self.sha256, "size": self.size,
                "complete": self.complete}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024  # hundreds of clients may connect at once

    def __init__(self, address: tuple[str, int], sim: "Simulator") -> None:
        self.sim = sim
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 300  # idle keep-alive connections are closed after this
    # Without TCP_NODELAY every small reply waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.server.conn_lock:
            self.server.connections.add(self.request)

    def finish(self) -> None:
        with self.server.conn_lock:
            self.server.connections.discard(self.request)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def do_POST(self) -> None:
        try:
            self._dispatch()
        except OSError:  # the client hung up
            self.close_connection = True
        except Exception:  # a simulator bug must not look like a network failure to the test
            logger.exception("simulator failed on %s %s", self.command, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.send_error(500, "simulator error")

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_POST

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        raw = self._read_body()
        if url.path.startswith("/_sim/"):
            self._control(url.path, url.query)
            return
        sim = self.server.sim
        try:
            faults = parse_faults(self.headers.get(FAULT_HEADER))
        except ValueError as e:
            self._json(400, {"error": f"bad {FAULT_HEADER} header: {e}"})
            return
        headers = list(self.headers.items())
        decode_error = None
        body: Any = None
        if raw:
            try:
                ce = (self.headers.get("content-encoding") or "identity").strip().lower()
                plain = encoding.decode(raw, ce) if ce != "identity" else raw
                body = json.loads(plain)
            except (ValueError, UnicodeDecodeError) as e:
                decode_error = f"could not decode request body: {type(e).__name__}"
        if faults.status is not None:
            outcome = sim.engine.fail(url.path, headers, faults.status,
                                      f"simulated failure ({FAULT_HEADER})")
        else:
            outcome = sim.engine.handle(self.command, url.path, url.query, headers,
                                        None if decode_error else body, decode_error,
                                        reply_text=self.headers.get(REPLY_TEXT_HEADER),
                                        diagnosis=faults.diagnosis,
                                        reject_diagnostics=faults.reject_diagnostics)
        sim._record(RecordedRequest(self.command, outcome.path, url.query, headers, raw, body,
                                    outcome.provider, outcome.replica, outcome.reply.status,
                                    outcome.usage, outcome.ts))
        self._send(outcome, faults)

    def _encoded(self, reply: Reply, enc_name: str | None,
                 faults: Faults) -> list[tuple[bytes, bool]]:
        """The body as it goes on the wire: (piece, is_event) pairs, one per SSE event."""
        if reply.events is None:
            data = encoding.encode(reply.body, enc_name) if enc_name else reply.body
            if faults.truncate_gzip:
                data = data[: len(data) // 2]
            return [(data, False)]
        events = list(reply.events)
        if faults.pad_event_bytes:
            events.insert(0, wire.sse({"type": "ping", "padding": "x" * faults.pad_event_bytes},
                                      "ping"))
        encoder = wire.ENCODERS[enc_name]() if enc_name else None
        pieces = [(encoder.chunk(e) if encoder else e, True) for e in events]
        if faults.truncate_gzip and pieces:
            last = pieces[-1][0]
            pieces[-1] = (last[: len(last) // 2], True)  # and no gzip trailer
        elif encoder:
            pieces.append((encoder.finish(), False))
        return pieces

    def _send(self, outcome: Outcome, faults: Faults) -> None:
        reply = outcome.reply
        enc_name = (self.headers.get(COMPRESS_HEADER) or "").strip().lower() or None
        if enc_name and enc_name not in wire.ENCODERS:
            enc_name = None
        if faults.truncate_gzip:
            enc_name = "gzip"
        pieces = self._encoded(reply, enc_name, faults)
        streaming = reply.events is not None
        sim = self.server.sim
        rid = sim._next_response_id()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("x-sim-provider", outcome.provider)
        self.send_header("x-sim-replica", str(outcome.replica))
        self.send_header(RESPONSE_ID_HEADER, str(rid))
        self.send_header(DIGEST_HEADER,
                         hashlib.sha256(b"".join(p for p, _ in pieces)).hexdigest())
        if reply.status in (429, 529):
            self.send_header("Retry-After", "1")
        if enc_name:
            self.send_header("Content-Encoding", enc_name)
        if streaming:
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(sum(len(p) for p, _ in pieces)))
        self.end_headers()
        self.wfile.flush()
        if self.command == "HEAD":
            sim._sent(SentResponse(rid, reply.status, hashlib.sha256().hexdigest(), 0, True))
            return
        digest = hashlib.sha256()
        written = [0]
        end = "error"
        try:
            end = self._write_pieces(pieces, streaming, faults, digest, written)
        except OSError:  # the client went away mid-stream
            self.close_connection = True
        # Recorded before a reset, so a test that saw the reset also finds the record.
        sim._sent(SentResponse(rid, reply.status, digest.hexdigest(), written[0], end == "done"))
        if end == "reset":
            self._reset()
        elif end == "close":  # a clean FIN, but the chunked body never ended
            self.close_connection = True

    def _write_pieces(self, pieces: list[tuple[bytes, bool]], streaming: bool, faults: Faults,
                      digest: Any, written: list[int]) -> str:
        """Writes the body, counting into `written[0]`; how it ends: done, reset or close."""
        delay = self.server.sim.event_delay
        override = self.headers.get(DELAY_HEADER)
        if override:
            with contextlib.suppress(ValueError):
                delay = max(float(override), 0.0) / 1000
        stop_at: int | None = None
        how: str | None = None
        after_events = faults.reset_after_events if faults.reset_after_events is not None \
            else faults.close_after_events
        if after_events is not None:
            how = "reset" if faults.reset_after_events is not None else "close"
            events = [p for p, is_event in pieces if is_event] if streaming else []
            stop_at = sum(len(p) for p in events[:after_events])
        if faults.reset_after_bytes is not None:
            stop_at, how = faults.reset_after_bytes, "reset"
        step = faults.slowloris_bytes if faults.slowloris_ms else None
        size = 0
        for piece, is_event in pieces:
            if is_event and delay:
                time.sleep(delay)
            for sub in ([piece[i:i + step] for i in range(0, len(piece), step)] if step
                        else [piece]):
                if stop_at is not None:
                    sub = sub[: max(stop_at - size, 0)]
                if not sub:
                    continue
                if step:
                    time.sleep(faults.slowloris_ms / 1000)
                if streaming:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(sub), sub))
                else:
                    self.wfile.write(sub)
                self.wfile.flush()
                digest.update(sub)
                size += len(sub)
                written[0] = size
        if how is not None:
            return how
        if streaming:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        return "done"

    def _reset(self) -> None:
        """Abort the connection with a TCP RST, the way a crashed upstream looks."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        # rfile holds a reference to the socket: drop it, or close() would not close anything.
        self.rfile.close()
        self.connection.close()

    def _json(self, status: int, payload: Any) -> None:
        data = wire.dumps(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _control(self, path: str, query: str) -> None:
        sim = self.server.sim
        params = parse_qs(query)
        status, payload = 200, None
        if path == "/_sim/health":
            payload = {"ok": True, "replicas": sim.engine.replicas, "now": sim.clock.now(),
                       "requests": len(sim.requests), "overflowed": sim.engine.overflowed}
        elif path == "/_sim/requests":
            bodies = params.get("bodies", ["0"])[0] not in ("0", "", "false")
            payload = [r.to_json(bodies) for r in sim.requests]
        elif path == "/_sim/responses":
            payload = [r.to_json() for r in sim.responses]
        elif path == "/_sim/advance" and self.command == "POST":
            try:
                payload = {"now": sim.clock.advance(float(params.get("seconds", ["0"])[0]))}
            except ValueError as e:
                status, payload = 400, {"error": str(e)}
        elif path == "/_sim/reset" and self.command == "POST":
            sim.reset()
            payload = {"ok": True}
        else:
            status, payload = 404, {"error": f"unknown control endpoint {self.command} {path}"}
        self._json(status, payload)


class Simulator:
    """A fake LLM provider on 127.0.0.1. Use as `with Simulator() as sim:` or start()/stop()."""

    def __init__(self, replicas: int = 4, clock: SimClock | None = None, seed: int = 0,
                 default_provider: str = "openai", event_delay: float = 0.0, *,
                 port: int = 0, auto_ttl: float | None = None) -> None:
        self.clock = clock if clock is not None else SimClock()
        self.engine = Engine(replicas, self.clock, seed, default_provider, auto_ttl)
        self.event_delay = event_delay
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._requests: list[RecordedRequest] = []
        self._responses: dict[int, SentResponse] = {}
        self._response_ids = 0
        self._lock = threading.Lock()
        self._sent_cond = threading.Condition(self._lock)

    def start(self, port: int | None = None) -> Self:
        if self._server is not None:
            return self
        if port is not None:
            self._port = port
        self._server = _Server(("127.0.0.1", self._port), self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"simulator:{self._port}", daemon=True)
        self._thread.start()
        logger.debug("simulator listening on %s", self.url)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with server.conn_lock:
            conns = list(server.connections)
        for conn in conns:  # wake handler threads parked on idle keep-alive connections
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def responses(self) -> list[SentResponse]:
        """Every reply body written (or cut short), by x-sim-response-id."""
        with self._lock:
            return [self._responses[k] for k in sorted(self._responses)]

    def response(self, response_id: int | str, timeout: float = 5.0) -> SentResponse | None:
        """The record of one reply, waiting for it: a client can see the last byte of a reply
        a moment before the simulator's thread gets to write down that it sent it."""
        rid = int(response_id)
        with self._sent_cond:
            self._sent_cond.wait_for(lambda: rid in self._responses, timeout)
            return self._responses.get(rid)

    def reset(self) -> None:
        """Forget every cache, recorded request and sent response (the clock is left alone)."""
        self.engine.reset()
        with self._lock:
            self._requests.clear()
            self._responses.clear()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _next_response_id(self) -> int:
        with self._lock:
            self._response_ids += 1
            return self._response_ids

    def _sent(self, response: SentResponse) -> None:
        with self._sent_cond:
            self._responses[response.id] = response
            self._sent_cond.notify_all()
