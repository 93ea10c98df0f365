"""Provider-verified verdicts end to end: the official `anthropic` and `openai` SDKs through a
real mitmdump with the shipped rules, into the simulator, which answers cache diagnostics the way
both providers document them (tests/sim/diagnostics.py).

One workload, two interleaved conversations per provider, each turn changing one thing (a tool
reorder, a new system prompt, another model, an edited earlier message, a cache expiry, ...).
Checked: every request names its own conversation's previous response (the simulator's request
log), `provider_diagnosis.result` is what the SDK parsed from the same answer, `agrees` both
ways, the client's own value kept, and `affinity report --json` counting it all. Separate
proxies check `affinity_provider_diagnostics=false` and a provider that refuses the field.
Run with `-s` for the agreement table.

Virtual time (tests/sim/clock_addon.py): each request carries `x-sim-time`, so the proxy and the
simulator see a 6-minute pause as one and the cache expires without waiting.
"""

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from tests.conversations import ANTHROPIC_TOOLS, RESPONSES_TOOLS, big_prompt
from tests.harness import ROOT, Proxy, start_proxy
from tests.sim import SimClock, Simulator

pytestmark = [pytest.mark.slow,
              # the anthropic SDK re-serializes the malformed answer it was given: its warning
              pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")]

T0 = 1_900_000_000.0
CLOCK_ADDON = ROOT / "tests" / "sim" / "clock_addon.py"
ANTHROPIC_HOST, OPENAI_HOST = "api.anthropic.com", "api.openai.com"


@dataclass
class Lab:
    sim: Simulator
    proxy: Proxy
    now: float = T0
    clients: list[httpx2.Client] = field(default_factory=list)
    # One entry per request sent through the proxy, in order: what we expect of it.
    expected: list[dict[str, Any]] = field(default_factory=list)

    def tick(self, seconds: float = 5.0) -> dict[str, str]:
        self.now += seconds
        return {"x-sim-time": f"{self.now:.3f}"}

    def _http(self) -> httpx2.Client:
        h = httpx2.Client(proxy=self.proxy.url,
                          verify=ssl.create_default_context(cafile=str(self.proxy.ca)),
                          timeout=30)
        self.clients.append(h)
        return h

    def anthropic(self, base: str = f"https://{ANTHROPIC_HOST}") -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=base, api_key="sk-ant-test-0", max_retries=0,
                                   http_client=self._http())

    def openai(self, base: str = f"https://{OPENAI_HOST}/v1") -> openai.OpenAI:
        return openai.OpenAI(base_url=base, api_key="sk-test-not-a-real-key", max_retries=0,
                             http_client=self._http())

    def close(self) -> None:
        for c in self.clients:
            c.close()


def new_lab(tmp: Path, sim: Simulator, **options: str) -> Lab:
    proxy = start_proxy(tmp, sim.url, scripts=[CLOCK_ADDON], options=options)
    proxy.log.touch()
    return Lab(sim, proxy)


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(replicas=1, clock=SimClock(T0), seed=0) as s:
        yield s


