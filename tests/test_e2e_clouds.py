"""Claude on Bedrock and Vertex, and Azure OpenAI, through a real mitmdump with the addon, against
the simulator (which plays bedrock-runtime, bedrock-mantle, Vertex and Azure from their docs).

- Plain scripts that mark nothing, each with a ~6k-token system prompt: Bedrock InvokeModel (the
  anthropic SDK's AnthropicBedrock with a Bedrock API key) and Converse (plain HTTP, a Bearer
  key), Vertex rawPredict (AnthropicVertex), streaming or not: turns 2+ read >= 0.80 of their
  prompt tokens from the cache, and every response has one record whose usage (total input,
  cache read, cache write) is the upstream's.
- A ConverseStream conversation signed with SigV4 arrives byte for byte and succeeds (the
  simulator checks the signature against the bytes it got); its record says why nothing was added.
- Gemini on Vertex and Azure OpenAI: usage recorded; prompt_cache_key only on a GPT-5.6
  deployment.
- No credential (Bedrock key, SigV4 signature and access key, session token, Google token, Azure
  api-key) in the log, a report or the proxy's output.
- A stream's first byte through the proxy is no later than direct + 5 ms.
"""

import hashlib
import json
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import pytest

from affinity_addon.response.eventstream import EventStreamTap, bedrock_frames
from affinity_addon.response.usage import UsageReader
from tests.harness import ROOT, Proxy
from tests.sim import sigv4

pytestmark = pytest.mark.slow

REGION = "us-east-1"
BEDROCK = f"https://bedrock-runtime.{REGION}.amazonaws.com"
VERTEX = "https://us-east5-aiplatform.googleapis.com"
AZURE = "https://res-test.openai.azure.com"
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_MODEL = "claude-sonnet-4-5@20250929"
TURNS = 6

# Canaries, assembled at runtime; obviously fake.
BEDROCK_KEY = "ABSK" + "QmVkcm9ja0FQSUtleS" + "CANARY" * 3
GOOGLE_TOKEN = "ya29." + "a0AfB_byCANARY" + "CANARY" * 3
AZURE_KEY = "0123456789abcdef" + "CANARY" * 3
SESSION_TOKEN = "IQoJb3JpZ2luX2Vj" + "SESSIONCANARY" * 3
ACCESS_KEY = next(iter(sigv4.CREDENTIALS))
SECRET_KEY = sigv4.CREDENTIALS[ACCESS_KEY]

SYSTEM = ("You are the ledger assistant of a small bookkeeping office. Answer in the house "
          "style: short sentences, amounts with two decimals, dates as YYYY-MM-DD. ") * 230


def client(proxy: Proxy, **kw: Any) -> httpx2.Client:
    return httpx2.Client(proxy=proxy.url, verify=ssl.create_default_context(cafile=str(proxy.ca)),
                         timeout=30, **kw)


def question(i: int) -> str:
    return f"Turn {i}: what changed in account {1000 + i} since last week, and why? " * 3


def sim_totals(usage: dict[str, Any]) -> tuple[int, int, int]:
    """(total input, cache read, cache write) from the usage object the simulator sent."""
    if "inputTokens" in usage:  # Converse
        read, write = usage.get("cacheReadInputTokens", 0), usage.get("cacheWriteInputTokens", 0)
        return usage["inputTokens"] + read + write, read, write
    if "cache_read_input_tokens" in usage:  # Anthropic (InvokeModel, Vertex, mantle)
        read = usage["cache_read_input_tokens"]
        write = usage["cache_creation_input_tokens"]
        return usage["input_tokens"] + read + write, read, write
    if "promptTokenCount" in usage:  # Gemini
        return usage["promptTokenCount"], usage.get("cachedContentTokenCount", 0), 0
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    return (usage.get("prompt_tokens", usage.get("input_tokens")), details.get("cached_tokens", 0),
            details.get("cache_write_tokens", 0))


