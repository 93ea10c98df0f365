"""Secrets and privacy: keys, cookies and prompt text never leave the flow.

Recognizable canaries (an Anthropic key in `x-api-key`, an OpenAI project key in
`Authorization: Bearer`, a cookie, a unique string in the system prompt, in the user message
and in the model's reply) go through every code path of a real mitmdump at debug verbosity:
JSON and SSE for each API (anthropic, openai-chat, openai-responses), a conversation whose
prefix changes (so miss verdicts with details are computed), a dry-run proxy, a failing upstream
(500, 429, a reset mid-stream), a client that hangs up mid-stream. None of them may appear in the
JSONL log, the flows' comments and metadata (saved with `-w`, read with FlowReader), the
summary printed at shutdown, `affinity report` (text, --json, --html), or anything else the proxy
printed. Positive controls make sure the canaries really went through (the simulator got them,
the saved flows' bodies hold them, the client got the reply canary).

The canaries are assembled at runtime and are obviously fake, so no scanner flags this file.
"""

import json
import re
import secrets
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mitmproxy import io as mio

from affinity_addon.record.schema import META
from tests.harness import ROOT, Proxy

pytestmark = pytest.mark.slow  # starts mitmdump

TOKEN = secrets.token_hex(6).upper()
ANTHROPIC_KEY = "sk-" + "ant-api03-" + "SECRETKEY" + "CANARY" * 4 + TOKEN
OPENAI_KEY = "sk-" + "proj-" + "SECRET" + "CANARY" * 4 + TOKEN
COOKIE_VALUE = "COOKIE" + "CANARY" * 3 + TOKEN
SYSTEM_CANARY = "SYSTEMPROMPT" + "CANARY" + TOKEN
USER_CANARY = "USERPROMPT" + "CANARY" + TOKEN
REPLY_CANARY = "MODELREPLY" + "CANARY" + TOKEN
CANARIES = {"anthropic key": ANTHROPIC_KEY, "openai key": OPENAI_KEY, "cookie": COOKIE_VALUE,
            "system prompt": SYSTEM_CANARY, "user message": USER_CANARY,
            "model reply": REPLY_CANARY}
# Long enough to be cached, so verdicts and details are computed for the conversation.
SYSTEM = f"You are a careful assistant. {SYSTEM_CANARY}. " + "Follow the house style. " * 300

APIS = {
    "anthropic": ("https://api.anthropic.com/v1/messages", "claude-sonnet-4-5"),
    "openai-chat": ("https://api.openai.com/v1/chat/completions", "gpt-5.6"),
    "xai-chat": ("https://api.x.ai/v1/chat/completions", "grok-4"),
    "openai-responses": ("https://api.openai.com/v1/responses", "gpt-5.6"),
}


