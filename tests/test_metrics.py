"""Prometheus metrics and health checks: option validation, bounded labels, and a real mitmdump
whose /metrics add up to the traffic sent through it."""

import json
import re
import socket
import struct
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons
from prometheus_client.parser import text_string_to_metric_families

from affinity_addon.mitm import Affinity, make_addons
from affinity_addon.mitm import Affinity as Bundle
from affinity_addon.mitm.config import DEFAULT_RULES
from affinity_addon.mitm.metrics import LabelCap
from affinity_addon.mitm.options import parse_address
from affinity_addon.mitm.state import State
from affinity_addon.models import model_family
from affinity_addon.record.jsonl import JsonlWriter
from tests.addon_errors import check_output, plant_args
from tests.harness import ADDON, MITMDUMP
from tests.procs import clean_env, free_port

BIG = "You are a meticulous assistant. Follow the house style. " * 200


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == val for k, val in labels.items()))


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_parse_address() -> None:
    assert parse_address("") is None and parse_address("  ") is None
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address(":9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("9464", "localhost", "127.0.0.1:", "127.0.0.1:99999", "a b:1", "http://x:1"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_model_family_folds_snapshots() -> None:
    assert model_family("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert model_family("gpt-5-mini-2025-08-07") == "gpt-5-mini"
    assert model_family("claude-opus-4@20250514") == "claude-opus-4"
    assert model_family("GPT-5") == "gpt-5" and model_family(None) == ""


def test_label_values_are_capped() -> None:
    cap = LabelCap(limit=3)
    got = [cap("rule", f"r{i}") for i in range(10)]
    assert got[:3] == ["r0", "r1", "r2"] and set(got[3:]) == {"other"}
    assert cap("rule", "r1") == "r1" and cap("provider", None) == "none"


@pytest.mark.parametrize("value, message", [
    ("nonsense", "Cannot parse affinity_metrics"),
    ("127.0.0.1:70000", "port out of range"),
])
def test_bad_address_is_an_options_error(value: str, message: str) -> None:
    b = Bundle(State())
    with taddons.context(b) as tctx, pytest.raises(exceptions.OptionsError, match=message):
        tctx.configure(b, affinity_metrics=value)


def test_port_in_use_is_an_options_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        b = Bundle(State())
        with taddons.context(b) as tctx, pytest.raises(exceptions.OptionsError,
                                                        match="Cannot serve affinity_metrics"):
            tctx.configure(b, affinity_metrics=f"127.0.0.1:{port}")


def test_readyz_reports_rules_and_log(tmp_path: Path) -> None:
    addons = make_addons()
    bundle = addons[0]
    assert isinstance(bundle, Affinity)
    metrics = bundle.metrics
    port = free_port()
    with taddons.context(*addons) as tctx:
        tctx.configure(bundle, affinity_rules=str(DEFAULT_RULES),
                       affinity_log=str(tmp_path / "a.jsonl"))
        tctx.configure(bundle, affinity_metrics=f"127.0.0.1:{port}")
        status, body = get(port, "/readyz")
        assert status == 200 and json.loads(body) == {"rules_loaded": True, "log_writable": True}
        assert get(port, "/healthz") == (200, b"ok\n")
        assert get(port, "/nope")[0] == 404
        writer = metrics.state.writer
        assert isinstance(writer, JsonlWriter)
        writer.failing = True  # what a failed write leaves (root ignores file modes)
        status, body = get(port, "/readyz")
        assert status == 503 and json.loads(body)["log_writable"] is False
        tctx.configure(bundle, affinity_metrics="")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5)


def test_a_client_that_hangs_up_is_no_error(capsys) -> None:
    # HAProxy's health check resets its connection once it has the status line; the endpoint
    # logged that as an error with a traceback, and socketserver printed a second one.
    bundle = Bundle(State())
    port = free_port()
    with taddons.context(bundle) as tctx:
        tctx.configure(bundle, affinity_metrics=f"127.0.0.1:{port}")
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert get(port, "/healthz") == (200, b"ok\n")  # and it still answers
        tctx.configure(bundle, affinity_metrics="")
    assert "Traceback" not in capsys.readouterr().err  # the autouse check covers the log


@pytest.mark.slow  # starts mitmdump
def test_metrics_add_up_through_real_mitmdump(monkeypatch, proxy_factory) -> None:
    mport = free_port()
    proxy = proxy_factory(options={"affinity_metrics": f"127.0.0.1:{mport}"})
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca))
    client = openai.OpenAI(base_url="https://api.openai.com/v1", api_key="sk-test", max_retries=0)
    messages = [{"role": "system", "content": BIG}, {"role": "user", "content": "hi"}]
    for _ in range(3):
        client.chat.completions.create(model="gpt-5-2025-08-07", messages=messages)
    for _ in range(2):
        for _chunk in client.chat.completions.create(
                model="gpt-5-2025-08-07", messages=messages, stream=True,
                stream_options={"include_usage": True}):
            pass
    recs = proxy.wait_records(5)
    assert len(recs) == 5
    samples = scrape(mport)
    assert total(samples, "affinity_requests_total", api="openai-chat", rule="openai") == 5
    assert total(samples, "affinity_records_total", model_family="gpt-5", outcome="ok") == 5
    assert total(samples, "affinity_tokens_total", kind="input") == sum(
        r["usage"]["input_tokens"] for r in recs)
    read = sum(r["usage"]["cache_read_tokens"] for r in recs)
    assert read > 0 and total(samples, "affinity_tokens_total", kind="cache_read") == read
    assert total(samples, "affinity_tokens_total", kind="output") == sum(
        r["usage"]["output_tokens"] for r in recs)
    # Dollars: the records' `cost_usd` (gpt-5 is in the price table), added up by kind.
    assert all(r["cost_usd"] for r in recs)
    for kind in ("input", "cache_read", "output"):
        assert total(samples, "affinity_cost_usd_total", kind=kind) == pytest.approx(
            sum(r["cost_usd"][kind] for r in recs))
    assert total(samples, "affinity_cost_usd_total", kind="cache_read") > 0
    assert total(samples, "affinity_unpriced_records_total") == 0
    assert total(samples, "affinity_first_byte_seconds_count", stream="true") == 2
    assert total(samples, "affinity_first_byte_seconds_count", stream="false") == 3
    assert total(samples, "affinity_errors_total") == 0
    labels = {k for (_, ls) in samples for k, _ in ls}
    assert "affinity_id" not in labels and not any(
        recs[0]["affinity_id"] in v for (_, ls) in samples for _, v in ls)
    assert get(mport, "/healthz")[0] == 200 and get(mport, "/readyz")[0] == 200


