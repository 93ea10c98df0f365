"""Every miss verdict, triggered on purpose through a real mitmdump + the simulator.

One proxy and one simulator serve the whole module; each scenario is a separate conversation
(distinct prompts, so distinct conversation keys and cache entries), runs once however the tests
are selected, and keeps the records it produced. The last test feeds the JSONL the module wrote
to `python -m affinity_addon report --json`.

`ttl-expired` is driven in-process (the addons of `addon.py` under `mitmproxy.test.taddons`,
with the simulator's real responses attached to the flows): the simulator's clock can be moved,
but the addon measures the gap between the flows' `timestamp_start` (wall time through
mitmdump), and a real gap above the TTL (5 minutes for Anthropic markers) is too long for a test; in-process, turn 1's
flow can say it started 400 s ago. `response-cache` runs both ways: through mitmdump, where
modify_headers adds `X-OpenRouter-Cache-Status: HIT` (the simulator never sends it) but the
usage is the simulator's, and in-process with the zero usage OpenRouter really reports. The
in-process addon writes to the mitmdump process's JSONL file (append mode, one write per line),
so the report sees every verdict.
"""

import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.mitm.config import DEFAULT_RULES
from tests.conversations import CHAT_TOOLS, big_prompt
from tests.driver import Affinity
from tests.harness import ROOT, Proxy, start_proxy
from tests.sim import SimClock, Simulator

pytestmark = pytest.mark.slow  # the module starts mitmdump

# OpenRouter's response cache, played by mitmdump's own modify_headers: it sets response
# headers in `responseheaders`, before the addon reads them in `response`, on the replies to
# requests that carry this test header only.
REPLAY = "x-test-response-cache"
RESPONSE_CACHE_HIT = ["--modify-headers", f"/~s & ~hq {REPLAY}/x-openrouter-cache-status/HIT"]
# Marks the turns sent while the affinity header is not added (only to find them again).
DROPPED = "x-test-dropped"


@dataclass
class Lab:
    sim: Simulator
    proxy: Proxy
    log: Path
    rules: Path
    done: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    clients: list[httpx2.Client] = field(default_factory=list)

    def verify(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.proxy.ca))

    def openai(self, host: str, path: str = "/v1") -> openai.OpenAI:
        h = openai.DefaultHttpxClient(proxy=self.proxy.url, verify=self.verify())
        self.clients.append(h)
        return openai.OpenAI(base_url=f"https://{host}{path}", api_key="sk-test-not-a-real-key",
                             max_retries=0, http_client=h)

    def anthropic(self) -> anthropic.Anthropic:
        h = anthropic.DefaultHttpxClient(proxy=self.proxy.url, verify=self.verify())
        self.clients.append(h)
        return anthropic.Anthropic(base_url="https://api.anthropic.com", api_key="sk-ant-test-0",
                                   max_retries=0, http_client=h)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def run(self, name: str) -> list[dict[str, Any]]:
        """The records of scenario `name`, running it first if no test has yet."""
        if name not in self.done:
            before = len(self.records())
            sent = SCENARIOS[name](self)
            deadline = time.monotonic() + 10
            while len(self.records()) < before + sent and time.monotonic() < deadline:
                time.sleep(0.05)
            recs = self.records()[before:]
            assert len(recs) == sent, (name, len(recs), sent)
            self.done[name] = recs
        return self.done[name]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    sim = Simulator(replicas=4, clock=SimClock(1_000_000.0), seed=0)
    sim.start()
    try:
        tmp = tmp_path_factory.mktemp("verdicts")
        rules = tmp / "rules.yaml"
        rules.write_text(DEFAULT_RULES.read_text())
        proxy = start_proxy(tmp / "proxy", sim.url, options={"affinity_rules": str(rules)},
                            extra_args=RESPONSE_CACHE_HIT)
        try:
            proxy.log.touch()
            lab = Lab(sim, proxy, proxy.log, rules)
            yield lab
            for c in lab.clients:
                c.close()
        finally:
            proxy.stop()
    finally:
        sim.stop()
    proxy.check()  # fails the module's last test: the addon logged an error somewhere in it


def reasons(recs: list[dict[str, Any]]) -> list[str]:
    return [r["miss_reason"] for r in recs]


