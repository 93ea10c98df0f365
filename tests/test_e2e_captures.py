"""Real agents' requests (tests/fixtures/captures, as the agents sent them) replayed turn by turn
through a real mitmdump with the addon into the simulator.

Real agents are not append-only: OpenClaw re-adds a per-turn internal-context message at the
end, Qwen Code moves its date reminder on resume and sends a memory-extraction side request
under the same `prompt_cache_key`. These tests hold the addon to what the issue asks: reads grow
with the history, the affinity ID survives resume, side requests are their own threads, and no
verdict contradicts the usage. Run with `-s` for one line per turn.
"""

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.harness import Proxy

pytestmark = pytest.mark.slow  # every test starts mitmdump

CAPTURES = Path(__file__).resolve().parent / "fixtures" / "captures"
KEY = "sk-test-not-a-real-key"
# Hop-by-hop and transport headers the replay's own client sets.
_DROP = {"authorization", "accept-encoding", "content-length", "host", "connection"}


def capture(folder: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((CAPTURES / folder).glob("*.json"))]


def replay(proxy: Proxy, requests: list[dict[str, Any]],
           edit: Any = None) -> list[dict[str, Any]]:
    """Send each captured request through the proxy; return the addon's records in order."""
    with httpx2.Client(proxy=proxy.url, verify=str(proxy.ca), timeout=30) as client:
        for i, req in enumerate(requests):
            headers = [(k, v) for k, v in req["headers"] if k.lower() not in _DROP]
            headers.append(("authorization", f"Bearer {KEY}"))
            body = edit(req["body"]) if edit else req["body"]
            r = client.post(f"https://{req['host']}{req['path']}", headers=headers,
                            content=json.dumps(body).encode())
            assert r.status_code == 200, r.text[:300]
            r.read()
            proxy.wait_records(i + 1)
    recs = proxy.wait_records(len(requests))
    assert len(recs) == len(requests)
    return recs


def _show(name: str, recs: list[dict[str, Any]]) -> None:
    for i, r in enumerate(recs, 1):
        u = r["usage"] or {}
        print(f"{name} {i}: in={u.get('input_tokens')} read={u.get('cache_read_tokens')} "
              f"write={u.get('cache_write_tokens')} {r['miss_reason']}: {r['miss_detail']}")


def _reads_back_and_pays_only_the_new_part(recs: list[dict[str, Any]]) -> None:
    for prev, cur in zip(recs, recs[1:], strict=False):
        p, c = prev["usage"], cur["usage"]
        # Reads back (nearly) everything the previous turn sent...
        assert c["cache_read_tokens"] >= 0.95 * p["input_tokens"], (p, c)
        # ...and pays for little more than what this turn added.
        added = c["input_tokens"] - p["input_tokens"]
        paid = c["input_tokens"] - c["cache_read_tokens"]
        assert paid <= added + 300, (p, c)


def _no_contradiction(recs: list[dict[str, Any]]) -> None:
    for r in recs:
        assert not (r["miss_reason"] == "hit" and "prefix changed" in (r["miss_detail"] or "")), r
        if r["miss_reason"] == "hit":
            assert r["usage"]["cache_read_tokens"] > 0


def test_openclaw_without_markers_reads_the_history_back(proxy_factory, sim):
    recs = replay(proxy_factory("openclaw"), capture("openclaw"))
    _show("openclaw", recs)
    _no_contradiction(recs)
    assert len({r["affinity_id"] for r in recs}) == 1
    assert {r.body["session_id"] for r in sim.requests} == {recs[0]["affinity_id"]}
    _reads_back_and_pays_only_the_new_part(recs)
    assert all(cur["miss_reason"] == "hit" for cur in recs[1:]), recs
    # The marker never lands on the trailing internal-context message.
    for r in recs:
        marked = {m["path"] for m in r["added"]["markers"]}
        body_len = len(capture("openclaw")[recs.index(r)]["body"]["messages"])
        assert f"messages[{body_len - 1}].content[0]" not in marked


