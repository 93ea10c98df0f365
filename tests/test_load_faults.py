"""Load and faults, through real mitmdump processes and the simulator.

- 200 concurrent streaming requests: every client gets exactly the bytes the simulator wrote
  (SHA-256 of the raw, possibly gzip-compressed body against the simulator's own digest of what
  it sent), and the JSONL log has exactly one intact line per response with the right usage;
- two proxy processes appending to one log file at the same time: every line parses, counts add up;
- faults: upstream reset or clean close mid-stream, 4xx/5xx (Anthropic's 400 for a fifth marker
  included), a gzip stream that ends early, a huge event, clients that hang up, a slow-loris
  upstream (the client still gets every byte promptly), a log on a full disk (`/dev/full`), and
  an unwritable log at startup (exit status 1 with a message).
The proxy never crashes (no traceback in its output) and every flow gets a record or a logged
reason why not. The simulator's fault injection (`x-sim-fault`) is checked directly first.
"""

import asyncio
import hashlib
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.addon_errors import check_output, plant_args
from tests.harness import ADDON, MITMDUMP, Proxy, free_port
from tests.sim import Simulator, parse_faults

# -- the simulator's fault injection, without a proxy ---------------------------------------------

CHAT = {"model": "grok-4", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}]}


def _direct(sim: Simulator, fault: str, body: dict[str, Any] = CHAT,
            path: str = "/p/xai/v1/chat/completions", **headers: str) -> tuple[Any, bytes, Any]:
    with httpx2.Client(timeout=10) as c, c.stream(
            "POST", sim.url + path, json=body, headers={"x-sim-fault": fault, **headers}) as r:
        data, err = b"", None
        try:
            for chunk in r.iter_raw():
                data += chunk
        except httpx2.HTTPError as e:
            err = e
        return r, data, err


def test_fault_header_parsing():
    f = parse_faults("reset-after-events=2; slowloris-ms=5, slowloris-bytes=8,truncate-gzip")
    assert (f.reset_after_events, f.slowloris_ms, f.slowloris_bytes, f.truncate_gzip) ==\
        (2, 5, 8, True)
    assert not parse_faults("").any and parse_faults("status=500").any
    for bad in ("bogus=1", "status=200", "status=x", "truncate-gzip=1", "slowloris-bytes=0",
                "reset-after-events=-1"):
        with pytest.raises(ValueError):
            parse_faults(bad)


