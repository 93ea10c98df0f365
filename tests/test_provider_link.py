"""Provider cache diagnostics, the request side (request/provider_link.py and the rewrite's step):
which request names which previous response, where, and where never; with the shipped rules."""

import copy
import json
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from affinity_addon.catalog.diagnostics import default_diagnostics, parse_diagnostics
from affinity_addon.catalog.yamlsource import TableError
from affinity_addon.request.provider_link import LinkKeys, ResponseLinks
from affinity_addon.request.rewrite import Outcome, apply_rules
from affinity_addon.request.rules import RuleSet, default_rules_file, load_rules, parse_rules

KEY = "provider-link-test-key-0123456789"
TOOLS = [{"name": f"tool{i}", "description": f"does {i}", "input_schema": {"type": "object"}}
         for i in range(3)]


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_rules(default_rules_file())


@pytest.fixture
def links() -> ResponseLinks:
    return ResponseLinks(default_diagnostics())


def claude(turns: int, *, first: str = "fix the bug", system: str = "You are careful.",
           tools: list[dict[str, Any]] = TOOLS, model: str = "claude-sonnet-4-6",
           edit: int | None = None, **extra: Any) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": first}]
    for i in range(turns):
        msgs.append({"role": "assistant", "content": f"answer {i}"})
        msgs.append({"role": "user", "content": f"go on {i}" + (" (edited)" if i == edit
                                                                 else "")})
    return {"model": model, "max_tokens": 64, "system": system, "tools": tools,
            "messages": msgs, **extra}


def responses(turns: int, *, first: str = "fix the bug", model: str = "gpt-5.6",
              **extra: Any) -> dict[str, Any]:
    items: list[dict[str, Any]] = [{"role": "user", "content": first}]
    for i in range(turns):
        items += [{"role": "assistant", "content": f"answer {i}"},
                  {"role": "user", "content": f"go on {i}"}]
    return {"model": model, "instructions": "Be terse.", "input": items, **extra}


class Agent:
    """Sends requests through `apply_rules` and settles each one's response id, as the
    recorder does."""

    def __init__(self, rules: RuleSet, links: ResponseLinks) -> None:
        self.rules, self.links, self.n = rules, links, 0

    def send(self, body: dict[str, Any], host: str = "api.anthropic.com",
             path: str = "/v1/messages", headers: dict[str, str] | None = None,
             dry_run: bool = False, answer: bool = True) -> tuple[dict[str, Any], Outcome, str]:
        request = tutils.treq(method=b"POST", host=host, port=443, scheme=b"https",
                              authority=b"", path=path.encode(),
                              content=json.dumps(body).encode(),
                              headers=http.Headers(content_type="application/json",
                                                   **(headers or {})))
        result = apply_rules(self.rules, request, secret=KEY, dry_run=dry_run, links=self.links)
        assert result is not None
        out = result[0]
        self.n += 1
        rid = f"msg_{self.n:04d}" if "anthropic" in host else f"resp_{self.n:04d}"
        if out.link is not None and answer:
            out.link.settle(rid)
        return json.loads(request.content or b"{}"), out, rid


def previous_message_id(sent: dict[str, Any]) -> Any:
    return sent["diagnostics"]["previous_message_id"]


def test_anthropic_links_each_conversation_to_its_own_previous_response(rules, links) -> None:
    agent = Agent(rules, links)
    a1, out, ra1 = agent.send(claude(0))
    assert previous_message_id(a1) is None  # the first request opts in
    assert out.diagnostics is not None and out.diagnostics.to_json() == {
        "source": "anthropic", "compared_to": None, "by": "proxy"}
    assert out.fields["diagnostics.previous_message_id"] is None
    assert out.body_write == "splice"  # a new top-level key: every other byte as sent
    assert {k: v for k, v in a1.items() if k != "diagnostics"} == claude(0)
    b1, _, rb1 = agent.send(claude(0, first="write the docs"))
    assert previous_message_id(b1) is None
    a2, _, ra2 = agent.send(claude(1))
    b2, _, rb2 = agent.send(claude(1, first="write the docs"))
    assert (previous_message_id(a2), previous_message_id(b2)) == (ra1, rb1)
    # A tool reorder, an edited later message, a new system prompt, another model: the same
    # conversation, so each names the one before.
    steps = [claude(2, tools=TOOLS[::-1]), claude(3, tools=TOOLS[::-1], edit=1),
             claude(4, tools=TOOLS[::-1], edit=1, system="You are careful. Today is Tuesday."),
             claude(5, tools=TOOLS[::-1], edit=1, system="You are careful. Today is Tuesday.",
                    model="claude-opus-4-8")]
    prev = ra2
    for body in steps:
        sent, out, rid = agent.send(body)
        assert previous_message_id(sent) == prev, body["model"]
        assert out.diagnostics is not None and out.diagnostics.compared_to == prev
        prev = rid
    b3, _, _ = agent.send(claude(2, first="write the docs"))
    assert previous_message_id(b3) == rb2


