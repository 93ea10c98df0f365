"""GPT-5.6+ breakpoints on api.openai.com: the planner writes OpenAI's `prompt_cache_breakpoint`
on Chat and Responses content parts, from catalog/providers.yaml `breakpoint_dialects`.

Checked against the simulator's reading of OpenAI's guide (tests/sim: a marker on an unsupported
part is a 400) and against the rule: at most 4 writes a request with the implicit one, never over
the client's own, never on older models or the Codex backend.
"""

import copy
import json
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tutils

from affinity_addon.apis import OPENAI_CHAT, OPENAI_RESPONSES
from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.providers import parse_provider_facts
from affinity_addon.diagnosis.fingerprint import fingerprint
from affinity_addon.request.breakpoint_spec import (
    CACHE_CONTROL,
    PlanHint,
    markers_for,
    parse_cache_control,
)
from affinity_addon.request.breakpoints import plan_breakpoints, strip_added
from affinity_addon.request.prompt import canonical
from affinity_addon.request.rewrite import apply_rules
from affinity_addon.request.rules import default_rules_file, load_rules, parse_rules
from tests.conversations import OPENCLAW_TRAILER
from tests.sim.engine import _misplaced_breakpoint
from tests.sim.providers import resolve

BP = "prompt_cache_breakpoint"
MARK = {"mode": "explicit"}
OPENAI = markers_for("api.openai.com", "gpt-5.6")
AGENT = parse_cache_control(True)
FILL = parse_cache_control({"client_markers": "fill"})
BIG = "lorem ipsum dolor sit amet " * 400  # ~2,700 tokens by the estimate
CHAT_PARTS = resolve("openai", "/v1/chat/completions", "gpt-5.6")
RESPONSES_PARTS = resolve("openai", "/v1/responses", "gpt-5.6")


def sim_rejects(body: dict[str, Any], api: str) -> str | None:
    """Where the simulator (OpenAI's guide) would answer 400, None when it takes the body."""
    route = CHAT_PARTS if api == OPENAI_CHAT else RESPONSES_PARTS
    assert route is not None and route.behaviour.breakpoint_parts is not None
    return _misplaced_breakpoint(body, route.behaviour.breakpoint_parts)


def marked(body: Any, path: str = "") -> list[str]:
    """Paths of the dicts that carry a breakpoint (written independently of the planner)."""
    out: list[str] = []
    if isinstance(body, dict):
        if BP in body:
            out.append(path)
        for k, v in body.items():
            out += marked(v, f"{path}.{k}" if path else k)
    elif isinstance(body, list):
        for i, v in enumerate(body):
            out += marked(v, f"{path}[{i}]")
    return out