def test_simulator_faults_directly(sim):
    r, data, err = _direct(sim, "")
    assert err is None and hashlib.sha256(data).hexdigest() == r.headers["x-sim-body-sha256"]
    sent = sim.response(r.headers["x-sim-response-id"])
    assert sent.complete and sent.size == len(data) and sent.sha256 == r.headers["x-sim-body-sha256"]

    r, data, err = _direct(sim, "status=429", path="/p/anthropic/v1/messages")
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert json.loads(data)["error"]["type"] == "rate_limit_error"
    assert sim.requests[-1].status == 429 and sim.requests[-1].usage is None

    for fault, error in (("reset-after-events=2", httpx2.ReadError),
                         ("close-after-events=2", httpx2.RemoteProtocolError)):
        r, data, err = _direct(sim, fault)
        assert isinstance(err, error), (fault, err)
        sent = sim.response(r.headers["x-sim-response-id"])
        assert not sent.complete and sent.size == len(data) and data.count(b"\n\n") == 2
        assert hashlib.sha256(data).hexdigest() == sent.sha256

    r, data, err = _direct(sim, "truncate-gzip")
    assert err is None and r.headers["content-encoding"] == "gzip"
    with pytest.raises(EOFError):
        import gzip

        gzip.decompress(data)

    r, data, err = _direct(sim, "pad-event-bytes=1000", **{"x-sim-reply-text": "Bonjour"})
    assert data.startswith(b"event: ping\ndata: ") and b"x" * 1000 in data and b"Bonjour" in data

    t = time.monotonic()
    r, data, err = _direct(sim, "slowloris-ms=20;slowloris-bytes=200")
    assert err is None and time.monotonic() - t >= 0.02 * (len(data) // 200)

    with httpx2.Client() as c:
        r = c.post(sim.url + "/p/xai/v1/chat/completions", json=CHAT,
                   headers={"x-sim-fault": "explode"})
    assert r.status_code == 400 and "unknown fault" in r.text


# -- helpers ------------------------------------------------------------------------------------------

LOAD_APIS = {
    # name: (url, model, how the client names its conversation)
    "xai": ("http://api.x.ai/v1/chat/completions", "grok-4", "header:x-grok-conv-id"),
    "openai": ("http://api.openai.com/v1/responses", "gpt-5.6", "body:prompt_cache_key"),
    "anthropic": ("http://api.anthropic.com/v1/messages", "claude-sonnet-4-5",
                  "header:x-session-id"),
}


def load_request(kind: str, conv: str, n: int) -> tuple[str, dict[str, Any], dict[str, str]]:
    url, model, where = LOAD_APIS[kind]
    system = f"You are agent {n}. " + "Keep answers short. " * 20
    if kind == "openai":
        body: dict[str, Any] = {"model": model, "stream": True, "instructions": system,
                                "input": [{"role": "user", "content": f"task {n}"}]}
    elif kind == "anthropic":
        body = {"model": model, "max_tokens": 32, "stream": True, "system": system,
                "messages": [{"role": "user", "content": f"task {n}"}]}
    else:
        body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"task {n}"}]}
    headers = {"x-load-id": conv}
    source, _, name = where.partition(":")
    if source == "header":
        headers[name] = conv
    else:
        body[name] = conv
    return url, body, headers