# --- scenarios: each sends one conversation and returns how many records it expects -----------

def chat_turns(client: openai.OpenAI, model: str, turns: list[list[dict[str, Any]]],
               **kw: Any) -> None:
    for messages in turns:
        client.chat.completions.create(model=model, messages=messages, **kw)


def history(system: str, n: int, big_at: int | None = None) -> list[dict[str, Any]]:
    """system + n user/assistant exchanges, ending with a user message. `big_at`: the exchange
    whose user message is a large pasted file (an agent's tool output)."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for i in range(n):
        text = f"Step {i}: go on."
        if i == big_at:
            text = "Here is the file:\n" + big_prompt(f"pasted file {i}", 2500)
        msgs.append({"role": "user", "content": text})
        if i < n - 1:
            msgs.append({"role": "assistant", "content": "ok"})
    return msgs


def normal(lab: Lab) -> int:
    system = big_prompt("normal conversation")
    chat_turns(lab.openai("api.openai.com"), "gpt-5.6",
               [history(system, n) for n in (1, 2, 3)])
    return 3


def tools_reordered(lab: Lab) -> int:
    system = "You are the tools agent."
    turns = [history(system, n, big_at=0) for n in (1, 2, 3)]
    client = lab.openai("api.openai.com")
    for i, messages in enumerate(turns):
        # Turn 3 sends the same tools in another order (tools precede every message).
        tools = CHAT_TOOLS if i < 2 else CHAT_TOOLS[::-1]
        client.chat.completions.create(model="gpt-5.6", messages=messages, tools=tools)
    return 3


def message_inserted(lab: Lab) -> int:
    # Short system and first exchange, then a large tool output: an insertion before it leaves
    # a common prefix below the 1024-token minimum, so nothing can be read.
    system = "You are the insertion agent."
    turns = [history(system, n, big_at=1) for n in (2, 3, 4)]
    last = turns[-1]
    turns[-1] = last[:3] + [{"role": "user", "content": "(a reminder injected mid-history)"}] \
        + last[3:]
    chat_turns(lab.openai("api.openai.com"), "gpt-5.6", turns)
    return 3


def below_minimum(lab: Lab) -> int:
    chat_turns(lab.openai("api.openai.com"), "gpt-5.6",
               [history("You are terse.", n) for n in (1, 2)])
    return 2


def reload_rules(lab: Lab, text: str) -> None:
    """Save a rules file and wait until the running proxy has reloaded it."""
    def reloads() -> int:
        return lab.proxy.output.read_text(errors="replace").count("affinity: reloaded")

    before = reloads()
    lab.rules.write_text(text)
    # A distinct mtime even on coarse-grained filesystems: the watcher compares mtimes.
    stamp = time.time() + before + 1
    os.utime(lab.rules, (stamp, stamp))
    deadline = time.monotonic() + 15
    while reloads() == before:
        assert time.monotonic() < deadline, lab.proxy.output.read_text(errors="replace")
        time.sleep(0.1)


def routed_away(lab: Lab) -> int:
    # xAI routes a conversation by x-grok-conv-id, else at random over 4 servers. Three turns
    # through the shipped rules, then the xai-chat rule loses its header (hot reload: the rule
    # still matches, so the turns are still observed), and turns go out without the header
    # until one lands on a server without the prefix. The simulator's routing is seeded, so
    # this is deterministic; 10 tries would all land on the warm server with odds 4^-10.
    client = lab.openai("api.x.ai")
    system = big_prompt("routed away")
    shipped = lab.rules.read_text()
    rules = yaml.safe_load(shipped)
    (xai,) = [r for r in rules["rules"] if r["name"] == "xai-chat"]
    del xai["set_headers"]
    sent = 0
    for n in range(1, 4):
        client.chat.completions.create(model="grok-4", messages=history(system, n))
        sent += 1
    reload_rules(lab, yaml.safe_dump(rules, sort_keys=False))
    try:
        for n in range(4, 14):
            client.chat.completions.create(model="grok-4", messages=history(system, n),
                                           extra_headers={DROPPED: "1"})
            sent += 1
            if lab.sim.requests[-1].usage["prompt_tokens_details"]["cached_tokens"] == 0:
                break
    finally:
        reload_rules(lab, shipped)
    return sent


def response_cache_e2e(lab: Lab) -> int:
    # The same request twice; the second answer comes "from OpenRouter's response cache".
    client = lab.openai("openrouter.ai", "/api/v1")
    msgs = history(big_prompt("response cache e2e"), 1)
    client.chat.completions.create(model="openai/gpt-5.6", messages=msgs)
    client.chat.completions.create(model="openai/gpt-5.6", messages=msgs,
                                   extra_headers={REPLAY: "1"})
    return 2


DATE = "Today's date: Mon Nov 23 2026"
NEXT_DATE = "Today's date: Tue Nov 24 2026"


def opencode_system(date: str) -> str:
    return (big_prompt("opencode") + "\nHere is some useful information about the environment "
            "you are running in:\n<env>\n  Working directory: /home/dev/project\n  Is directory "
            f"a git repo: yes\n  Platform: linux\n  {date}\n</env>")


def date_change_anthropic(lab: Lab) -> int:
    # opencode's Anthropic provider: session headers, markers on system[0] and the last two
    # messages, the date inside the system prompt. Turn 3 runs past midnight.
    client = lab.anthropic()
    session = "ses_0date0change0anthropic"
    headers = {"x-session-affinity": session, "x-session-id": session}
    eph = {"type": "ephemeral"}
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Plan the refactor."}]
    for turn in range(3):
        system = [{"type": "text", "text": opencode_system(DATE if turn < 2 else NEXT_DATE),
                   "cache_control": eph}]
        sent = json.loads(json.dumps(msgs))
        for m in sent[-2:]:
            m["content"] = [{"type": "text", "text": m["content"], "cache_control": eph}]
        client.messages.create(model="claude-sonnet-4-6", max_tokens=64, system=system,
                               messages=sent, extra_headers=headers)
        msgs += [{"role": "assistant", "content": "ok"},
                 {"role": "user", "content": f"Step {turn}: go on."}]
    return 3


def date_change_openai(lab: Lab) -> int:
    # opencode's OpenAI-compatible provider: session headers, no cache fields, date in system.
    client = lab.openai("api.openai.com")
    session = "ses_0date0change0openai"
    headers = {"x-session-affinity": session, "x-session-id": session}
    for turn, n in enumerate((1, 2, 3)):
        msgs = history(opencode_system(DATE if turn < 2 else NEXT_DATE), n)
        client.chat.completions.create(model="gpt-5.6", messages=msgs, extra_headers=headers)
    return 3


# --- in-process scenarios: the addon class, fed the simulator's real responses -----------------

def in_process(lab: Lab, sim: Simulator, host: str, path: str,
               bodies: list[tuple[dict[str, Any], float]],
               respond: Callable[[int, httpx2.Response], http.Response] | None = None,
               between: Callable[[int], None] | None = None) -> int:
    """Send each (body, request start time) through the addons in-process and then to
    `sim`, attaching the simulator's reply (or `respond(i, reply)`) to the flow."""
    addon = Affinity()
    with taddons.context(*addon.addons) as tctx, httpx2.Client(timeout=30) as h:
        tctx.configure(addon.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(lab.log),
                       affinity_summary=False)
        for i, (body, started) in enumerate(bodies):
            if between:
                between(i)
            f = tflow.tflow(req=tutils.treq(
                method=b"POST", host=host, port=443, scheme=b"https", authority=b"",
                path=path.encode(), content=json.dumps(body).encode(),
                headers=http.Headers(content_type="application/json",
                                     authorization="Bearer sk-test")))
            f.request.timestamp_start = started
            addon.request(f)
            provider = {"api.anthropic.com": "anthropic", "openrouter.ai": "openrouter"}[host]
            r = h.post(f"{sim.url}/p/{provider}{path}", content=f.request.content,
                       headers={k: v for k, v in f.request.headers.items()
                                if k.lower() != "content-length"})
            assert r.status_code == 200, r.text
            f.response = respond(i, r) if respond else tutils.tresp(
                headers=http.Headers(content_type=r.headers["content-type"]), content=r.content)
            addon.responseheaders(f)
            addon.response(f)
        tctx.configure(addon.bundle, affinity_log="")  # close the file before the report reads it
    return len(bodies)