def chat(turns: int, model: str = "gpt-5.6") -> dict[str, Any]:
    """OpenClaw on Chat Completions at turn `turns + 1`: strings, then its trailer."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": BIG},
                                  {"role": "user", "content": "hi"}]
    for i in range(turns):
        msgs += [{"role": "assistant", "content": f"answer {i}"},
                 {"role": "user", "content": f"step {i}"}]
    msgs.append({"role": "user", "content": [{"type": "text", "text": OPENCLAW_TRAILER}]})
    return {"model": model, "messages": msgs}


def responses(turns: int, model: str = "gpt-5.6") -> dict[str, Any]:
    items: list[dict[str, Any]] = [{"role": "user", "content": "hi " + BIG}]
    for i in range(turns):
        items += [{"type": "function_call", "call_id": f"c{i}", "name": "read", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": f"c{i}", "output": f"out {i}"},
                  {"role": "assistant", "content": f"answer {i}"},
                  {"role": "user", "content": f"step {i}"}]
    items.append({"role": "user", "content": [{"type": "input_text", "text": OPENCLAW_TRAILER}]})
    return {"model": model, "instructions": "Be careful. " * 50, "input": items}


def test_the_catalog_names_gpt_5_6_and_later_on_api_openai_com_only():
    assert OPENAI is not None and OPENAI.key == BP and OPENAI.implicit
    for model in ("gpt-5.6", "gpt-5.6-sol-2026-07-09", "openai/gpt-5.6-luna", "gpt-5.7", "gpt-6"):
        assert markers_for("api.openai.com", model) is OPENAI, model
    for model in ("gpt-5.5", "gpt-5.5-pro", "gpt-5", "gpt-4.1", "o3", "gpt-5.60", None):
        assert markers_for("api.openai.com", model) is None, model  # nothing at all
    # other hosts take cache_control where a rule asks for markers
    assert markers_for("openrouter.ai", "anthropic/claude-sonnet-4.5") is CACHE_CONTROL
    assert markers_for("chatgpt.com", "gpt-5.6") is CACHE_CONTROL  # the rewrite skips it


def test_chat_rolling_breakpoint_skips_the_trailer():
    body = chat(3)
    before = copy.deepcopy(body)
    added = plan_breakpoints(body, OPENAI_CHAT, "gpt-5.6", AGENT, markers=OPENAI)
    msgs = body["messages"]
    # the newest real user message (the rolling spot), the one before the last reply (where
    # the previous request's was) and the end of the system prompt; never the trailer
    assert [m.path for m in added] == ["messages[0].content[0]", "messages[5].content[0]",
                                       "messages[7].content[0]"]
    assert all(m.converted and m.ttl == "30m" for m in added)
    assert msgs[7]["content"] == [{"type": "text", "text": "step 2", BP: MARK}]
    assert msgs[0]["content"] == [{"type": "text", "text": BIG, BP: MARK}]
    assert BP not in msgs[8]["content"][0]
    assert all(isinstance(msgs[i]["content"], str) for i in (2, 4, 6))  # assistants untouched
    assert "cache_control" not in json.dumps(body) and sim_rejects(body, OPENAI_CHAT) is None
    # the same prompt: a string and a one-part text list hash alike
    assert [canonical(m["content"][0] if isinstance(m["content"], list) else m["content"])
            for m in msgs[:8]] == [canonical(m["content"]) for m in before["messages"][:8]]
    strip_added(body, added)
    assert body == before


def test_responses_marks_input_text_and_leaves_instructions_and_items_alone():
    body = responses(2)
    before = copy.deepcopy(body)
    added = plan_breakpoints(body, OPENAI_RESPONSES, "gpt-5.6", AGENT, markers=OPENAI)
    items = body["input"]
    # the newest user message and the one before the last reply (the previous request's)
    assert [m.path for m in added] == ["input[4].content[0]", "input[8].content[0]"]
    assert items[8]["content"] == [{"type": "input_text", "text": "step 1", BP: MARK}]
    assert body["instructions"] == before["instructions"]  # a string with no part to mark
    for i, item in enumerate(items[:-1]):
        if i not in (4, 8):
            assert item == before["input"][i]  # calls, outputs, assistant strings as sent
    assert sim_rejects(body, OPENAI_RESPONSES) is None
    strip_added(body, added)
    assert body == before


@pytest.mark.parametrize(("make", "api", "reread"), [
    (chat, OPENAI_CHAT, "messages[5].content[0]"),
    (responses, OPENAI_RESPONSES, "input[8].content[0]")])
def test_with_the_previous_request_it_reads_where_that_one_wrote(make, api, reread):
    # The tracker's hint: the block digests of the request as sent (markers and all). The
    # string the client sends again hashes like the part the planner made of it, so the spot
    # the previous request wrote at is found again, the trailer it had at its end notwithstanding.
    sent = make(2)
    first = plan_breakpoints(sent, api, "gpt-5.6", AGENT, markers=OPENAI)
    assert first[-1].path == reread
    hint = PlanHint((fingerprint(sent, api, None).plan_digests(),))
    nxt = make(3)
    added = plan_breakpoints(nxt, api, "gpt-5.6", AGENT, hint, markers=OPENAI)
    assert reread in [m.path for m in added] and len(added) <= 3
    assert sim_rejects(nxt, api) is None


def test_at_most_four_writes_with_the_implicit_one_and_never_over_the_clients():
    for body, api in ((chat(3), OPENAI_CHAT), (responses(3), OPENAI_RESPONSES)):
        added = plan_breakpoints(body, api, "gpt-5.6", AGENT, markers=OPENAI)
        assert 1 <= len(added) <= 3 == OPENAI.writes - 1
        # planning again finds the markers and adds nothing (idempotent)
        assert plan_breakpoints(body, api, "gpt-5.6", AGENT, markers=OPENAI) == []
    # a client that places its own, or turns the implicit one off, keeps its plan
    own = chat(3)
    own["messages"][0]["content"] = [{"type": "text", "text": BIG, BP: MARK}]
    assert plan_breakpoints(copy.deepcopy(own), OPENAI_CHAT, "gpt-5.6", AGENT,
                            markers=OPENAI) == []
    off = chat(3) | {"prompt_cache_options": {"mode": "explicit"}}
    assert plan_breakpoints(off, OPENAI_CHAT, "gpt-5.6", AGENT, markers=OPENAI) == []
    # `client_markers: fill` fills free writes only: 4 - the implicit one - the client's one
    added = plan_breakpoints(own, OPENAI_CHAT, "gpt-5.6", FILL, markers=OPENAI)
    assert len(added) == 2 and own["messages"][0]["content"][0][BP] == MARK
    assert len(marked(own)) == 3
    # without the implicit breakpoint four explicit ones may be written
    off = chat(3) | {"prompt_cache_options": {"mode": "explicit"}}
    assert len(plan_breakpoints(off, OPENAI_CHAT, "gpt-5.6", FILL, markers=OPENAI)) == 3
    assert len(marked(off)) == 3  # rolling, previous spot, system: all there is to mark


def test_too_short_a_prefix_gets_no_breakpoint():
    body = {"model": "gpt-5.6", "messages": [{"role": "system", "content": "Be terse."},
                                             {"role": "user", "content": "hi"}]}
    assert plan_breakpoints(body, OPENAI_CHAT, "gpt-5.6", AGENT, markers=OPENAI) == []


# --- through the shipped rules ------------------------------------------------------------------

def send(body: dict[str, Any], host: str = "api.openai.com", path: str = "/v1/chat/completions",
         rules: Any = None) -> tuple[dict[str, Any], Any]:
    request = tutils.treq(method=b"POST", host=host, port=443, scheme=b"https", authority=b"",
                          path=path.encode(), content=json.dumps(body).encode(),
                          headers=http.Headers(content_type="application/json"))
    result = apply_rules(rules or load_rules(default_rules_file()), request, secret="k" * 32)
    assert result is not None
    return json.loads(request.content or b"{}"), result[0]


def test_shipped_rules_mark_gpt_5_6_and_nothing_else():
    sent, out = send(chat(2))
    assert "openai-breakpoints" in out.rules and len(out.markers) == 3
    assert {m["ttl"] for m in out.markers} == {"30m"} and len(marked(sent)) == 3
    sent, out = send(responses(2), path="/v1/responses")
    assert len(out.markers) == 2 and sim_rejects(sent, OPENAI_RESPONSES) is None
    for older in ("gpt-5.5", "gpt-4.1", "o3"):
        sent, out = send(chat(2, older))
        assert out.markers == [] and marked(sent) == [], older
        assert sent["messages"] == chat(2, older)["messages"]


def test_never_on_the_codex_backend_whatever_a_rule_says():
    rules = parse_rules(yaml.safe_load("""