@pytest.fixture(scope="module")
def lab(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = new_lab(tmp_path_factory.mktemp("provider-diagnostics"), sim)
    try:
        yield lab
    finally:
        lab.close()
        lab.proxy.stop()
        lab.proxy.check()  # an addon error fails the module's tests here


# --- the two providers' conversations ------------------------------------------------------------

class Claude:
    """One Anthropic conversation: the history grows by the reply and a new user turn."""

    def __init__(self, lab: Lab, task: str, *, stream: bool) -> None:
        self.lab, self.stream = lab, stream
        self.client = lab.anthropic()
        self.system = big_prompt(task, 2500)
        self.tools = list(ANTHROPIC_TOOLS)
        self.model = "claude-sonnet-4-6"
        self.messages: list[dict[str, Any]] = [{"role": "user", "content": f"{task}: begin."}]
        self.previous: str | None = None  # the last response id, as the SDK saw it
        self.extra: dict[str, Any] = {}

    def send(self, expect: str | None, agrees: bool | None, *, pause: float = 5.0,
             fault: str | None = None, own: dict[str, Any] | None = None) -> Any:
        headers = self.lab.tick(pause)
        if fault:
            headers["x-sim-fault"] = fault
        kw: dict[str, Any] = dict(model=self.model, max_tokens=64, system=self.system,
                                  tools=self.tools, messages=self.messages,
                                  extra_headers=headers, **self.extra)
        if own is not None:
            kw["diagnostics"] = own
        if self.stream:
            with self.client.messages.stream(**kw) as s:
                msg = s.get_final_message()
        else:
            msg = self.client.messages.create(**kw)
        d = msg.diagnostics  # parsed by the SDK: message_start (SSE) or the JSON body
        said = None if d is None else "pending" if d.cache_miss_reason is None\
            else getattr(d.cache_miss_reason, "type", "(unparsed)")
        compared = own["previous_message_id"] if own is not None else self.previous
        self.lab.expected.append({
            "host": ANTHROPIC_HOST, "link": ("diagnostics", "previous_message_id"),
            "sent": compared, "own": own is not None, "sdk": said,
            "result": expect, "agrees": agrees, "surprise": fault == "diagnosis=tools_changed"})
        assert said == (None if expect == "no-divergence" else expect) or expect is None
        self.previous = msg.id
        self.messages = [*self.messages, {"role": "assistant", "content": msg.content[0].text},
                         {"role": "user", "content": f"Step {len(self.messages) // 2 + 1}: "
                                                     "go on."}]
        return msg


class Gpt:
    """One OpenAI Responses conversation, history managed by the client."""

    def __init__(self, lab: Lab, task: str, *, stream: bool, model: str = "gpt-5.6") -> None:
        self.lab, self.stream, self.model = lab, stream, model
        self.client = lab.openai()
        self.instructions = big_prompt(task, 2500)
        self.tools = list(RESPONSES_TOOLS)
        self.input: list[dict[str, Any]] = [{"role": "user", "content": f"{task}: begin."}]
        self.previous: str | None = None
        self.extra: dict[str, Any] = {}

    def send(self, expect: str | None, agrees: bool | None, *, sent: Any = "previous",
             own: str | None = None, fault: str | None = None) -> Any:
        headers = self.lab.tick()
        if fault:
            headers["x-sim-fault"] = fault
        kw: dict[str, Any] = dict(model=self.model, instructions=self.instructions,
                                  tools=self.tools, input=self.input, extra_headers=headers,
                                  **self.extra)
        if own is not None:
            kw["prompt_cache_options"] = {"comparison_response_id": own}
        if self.stream:
            events = list(self.client.responses.create(**kw, stream=True))
            resp = next(e for e in events if e.type == "response.completed").response
        else:
            resp = self.client.responses.create(**kw)
        d = resp.prompt_cache_diagnostics  # parsed by the SDK
        said = None if d is None else (d.reason if d.type == "cache_miss" else d.type)
        compared = own if own is not None else self.previous if sent == "previous" else sent
        self.lab.expected.append({
            "host": OPENAI_HOST, "link": ("prompt_cache_options", "comparison_response_id"),
            "sent": compared, "own": own is not None, "sdk": said, "result": expect,
            "agrees": agrees, "surprise": False})
        assert said == expect or expect is None
        self.previous = resp.id
        self.input = [*self.input, {"role": "assistant", "content": resp.output_text},
                      {"role": "user", "content": f"Step {len(self.input) // 2 + 1}: go on."}]
        return resp


def run_workload(lab: Lab) -> None:
    a = Claude(lab, "refactor the parser", stream=False)
    b = Claude(lab, "write the changelog", stream=True)
    a.send(None, None)  # opts in; nothing compared
    b.send(None, None)
    a.send("no-divergence", True)  # appended only
    b.send("no-divergence", True)
    a.tools = a.tools[::-1]
    a.send("tools_changed", True)  # a tool reorder
    b.send("no-divergence", True)
    a.system = a.system.replace("House rule 3 ", "House rule 3 (revised) ")
    a.send("system_changed", True)  # the affinity ID (root) changes: the link follows
    b.messages[2] = {"role": "user", "content": "Step 2 (edited): go on."}
    b.send("messages_changed", True)  # an edited earlier message
    a.model = "claude-opus-4-8"
    a.send("model_changed", True)  # a model switch
    a.extra = {"speed": "fast"}
    a.send("model_changed", True)  # "model or speed"
    b.send("no-divergence", True, pause=400.0)  # after the cache expired: ours is ttl-expired
    a.send("pending", None, fault="diagnosis=pending")  # still comparing
    a.send("tools_changed", False, fault="diagnosis=tools_changed")  # a provider surprise
    a.send("cache_evicted", None, fault="diagnosis=cache_evicted")  # a type nobody documents
    a.send(None, None, fault="diagnosis=malformed")  # an API we do not know: no result
    b.send(None, None, fault="diagnosis=malformed")  # ... on message_start: the stream goes on
    a.send("previous_message_not_found", None, own={"previous_message_id": "msg_client_own"})
    a.send("no-divergence", True)  # the link goes on from the client's turn's response

    c = Gpt(lab, "migrate the database", stream=False)
    d = Gpt(lab, "triage the issues", stream=True)
    c.send(None, None, sent=None)  # OpenAI: nothing on a conversation's first request
    d.send(None, None, sent=None)
    c.send("cache_hit", True)
    d.send("cache_hit", True)
    c.tools = c.tools[::-1]  # the {family_key} changes with the tools: OpenAI names the key
    c.send("prompt_cache_key_changed", True)
    d.send("cache_hit", True)
    c.extra = {"reasoning": {"effort": "high"}}
    c.send("reasoning_effort_changed", True)
    d.model = "gpt-5.6-mini"
    d.send("model_changed", True)
    c.send("cache_hit", True)
    c.input[2] = {"role": "user", "content": "Step 2 (edited): go on."}
    c.send("input_changed", True)
    c.send("comparison_response_not_found", None, own="resp_client_own")
    e = Gpt(lab, "older model", stream=False, model="gpt-5.5")
    for _ in range(3):
        e.send(None, None, sent=None)  # gpt-5.5: never
    f = Gpt(lab, "extended retention", stream=False)
    f.extra = {"prompt_cache_retention": "24h"}
    for _ in range(2):
        f.send(None, None, sent=None)  # never next to prompt_cache_retention


@pytest.fixture(scope="module")
def workload(lab: Lab) -> list[dict[str, Any]]:
    before = len(lab.sim.requests)
    run_workload(lab)
    records = lab.proxy.wait_records(len(lab.expected), timeout=20)
    assert len(records) == len(lab.expected)
    requests = lab.sim.requests[before:]
    assert len(requests) == len(lab.expected)
    return [{**exp, "record": rec, "body": req.body}
            for exp, rec, req in zip(lab.expected, records, requests, strict=True)]


def test_every_request_names_its_own_conversations_previous_response(workload) -> None:
    for i, w in enumerate(workload):
        top, key = w["link"]
        body = w["body"]
        if w["sent"] is None and w["host"] == OPENAI_HOST:
            assert "prompt_cache_options" not in body, i  # first turn, gpt-5.5, retention
            assert w["record"]["provider_diagnosis"] is None, i
            continue
        assert body[top][key] == w["sent"], (i, body.get(top))
        assert w["record"]["provider_diagnosis"]["compared_to"] == w["sent"], i
        added = w["record"]["added"]["fields"]
        assert (f"{top}.{key}" in added) is not w["own"], (i, added)
    # The client's own values went out as it sent them, and nothing was added next to them.
    own = [w for w in workload if w["own"]]
    assert [w["body"]["diagnostics"] if w["host"] == ANTHROPIC_HOST else
            w["body"]["prompt_cache_options"] for w in own] == [
        {"previous_message_id": "msg_client_own"}, {"comparison_response_id": "resp_client_own"}]


def test_the_result_is_the_providers_answer_and_agrees_both_ways(workload) -> None:
    for i, w in enumerate(workload):
        said = w["record"]["provider_diagnosis"]
        if said is None:
            continue
        sdk = w["sdk"]
        if w["result"] == "no-divergence":
            assert sdk is None  # the SDK sees null
        elif w["result"] is not None:
            assert sdk == w["result"], i
        assert said["result"] == w["result"], (i, said, w["record"]["miss_reason"])
        assert said["agrees"] is w["agrees"], (i, said, w["record"]["miss_reason"],
                                               w["record"]["miss_detail"])
    assert all(w["record"]["complete"] and w["record"]["usage"] for w in workload)
    expired = next(w for w in workload if w["record"]["miss_reason"] == "ttl-expired")
    assert expired["record"]["provider_diagnosis"]["result"] == "no-divergence"
    assert expired["record"]["provider_diagnosis"]["agrees"] is True


def test_the_report_counts_the_agreement(lab: Lab, workload) -> None:
    r = subprocess.run([sys.executable, "-m", "affinity_addon", "report", str(lab.proxy.log),
                        "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)["provider_agreement"]
    judged = [w for w in workload if w["record"]["provider_diagnosis"]
              and w["record"]["provider_diagnosis"]["result"]]
    assert doc["compared"] == len(judged)
    assert doc["agree"] == sum(w["agrees"] is True for w in judged)
    assert doc["disagree"] == sum(w["agrees"] is False for w in judged) >= 1
    assert doc["pairs"][0]["agrees"] is False
    # Where both see the same thing (all but the provider's surprise), ours fits its answer.
    weighed = [w["record"]["provider_diagnosis"]["agrees"] for w in judged
               if w["agrees"] is not None and not w["surprise"]]
    assert sum(a is True for a in weighed) / len(weighed) >= 0.9
    print("\nagreement on the e2e workload:", {k: doc[k] for k in (
        "compared", "agree", "disagree", "unjudged")})
    for p in doc["pairs"]:
        print(f"  {str(p['agrees']):>5}  {p['source']}: {p['provider']:<28} ours "
              f"{p['ours']:<16} x{p['requests']}")


def test_third_party_hosts_and_the_codex_backend_get_nothing(lab: Lab) -> None:
    before = len(lab.sim.requests)
    router = lab.openai("https://openrouter.ai/api/v1")
    for _ in range(2):
        router.chat.completions.create(model="anthropic/claude-sonnet-4.6", messages=[
            {"role": "user", "content": "hi"}], extra_headers=lab.tick())
        with pytest.raises(openai.NotFoundError):  # the simulator's OpenRouter has no Responses
            router.responses.create(model="openai/gpt-5.6", input="hi",
                                    extra_headers=lab.tick())
    codex = lab.openai("https://chatgpt.com/backend-api/codex")
    for _ in range(2):  # the backend refuses any cache directive: none goes out
        list(codex.responses.create(model="gpt-5.6", input="hi", instructions="Be terse.",
                                    store=False, stream=True, extra_headers=lab.tick()))
    bodies = [r.body for r in lab.sim.requests[before:]]
    assert len(bodies) == 6
    assert all("prompt_cache_options" not in b and "diagnostics" not in b for b in bodies)


def test_off_adds_nothing(sim: Simulator, tmp_path: Path) -> None:
    off = new_lab(tmp_path, sim, affinity_provider_diagnostics="false")
    try:
        before = len(sim.requests)
        a = Claude(off, "switched off", stream=False)
        c = Gpt(off, "switched off too", stream=True)
        for _ in range(2):
            a.send(None, None)
            c.send(None, None)
        bodies = [r.body for r in sim.requests[before:]]
        assert all("diagnostics" not in b and "prompt_cache_options" not in b for b in bodies)
        records = off.proxy.wait_records(4)
        assert [r["provider_diagnosis"] for r in records] == [None] * 4
    finally:
        off.close()
        off.proxy.stop()
    off.proxy.check()


def test_a_refusal_turns_it_off_for_the_host_and_is_logged_once(sim: Simulator,
                                                                 tmp_path: Path) -> None:
    lab = new_lab(tmp_path, sim)
    try:
        before = len(sim.requests)
        a = Claude(lab, "refused", stream=False)
        refuse = {"x-sim-fault": "reject-diagnostics"}  # a 400 for requests with the field
        with pytest.raises(anthropic.BadRequestError):
            a.client.messages.create(model=a.model, max_tokens=64, system=a.system,
                                     messages=a.messages, extra_headers={**lab.tick(), **refuse})
        # From now on nothing is added: the same knob lets the request through.
        a.client.messages.create(model=a.model, max_tokens=64, system=a.system,
                                 messages=a.messages, extra_headers={**lab.tick(), **refuse})
        a.send(None, None)
        bodies = [r.body for r in sim.requests[before:]]
        assert "diagnostics" in bodies[0]
        assert all("diagnostics" not in b for b in bodies[1:]), bodies
        c = Gpt(lab, "not refused", stream=False)  # another host keeps it
        c.send(None, None, sent=None)
        c.send("cache_hit", True)
        assert "comparison_response_id" in sim.requests[-1].body["prompt_cache_options"]
    finally:
        lab.close()
        out = lab.proxy.stop()
    lab.proxy.check()  # the refusal is a warning, not an addon error
    refusals = [line for line in out.splitlines() if "refused the cache diagnostics" in line]
    assert len(refusals) == 1, out
    assert "diagnostics: Extra inputs are not permitted" in refusals[0]
