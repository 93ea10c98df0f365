"""The provider simulator as a server: compression, event delays, keep-alive, concurrent
streams, its control API and command line, and its independence from the addon's code."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
from mitmproxy.net import encoding

from tests.sim import SimClock, Simulator
from tests.sim_client import (
    ROOT,
    anthropic_turn,
    chat,
    control,
    convo,
    post,
    post_json,
    sse_events,
)


@pytest.fixture
def clock() -> SimClock:
    """Virtual time from 0 (conftest's starts at 1e6): times below are absolute."""
    return SimClock()


# --- compression, delays, concurrency ------------------------------------------------------

@pytest.mark.parametrize("enc", ["gzip", "br", "zstd"])
def test_compressed_responses(sim: Simulator, enc: str) -> None:
    status, h, data = post(sim, "/p/anthropic/v1/messages", anthropic_turn(0),
                           {"x-sim-compress": enc})
    assert status == 200 and h["content-encoding"] == enc
    assert json.loads(encoding.decode(data, enc))["usage"]["cache_creation_input_tokens"] > 0
    body = anthropic_turn(0) | {"stream": True}
    status, h, data = post(sim, "/p/anthropic/v1/messages", body, {"x-sim-compress": enc})
    assert status == 200 and h["content-encoding"] == enc
    assert h["content-type"] == "text/event-stream"
    events = sse_events(encoding.decode(data, enc))
    assert [e for e, _ in events][-1] == "message_stop" and len(events) == 7


def test_compressed_sse_is_flushed_per_event(sim: Simulator) -> None:
    import zlib
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        body = json.dumps(anthropic_turn(0) | {"stream": True})
        start = time.monotonic()
        conn.request("POST", "/p/anthropic/v1/messages", body=body,
                     headers={"x-sim-compress": "gzip", "x-sim-event-delay-ms": "100"})
        resp = conn.getresponse()
        decoder = zlib.decompressobj(47)
        seen = b""
        while b"event: message_start" not in seen:
            chunk = resp.read1(65536)
            assert chunk, "stream ended before the first event decoded"
            seen += decoder.decompress(chunk)
        first_event_at = time.monotonic() - start
        rest = resp.read()
        total = time.monotonic() - start
        seen += decoder.decompress(rest) + decoder.flush()
    finally:
        conn.close()
    assert b"event: message_stop" in seen
    assert 0.09 < first_event_at < total - 0.4 and total > 0.65  # 7 events, 100 ms apart


def test_event_delay_sets_time_to_first_byte(clock: SimClock) -> None:
    with Simulator(replicas=1, clock=clock, event_delay=0.15) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        start = time.monotonic()
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps(chat(convo(0), stream=True)))
        resp = conn.getresponse()
        headers_at = time.monotonic() - start
        resp.read1(1)
        first_byte_at = time.monotonic() - start
        resp.read()
        conn.close()
    assert headers_at + 0.1 < first_byte_at and 0.14 < first_byte_at < 2


def test_keep_alive_connection_reused(sim: Simulator) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        for stream in (False, True, False):
            conn.request("POST", "/p/openai/v1/chat/completions",
                         body=json.dumps(chat(convo(0), stream=stream)))
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read()
            sock = conn.sock
            assert sock is not None
    finally:
        conn.close()
    assert len(sim.requests) == 3


@pytest.mark.slow  # a load test
def test_two_hundred_concurrent_streams(sim: Simulator) -> None:
    n = 200
    results: list[bytes | Exception] = [b""] * n
    barrier = threading.Barrier(n, timeout=20)

    def one(i: int) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=30)
            body = json.dumps(anthropic_turn(0) | {"stream": True})
            barrier.wait()
            conn.request("POST", "/p/anthropic/v1/messages", body=body,
                         headers={"x-sim-event-delay-ms": "100"})
            results[i] = conn.getresponse().read()
            conn.close()
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - start
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert all(isinstance(r, bytes) and r.rstrip().endswith(b'{"type":"message_stop"}')
               for r in results)
    assert len(sim.requests) == n
    assert elapsed < 15  # 0.7 s of events each: they ran in parallel, not one after another