def body_for(api: str, model: str, stream: bool, turn: int = 0,
             system: str = SYSTEM) -> dict[str, Any]:
    user = f"Please help. {USER_CANARY}"
    if api == "anthropic":
        msgs: list[dict[str, Any]] = [{"role": "user", "content": user}]
        for i in range(turn):
            msgs += [{"role": "assistant", "content": REPLY_CANARY},
                     {"role": "user", "content": f"more {i} {USER_CANARY}"}]
        return {"model": model, "max_tokens": 64, "stream": stream, "system": system,
                "metadata": {"user_id": f"user_{TOKEN}"}, "messages": msgs}
    if api == "openai-responses":
        items: list[dict[str, Any]] = [{"role": "user", "content": user}]
        for i in range(turn):
            items += [{"role": "assistant", "content": REPLY_CANARY},
                      {"role": "user", "content": f"more {i} {USER_CANARY}"}]
        return {"model": model, "stream": stream, "instructions": system, "input": items}
    chat: list[dict[str, Any]] = [{"role": "system", "content": system},
                                  {"role": "user", "content": user}]
    for i in range(turn):
        chat += [{"role": "assistant", "content": REPLY_CANARY},
                 {"role": "user", "content": f"more {i} {USER_CANARY}"}]
    out: dict[str, Any] = {"model": model, "stream": stream, "messages": chat}
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def headers_for(api: str, **extra: str) -> dict[str, str]:
    h = {"cookie": f"session={COOKIE_VALUE}; theme=dark", "x-sim-reply-text": REPLY_CANARY}
    if api == "anthropic":
        h |= {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    else:
        h["authorization"] = f"Bearer {OPENAI_KEY}"
    return h | extra


def exchange(client: httpx2.Client, api: str, *, stream: bool, turn: int = 0,
             system: str = SYSTEM, hang_up: bool = False, **extra: str) -> tuple[int, bytes]:
    url, model = APIS[api]
    with client.stream("POST", url, json=body_for(api, model, stream, turn, system),
                       headers=headers_for(api, **extra)) as r:
        if hang_up:
            return r.status_code, next(r.iter_raw())  # closing the stream hangs up mid-answer
        try:
            return r.status_code, r.read()
        except httpx2.HTTPError:  # an upstream reset reaches the client as a broken body
            return r.status_code, b""


def drive(proxy: Proxy) -> int:
    """Every code path once; returns how many requests should have a record."""
    n = 0
    trust = ssl.create_default_context(cafile=str(proxy.ca))
    with httpx2.Client(proxy=proxy.url, verify=trust, timeout=30) as client:
        for api in APIS:
            for stream in (False, True):
                for turn in range(2):
                    status, data = exchange(client, api, stream=stream, turn=turn)
                    assert status == 200, data[:300]
                    if api != "openai-responses" or not stream:
                        # (a Responses stream repeats nothing; the reply is in a delta)
                        assert REPLY_CANARY.encode() in data, f"{api} reply canary missing"
                    n += 1
        # The prefix changed: a verdict with a detail about where.
        changed = SYSTEM.replace("careful", "CAREFUL")
        for api in APIS:
            exchange(client, api, stream=True, turn=2, system=changed)
            n += 1
        for fault in ("status=500", "status=429", "reset-after-events=2"):
            for api in ("anthropic", "openai-chat", "openai-responses"):
                exchange(client, api, stream=True, **{"x-sim-fault": fault})
                n += 1
        for api in ("anthropic", "openai-chat"):
            status, first = exchange(client, api, stream=True, hang_up=True,
                                     **{"x-sim-event-delay-ms": "300"})
            assert status == 200 and first
            n += 1
    return n


def report_outputs(log: Path, tmp: Path) -> dict[str, str]:
    html = tmp / "report.html"
    outputs = {}
    for name, extra in (("text", []), ("json", ["--json"]), ("html", ["--html", str(html)])):
        p = subprocess.run([sys.executable, "-m", "affinity_addon", "report", str(log), *extra],
                           capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
        assert p.returncode == 0, p.stderr
        outputs[f"report {name}"] = p.stdout + p.stderr
    outputs["report html file"] = html.read_text()
    assert "claude-sonnet-4-5" in outputs["report text"]  # it did report on these records
    return outputs


# `-v` sets flow_detail=2: mitmdump's own flow dump prints every request header, keys and cookies
# included (mitmproxy's behaviour, not the addon's). Those header lines are all it may show.
DUMPED_HEADER = re.compile(r"^    (cookie|x-api-key|authorization|x-sim-reply-text): .*$", re.M)


def leaks(where: str, text: str) -> list[str]:
    return [f"{name} in {where}" for name, value in CANARIES.items() if value in text]


def saved_flows(path: Path) -> list[Any]:
    with path.open("rb") as f:
        return list(mio.FlowReader(f).stream())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("dry_run", [False, True], ids=["rewrite", "dry-run"])
def test_no_secret_or_prompt_text_leaves_the_flow(sim, proxy_factory, tmp_path, dry_run):
    flows_file = tmp_path / "flows.mitm"
    proxy = proxy_factory(options={"affinity_scope": "all",
                                   "affinity_dry_run": str(dry_run).lower()},
                          extra_args=["-v", "-w", str(flows_file)])
    expected = drive(proxy)
    recs = proxy.wait_records(expected, timeout=20)
    assert len(recs) == expected
    output = proxy.stop()  # prints the shutdown summary
    assert "Per model" in output, "no summary was printed at shutdown"
    assert "Traceback" not in output and "has crashed" not in output

    # Positive controls: the canaries did travel through this proxy.
    up = [r for r in sim.requests if r.provider in ("anthropic", "openai", "xai")]
    assert any(r.header("x-api-key") == ANTHROPIC_KEY for r in up)
    assert any(r.header("authorization") == f"Bearer {OPENAI_KEY}" for r in up)
    assert all(COOKIE_VALUE in (r.header("cookie") or "") for r in up)
    assert all(USER_CANARY.encode() in r.raw_body for r in up)
    flows = saved_flows(flows_file)
    ours = [f for f in flows if META in f.metadata]
    assert len(ours) == expected
    assert any(SYSTEM_CANARY.encode() in (f.request.raw_content or b"") for f in ours)
    assert any(REPLY_CANARY.encode() in (f.response.raw_content or b"")
               for f in ours if f.response)
    assert {r["dry_run"] for r in recs} == {dry_run}
    assert any(r["miss_reason"] == "prefix-changed" and r["miss_detail"] for r in recs)
    assert any(r["complete"] is False and r["error"] for r in recs)
    assert {r["status"] for r in recs} >= {200, 429, 500}

    found = leaks("the JSONL log", proxy.log.read_text())
    dumped = DUMPED_HEADER.findall(output)
    assert len(dumped) >= 3 * expected  # the filter below removes the dump, and only the dump
    found += leaks("the proxy's output", DUMPED_HEADER.sub("", output))
    for f in flows:
        found += leaks(f"flow {f.id} comment", f.comment)
        found += leaks(f"flow {f.id} metadata", json.dumps(f.metadata, default=str))
        found += leaks(f"flow {f.id} marker", str(f.marked))
    for where, text in report_outputs(proxy.log, tmp_path).items():
        found += leaks(where, text)
    assert not found, "\n".join(sorted(set(found)))