def test_side_requests_under_one_session_are_threads_of_their_own(rules, links) -> None:
    agent = Agent(rules, links)
    session = {"x-claude-code-session-id": "7f1c2a9e-session"}
    _, _, main1 = agent.send(claude(0), headers=session)
    title, _, t1 = agent.send(claude(0, first="Summarize this in 5 words", system="Titles.",
                                     tools=[]), headers=session)
    assert previous_message_id(title) is None  # a new thread: nothing to compare with
    main2, _, main2_id = agent.send(claude(1), headers=session)
    assert previous_message_id(main2) == main1
    # The main thread's system prompt changes: its first message still finds it.
    main3, _, _ = agent.send(claude(2, system="New rules."), headers=session)
    assert previous_message_id(main3) == main2_id
    title2, _, _ = agent.send(claude(1, first="Summarize this in 5 words", system="Titles.",
                                     tools=[]), headers=session)
    assert previous_message_id(title2) == t1


def test_a_conversations_first_request_continues_nothing(rules, links) -> None:
    agent = Agent(rules, links)
    agent.send(claude(3))
    # Same first message, a new conversation (one message): never linked to the other one.
    sent, _, _ = agent.send(claude(0, system="Another agent."))
    assert previous_message_id(sent) is None


def test_the_clients_own_value_is_kept_and_recorded(rules, links) -> None:
    agent = Agent(rules, links)
    own = {"previous_message_id": "msg_client_own"}
    sent, out, _ = agent.send(claude(1, diagnostics=own))
    assert sent["diagnostics"] == own and "field:diagnostics" in out.kept
    assert "diagnostics.previous_message_id" not in out.fields
    assert out.diagnostics is not None and out.diagnostics.to_json() == {
        "source": "anthropic", "compared_to": "msg_client_own", "by": "client"}
    sent, out, _ = agent.send(claude(1, first="x", diagnostics=None))  # null counts as set
    assert sent["diagnostics"] is None and out.diagnostics is not None
    assert out.diagnostics.by == "client" and out.diagnostics.compared_to is None


def test_openai_from_the_second_request_on_gpt_5_6_and_later(rules, links) -> None:
    agent = Agent(rules, links)
    host, path = "api.openai.com", "/v1/responses"
    first, out, r1 = agent.send(responses(0), host, path)
    assert "prompt_cache_options" not in first and out.diagnostics is None
    second, out, r2 = agent.send(responses(1), host, path)
    assert second["prompt_cache_options"] == {"comparison_response_id": r1}
    assert out.diagnostics is not None and out.diagnostics.compared_to == r1
    # Inside the client's own options object, which stays as it was otherwise.
    third, _, _ = agent.send(responses(2, prompt_cache_options={"mode": "explicit"}), host, path)
    assert third["prompt_cache_options"] == {"mode": "explicit", "comparison_response_id": r2}
    # Later models too; the model switch stays in the conversation.
    fourth, _, _ = agent.send(responses(3, model="gpt-6-astra"), host, path)
    assert "comparison_response_id" in fourth["prompt_cache_options"]


@pytest.mark.parametrize("model", ["gpt-5.5", "gpt-5.5-pro", "gpt-4.1", "gpt-5"])
def test_openai_older_models_get_nothing(rules, links, model: str) -> None:
    agent = Agent(rules, links)
    for turns in range(3):
        sent, out, _ = agent.send(responses(turns, model=model), "api.openai.com",
                                  "/v1/responses")
        assert "prompt_cache_options" not in sent and out.diagnostics is None


def test_openai_never_next_to_prompt_cache_retention(rules, links) -> None:
    agent = Agent(rules, links)
    host, path = "api.openai.com", "/v1/responses"
    agent.send(responses(0, prompt_cache_retention="24h"), host, path)
    sent, out, _ = agent.send(responses(1, prompt_cache_retention="24h"), host, path)
    assert "prompt_cache_options" not in sent and out.diagnostics is None
    # The client's own options object next to it is the client's choice: it is added to.
    sent, _, _ = agent.send(responses(2, prompt_cache_retention="24h",
                                      prompt_cache_options={"mode": "implicit"}), host, path)
    assert "comparison_response_id" in sent["prompt_cache_options"]


@pytest.mark.parametrize("host, path, body", [
    ("openrouter.ai", "/api/v1/messages", claude(1, model="anthropic/claude-sonnet-4.6")),
    ("openrouter.ai", "/api/v1/responses", responses(1, model="openai/gpt-5.6")),
    ("api.z.ai", "/api/anthropic/v1/messages", claude(1, model="glm-5")),
    ("api.deepseek.com", "/anthropic/v1/messages", claude(1, model="claude-sonnet-4-6")),
    ("chatgpt.com", "/backend-api/codex/responses", responses(1, stream=True, store=False)),
    ("api.openai.com", "/v1/chat/completions", {"model": "gpt-5.6", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "go"}]}),
])
def test_never_on_other_hosts_or_apis(rules, links, host: str, path: str,
                                      body: dict[str, Any]) -> None:
    agent = Agent(rules, links)
    for _ in range(2):
        sent, out, _ = agent.send(copy.deepcopy(body), host, path)
        assert "diagnostics" not in sent and "prompt_cache_options" not in sent
        assert out.diagnostics is None and out.link is None