def test_openclaw_own_markers_are_left_alone(proxy_factory, sim):
    recs = replay(proxy_factory("openclaw-default"), capture("openclaw-default"))
    _show("openclaw-default", recs)
    _no_contradiction(recs)
    assert all(not r["added"]["markers"] for r in recs)
    assert all(r["miss_reason"] == "hit" for r in recs[1:])


@pytest.mark.parametrize("folder", ["qwen-code-openrouter", "qwen-code-openai"])
def test_qwen_code_ids_survive_resume_and_side_requests_are_threads(proxy_factory, sim, folder):
    reqs = capture(folder)
    recs = replay(proxy_factory(folder), reqs)
    _show(folder, recs)
    _no_contradiction(recs)
    main, side = recs[0::2], recs[1::2]  # each turn: the main request, then memory extraction
    assert len({r["affinity_id"] for r in main}) == 1
    assert len({r["affinity_id"] for r in side}) == 1
    if folder == "qwen-code-openrouter":
        sent = [r.body for r in sim.requests]
        assert len({b["session_id"] for b in sent[0::2]}) == 1  # main turn 1 and the resume
        assert sent[0]["session_id"] == main[0]["affinity_id"]
    # Side requests are compared with their own previous request, never with the main thread
    # (which has other tools and another system prompt), and the reverse.
    assert side[0]["miss_reason"] == "first-write", side[0]
    for r in recs[1:]:
        assert "tools[" not in (r["miss_detail"] or ""), r
        assert not (r["miss_detail"] or "").startswith("system"), r
    # The resume moved the date reminder out of the first message: a change in messages[1].
    for r in (main[1], side[1]):
        if r["miss_reason"] != "hit":
            assert "messages[1].content[3]" in r["miss_detail"], r


def test_plain_sdk_system_date_change_is_prefix_changed(proxy_factory, sim):
    """A plain script whose system prompt carries today's date, across midnight: the request
    continues a known conversation, so the verdict names the system prompt, not "new"."""
    system = ("You are a helpful assistant for the accounting team. " * 40
              + "Today is {date}. Answer briefly.")
    history = [{"role": "user", "content": "Summarize the ledger rules. " * 200}]
    turn1 = {"model": "gpt-4.1", "messages": [{"role": "system", "content": system.format(
        date="Monday, 30 November")}, *history]}
    turn2 = {"model": "gpt-4.1", "messages": [{"role": "system", "content": system.format(
        date="Tuesday, 1 December")}, *history, {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "And the exceptions?"}]}
    reqs = [{"host": "api.openai.com", "path": "/v1/chat/completions",
             "headers": [["content-type", "application/json"]], "body": b}
            for b in (turn1, turn2)]
    recs = replay(proxy_factory("sdk"), reqs)
    _show("sdk", recs)
    assert recs[0]["affinity_id"] != recs[1]["affinity_id"]  # the root changed with the date
    assert recs[1]["miss_reason"] in ("prefix-changed", "partial"), recs[1]
    assert "messages[0].content changed at ~char" in recs[1]["miss_detail"], recs[1]


def _long_turns(turns: int, calls: int) -> list[dict[str, Any]]:
    """OpenClaw's first captured request grown by tool loops of `calls` calls per request (more
    blocks than Anthropic's 20-block lookback), the internal context always at the end."""
    first = capture("openclaw")[0]
    head, trailer = first["body"]["messages"][:-1], first["body"]["messages"][-1]
    out, history = [], list(head)
    for t in range(turns):
        body = {**first["body"], "messages": [*history, trailer]}
        out.append({**first, "body": json.loads(json.dumps(body))})
        for c in range(calls):
            call = f"call_{t}_{c}"
            history += [
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call, "type": "function",
                     "function": {"name": "exec", "arguments": json.dumps({"cmd": f"ls {c}"})}}]},
                {"role": "tool", "tool_call_id": call, "content": f"file-{t}-{c}.txt\n" * 40}]
    return out


def test_openclaw_long_tool_turns_read_back_and_pay_only_the_new_part(proxy_factory, sim):
    recs = replay(proxy_factory("openclaw-long"), _long_turns(4, 25))
    _show("openclaw-long", recs)
    _no_contradiction(recs)
    _reads_back_and_pays_only_the_new_part(recs)
