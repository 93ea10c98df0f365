"""Real mitmdump/mitmweb: streaming usage records, scope, CA hints, hot reload, mitmweb views."""

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import httpx2
import openai
import pytest
import trustme

from tests.harness import Proxy

pytestmark = pytest.mark.slow  # every test starts mitmdump or mitmweb

BIG = "You are a meticulous assistant. Follow the house style. " * 200


def sdk_env(monkeypatch, proxy: Proxy) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca))


def claude_turns(client: anthropic.Anthropic, n: int, stream: bool) -> list:
    messages = [{"role": "user", "content": "Plan the refactor."}]
    out = []
    for i in range(n):
        system = [{"type": "text", "text": BIG, "cache_control": {"type": "ephemeral"}}]
        if stream:
            with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, system=system,
                                        messages=messages) as s:
                msg = s.get_final_message()
        else:
            msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, system=system,
                                         messages=messages)
        out.append(msg)
        messages += [{"role": "assistant", "content": msg.content[0].text},
                     {"role": "user", "content": f"next {i}"}]
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_sdk_usage_records_match_upstream(monkeypatch, sim, proxy_factory, stream):
    proxy = proxy_factory(options={"affinity_scope": "all"})
    sdk_env(monkeypatch, proxy)
    client = anthropic.Anthropic(base_url="https://api.anthropic.com", api_key="sk-ant-test-000",
                                 max_retries=0)
    msgs = claude_turns(client, 3, stream)
    recs = proxy.wait_records(3)
    assert len(recs) == 3
    for msg, rec, up in zip(msgs, recs, sim.requests, strict=True):
        u = msg.usage
        assert rec["stream"] is stream and rec["complete"] is True and rec["status"] == 200
        assert rec["api"] == "anthropic" and rec["model"] == "claude-sonnet-4-5"
        assert rec["usage"]["cache_read_tokens"] == u.cache_read_input_tokens == up.usage["cache_read_input_tokens"]
        assert rec["usage"]["cache_write_tokens"] == u.cache_creation_input_tokens
        assert rec["usage"]["input_tokens"] == (u.input_tokens + u.cache_read_input_tokens
                                                + u.cache_creation_input_tokens)
        assert rec["usage"]["output_tokens"] == u.output_tokens
    assert recs[0]["miss_reason"] == "first-write"
    assert recs[1]["miss_reason"] == "hit" and recs[1]["hit_ratio"] > 0.5
    text = proxy.log.read_text()
    assert "sk-ant-test-000" not in text and "meticulous" not in text