@pytest.mark.slow  # starts mitmdump
def test_bad_metrics_address_stops_mitmdump(tmp_path: Path) -> None:
    r = subprocess.run([str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(free_port()),
                        "--set", f"confdir={tmp_path}", "-s", str(ADDON),
                        "--set", "affinity_metrics=localhost", *plant_args()],
                       capture_output=True, text=True, timeout=60, env=clean_env(),
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stdout + r.stderr
    # The option, what it wants and what it got, and no other error than that one.
    expected = ("Cannot parse affinity_metrics option: expected HOST:PORT such as "
                "127.0.0.1:9464, not 'localhost'")
    assert expected in r.stdout + r.stderr
    check_output(r.stdout + r.stderr, "mitmdump", expect=[re.escape(expected)])


def test_a_failing_sink_never_stops_the_record_and_instance_is_named(tmp_path: Path) -> None:
    from mitmproxy.test import tflow

    from tests.driver import Affinity

    log = tmp_path / "a.jsonl"
    a = Affinity()
    seen = []

    def broken(record, data) -> None:
        raise RuntimeError("exporter down")

    a.state.sinks.append(broken)
    a.state.sinks.append(lambda record, data: seen.append(data))
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(log))
        tctx.configure(a.bundle, affinity_instance="gw-a1")
        with pytest.raises(exceptions.OptionsError, match="affinity_instance"):
            tctx.configure(a.bundle, affinity_instance="no spaces please")
        for _ in range(2):
            f = tflow.tflow(resp=True)
            f.request.host, f.request.port, f.request.scheme = "api.openai.com", 443, "https"
            f.request.method, f.request.path = "POST", "/v1/chat/completions"
            f.request.headers["content-type"] = "application/json"
            f.request.content = json.dumps({"model": "gpt-5", "messages": [
                {"role": "user", "content": "hi"}]}).encode()
            resp = f.response
            f.response = None
            a.request(f)
            f.response = resp
            f.response.headers["content-type"] = "application/json"
            f.response.content = json.dumps({"usage": {"prompt_tokens": 10,
                                                       "completion_tokens": 2}}).encode()
            a.responseheaders(f)
            a.response(f)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(recs) == 2 and all(r["instance"] == "gw-a1" for r in recs)
    assert len(seen) == 2 and a.stats.total.requests == 2  # the sinks after it still ran