def rec_totals(rec: dict[str, Any]) -> tuple[int, int, int]:
    u = rec["usage"]
    return u["input_tokens"], u["cache_read_tokens"], u["cache_write_tokens"]


def assert_records_match(proxy: Proxy, sim: Any, n: int) -> list[dict[str, Any]]:
    """One record per response, in order, each with the upstream's usage."""
    recs = proxy.wait_records(n, timeout=20)
    assert len(recs) == n, [r.get("path") for r in recs]
    served = [r for r in sim.requests if r.usage is not None]
    assert len(served) == n
    assert [rec_totals(r) for r in recs] == [sim_totals(r.usage) for r in served]
    assert all(r["complete"] and r["usage_problem"] is None for r in recs)
    return recs


def later_hit_ratio(sim: Any, first: int = 1) -> float:
    """Token-weighted read share of the turns from `first` on (0: all turns, turn 1 included)."""
    totals = [sim_totals(r.usage) for r in sim.requests if r.usage is not None][first:]
    return sum(t[1] for t in totals) / sum(t[0] for t in totals)


# --- the conversations -----------------------------------------------------------------------

def invoke_turns(proxy: Proxy, stream: bool) -> Iterator[str]:
    """Bedrock InvokeModel with a Bedrock API key: the anthropic SDK's AnthropicBedrock (its
    stream decoder needs botocore, so the stream goes by plain HTTP: the same request)."""
    http = client(proxy)
    sdk = anthropic.AnthropicBedrock(api_key=BEDROCK_KEY, aws_region=REGION, http_client=http,
                                     max_retries=0)
    messages: list[dict[str, Any]] = []
    for i in range(TURNS):
        messages.append({"role": "user", "content": question(i)})
        if not stream:
            reply = sdk.messages.create(model=SONNET, max_tokens=64, system=SYSTEM,
                                        messages=messages)
            text = reply.content[0].text
        else:
            body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
                    "system": SYSTEM, "messages": messages}
            r = http.post(f"{BEDROCK}/model/{SONNET}/invoke-with-response-stream", json=body,
                          headers={"authorization": f"Bearer {BEDROCK_KEY}"})
            assert r.status_code == 200, r.text[:300]
            assert r.headers["content-type"] == "application/vnd.amazon.eventstream"
            reader = UsageReader("anthropic")
            tap = EventStreamTap(None, bedrock_frames(reader))
            tap(r.content)
            tap(b"")
            assert tap.failed is None and reader.terminal
            text = "ok"
        messages.append({"role": "assistant", "content": text})
        yield text