def test_never_on_clouds_even_when_a_rule_matches(links) -> None:
    cloud = parse_rules({"rules": [{"name": "bedrock", "match": {
        "host": ["bedrock-runtime.us-east-1.amazonaws.com", "*-aiplatform.googleapis.com"]},
        "cache_control": {"strategy": "agent"}}]})
    agent = Agent(cloud, links)
    for host, path in (("bedrock-runtime.us-east-1.amazonaws.com", "/anthropic/v1/messages"),
                       ("us-east5-aiplatform.googleapis.com", "/v1/projects/p/locations/"
                        "us-east5/publishers/anthropic/models/claude:rawPredict")):
        sent, out, _ = agent.send(claude(1), host, path)
        assert "diagnostics" not in sent and out.diagnostics is None


def test_a_refusing_host_gets_nothing_more(rules, links) -> None:
    agent = Agent(rules, links)
    agent.send(claude(0))
    assert links.refuse("api.anthropic.com", "diagnostics: Extra inputs are not permitted")
    assert not links.refuse("API.anthropic.com", "again")  # logged once
    sent, out, _ = agent.send(claude(1))
    assert "diagnostics" not in sent and out.diagnostics is None
    # The link is still kept: the client's own field is recorded as before.
    sent, out, _ = agent.send(claude(2, diagnostics={"previous_message_id": None}))
    assert out.diagnostics is not None and out.diagnostics.by == "client"


def test_dry_run_computes_but_sends_nothing(rules, links) -> None:
    agent = Agent(rules, links)
    sent, out, _ = agent.send(claude(0), dry_run=True)
    assert "diagnostics" not in sent
    assert out.fields["diagnostics.previous_message_id"] is None  # what it would have added
    assert out.diagnostics is None  # nothing asked: nothing to record


def test_off_when_no_links_are_given(rules) -> None:
    request = tutils.treq(method=b"POST", host="api.anthropic.com", port=443, scheme=b"https",
                          authority=b"", path=b"/v1/messages",
                          content=json.dumps(claude(0)).encode(),
                          headers=http.Headers(content_type="application/json"))
    result = apply_rules(rules, request, secret=KEY)
    assert result is not None and result[0].diagnostics is None
    assert "diagnostics" not in json.loads(request.content or b"{}")


def test_a_response_id_is_read_when_the_next_request_needs_it(links) -> None:
    keys = LinkKeys("conv", "root", "open", True)
    thread, prev = links.link(keys)
    assert prev is None
    state = {"id": None, "done": False}
    resolver = lambda: (state["id"], state["done"])  # noqa: E731
    links.answering(thread, resolver)
    # Still streaming and no id yet (a parallel request): the older link stands.
    assert links.link(keys)[1] is None
    links.answering(thread, resolver)
    state.update(id="msg_early", done=True)
    again, prev = links.link(keys)
    assert again is thread and prev == "msg_early" and thread.pending is None
    # A later request took the thread's place: the earlier response's late record changes
    # nothing.
    later = lambda: ("msg_later", True)  # noqa: E731
    links.answering(thread, later)
    thread.answered(resolver, "msg_stale")
    assert thread.pending is later
    thread.answered(later, "msg_later")
    assert thread.previous() == "msg_later"


def test_the_map_is_bounded_and_holds_no_text() -> None:
    links = ResponseLinks(default_diagnostics(), capacity=50)
    for i in range(500):
        thread, _ = links.link(LinkKeys(f"conv{i}", f"root{i}", f"open{i}", True))
        thread.settle("msg_" + "x" * 500)  # not an id: never kept
        assert thread.response_id is None
        thread.settle(f"msg_{i}")
    assert len(links) == 50 and len(links._openings) <= 50
    assert links.link(LinkKeys("conv499", "root499", "open499", True))[1] == "msg_499"
    assert links.link(LinkKeys("conv0", "root0", "open0", False))[1] is None  # forgotten


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["sources"][0].pop("answer"), "needs"),
    (lambda d: d["sources"][0]["request"].update(first="yes"), "true or false"),
    (lambda d: d["sources"][1].update(models={"from": "gpt"}), "no version"),
    (lambda d: d["sources"][0]["request"].update(link="a..b"), "dotted"),
    (lambda d: d["sources"].append(copy.deepcopy(d["sources"][0])), "unique"),
])
def test_catalog_errors_name_the_entry(mutate, message: str) -> None:
    from affinity_addon.catalog.diagnostics import DIAGNOSTICS_FILE
    from affinity_addon.catalog.yamlsource import load_yaml

    data = copy.deepcopy(load_yaml(DIAGNOSTICS_FILE))
    mutate(data)
    with pytest.raises(TableError, match=message):
        parse_diagnostics(data)