def normalized(kind: str, usage: dict[str, Any]) -> tuple[int, int]:
    """(input tokens including cached ones, cache reads) from the simulator's usage object."""
    if kind == "anthropic":
        return (usage["input_tokens"] + usage["cache_read_input_tokens"]
                + usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"])
    if kind == "openai":
        return usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"]
    return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


async def fetch(client: httpx2.AsyncClient, url: str, body: dict[str, Any],
                headers: dict[str, str]) -> dict[str, Any]:
    async with client.stream("POST", url, json=body, headers=headers) as r:
        raw = b"".join([c async for c in r.aiter_raw()])
        return {"status": r.status_code, "raw": raw, "id": r.headers.get("x-sim-response-id"),
                "digest": r.headers.get("x-sim-body-sha256"),
                "encoding": r.headers.get("content-encoding")}


def parse_log(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.split(b"\n")[:-1]]  # every line intact JSON


def with_log(path: Path) -> dict[str, Any]:
    """proxy_factory arguments for an addon that logs to `path` (the harness's own log path
    cannot be overridden: mitmdump refuses a second --set of one option)."""
    return {"addon": False,
            "extra_args": ["-s", str(ADDON), "--set", f"affinity_log={path}", *plant_args()]}


def assert_healthy(output: str) -> None:
    assert "Traceback" not in output, output[-3000:]
    assert "has crashed" not in output, output[-3000:]


async def run_load(proxies: list[Proxy], per_proxy: int, sim: Simulator,
                   delay_ms: int = 30) -> dict[str, tuple[str, dict[str, Any]]]:
    """Sends per_proxy concurrent streams through each proxy; returns conv -> (kind, result)."""
    limits = httpx2.Limits(max_connections=per_proxy + 10, max_keepalive_connections=0)
    clients = [httpx2.AsyncClient(proxy=p.url, limits=limits, timeout=60) for p in proxies]
    jobs, meta = [], []
    kinds = list(LOAD_APIS)
    try:
        for pi, client in enumerate(clients):
            for n in range(per_proxy):
                kind = kinds[n % len(kinds)]
                conv = f"load-{pi}-{n}"
                url, body, headers = load_request(kind, conv, n)
                headers["x-sim-event-delay-ms"] = str(delay_ms)
                if n % 4 == 1:
                    headers["x-sim-compress"] = "gzip"
                jobs.append(fetch(client, url, body, headers))
                meta.append((conv, kind))
        results = await asyncio.gather(*jobs)
    finally:
        for c in clients:
            await c.aclose()
    return {conv: (kind, res) for (conv, kind), res in zip(meta, results, strict=True)}


def check_load(results: dict[str, tuple[str, dict[str, Any]]], records: list[dict[str, Any]],
               sim: Simulator) -> None:
    upstream = {r.header("x-load-id"): r for r in sim.requests}
    for conv, (_, res) in results.items():
        assert res["status"] == 200, (conv, res["raw"][:200])
        sent = sim.response(res["id"])
        assert sent is not None and sent.complete, conv
        # Byte-identical: the raw body (still compressed when gzip) is what the simulator wrote.
        assert hashlib.sha256(res["raw"]).hexdigest() == sent.sha256 == res["digest"], conv
        assert len(res["raw"]) == sent.size
    by_conv: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_conv.setdefault(rec["affinity_id"], []).append(rec)
    assert sorted(by_conv) == sorted(results), "records and responses do not match one to one"
    for conv, recs in by_conv.items():
        assert len(recs) == 1, f"{conv}: {len(recs)} records"
        rec, (kind, _) = recs[0], results[conv]
        assert rec["complete"] is True and rec["status"] == 200 and rec["stream"] is True, rec
        up = upstream[conv]
        assert (rec["usage"]["input_tokens"], rec["usage"]["cache_read_tokens"]) ==\
            normalized(kind, up.usage), conv


# -- load -------------------------------------------------------------------------------------------

@pytest.mark.slow  # starts mitmdump
@pytest.mark.timeout(240)
def test_two_hundred_concurrent_streams_arrive_byte_identical_with_one_record_each(
        sim, proxy_factory):
    proxy = proxy_factory(options={"flow_detail": "0"})
    t = time.monotonic()
    results = asyncio.run(run_load([proxy], 200, sim))
    elapsed = time.monotonic() - t
    records = proxy.wait_records(200, timeout=30)
    check_load(results, parse_log(proxy.log), sim)
    assert len(records) == 200
    assert elapsed < 60, f"200 streams took {elapsed:.1f}s"
    assert_healthy(proxy.stop())


@pytest.mark.slow  # starts mitmdump
@pytest.mark.timeout(240)
def test_two_proxies_append_to_one_log(sim, proxy_factory, tmp_path):
    shared = tmp_path / "shared.jsonl"
    a, b = (proxy_factory(name, **with_log(shared), options={"flow_detail": "0"})
            for name in ("a", "b"))
    results = asyncio.run(run_load([a, b], 60, sim, delay_ms=10))
    deadline = time.monotonic() + 30
    while (len(shared.read_bytes().splitlines()) if shared.exists() else 0) < 120:
        assert time.monotonic() < deadline, "records missing"
        time.sleep(0.1)
    records = parse_log(shared)
    assert len(records) == 120
    check_load(results, records, sim)
    assert {r["affinity_id"].split("-")[1] for r in records} == {"0", "1"}
    assert len({r["flow_id"] for r in records}) == 120
    assert not a.log.exists() and not b.log.exists()
    assert_healthy(a.stop())
    assert_healthy(b.stop())


# -- faults -----------------------------------------------------------------------------------------

FIVE_MARKERS = {"model": "claude-sonnet-4-5", "max_tokens": 16, "stream": True,
                "system": [{"type": "text", "text": f"rule {i}", "cache_control": {"type": "ephemeral"}}
                           for i in range(3)],
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}}]}]}


def _through(client: httpx2.Client, url: str, body: dict[str, Any],
             headers: dict[str, str]) -> dict[str, Any]:
    with client.stream("POST", url, json=body, headers=headers) as r:
        raw, err = b"", None
        try:
            for chunk in r.iter_raw():
                raw += chunk
        except httpx2.HTTPError as e:
            err = e
        return {"status": r.status_code, "raw": raw, "err": err,
                "id": r.headers.get("x-sim-response-id"),
                "digest": r.headers.get("x-sim-body-sha256")}


