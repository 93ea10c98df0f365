"""Claude Code on Anthropic-compatible endpoints of other providers: the shipped rules, the
`remove_blocks` action on the billing block, the host-aware diagnosis, and usage as those
endpoints report it."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import tutils

from affinity_addon.catalog.profiles import HONOURED, IGNORED, UNKNOWN, parse_profiles, profile_for
from affinity_addon.catalog.volatile import default_volatile
from affinity_addon.diagnosis.blockprint import IGNORED as IGNORED_BLOCK
from affinity_addon.diagnosis.tracker import MissTracker
from affinity_addon.record.schema import Usage
from affinity_addon.request.actions import RemoveBlock
from affinity_addon.request.removal import remove_blocks
from affinity_addon.request.rewrite import Outcome, apply_rules
from affinity_addon.request.rules import RuleSet, load_rules, parse_rules
from affinity_addon.response.usage import UsageReader

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = load_rules(ROOT / "rules" / "default.yaml")
KEY = "k" * 32
BILLING = "x-anthropic-billing-header: cc_version=2.1.197.14a; cc_entrypoint=cli;"
SYSTEM = "You are Claude Code, Anthropic's official CLI for Claude."
TOOLS = [{"name": f"Tool{i}", "description": "does things " * 40,
          "input_schema": {"type": "object", "properties": {}}} for i in range(3)]

# Each shipped Anthropic-compatible endpoint: (host, path).
ENDPOINTS = [
    ("api.deepseek.com", "/anthropic/v1/messages"),
    ("api.deepseek.com", "/anthropic/messages"),
    ("api.moonshot.ai", "/anthropic/v1/messages"),
    ("api.moonshot.cn", "/anthropic/v1/messages"),
    ("api.kimi.com", "/coding/v1/messages"),
    ("api.z.ai", "/api/anthropic/v1/messages"),
    ("open.bigmodel.cn", "/api/anthropic/v1/messages"),
    ("api.minimax.io", "/anthropic/v1/messages"),
    ("api.minimaxi.com", "/anthropic/v1/messages"),
    ("dashscope-intl.aliyuncs.com", "/apps/anthropic/v1/messages"),
    ("dashscope.aliyuncs.com", "/apps/anthropic/v1/messages"),
]


def claude_code_body(first: str = "Refactor the parser", marker_on_billing: bool = False,
                     turns: int = 0) -> dict[str, Any]:
    """A request as Claude Code 2.1.197 sends it: the billing block first in `system`, its own
    markers on the last two system blocks and on the newest user message."""
    billing: dict[str, Any] = {"type": "text", "text": BILLING}
    if marker_on_billing:
        billing["cache_control"] = {"type": "ephemeral"}
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": first}]}]
    for i in range(turns):
        messages += [{"role": "assistant", "content": [{"type": "text", "text": f"a{i} " * 50}]},
                     {"role": "user", "content": [{"type": "text", "text": f"q{i} " * 50}]}]
    messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return {"model": "claude-sonnet-4-5", "max_tokens": 32, "stream": True, "tools": TOOLS,
            "system": [billing, {"type": "text", "text": SYSTEM},
                       {"type": "text", "text": "Be careful. " * 300,
                        "cache_control": {"type": "ephemeral"}}],
            "messages": messages}


def send(rules: RuleSet, body: dict[str, Any], host: str, path: str = "/anthropic/v1/messages",
         dry_run: bool = False) -> tuple[http.Request, Outcome | None, bytes]:
    raw = json.dumps(body).encode()
    request = tutils.treq(method=b"POST", host=host, port=443, scheme=b"https", authority=b"",
                          path=path.encode(), content=raw,
                          headers=http.Headers(content_type="application/json"))
    result = apply_rules(rules, request, secret=KEY, dry_run=dry_run)
    return request, result[0] if result else None, raw


# --- the shipped rules and profiles ----------------------------------------------------------

@pytest.mark.parametrize("host, path", ENDPOINTS)
def test_shipped_rules_remove_the_billing_block_on_every_endpoint(host: str, path: str) -> None:
    body = claude_code_body()
    request, out, _ = send(DEFAULT, body, host, path)
    assert out is not None
    sent = json.loads(request.content or b"")
    assert [b["text"] for b in sent["system"]][:1] == [SYSTEM]  # the block is gone, whole
    expected = copy.deepcopy(body)
    del expected["system"][0]
    assert sent == expected  # nothing else touched: no marker added, none moved
    facts = out.facts(host=host, path=path, method="POST")
    assert facts.added["removed"] == [{"path": "system[0]", "block": "claude-code-billing",
                                       "tokens": 18}]
    assert facts.body_write == "reserialize"
    assert BILLING not in json.dumps(facts.to_json())  # never the text


def test_shipped_profiles_say_what_markers_do() -> None:
    expected = {"api.deepseek.com": IGNORED, "api.kimi.com": IGNORED,
                "api.moonshot.ai": UNKNOWN, "api.z.ai": UNKNOWN, "open.bigmodel.cn": UNKNOWN,
                "api.minimax.io": HONOURED, "dashscope-intl.aliyuncs.com": HONOURED}
    for host, markers in expected.items():
        prof = profile_for(host, "anthropic", "claude-sonnet-4-5")
        assert prof.markers == markers, host
        assert prof.automatic, host  # every one of them caches without markers as well
    assert profile_for("api.deepseek.com", "anthropic", None).lookback_blocks is None
    assert profile_for("api.minimax.io", "anthropic", None).lookback_blocks == 20
    first_party = profile_for("api.anthropic.com", "anthropic", "claude-sonnet-4-5")
    assert not first_party.automatic and first_party.markers == HONOURED
    with pytest.raises(ValueError, match="markers must be one of"):
        parse_profiles({"profiles": [{"match": {}, "markers": "maybe"}]})
    with pytest.raises(ValueError, match="lookback_blocks"):
        parse_profiles({"profiles": [{"match": {}, "lookback_blocks": 0}]})


def test_the_block_arrives_as_sent_on_anthropic() -> None:
    body = claude_code_body()
    request, out, raw = send(DEFAULT, body, "api.anthropic.com", "/v1/messages")
    assert out is not None and not out.removed
    assert request.content == raw  # Claude Code's own markers: left alone, byte for byte
    assert "removed" not in out.facts(host="api.anthropic.com", path="/v1/messages",
                                      method="POST").added


def test_the_planner_runs_only_where_markers_count() -> None:
    rules = parse_rules(yaml.safe_load("""