def test_openai_stream_usage_and_client_disconnect(monkeypatch, sim, proxy_factory):
    proxy = proxy_factory()
    sdk_env(monkeypatch, proxy)
    client = openai.OpenAI(base_url="https://api.x.ai/v1", api_key="xai-test", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="grok-4", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": BIG}, {"role": "user", "content": "hi"}]))
    final = chunks[-1].usage
    # A client that hangs up mid-stream still gets a record, marked incomplete.
    with httpx2.Client(proxy=proxy.url, verify=str(proxy.ca)) as h, h.stream(
        "POST", "https://api.x.ai/v1/chat/completions",
        headers={"authorization": "Bearer xai-test", "x-sim-event-delay-ms": "400"},
        json={"model": "grok-4", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    ) as r:
        next(r.iter_raw())
    recs = proxy.wait_records(2)
    assert len(recs) == 2
    assert recs[0]["complete"] is True and recs[0]["stream"] is True
    assert recs[0]["usage"]["input_tokens"] == final.prompt_tokens
    assert recs[0]["usage"]["cache_read_tokens"] == final.prompt_tokens_details.cached_tokens
    assert recs[1]["complete"] is False and recs[1]["error"]
    assert recs[1]["affinity_id"]


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"hello from the real server"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def tls_server(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    pem = tmp_path / "other-ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    yield server.server_address[1], pem
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("scope, intercepted", [("rules", False), ("all", True)])
def test_scope_passes_unrelated_tls_through_untouched(proxy_factory, tls_server, scope, intercepted):
    port, other_ca = tls_server
    proxy = proxy_factory(options={"affinity_scope": scope})
    with httpx2.Client(proxy=proxy.url, verify=str(other_ca)) as h:
        if intercepted:  # mitmproxy's certificate: not signed by the server's CA
            with pytest.raises(httpx2.ConnectError):
                h.get(f"https://localhost:{port}/")
        else:  # passed through: the client talks TLS with the real server
            assert h.get(f"https://localhost:{port}/").text == "hello from the real server"


def test_client_without_the_ca_gets_a_hint(proxy_factory):
    proxy = proxy_factory()
    with httpx2.Client(proxy=proxy.url) as h, pytest.raises(httpx2.ConnectError):
        h.post("https://api.x.ai/v1/chat/completions", json={})
    deadline = time.monotonic() + 5
    while "does not trust the mitmproxy CA" not in proxy.output.read_text():
        assert time.monotonic() < deadline, proxy.output.read_text()
        time.sleep(0.1)
    assert "NODE_EXTRA_CA_CERTS=" in proxy.output.read_text()


RULES_A = """
rules:
  - name: grok
    match: {host: api.x.ai}
    set_headers: {x-grok-conv-id: "{affinity_id}"}
"""


def test_rules_hot_reload_and_broken_edit_keeps_last_good(monkeypatch, tmp_path, sim, proxy_factory):
    rules = tmp_path / "live.yaml"
    rules.write_text(RULES_A)
    # The broken edit below is logged as an error on purpose (and must be).
    proxy = proxy_factory(options={"affinity_rules": str(rules)},
                          expect_errors=[r"rules not reloaded, keeping the previous ones: .*"
                                         r"rule 'broken'"])
    sdk_env(monkeypatch, proxy)
    client = openai.OpenAI(base_url="https://api.x.ai/v1", api_key="k", max_retries=0)

    def send() -> dict[str, str]:
        client.chat.completions.create(model="grok-4", messages=[{"role": "user", "content": "hi"}])
        return {k.lower(): v for k, v in sim.requests[-1].headers}

    assert "x-grok-conv-id" in send()
    rules.write_text(RULES_A.replace("x-grok-conv-id", "x-reloaded"))
    deadline = time.monotonic() + 5
    while "x-reloaded" not in send():
        assert time.monotonic() < deadline, "rules were not reloaded"
        time.sleep(0.2)
    rules.write_text(RULES_A + '  - name: broken\n    match: {host: x}\n    set_headers: {"a b": c}\n')
    deadline = time.monotonic() + 5
    while "rules not reloaded" not in proxy.output.read_text():
        assert time.monotonic() < deadline, proxy.output.read_text()
        time.sleep(0.2)
    assert f"{rules}:8: rule 'broken'" in proxy.output.read_text()
    assert "x-reloaded" in send()  # the last good rules still apply


def test_mitmweb_shows_comments_markers_and_the_llm_view(monkeypatch, sim, proxy_factory):
    proxy = proxy_factory(web=True)
    sdk_env(monkeypatch, proxy)
    client = openai.OpenAI(base_url="https://api.openai.com/v1", api_key="sk-test", max_retries=0)
    msgs = [{"role": "system", "content": BIG}, {"role": "user", "content": "hi"}]
    client.chat.completions.create(model="gpt-5.6", messages=msgs)
    client.chat.completions.create(model="gpt-5.6", messages=msgs + [
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}])
    proxy.wait_records(2)
    web = f"http://127.0.0.1:{proxy.web_port}"
    auth = {"Authorization": "Bearer test-token"}
    flows = httpx2.get(f"{web}/flows.json", headers=auth).json()
    llm = [f for f in flows if f["request"]["path"].endswith("/v1/chat/completions")]
    assert len(llm) == 2
    assert llm[0]["comment"].startswith("cache 0 read") and "miss: first-write" in llm[0]["comment"]
    assert llm[0]["marked"]  # a miss: filter with ~marked
    assert "cache " in llm[1]["comment"] and "%" in llm[1]["comment"] and not llm[1]["marked"]
    view = httpx2.get(f"{web}/flows/{llm[1]['id']}/request/content/auto.json", headers=auth).json()
    assert view["view_name"] == "LLM cache (affinity)"
    text = json.dumps(view)
    assert "prompt_cache_key" in text and "messages[0].content" in text
    cmds = httpx2.get(f"{web}/commands.json", headers=auth).json()
    assert "affinity.stats" in cmds