rules:
  - name: mine
    match: {host: chatgpt.com}
    cache_control: agent
"""))
    body = responses(2) | {"stream": True, "store": False}
    sent, out = send(body, host="chatgpt.com", path="/backend-api/codex/responses", rules=rules)
    assert out.markers == [] and sent == body


# --- every plan is one the API takes ------------------------------------------------------------

_TEXT = st.text(alphabet="abc ", min_size=0, max_size=30).map(lambda t: t + " " + "x" * 600)
_CHAT_PART = st.one_of(
    _TEXT.map(lambda t: {"type": "text", "text": t}),
    st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
    st.just({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
    st.just({"type": "file", "file": {"file_id": "file-1"}}))
_CHAT_MSG = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c},
              st.sampled_from(["system", "developer", "user", "tool"]),
              st.one_of(_TEXT, st.lists(_CHAT_PART, min_size=1, max_size=3))),
    st.builds(lambda c: {"role": "assistant", "content": c}, _TEXT),
    st.just({"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}),
    st.just({"role": "assistant", "content": None,
             "tool_calls": [{"id": "c", "type": "function",
                             "function": {"name": "f", "arguments": "{}"}}]}),
    st.just({"role": "user", "content": [{"type": "text", "text": OPENCLAW_TRAILER}]}))
_RESP_PART = st.one_of(
    _TEXT.map(lambda t: {"type": "input_text", "text": t}),
    st.just({"type": "input_image", "image_url": "data:image/png;base64,AAAA"}),
    st.just({"type": "input_file", "file_id": "file-1"}))
_RESP_ITEM = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c},
              st.sampled_from(["system", "developer", "user"]),
              st.one_of(_TEXT, st.lists(_RESP_PART, min_size=1, max_size=3))),
    st.builds(lambda c: {"role": "assistant", "content": c}, _TEXT),
    st.builds(lambda t: {"type": "message", "role": "assistant",
                         "content": [{"type": "output_text", "text": t}]}, _TEXT),
    st.just({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}),
    st.builds(lambda t: {"type": "function_call_output", "call_id": "c", "output": t}, _TEXT),
    st.just({"type": "reasoning", "id": "rs_1", "summary": []}))


@given(st.one_of(
    st.lists(_CHAT_MSG, min_size=1, max_size=12).map(
        lambda m: (OPENAI_CHAT, {"model": "gpt-5.6", "messages": m})),
    st.lists(_RESP_ITEM, min_size=1, max_size=12).map(
        lambda m: (OPENAI_RESPONSES, {"model": "gpt-5.6", "instructions": "x" * 5000,
                                      "input": m}))),
    st.sampled_from([AGENT, FILL]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_plan_is_accepted_and_undone(case, spec):
    api, body = case
    body = json.loads(json.dumps(body))  # st.just() shares dicts; a JSON body never does
    before = copy.deepcopy(body)
    added = plan_breakpoints(body, api, "gpt-5.6", spec, markers=OPENAI)
    assert len(added) <= 3 and len(marked(body)) == len(added)
    assert sim_rejects(body, api) is None, json.dumps(body)[:500]
    assert "cache_control" not in json.dumps(body)
    msgs = body["messages" if api == OPENAI_CHAT else "input"]
    for m in marked(body):  # on a content part of a role that takes one, never an assistant's
        found = re.fullmatch(r"\w+\[(\d+)\]\.content\[\d+\]", m)
        assert found, m
        assert msgs[int(found.group(1))].get("role") in ("system", "developer", "user", "tool")
    last = msgs[-1]
    if isinstance(last.get("content"), list) and last["content"][-1].get("text") == OPENCLAW_TRAILER:
        assert BP not in last["content"][-1]  # a trailer at the end never carries one
    strip_added(body, added)
    assert body == before


def test_catalog_dialects_are_checked(tmp_path):
    base = yaml.safe_load(catalog_file("providers.yaml").read_text())
    good = base["breakpoint_dialects"][0]
    for bad, reason in (
            ({k: v for k, v in good.items() if k != "writes"}, "needs exactly"),
            (good | {"writes": 0}, "writes must be a positive integer"),
            (good | {"implicit_off": {"field": "a..b", "value": "x"}}, "implicit_off"),
            (good | {"apis": {"openai-chat": {"parts": ["text"]}}}, "apis.openai-chat")):
        p = tmp_path / "providers.yaml"
        p.write_text(yaml.safe_dump({**base, "breakpoint_dialects": [bad]}))
        with pytest.raises(ValueError, match=reason) as e:
            parse_provider_facts(p)
        assert str(e.value).startswith(f"{p}:")