rules:
  - name: plan-everywhere
    match: {host: ["api.deepseek.com", "api.minimax.io"], path: "*/messages"}
    cache_control: {strategy: agent}
"""))
    plain = {"model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "rules " * 3000}],
             "messages": [{"role": "user", "content": "hi " * 500}]}
    _, ignored, _ = send(rules, plain, "api.deepseek.com")
    assert ignored is not None and ignored.markers == []
    _, honoured, _ = send(rules, plain, "api.minimax.io")
    assert honoured is not None and honoured.markers


def test_zai_gets_one_session_id_per_conversation() -> None:
    a1, out, _ = send(DEFAULT, claude_code_body("first conversation"), "api.z.ai",
                      "/api/anthropic/v1/messages")
    a2, _, _ = send(DEFAULT, claude_code_body("first conversation", turns=1), "api.z.ai",
                    "/api/anthropic/v1/messages")
    b1, _, _ = send(DEFAULT, claude_code_body("other conversation"), "api.z.ai",
                    "/api/anthropic/v1/messages")
    assert out is not None and out.rules[:2] == ["zai-anthropic", "zai-session"]
    sid = a1.headers["x-session-id"]
    assert sid and sid == a2.headers["x-session-id"] != b1.headers["x-session-id"]
    chat = {"model": "glm-5.1", "messages": [{"role": "user", "content": "hi"}]}
    c, _, _ = send(DEFAULT, chat, "api.z.ai", "/api/paas/v4/chat/completions")
    assert c.headers.get("x-session-id")


# --- remove_blocks: the action ----------------------------------------------------------------

def test_a_marker_on_the_removed_block_moves_to_the_block_before_it() -> None:
    body = claude_code_body(marker_on_billing=True)
    request, out, _ = send(DEFAULT, body, "api.deepseek.com")
    sent = json.loads(request.content or b"")
    assert sent["tools"][-1]["cache_control"] == {"type": "ephemeral"}  # the same prefix, minus
    assert out is not None and out.removed[0]["cache_control"] == "moved to tools[2]"
    # ... after a system block: onto it; where the block before has a marker: dropped
    spec = RemoveBlock("claude-code-billing", default_volatile().pattern("claude-code-billing"))
    b = {"system": [{"type": "text", "text": "intro"},
                    {"type": "text", "text": BILLING, "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "rest"}]}
    removed, problems = remove_blocks(b, [spec], "api.example")
    assert b["system"] == [{"type": "text", "text": "intro", "cache_control": {"type": "ephemeral"}},
                           {"type": "text", "text": "rest"}]
    assert removed[0]["cache_control"] == "moved to system[0]" and not problems
    b = {"system": [{"type": "text", "text": BILLING, "cache_control": {"type": "ephemeral"}}]}
    removed, _ = remove_blocks(b, [spec], "api.example")
    assert b == {} and removed[0]["cache_control"] == "dropped"  # no block before it


def test_system_as_a_string_and_merged_blocks() -> None:
    spec = RemoveBlock("claude-code-billing", default_volatile().pattern("claude-code-billing"))
    only = {"system": BILLING + "\n", "messages": []}
    removed, _ = remove_blocks(only, [spec], "api.example")
    assert only == {"messages": []} and removed[0]["path"] == "system"
    merged = BILLING + "\n\n" + SYSTEM  # a gateway that glued the header to the next text
    for body in ({"system": merged}, {"system": [{"type": "text", "text": merged}]}):
        before = copy.deepcopy(body)
        removed, problems = remove_blocks(body, [spec], "api.example")
        assert body == before and removed == [] and "left in place" in problems[0]
    untouched = {"system": [{"type": "text", "text": SYSTEM}]}
    assert remove_blocks(untouched, [spec], "api.example") == ([], [])


def test_never_on_a_host_that_reads_the_block() -> None:
    block = default_volatile().named_block("claude-code-billing")
    spec = RemoveBlock(block.name, block.pattern, block.stripped_by)
    for host in ("api.anthropic.com", "us-east5-aiplatform.googleapis.com",
                 "aiplatform.googleapis.com"):
        body = claude_code_body()
        assert remove_blocks(body, [spec], host) == ([], []) and body == claude_code_body()
    assert remove_blocks(claude_code_body(), [spec], "api.deepseek.com")[0]


@pytest.mark.parametrize("host", ["api.anthropic.com", "*", "*.anthropic.com",
                                  "*.googleapis.com", "*-aiplatform.googleapis.com",
                                  "[ab]pi.anthropic.com"])
def test_a_rule_that_could_remove_it_where_it_is_used_is_refused(tmp_path: Path,
                                                                  host: str) -> None:
    p = tmp_path / "rules.yaml"
    p.write_text("rules:\n  - name: strip\n    match:\n"
                 f"      host: [\"gateway.internal\", \"{host}\"]\n"
                 "    remove_blocks: [claude-code-billing]\n")
    with pytest.raises(ValueError, match="must stay on .*whose API reads it") as e:
        load_rules(p)
    assert str(e.value).startswith(f"{p}:5: rule 'strip':")


@pytest.mark.parametrize("text, pattern", [
    ("    remove_blocks: [no-such-block]\n", "no block named 'no-such-block'"),
    ("    remove_blocks: []\n", "must be a list of block names"),
    ("    remove_blocks: {a: 1}\n", "must be a list of block names"),
])
def test_remove_blocks_parse_errors(tmp_path: Path, text: str, pattern: str) -> None:
    p = tmp_path / "rules.yaml"
    p.write_text("rules:\n  - name: r\n    match: {host: gw.internal}\n" + text)
    with pytest.raises(ValueError, match=pattern) as e:
        load_rules(p)
    assert str(e.value).startswith(f"{p}:4:")
    p.write_text("rules:\n  - name: r\n    match: {host: gw.internal, api: openai-chat}\n"
                 "    remove_blocks: claude-code-billing\n")
    with pytest.raises(ValueError, match="Anthropic Messages system prompt"):
        load_rules(p)


def test_a_users_rule_removes_it_on_the_host_it_names() -> None:
    rules = parse_rules(yaml.safe_load("""