# --- control API and CLI -------------------------------------------------------------------


def test_control_api(sim: Simulator, clock: SimClock) -> None:
    status, health = control(sim.url, "GET", "/_sim/health")
    assert status == 200 and health["ok"] is True and health["replicas"] == 4
    assert health["overflowed"] == 0  # requests an RPM limit sent off their home machine
    body = chat(convo(0), prompt_cache_key="k")
    post(sim, "/p/openai/v1/chat/completions", body, {"Authorization": "Bearer sk-secret"})
    _, listed = control(sim.url, "GET", "/_sim/requests")
    assert len(listed) == 1 and "body" not in listed[0]
    entry = listed[0]
    assert entry["provider"] == "openai" and entry["path"] == "/v1/chat/completions"
    assert entry["status"] == 200 and entry["usage"]["prompt_tokens"] > 0
    assert ["Authorization", "<redacted>"] in entry["headers"]
    assert "sk-secret" not in json.dumps(listed)
    _, with_bodies = control(sim.url, "GET", "/_sim/requests?bodies=1")
    assert with_bodies[0]["body"] == body
    _, moved = control(sim.url, "POST", "/_sim/advance?seconds=42.5")
    assert moved["now"] == 42.5 == clock.now()
    _, cached = post_json(sim, "/p/openai/v1/chat/completions", body)
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert control(sim.url, "POST", "/_sim/reset") == (200, {"ok": True})
    assert sim.requests == [] and control(sim.url, "GET", "/_sim/requests")[1] == []
    _, fresh = post_json(sim, "/p/openai/v1/chat/completions", body)
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # caches forgotten
    assert control(sim.url, "POST", "/_sim/advance?seconds=-1")[0] == 400
    post(sim, "/p/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=AIza-secret",
         {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    _, listed = control(sim.url, "GET", "/_sim/requests")
    assert listed[-1]["query"] == "key=<redacted>" and listed[-1]["ts"] == 42.5
    assert sim.requests[-1].query == "key=AIza-secret"  # in-process records stay exact
    assert control(sim.url, "GET", "/_sim/nope")[0] == 404


@pytest.mark.slow  # starts the simulator as a process
def test_cli_subprocess() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tests.sim", "--port", "0",
                             "--replicas", "2", "--event-delay", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        status, health = control(url, "GET", "/_sim/health")
        assert status == 200 and health["replicas"] == 2
        client = openai.OpenAI(base_url=url + "/p/openai/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(model="m", messages=convo(0)).usage.prompt_tokens
        assert len(control(url, "GET", "/_sim/requests")[1]) == 1
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert rc == 0


def test_start_on_a_given_port(clock: SimClock) -> None:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sim = Simulator(replicas=1, clock=clock).start(port=port)
    try:
        assert sim.port == port and sim.url == f"http://127.0.0.1:{port}"
        assert control(sim.url, "GET", "/_sim/health")[0] == 200
    finally:
        sim.stop()
    sim.stop()  # idempotent


# --- independence: the simulator is an oracle for the addon, so it must not reuse its code ------

def test_simulator_imports_nothing_from_the_addon() -> None:
    # Every module of tests.sim, imported in a fresh interpreter: not one affinity_addon module
    # gets loaded (an AST scan would miss an import hidden behind another package).
    code = ("import pkgutil, importlib, sys, tests.sim as s\n"
            "for m in pkgutil.iter_modules(s.__path__):\n"
            "    importlib.import_module('tests.sim.' + m.name)\n"
            "print('\\n'.join(sorted(n for n in sys.modules if n.split('.')[0] == 'affinity_addon')))\n"
            "print('modules', sum(1 for n in sys.modules if n.startswith('tests.sim.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    *leaked, count = [line for line in r.stdout.splitlines() if line]
    assert leaked == [] and int(count.split()[1]) >= 9, r.stdout
    # and no source file imports it, even in a function-level import
    import ast
    for path in (ROOT / "tests" / "sim").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "affinity_addon" for n in names), path