FAULTS = {  # name: (API, x-sim-fault, other headers)
    "reset": ("xai", "reset-after-events=2", {}),
    "reset-gzip": ("xai", "reset-after-events=2", {"x-sim-compress": "gzip"}),
    "close": ("xai", "close-after-events=3", {}),
    "reset-at-once": ("openai", "reset-after-bytes=0", {}),
    "500": ("xai", "status=500", {}),
    "429": ("openai", "status=429", {}),
    "529": ("anthropic", "status=529", {}),
    "fifth-marker": ("anthropic", "", {}),
    "truncated-gzip": ("xai", "truncate-gzip", {}),
    "huge-event": ("anthropic", "pad-event-bytes=10000000", {}),
    "ok": ("openai", "", {}),
}


@pytest.mark.slow  # starts mitmdump
@pytest.mark.timeout(180)
def test_upstream_faults_and_client_hangups_never_crash_the_proxy(sim, proxy_factory):
    proxy = proxy_factory()
    got: dict[str, dict[str, Any]] = {}
    hangups = [f"hangup-{i}" for i in range(4)]
    with httpx2.Client(proxy=proxy.url, timeout=60) as client:
        for n, (name, (kind, fault, extra)) in enumerate(FAULTS.items()):
            url, body, headers = load_request(kind, name, n)
            if name == "fifth-marker":
                body = FIVE_MARKERS
            got[name] = _through(client, url, body, headers | extra | {"x-sim-fault": fault})
        for n, name in enumerate(hangups):  # clients that hang up mid-stream
            url, body, headers = load_request(("xai", "anthropic")[n % 2], name, n)
            with client.stream("POST", url, json=body,
                               headers=headers | {"x-sim-event-delay-ms": "200"}) as r:
                assert r.status_code == 200
                next(r.iter_raw())
        url, body, headers = load_request("xai", "after", 99)
        after = _through(client, url, body, headers)
    assert after["status"] == 200 and after["err"] is None  # and the proxy is still fine

    for name, res in got.items():
        sent = sim.response(res["id"]) if res["id"] else None
        assert sent is not None, name
        # Whatever upstream managed to send reached the client unchanged, up to the fault.
        assert hashlib.sha256(res["raw"]).hexdigest() == sent.sha256, name
    for name in ("reset", "reset-gzip", "close"):
        assert got[name]["err"] is not None, f"{name}: the client did not see the stream break"
    assert got["fifth-marker"]["status"] == 400
    assert b"A maximum of 4 blocks with cache_control" in got["fifth-marker"]["raw"]

    names = [*FAULTS, *hangups, "after"]
    recs = proxy.wait_records(len(names), timeout=20)
    by_name = {r["affinity_id"]: r for r in recs}
    assert len(recs) == len(names) and sorted(by_name) == sorted(names), "a flow got no record"
    for name in ("reset", "reset-gzip", "close", "reset-at-once", *hangups):
        assert by_name[name]["complete"] is False and by_name[name]["error"], by_name[name]
    for name, status in (("500", 500), ("429", 429), ("529", 529), ("fifth-marker", 400)):
        rec = by_name[name]
        assert rec["status"] == status and rec["usage"] is None and rec["complete"], rec
    assert by_name["truncated-gzip"]["complete"] is False  # its end never arrived
    for name in ("ok", "after", "huge-event"):  # usage after a 10 MB event is still read
        assert by_name[name]["complete"] is True and by_name[name]["usage"]["input_tokens"] > 0
    assert_healthy(proxy.stop())


