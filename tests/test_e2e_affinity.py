"""Real mitmdump + the addon between the official openai SDK and a recording upstream."""

import json
import re

import openai
import pytest

from tests.harness import Proxy

pytestmark = pytest.mark.slow  # every test starts mitmdump

SYSTEM = "You are a careful coding agent. " * 40


def conversation(client: openai.OpenAI, model: str, topic: str, turns: int = 3) -> None:
    messages = [{"role": "system", "content": SYSTEM + topic},
                {"role": "user", "content": f"Let's talk about {topic}."}]
    for i in range(turns):
        r = client.chat.completions.create(model=model, messages=messages)
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": f"Tell me more ({i})."}]


def regular_client(monkeypatch, proxy: Proxy, base_url: str) -> openai.OpenAI:
    # The way an agent is pointed at the proxy: HTTPS_PROXY plus the CA for its runtime.
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca))
    return openai.OpenAI(base_url=base_url, api_key="sk-test-not-a-real-key", max_retries=0)


def test_regular_mode_grok_gets_one_conv_id_per_conversation(monkeypatch, sim, proxy_factory):
    proxy = proxy_factory()
    client = regular_client(monkeypatch, proxy, "https://api.x.ai/v1")
    conversation(client, "grok-4", "rust")
    conversation(client, "grok-4", "python")
    reqs = sim.requests
    assert len(reqs) == 6 and all(r.provider == "xai" for r in reqs)
    ids = [r.header("x-grok-conv-id") for r in reqs]
    assert all(ids), ids
    assert len(set(ids[:3])) == 1 and len(set(ids[3:])) == 1 and ids[0] != ids[3]
    # Same conversation, same backend replica: that is what the header is for.
    assert len({r.replica for r in reqs[:3]}) == 1
    # The key reached upstream untouched, and the body was not rewritten for this rule.
    assert all(r.header("authorization") == "Bearer sk-test-not-a-real-key" for r in reqs)
    assert all("prompt_cache_key" not in r.body for r in reqs)


def test_regular_mode_openai_prompt_cache_key_and_client_key_kept(monkeypatch, sim, proxy_factory):
    proxy = proxy_factory()
    client = regular_client(monkeypatch, proxy, "https://api.openai.com/v1")
    conversation(client, "gpt-5.6", "go", turns=2)
    client.chat.completions.create(model="gpt-5.6", prompt_cache_key="mine-1",
                                   messages=[{"role": "user", "content": "hi"}])
    keys = [r.body.get("prompt_cache_key") for r in sim.requests]
    assert keys[0] and keys[0] == keys[1] and keys[2] == "mine-1"


def test_reverse_mode_responses_api(sim, proxy_factory):
    proxy = proxy_factory(mode="reverse:https://api.openai.com")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-not-a-real-key", max_retries=0)
    ids = []
    for topic in ("a", "a", "b"):
        client.responses.create(model="gpt-5.6", instructions=SYSTEM + topic, input="hello")
    for r in sim.requests:
        assert r.path == "/v1/responses"
        ids.append(r.body["prompt_cache_key"])
    assert ids[0] == ids[1] != ids[2]  # one key per prompt family ({family_key})
    recs = proxy.wait_records(3)
    affs = [rec["affinity_id"] for rec in recs]
    assert affs[0] == affs[1] != affs[2] and all(i.startswith("fam-") for i in ids)


def test_dry_run_sends_nothing_changed(monkeypatch, sim, proxy_factory):
    proxy = proxy_factory(options={"affinity_dry_run": "true"})
    client = regular_client(monkeypatch, proxy, "https://api.x.ai/v1")
    conversation(client, "grok-4", "dry", turns=2)
    assert all(r.header("x-grok-conv-id") is None for r in sim.requests)
    recs = proxy.wait_records(2)
    assert len(recs) == 2 and all(rec["dry_run"] for rec in recs)
    assert recs[0]["added"]["headers"]["x-grok-conv-id"] == recs[1]["affinity_id"]


def test_unmatched_hosts_pass_through_untouched(monkeypatch, sim, proxy_factory):
    # Decrypt everything (scope "all") to see that an unmatched host's request is untouched;
    # by default its TLS would not even be opened (test_e2e_proxy.py).
    proxy = proxy_factory(options={"affinity_scope": "all"})
    client = regular_client(monkeypatch, proxy, "https://llm.unlisted.test/v1")
    body = {"model": "some-model", "messages": [{"role": "user", "content": "hi"}]}
    client.chat.completions.create(**body)
    (r,) = sim.requests
    assert json.loads(r.raw_body) == body
    assert not [h for h, _ in r.headers if h.lower().startswith(("x-grok", "session"))]
    assert proxy.records() == []


@pytest.mark.parametrize("args, message", [
    (["--set", "affinity_dry_run=maybe"], "Cannot parse option affinity_dry_run"),
    (["--set", "affinity_rulez=x.yaml"], "unknown option(s): affinity_rulez"),
    (["--set", "affinity_rules=/nonexistent/rules.yaml"], "Cannot load affinity_rules: /nonexistent/rules.yaml: cannot read"),
])
def test_bad_options_stop_startup(tmp_path, args, message):
    import subprocess

    from tests.addon_errors import check_output, plant_args
    from tests.harness import ADDON, MITMDUMP
    r = subprocess.run([str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", "0",
                        "--set", f"confdir={tmp_path}", "-s", str(ADDON), *args, *plant_args()],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert message in r.stdout + r.stderr
    check_output(r.stdout + r.stderr, "mitmdump", expect=[re.escape(message)])


def test_reverse_mode_with_a_tls_client(sim, proxy_factory):
    # The client speaks TLS to the reverse proxy with its own SNI ("localhost"): the rules are
    # about the upstream, so the connection must still be intercepted and rewritten.
    import httpx2

    proxy = proxy_factory(mode="reverse:https://api.x.ai")
    client = openai.OpenAI(base_url=f"https://localhost:{proxy.port}/v1", api_key="k", max_retries=0,
                           http_client=httpx2.Client(verify=str(proxy.ca)))
    conversation(client, "grok-4", "tls", turns=2)
    ids = [r.header("x-grok-conv-id") for r in sim.requests]
    assert ids[0] and ids[0] == ids[1]