rules:
  - name: my-gateway
    match: {host: llm.corp.internal, path: "/v1/messages"}
    remove_blocks: claude-code-billing
"""))
    request, out, _ = send(rules, claude_code_body(), "llm.corp.internal", "/v1/messages")
    assert out is not None and out.removed and out.rules == ["my-gateway"]
    assert BILLING.encode() not in (request.content or b"")
    # a dry run computes it and sends the body unchanged
    request, out, raw = send(rules, claude_code_body(), "llm.corp.internal", "/v1/messages",
                             dry_run=True)
    assert out is not None and out.removed and request.content == raw


# --- the diagnosis: the block is prompt text where it is cached -------------------------------

def observe(tracker: MissTracker, body: dict[str, Any], host: str, key: str, ts: float,
            read: int) -> Any:
    p = tracker.observe(body, api="anthropic", model=body["model"], host=host, keys=(key,),
                        signal=None, ts=ts)
    usage = Usage(input_tokens=p.fingerprint.total_tokens, cache_read_tokens=read)
    return p, tracker.verdict(p, usage, ts + 1, response_cache=False,
                              dry_run=False)[0]


def test_the_fingerprint_ignores_the_block_only_where_the_provider_strips_it() -> None:
    body = claude_code_body()
    on_anthropic, _ = observe(MissTracker(), body, "api.anthropic.com", "a", 0, 0)
    elsewhere, _ = observe(MissTracker(), body, "llm.corp.internal", "a", 0, 0)
    first = lambda p: next(b for b in p.fingerprint.unpack().all if b.path == "system[0]")  # noqa: E731
    assert first(on_anthropic).kind == IGNORED_BLOCK
    assert first(elsewhere).kind == "text"
    # a new suffix in the block: nothing on Anthropic, a prefix change at token 0 elsewhere
    other = claude_code_body()
    other["system"][0]["text"] = BILLING.replace("14a", "191")
    for host, reason in (("api.anthropic.com", "hit"), ("llm.corp.internal", "prefix-changed")):
        tracker = MissTracker()
        p, _ = observe(tracker, body, host, "conv", 0, 0)
        _, v = observe(tracker, other, host, "conv", 10,
                       p.fingerprint.total_tokens if reason == "hit" else 0)
        assert v.reason == reason, (host, v)
        if reason == "prefix-changed":
            assert "system[0]" in (v.detail or "")


def test_no_lookback_verdict_where_the_endpoint_caches_by_prefix() -> None:
    """30 new blocks in one turn: past Anthropic's 20-block lookback, nothing to DeepSeek."""
    def body(n: int) -> dict[str, Any]:
        b = claude_code_body(turns=n)
        for m in b["messages"]:
            m["content"][-1].pop("cache_control", None)
        b["messages"][-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
        return b
    for host, read, reason in (("api.anthropic.com", 0, "lookback-exceeded"),
                               ("api.deepseek.com", 0, "routed-away")):
        tracker = MissTracker()
        observe(tracker, body(1), host, "conv", 0, 0)
        _, v = observe(tracker, body(16), host, "conv", 10, read)
        assert v.reason == reason, (host, v)


# --- usage as these endpoints report it --------------------------------------------------------

def test_usage_with_missing_fields_is_recorded_as_it_comes() -> None:
    r = UsageReader("anthropic")
    r.feed_json({"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 50}}})
    r.feed_json({"type": "message_delta", "usage": {"output_tokens": 7}})
    r.feed_json({"type": "message_stop"})
    u = r.usage()
    assert u is not None and (u.input_tokens, u.cache_read_tokens, u.cache_write_tokens,
                              u.output_tokens) == (50, 0, 0, 7)
    assert r.terminal
    r = UsageReader("anthropic")  # usage only at the end, none at the start
    r.feed_json({"type": "message_start", "message": {"id": "m", "usage": {}}})
    r.feed_json({"type": "message_delta", "usage": {"input_tokens": 5,
                                                   "cache_read_input_tokens": 4000}})
    u = r.usage()
    assert u is not None and u.input_tokens == 4005 and u.cache_read_tokens == 4000
    r = UsageReader("anthropic")  # no usage at all: nothing to record, and no error
    r.feed_json({"type": "message_start", "message": {"id": "m"}})
    r.feed_event("message_stop", b'{"type":"message_stop"}')
    assert r.usage() is None and r.terminal