def converse_turns(proxy: Proxy, stream: bool, signed: bool = False,
                   sent: list[bytes] | None = None) -> Iterator[str]:
    """Bedrock Converse / ConverseStream by plain HTTP, with a Bearer key or signed with SigV4."""
    http = client(proxy)
    messages: list[dict[str, Any]] = []
    op = "converse-stream" if stream else "converse"
    path = f"/model/{SONNET.replace(':', '%3A')}/{op}"
    for i in range(TURNS):
        messages.append({"role": "user", "content": [{"text": question(i)}]})
        body = json.dumps({"system": [{"text": SYSTEM}], "messages": messages,
                           "inferenceConfig": {"maxTokens": 64}}).encode()
        headers = {"Content-Type": "application/json"}
        if signed:
            headers = sigv4.sign("POST", BEDROCK.removeprefix("https://"), path, headers, body,
                                 access_key=ACCESS_KEY, secret=SECRET_KEY, region=REGION,
                                 service="bedrock", session_token=SESSION_TOKEN,
                                 amz_date=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        else:
            headers["Authorization"] = f"Bearer {BEDROCK_KEY}"
        if sent is not None:
            sent.append(body)
        r = http.post(BEDROCK + path, content=body, headers=headers)
        assert r.status_code == 200, r.text[:300]
        if stream:
            reader = UsageReader("bedrock-converse")
            tap = EventStreamTap(None, bedrock_frames(reader))
            tap(r.content)
            tap(b"")
            assert tap.failed is None and reader.terminal and tap.events == 5
            text = "ok"
        else:
            text = r.json()["output"]["message"]["content"][0]["text"]
        messages.append({"role": "assistant", "content": [{"text": text}]})
        yield text


def vertex_turns(proxy: Proxy, stream: bool) -> Iterator[str]:
    sdk = anthropic.AnthropicVertex(region="us-east5", project_id="ledger-prod",
                                    access_token=GOOGLE_TOKEN, http_client=client(proxy),
                                    max_retries=0)
    messages: list[dict[str, Any]] = []
    for i in range(TURNS):
        messages.append({"role": "user", "content": question(i)})
        if stream:
            with sdk.messages.stream(model=VERTEX_MODEL, max_tokens=64, system=SYSTEM,
                                     messages=messages) as s:
                text = s.get_final_text()
        else:
            text = sdk.messages.create(model=VERTEX_MODEL, max_tokens=64, system=SYSTEM,
                                       messages=messages).content[0].text
        messages.append({"role": "assistant", "content": text})
        yield text


SCRIPTS = {"bedrock-invoke": invoke_turns, "bedrock-converse": converse_turns,
           "vertex-rawpredict": vertex_turns}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_plain_scripts_read_their_prompt_from_the_cache(sim, proxy_factory, script: str,
                                                       stream: bool) -> None:
    proxy = proxy_factory()
    assert len(list(SCRIPTS[script](proxy, stream))) == TURNS
    recs = assert_records_match(proxy, sim, TURNS)
    ratio = later_hit_ratio(sim)
    print(f"\n{script} {'stream' if stream else 'json'}: turns 2-{TURNS} read {ratio:.3f} of "
          f"their prompt tokens from the cache, all turns {later_hit_ratio(sim, 0):.3f}")
    assert ratio >= 0.80
    assert all(r["added"]["markers"] and not r["dry_run"] for r in recs)
    assert {r["stream"] for r in recs} == {stream}
    for r in sim.requests:  # never Anthropic's top-level automatic marker on these clouds
        assert "cache_control" not in r.body
    if script == "bedrock-converse":
        assert all(any("cachePoint" in b for b in r.body["system"]) for r in sim.requests)


@pytest.mark.timeout(120)
def test_a_sigv4_signed_conversation_arrives_byte_for_byte(sim, proxy_factory) -> None:
    proxy = proxy_factory()
    sent: list[bytes] = []
    assert len(list(converse_turns(proxy, stream=True, signed=True, sent=sent))) == TURNS
    got = [r for r in sim.requests]
    assert [r.raw_body for r in got] == sent  # the simulator verified each signature too
    assert all(r.status == 200 and r.header("x-amz-security-token") == SESSION_TOKEN for r in got)
    recs = assert_records_match(proxy, sim, TURNS)
    for rec in recs:
        assert rec["rewrite_skipped"] == "signed (aws-sigv4)" and rec["dry_run"]
        assert rec["added"]["markers"]  # what a Bearer request would have been given
        assert rec["api"] == "bedrock-converse" and rec["model"] == SONNET
    assert later_hit_ratio(sim) == 0  # nothing marked, nothing cached: the verdicts say so
    assert {r["miss_reason"] for r in recs} == {"unknown"}
    assert all("no cache marker" in r["miss_detail"] for r in recs)  # judged as sent


@pytest.mark.timeout(120)
def test_gemini_on_vertex_azure_and_mantle_are_recorded(sim, proxy_factory) -> None:
    proxy = proxy_factory()
    http = client(proxy)
    gem = {"systemInstruction": {"parts": [{"text": SYSTEM}]},
           "contents": [{"role": "user", "parts": [{"text": question(0)}]}]}
    base = f"{VERTEX}/v1/projects/ledger-prod/locations/us-east5/publishers/google/models"
    auth = {"authorization": f"Bearer {GOOGLE_TOKEN}"}
    for _ in range(2):
        assert http.post(f"{base}/gemini-2.5-pro:generateContent", json=gem,
                         headers=auth).status_code == 200
    r = http.post(f"{base}/gemini-2.5-pro:streamGenerateContent?alt=sse", json=gem, headers=auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chat = {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question(1)}]}
    for deployment in ("gpt-5.6", "gpt-4.1"):
        r = http.post(f"{AZURE}/openai/deployments/{deployment}/chat/completions"
                      "?api-version=2025-04-01-preview", json=chat, headers={"api-key": AZURE_KEY})
        assert r.status_code == 200, r.text[:200]
    r = http.post(f"{AZURE}/openai/v1/responses", headers={"api-key": AZURE_KEY},
                  json={"model": "gpt-5.6", "instructions": SYSTEM, "input": question(2)})
    assert r.status_code == 200, r.text[:200]
    r = http.post("https://bedrock-mantle.us-east-1.api.aws/anthropic/v1/messages",
                  headers={"authorization": f"Bearer {BEDROCK_KEY}",
                           "anthropic-version": "2023-06-01"},
                  json={"model": "anthropic.claude-sonnet-4-5-20250929-v1:0", "max_tokens": 64,
                        "system": SYSTEM, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text[:200]
    recs = assert_records_match(proxy, sim, 7)
    assert [r["rule"] for r in recs] == ["vertex-gemini"] * 3 + [
        "azure-openai-cache-key", "observe-azure-openai", "azure-openai-cache-key",
        "bedrock-claude"]
    assert [r["model"] for r in recs[:5]] == ["gemini-2.5-pro"] * 3 + ["gpt-5.6", "gpt-4.1"]
    keys = [r.body.get("prompt_cache_key") for r in sim.requests[3:6]]
    assert keys[0] and keys[0].startswith("fam-") and keys[1] is None and keys[2]
    assert recs[6]["added"]["markers"] and recs[1]["usage"]["cache_read_tokens"] > 0


@pytest.mark.timeout(180)
def test_no_credential_reaches_the_log_a_report_or_the_output(sim, proxy_factory,
                                                               tmp_path) -> None:
    proxy = proxy_factory()
    for script in (invoke_turns, vertex_turns):
        for stream in (False, True):
            list(script(proxy, stream))
    signed: list[bytes] = []
    list(converse_turns(proxy, stream=False, signed=True, sent=signed))
    http = client(proxy)
    http.post(f"{AZURE}/openai/deployments/gpt-5.6/chat/completions",
              json={"messages": [{"role": "user", "content": "hi"}]}, headers={"api-key": AZURE_KEY})
    http.post(f"{BEDROCK}/model/{SONNET}/invoke", headers={"authorization": f"Bearer {BEDROCK_KEY}",
                                                           "x-sim-fault": "status=500"},
              json={"anthropic_version": "bedrock-2023-05-31", "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hi"}]})
    n = 4 * TURNS + TURNS + 2
    assert len(proxy.wait_records(n, timeout=30)) == n
    signatures = {r.header("authorization").rsplit("Signature=", 1)[1] for r in sim.requests
                  if (r.header("authorization") or "").startswith("AWS4")}
    assert len(signatures) == TURNS  # the positive control: they did go through
    output = proxy.stop()
    report = subprocess.run([sys.executable, "-m", "affinity_addon", "report", str(proxy.log)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert report.returncode == 0, report.stderr
    canaries = {"bedrock key": BEDROCK_KEY, "google token": GOOGLE_TOKEN, "azure key": AZURE_KEY,
                "session token": SESSION_TOKEN, "access key id": ACCESS_KEY,
                "secret key": SECRET_KEY, **{f"signature {s[:6]}": s for s in signatures}}
    found = [f"{name} in {where}" for where, text in (
        ("the log", proxy.log.read_text()), ("the output", output),
        ("the report", report.stdout + report.stderr)) for name, value in canaries.items()
        if value in text]
    assert not found, found


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["eventstream", "sse"])
def test_first_byte_through_the_proxy_is_within_5_ms_of_direct(sim, proxy_factory,
                                                              kind: str) -> None:
    proxy = proxy_factory()
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "system": SYSTEM,
            "messages": [{"role": "user", "content": question(0)}]}
    if kind == "eventstream":
        where = (f"/model/{SONNET}/invoke-with-response-stream", "bedrock")
        origin, auth = BEDROCK, f"Bearer {BEDROCK_KEY}"
    else:
        where = (f"/v1/projects/p/locations/us-east5/publishers/anthropic/models/{VERTEX_MODEL}"
                 ":streamRawPredict", "vertex")
        origin, auth = VERTEX, f"Bearer {GOOGLE_TOKEN}"
        body["anthropic_version"] = "vertex-2023-10-16"
        body["stream"] = True
    headers = {"authorization": auth, "x-sim-event-delay-ms": "20"}
    via, direct = client(proxy), httpx2.Client(timeout=30)
    targets = {"proxy": (via, origin + where[0]),
               "direct": (direct, f"{sim.url}/p/{where[1]}{where[0]}")}

    def first_byte(name: str) -> float:
        http, url = targets[name]
        start = time.perf_counter()
        with http.stream("POST", url, json=body, headers=headers) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()
            next(chunks)
            took = time.perf_counter() - start
            for _ in chunks:  # the rest of the answer, so the connection can be reused
                pass
        return took

    def quartiles() -> tuple[float, float, str]:
        times: dict[str, list[float]] = {"proxy": [], "direct": []}
        for i in range(22):  # interleaved, after two warm-up rounds (connections, TLS)
            for name in ("direct", "proxy") if i % 2 else ("proxy", "direct"):
                t = first_byte(name)
                if i >= 2:
                    times[name].append(t)
        q = {k: statistics.quantiles(v, n=4) for k, v in times.items()}
        return q["proxy"][0], q["direct"][0], (
            f"direct {q['direct'][0] * 1e3:.1f} / {q['direct'][1] * 1e3:.1f} ms, through the "
            f"proxy {q['proxy'][0] * 1e3:.1f} / {q['proxy'][1] * 1e3:.1f} ms (q25 / median)")

    # The machine is shared (2 cores; other suites run beside this one, which bursts onto the
    # proxy's one event loop more than onto the simulator's threads): the lower quartile is the
    # hop's own cost, the median also the neighbours'. Of it, bare mitmdump with a streaming
    # no-op script takes ~3.3 ms when the machine is quiet, the addon ~0.5-1 ms. A round over
    # the bound is measured again, at most twice.
    seen = []
    for _ in range(3):
        p, d, line = quartiles()
        seen.append(line)
        if p <= d + 0.005:
            break
    print(f"\n{kind}: first byte " + "; ".join(seen))
    assert p <= d + 0.005, seen


@pytest.mark.timeout(120)
def test_a_bad_frame_is_passed_on_untouched_and_recorded_as_a_usage_problem(sim, proxy_factory):
    proxy = proxy_factory()
    http = client(proxy)
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "system": SYSTEM,
            "messages": [{"role": "user", "content": question(0)}]}
    r = http.post(f"{BEDROCK}/model/{SONNET}/invoke-with-response-stream", json=body,
                  headers={"authorization": f"Bearer {BEDROCK_KEY}", "x-sim-fault": "corrupt-event=3"})
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == r.headers["x-sim-body-sha256"]  # as sent
    rec = proxy.wait_records(1)[0]
    assert rec["usage_problem"] == "stream not read: event stream frame 3: message CRC mismatch"
    assert rec["complete"] is False and rec["status"] == 200
