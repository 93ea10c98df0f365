"""OpenTelemetry export: a real mitmdump sends one span per LLM response to a local OTLP/HTTP
receiver that decodes the protobuf ExportTraceServiceRequest; a dead collector is a warning and
the proxy keeps working; a malformed endpoint stops startup."""

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from affinity_addon.mitm.otel import provider_name, traces_endpoint
from tests.addon_errors import check_output, plant_args
from tests.harness import ADDON, MITMDUMP
from tests.procs import clean_env, free_port

BIG = "You are a meticulous assistant. Follow the house style. " * 200


class Receiver:
    """OTLP/HTTP traces endpoint on 127.0.0.1: decoded spans and the request headers."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                with owner.lock:
                    owner.headers.append({k.lower(): v for k, v in self.headers.items()})
                    for rs in req.resource_spans:
                        res = {a.key: _value(a.value) for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            for sp in ss.spans:
                                owner.spans.append({
                                    "name": sp.name, "resource": res, "kind": sp.kind,
                                    "duration_ns": sp.end_time_unix_nano - sp.start_time_unix_nano,
                                    "attrs": {a.key: _value(a.value) for a in sp.attributes}})
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_spans(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.spans) >= n:
                    return list(self.spans)
            time.sleep(0.05)
        return list(self.spans)


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


def test_endpoint_validation() -> None:
    assert traces_endpoint({}) == "http://localhost:4318/v1/traces"
    assert traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    assert traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t/x"}) == "https://t/x"
    for bad in ("collector:4318", "http://", "ftp://c/v1", "http://c:99999", "http://c:port"):
        with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
            traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": bad})
    assert provider_name("api.anthropic.com") == "anthropic"
    assert provider_name("bedrock-runtime.us-east-1.amazonaws.com") == "aws.bedrock"


def _turns(client: openai.OpenAI, n: int) -> None:
    messages = [{"role": "system", "content": BIG}, {"role": "user", "content": "hi"}]
    for _ in range(n):
        client.chat.completions.create(model="gpt-5", messages=messages)


@pytest.mark.slow  # starts mitmdump
def test_one_span_per_response_with_genai_attributes(monkeypatch, proxy_factory,
                                                     receiver: Receiver) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-team=blue")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    proxy = proxy_factory(options={"affinity_otel": "true"})
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca))
    client = openai.OpenAI(base_url="https://api.openai.com/v1", api_key="sk-secret-test",
                           max_retries=0)
    _turns(client, 3)
    recs = proxy.wait_records(3)
    spans = receiver.wait_spans(3)
    assert len(spans) == 3, spans
    for span, rec in zip(spans, recs, strict=True):
        a = span["attrs"]
        assert span["resource"]["service.name"] == "affinity" and span["name"] == "chat gpt-5"
        assert span["kind"] == 3  # SPAN_KIND_CLIENT
        assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == "gpt-5"
        assert a["gen_ai.conversation.id"] == rec["affinity_id"]
        assert a["gen_ai.usage.input_tokens"] == rec["usage"]["input_tokens"]
        assert a["gen_ai.usage.output_tokens"] == rec["usage"]["output_tokens"]
        assert a["gen_ai.usage.cache_read.input_tokens"] == rec["usage"]["cache_read_tokens"]
        assert a["gen_ai.usage.cache_creation.input_tokens"] == rec["usage"]["cache_write_tokens"]
        assert a["affinity.verdict"] == rec["miss_reason"]
        assert span["duration_ns"] > 0
    assert spans[-1]["attrs"]["gen_ai.usage.cache_read.input_tokens"] > 0
    assert all(h.get("x-team") == "blue" for h in receiver.headers)
    dump = repr(spans) + repr(receiver.headers)
    assert "sk-secret-test" not in dump and "meticulous" not in dump  # no key, no prompt text


@pytest.mark.slow  # starts mitmdump
def test_unreachable_collector_is_a_warning_and_traffic_flows(monkeypatch, proxy_factory) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    proxy = proxy_factory(options={"affinity_otel": "true"})
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca))
    client = openai.OpenAI(base_url="https://api.openai.com/v1", api_key="sk-test", max_retries=0)
    t0 = time.monotonic()
    _turns(client, 3)
    assert time.monotonic() - t0 < 10
    assert len(proxy.wait_records(3)) == 3
    t0 = time.monotonic()
    out = proxy.stop()
    assert time.monotonic() - t0 < 10  # the shutdown does not wait on the dead collector
    assert "collector" in out and "unreachable" in out


@pytest.mark.slow  # starts mitmdump
def test_malformed_endpoint_stops_startup(tmp_path: Path) -> None:
    env = clean_env() | {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}
    r = subprocess.run([str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(free_port()),
                        "--set", f"confdir={tmp_path}", "-s", str(ADDON),
                        "--set", "affinity_otel=true", *plant_args()],
                       capture_output=True, text=True, timeout=60, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "OTEL_EXPORTER_OTLP_ENDPOINT='collector:4318'" in r.stdout + r.stderr
    check_output(r.stdout + r.stderr, "mitmdump",
                 expect=[re.escape("OTEL_EXPORTER_OTLP_ENDPOINT='collector:4318'")])