@pytest.mark.slow  # starts mitmdump
@pytest.mark.timeout(120)
def test_slowloris_upstream_bytes_reach_the_client_promptly(sim, proxy_factory):
    proxy = proxy_factory()
    url, body, headers = load_request("xai", "slow-conv", 0)
    piece, gap = 16, 0.04
    headers |= {"x-sim-fault": f"slowloris-ms={int(gap * 1000)};slowloris-bytes={piece}"}
    arrivals: list[tuple[float, int]] = []
    with httpx2.Client(proxy=proxy.url, timeout=60) as client, client.stream(
            "POST", url, json=body, headers=headers) as r:
        raw = b""
        for chunk in r.iter_raw():
            raw += chunk
            arrivals.append((time.monotonic(), len(raw)))
    sent = sim.response(r.headers["x-sim-response-id"])
    assert hashlib.sha256(raw).digest().hex() == sent.sha256 and sent.complete
    assert len(raw) > 40 * piece
    # The simulator writes piece k at about t0 + k * gap; a proxy that held bytes back (whole
    # response, or event by event) would deliver them long after that.
    t0 = arrivals[0][0]
    worst = max(t - t0 - (size - 1) // piece * gap for t, size in arrivals)
    print(f"slowloris: {len(raw)} bytes in {len(arrivals)} reads, worst lag {worst:.3f}s")
    assert worst < 1.0, f"bytes arrived up to {worst:.2f}s late"
    first_event_end = raw.index(b"\n\n") + 2
    assert sum(1 for _, size in arrivals if size < first_event_end) >= 4,\
        "the first event was not passed on piece by piece"
    recs = proxy.wait_records(1)
    assert len(recs) == 1 and recs[0]["complete"] is True and recs[0]["usage"]
    assert_healthy(proxy.stop())


@pytest.mark.slow  # starts mitmdump
@pytest.mark.timeout(120)
def test_log_on_a_full_disk_keeps_proxying_and_says_so_once(sim, proxy_factory):
    proxy = proxy_factory(**with_log(Path("/dev/full")))
    url, body, headers = load_request("xai", "full-disk", 0)
    with httpx2.Client(proxy=proxy.url, timeout=30) as client:
        for i in range(5):
            res = _through(client, url, body, headers | {"x-load-id": f"full-{i}"})
            assert res["status"] == 200 and res["err"] is None
            assert hashlib.sha256(res["raw"]).hexdigest() == res["digest"]
    deadline = time.monotonic() + 10
    while "cannot write /dev/full" not in proxy.output.read_text():
        assert time.monotonic() < deadline, proxy.output.read_text()
        time.sleep(0.1)
    output = proxy.stop()
    assert output.count("cannot write /dev/full") == 1, output
    assert "proxying continues" in output
    assert "5 requests" in output  # the shutdown summary still counted every response
    assert_healthy(output)


@pytest.mark.slow  # starts mitmdump
@pytest.mark.timeout(120)
def test_a_removed_log_file_is_recreated_or_reported(sim, proxy_factory):
    proxy = proxy_factory()
    url, body, headers = load_request("xai", "removed-log", 0)
    with httpx2.Client(proxy=proxy.url, timeout=30) as client:
        assert _through(client, url, body, headers)["status"] == 200
        assert len(proxy.wait_records(1)) == 1
        proxy.log.unlink()  # e.g. a user starting a fresh log, or logrotate without copytruncate
        assert _through(client, url, body, headers)["status"] == 200
    deadline = time.monotonic() + 3
    while not proxy.log.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    output = proxy.stop()
    assert_healthy(output)
    assert len(proxy.records()) == 1  # the second record went to a new file at the path


@pytest.mark.slow  # starts mitmdump
@pytest.mark.parametrize("where", ["missing-directory", "a-directory"])
def test_unwritable_log_at_startup_exits_1_with_a_message(tmp_path, where):
    log = tmp_path / "no" / "such" / "dir" / "a.jsonl" if where == "missing-directory" else tmp_path
    args = [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(free_port()),
            "--set", f"confdir={tmp_path / 'confdir'}", "-s", str(ADDON),
            "--set", f"affinity_log={log}", *plant_args()]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text
    assert f"Cannot open affinity_log {log}" in text
    check_output(text, "mitmdump", expect=[re.escape(f"Cannot open affinity_log {log}")])