def ttl_expired(lab: Lab) -> int:
    # A plain Anthropic SDK body (the addon adds the markers, 5m TTL). The simulator's clock
    # moves 400 s between the turns so its cache entry expires; the addon sees the same gap
    # because turn 1's flow says it started 400 s ago.
    sim = Simulator(replicas=1, clock=SimClock(5_000.0), seed=0)
    gap = 400.0
    messages = [{"role": "user", "content": "Plan the refactor."}]
    body1 = {"model": "claude-sonnet-4-6", "max_tokens": 64, "system": big_prompt("ttl gap"),
             "messages": messages}
    body2 = dict(body1, messages=messages + [{"role": "assistant", "content": "ok"},
                                             {"role": "user", "content": "Go on."}])
    now = time.time()
    with sim:
        return in_process(lab, sim, "api.anthropic.com", "/v1/messages",
                          [(body1, now - gap), (body2, now)],
                          between=lambda i: sim.clock.advance(gap) if i == 1 else None)


def response_cache(lab: Lab) -> int:
    # OpenRouter's response cache answers an identical request itself: zero usage and
    # `X-OpenRouter-Cache-Status: HIT`. Turn 2 repeats turn 1 and gets turn 1's reply that way.
    sim = Simulator(replicas=1, clock=SimClock(), seed=0)
    body = {"model": "openai/gpt-5.6", "messages": [
        {"role": "system", "content": big_prompt("response cache")},
        {"role": "user", "content": "Same question again."}]}
    first: list[bytes] = []

    def respond(i: int, r: httpx2.Response) -> http.Response:
        if i == 0:
            first.append(r.content)
            return tutils.tresp(headers=http.Headers(content_type="application/json",
                                                     x_openrouter_cache_status="MISS"),
                                content=r.content)
        cached = json.loads(first[0])
        cached["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                           "cost": 0}
        return tutils.tresp(headers=http.Headers(content_type="application/json",
                                                 x_openrouter_cache_status="HIT"),
                            content=json.dumps(cached).encode())

    now = time.time()
    with sim:
        return in_process(lab, sim, "openrouter.ai", "/api/v1/chat/completions",
                          [(body, now - 1), (body, now)], respond=respond)


SCENARIOS: dict[str, Callable[[Lab], int]] = {
    "normal": normal,
    "tools-reordered": tools_reordered,
    "message-inserted": message_inserted,
    "below-minimum": below_minimum,
    "routed-away": routed_away,
    "response-cache-e2e": response_cache_e2e,
    "date-change-anthropic": date_change_anthropic,
    "date-change-openai": date_change_openai,
    "ttl-expired": ttl_expired,
    "response-cache": response_cache,
}


# --- the tests -----------------------------------------------------------------------------------

def test_first_write_then_hits(lab):
    recs = lab.run("normal")
    assert reasons(recs) == ["first-write", "hit", "hit"]
    assert recs[0]["miss_detail"].startswith("new conversation")
    assert all(r["hit_ratio"] > 0.9 for r in recs[1:])
    assert len({r["affinity_id"] for r in recs}) == 1


def test_reordered_tools_change_the_prefix(lab):
    recs = lab.run("tools-reordered")
    assert reasons(recs) == ["first-write", "hit", "prefix-changed"]
    assert recs[2]["usage"]["cache_read_tokens"] == 0
    assert recs[2]["miss_detail"].startswith("tools-reordered: tools reordered (4 definitions")


def test_inserted_message_names_its_index(lab):
    recs = lab.run("message-inserted")
    assert reasons(recs) == ["first-write", "hit", "prefix-changed"]
    assert recs[2]["usage"]["cache_read_tokens"] == 0
    assert recs[2]["miss_detail"] == \
        "message-inserted: 1 message(s) inserted at messages[3]", recs[2]["miss_detail"]


def test_short_prompt_is_below_minimum(lab):
    recs = lab.run("below-minimum")
    assert reasons(recs) == ["below-minimum", "below-minimum"]
    assert "below the 1024-token minimum" in recs[1]["miss_detail"]


def test_dropped_affinity_header_is_routed_away(lab):
    recs = lab.run("routed-away")
    assert reasons(recs[:3]) == ["first-write", "hit", "hit"]
    dropped = recs[3:]
    assert all(r["added"]["headers"] == {} for r in dropped)
    # The header really was missing upstream, and the simulator routed those turns at random.
    got = [r.header("x-grok-conv-id") for r in lab.sim.requests if r.header(DROPPED)]
    assert len(got) == len(dropped) and not any(got)
    assert dropped[-1]["usage"]["cache_read_tokens"] == 0
    assert dropped[-1]["miss_reason"] == "routed-away", dropped[-1]
    assert "previously cached, yet nothing read" in dropped[-1]["miss_detail"]
    assert "no affinity ID reached the provider" in dropped[-1]["miss_detail"]
    assert set(reasons(dropped[:-1])) <= {"hit"}


def test_date_change_in_system_prompt_anthropic(lab):
    recs = lab.run("date-change-anthropic")
    assert reasons(recs[:2]) == ["first-write", "hit"]
    assert recs[2]["usage"]["cache_read_tokens"] == 0
    assert recs[2]["miss_reason"] == "prefix-changed", recs[2]
    m = re.search(r"system\[0\]\.text changed at ~char (\d+)", recs[2]["miss_detail"])
    assert m, recs[2]["miss_detail"]
    where = opencode_system(DATE).index(DATE) + len("Today's date: ")
    assert where - 256 < int(m.group(1)) <= where


def test_date_change_in_system_prompt_openai(lab):
    recs = lab.run("date-change-openai")
    assert reasons(recs[:2]) == ["first-write", "hit"]
    assert recs[2]["miss_reason"] == "prefix-changed", recs[2]
    # GPT-5.6: the shipped rules mark the end of the system prompt, which turns its string into
    # one text part (the same prompt): the path names the part as sent
    m = re.search(r"messages\[0\]\.content(?:\[0\]\.text)? changed at ~char (\d+)",
                  recs[2]["miss_detail"])
    assert m, recs[2]["miss_detail"]
    where = opencode_system(DATE).index(DATE) + len("Today's date: ")
    assert where - 256 < int(m.group(1)) <= where


def test_records_name_the_host_and_path_the_client_used(lab):
    recs = lab.run("normal")
    assert {(r["host"], r["path"]) for r in recs} == {("api.openai.com", "/v1/chat/completions")}


def test_ttl_gap_expires_the_cache(lab):
    recs = lab.run("ttl-expired")
    assert reasons(recs) == ["first-write", "ttl-expired"]
    assert recs[1]["usage"]["cache_read_tokens"] == 0 and recs[1]["usage"]["cache_write_tokens"]
    m = re.fullmatch(r"(\d+) s since the previous request, above the 300 s TTL",
                     recs[1]["miss_detail"])
    assert m and 400 <= int(m.group(1)) < 460, recs[1]["miss_detail"]


def test_openrouter_response_cache_header_through_mitmdump(lab):
    recs = lab.run("response-cache-e2e")
    assert reasons(recs) == ["first-write", "response-cache"]
    assert recs[1]["response_cache"] is True and recs[0]["response_cache"] is False
    assert recs[1]["miss_detail"] == "served from the OpenRouter response cache (zero usage)"


def test_openrouter_response_cache_is_not_a_miss(lab):
    recs = lab.run("response-cache")
    assert reasons(recs) == ["first-write", "response-cache"]
    assert recs[1]["response_cache"] is True and recs[0]["response_cache"] is False


def test_report_counts_every_reason(lab):
    for name in SCENARIOS:
        lab.run(name)
    logged = Counter(reasons(lab.records()))
    for reason in ("hit", "first-write", "prefix-changed", "ttl-expired", "routed-away",
                   "below-minimum", "response-cache"):
        assert logged[reason] >= 1, logged
    r = subprocess.run([sys.executable, "-m", "affinity_addon", "report", str(lab.log), "--json"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["input"]["records"] == sum(logged.values()) and doc["input"]["malformed"] == 0
    by_reason = {b["key"]: b["requests"] for b in doc["by_reason"]}
    assert by_reason == dict(logged), (by_reason, logged)
    misses = {m["reason"]: m["requests"] for m in doc["total"]["miss_reasons"]}
    # Hits and response-cache answers are not misses; every other verdict is one.
    assert misses == {k: n for k, n in logged.items() if k not in ("hit", "response-cache")}
    assert doc["total"]["response_cache"] == logged["response-cache"]
