import copy
import json
import pickle
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_addon.diagnosis.blockprint import CHUNK_CHARS, IGNORED, Fingerprint
from affinity_addon.diagnosis.fingerprint import (
    compile_volatile,
    fingerprint,
    fingerprint_steps,
    run_steps,
)
from affinity_addon.diagnosis.prefix_diff import compare

SECRET = "SECRET-PROMPT-TEXT-4711"
DATE_AT = 600  # where the system prompt's date sits: inside chunk 512..767


def system_text(date: str = "2026-11-23") -> str:
    return "You are a careful coding agent. " * 18 + f"Today's date: {date}. " + "Rules. " * 300


def tools(n: int = 4) -> list[dict]:
    return [{"name": f"tool{i}", "description": f"does thing {i}",
             "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}}}
            for i in range(n)]


def anthropic_body(turns: int = 3, *, date: str = "2026-11-23", marker: bool = True) -> dict:
    messages: list[dict] = []
    for i in range(turns):
        messages.append({"role": "user", "content": [{"type": "text", "text": f"question {i}"}]})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": [
                {"type": "thinking", "thinking": f"thought {i}", "signature": f"sig{i}"},
                {"type": "text", "text": f"answer {i}"}]})
    body = {"model": "claude-sonnet-4-6", "max_tokens": 1000, "tools": tools(),
            "system": [{"type": "text", "text": system_text(date)}], "messages": messages}
    if marker:
        body["system"][0]["cache_control"] = {"type": "ephemeral"}
        messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    return body


def fp_a(body: dict) -> Fingerprint:
    return fingerprint(body, "anthropic", body.get("model"))


def diff_a(prev: dict, cur: dict):
    return compare(fp_a(prev), fp_a(cur))


# --- fingerprint -----------------------------------------------------------------------------

def test_blocks_in_provider_hash_order_with_markers_and_lengths():
    body = anthropic_body(2)
    fp = fp_a(body)
    paths = [b.path for b in fp.blocks]
    assert paths == ["tools[0]", "tools[1]", "tools[2]", "tools[3]", "system[0]",
                     "messages[0].content[0]", "messages[1].content[0]", "messages[1].content[1]",
                     "messages[2].content[0]"]
    sys0 = fp.blocks[4]
    assert sys0.section == "system" and sys0.kind == "text" and sys0.system
    assert sys0.marked and sys0.ttl is None and sys0.chars == len(system_text())
    assert sys0.tokens == (sys0.chars + 3) // 4
    last = fp.blocks[-1]
    assert last.marked and last.ttl == "1h" and last.message_index == 2 and last.first
    assert fp.blocks[6].kind == "thinking" and fp.blocks[6].first and not fp.blocks[7].first
    assert fp.last_ttl == "1h"
    assert fp.total_tokens == sum(b.tokens for b in fp.blocks)
    assert all(len(b.digest) == 8 for b in fp.blocks)
    assert len(sys0.chunks) == 4 * -(-sys0.chars // CHUNK_CHARS)


def test_responses_and_chat_orders():
    resp = {"model": "gpt-5.6", "tools": [{"type": "function", "name": "f"}],
            "instructions": "be brief",
            "input": [{"role": "developer", "content": [{"type": "input_text", "text": "dev"}]},
                      {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                      {"role": "user", "content": "hi"}]}
    fp = fingerprint(resp, "openai-responses", "gpt-5.6")
    assert [b.path for b in fp.blocks] == ["tools[0]", "instructions", "input[0].content[0]",
                                           "input[1]", "input[2].content"]
    assert fp.blocks[1].system and fp.blocks[2].system and not fp.blocks[4].system
    chat = {"messages": [{"role": "system", "content": "sys"},
                         {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": None,
                          "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "1", "content": "result"}]}
    fp = fingerprint(chat, "openai-chat", None)
    # the content-less assistant turn is still a block: its tool_calls are part of the prefix
    assert [(b.path, b.kind) for b in fp.blocks] == [
        ("messages[0].content", "string"), ("messages[1].content", "string"),
        ("messages[2]", "tool_calls"), ("messages[3].content", "string")]


def test_fingerprint_keeps_no_text():
    body = anthropic_body(2)
    body["messages"][0]["content"][0]["text"] = SECRET * 50
    body["system"][0]["text"] += SECRET
    fp = fp_a(body)
    blob = pickle.dumps(fp) + pickle.dumps(fp.blocks) + repr(fp.blocks).encode()
    assert SECRET.encode() not in blob
    assert b"Rules." not in blob and b"question" not in blob


def test_markers_do_not_change_digests():
    marked, plain = fp_a(anthropic_body(3)), fp_a(anthropic_body(3, marker=False))
    assert [b.digest for b in marked.blocks] == [b.digest for b in plain.blocks]
    assert compare(marked, plain).kind == "identical"
    assert any(b.marked for b in marked.blocks) and not any(b.marked for b in plain.blocks)


def test_volatile_billing_header_is_ignored():
    def cc(cch: str | None) -> dict:
        body = anthropic_body(2)
        if cch is not None:
            body["system"].insert(0, {"type": "text", "text": f"x-anthropic-billing-header: "
                                      f"cc_version=2.1.197.0df; cc_entrypoint=cli; cch={cch};"})
        return body
    fp1, fp2 = fp_a(cc("aaaa")), fp_a(cc("bbbb"))
    assert fp1.blocks[4].kind == IGNORED and fp1.blocks[4].path == "system[0]"
    assert fp1.blocks[4].digest == fp2.blocks[4].digest
    d = compare(fp1, fp2)
    assert d.kind == "identical" and d.first_change is None
    assert compare(fp_a(cc(None)), fp2).kind == "identical"  # header appearing is no change either
    # a custom table replaces the default one
    strict = fingerprint(cc("aaaa"), "anthropic", None, volatile={})
    assert strict.blocks[4].kind == "text"


def test_compile_volatile_rejects_bad_patterns():
    assert compile_volatile({"system": ["^a"]})["system"][0].pattern == "^a"
    with pytest.raises(ValueError, match="bad volatile pattern"):
        compile_volatile({"system": ["(unclosed"]})
    with pytest.raises(ValueError, match="must be a list"):
        compile_volatile({"system": "^a"})


# --- compare ---------------------------------------------------------------------------------

def test_identical_and_appended():
    t2, t3 = anthropic_body(2), anthropic_body(3)
    assert diff_a(t2, t2).kind == "identical"
    d = diff_a(t2, t3)
    assert d.kind == "appended" and d.first_change is None
    assert d.common_blocks == len(fp_a(t2).blocks)
    assert d.common_tokens == fp_a(t2).total_tokens


def test_date_change_in_system_prompt_names_path_and_char():
    d = diff_a(anthropic_body(3), anthropic_body(3, date="2026-11-24"))
    assert d.kind == "system-changed"
    assert d.first_change == "system[0].text"
    assert d.detail == "system[0].text changed at ~char 512"
    assert (DATE_AT // CHUNK_CHARS) * CHUNK_CHARS == 512
    assert d.common_blocks == 4  # the tools still match
    assert d.common_tokens == sum(b.tokens for b in fp_a(anthropic_body(3)).blocks[:4])


def test_tools_reordered_changed_added_removed():
    base = anthropic_body(2)
    reordered = copy.deepcopy(base)
    reordered["tools"] = [reordered["tools"][i] for i in (0, 2, 1, 3)]
    d = diff_a(base, reordered)
    assert (d.kind, d.first_change, d.common_blocks) == ("tools-reordered", "tools", 1)

    changed = copy.deepcopy(base)
    changed["tools"][2]["description"] = "does something else"
    d = diff_a(base, changed)
    assert (d.kind, d.first_change) == ("tool-changed", "tools[2]")

    added = copy.deepcopy(base)
    added["tools"].insert(1, {"name": "new", "input_schema": {}})
    d = diff_a(base, added)
    assert (d.kind, d.first_change) == ("tool-added", "tools[1]")

    removed = copy.deepcopy(base)
    del removed["tools"][3]
    d = diff_a(base, removed)
    assert (d.kind, d.first_change) == ("tool-removed", "tools[3]")


def test_message_inserted_and_removed():
    base = anthropic_body(4)  # messages 0..6
    inserted = copy.deepcopy(base)
    inserted["messages"].insert(3, {"role": "user", "content": [{"type": "text", "text": "oops"}]})
    d = diff_a(base, inserted)
    assert (d.kind, d.first_change) == ("message-inserted", "messages[3]")
    assert d.detail == "1 message(s) inserted at messages[3]"

    removed = copy.deepcopy(base)
    del removed["messages"][2:4]  # a user/assistant pair from the middle
    d = diff_a(base, removed)
    assert (d.kind, d.first_change) == ("message-removed", "messages[2]")

    rewound = copy.deepcopy(base)
    del rewound["messages"][5:]
    d = diff_a(base, rewound)
    assert (d.kind, d.first_change) == ("message-removed", "messages[5]")


def test_message_text_changed():
    base = anthropic_body(3)
    edited = copy.deepcopy(base)
    edited["messages"][2]["content"][0]["text"] = "question 1 (edited)"
    d = diff_a(base, edited)
    assert (d.kind, d.first_change) == ("message-changed", "messages[2].content[0].text")
    # Chunk hashes (the ~char locator) are kept for tools, system and the first messages only.
    assert d.detail == "messages[2].content[0].text changed"
    edited = copy.deepcopy(base)
    edited["messages"][0]["content"][0]["text"] += " (edited)"
    d = diff_a(base, edited)
    assert d.first_change == "messages[0].content[0].text" and "~char" in d.detail


def test_image_added_and_removed():
    base = anthropic_body(3)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo" * 5000}}
    with_image = copy.deepcopy(base)
    with_image["messages"][2]["content"].insert(0, image)
    d = diff_a(base, with_image)
    assert (d.kind, d.first_change) == ("image-added", "messages[2].content[0]")
    img = next(b for b in fp_a(with_image).blocks if b.path == "messages[2].content[0]")
    assert img.kind == "image" and 1_000 <= img.tokens < 1_100  # not its base64 length
    d = diff_a(with_image, base)
    assert (d.kind, d.first_change) == ("image-removed", "messages[2].content[0]")


def test_thinking_removed_anthropic_and_chat_reasoning():
    base = anthropic_body(3)
    stripped = copy.deepcopy(base)
    del stripped["messages"][1]["content"][0]
    d = diff_a(base, stripped)
    assert (d.kind, d.first_change) == ("thinking-removed", "messages[1].content[0]")

    def chat(reasoning: bool) -> dict:
        assistant = {"role": "assistant", "content": "4"}
        if reasoning:
            assistant["reasoning_content"] = "2+2 is 4"
        return {"messages": [{"role": "system", "content": "sys"},
                             {"role": "user", "content": "2+2?"}, assistant,
                             {"role": "user", "content": "and 3+3?"}]}
    d = compare(fingerprint(chat(True), "openai-chat", "grok-4"),
                fingerprint(chat(False), "openai-chat", "grok-4"))
    assert (d.kind, d.first_change) == ("thinking-removed", "messages[2]")


def test_model_switch_and_settings_change():
    base = anthropic_body(3)
    other = copy.deepcopy(base)
    other["model"] = "claude-opus-4-8"
    d = diff_a(base, other)
    assert (d.kind, d.first_change, d.common_tokens) == ("model-switched", "model", 0)

    thinking = copy.deepcopy(base)
    thinking["thinking"] = {"type": "enabled", "budget_tokens": 2000}
    d = diff_a(base, thinking)
    assert (d.kind, d.first_change) == ("settings-changed", "thinking")
    assert d.common_blocks == 5  # tools and system stay cached


def test_chat_and_responses_system_changes():
    def chat(date: str) -> dict:
        return {"messages": [{"role": "system", "content": system_text(date)},
                             {"role": "user", "content": "hi"}]}
    d = compare(fingerprint(chat("2026-11-23"), "openai-chat", "gpt-5"),
                fingerprint(chat("2026-11-24"), "openai-chat", "gpt-5"))
    assert (d.kind, d.first_change) == ("system-changed", "messages[0].content")
    assert d.detail == "messages[0].content changed at ~char 512"

    def resp(date: str) -> dict:
        return {"input": [{"role": "developer",
                           "content": [{"type": "input_text", "text": system_text(date)}]},
                          {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}
    d = compare(fingerprint(resp("2026-11-23"), "openai-responses", "gpt-5"),
                fingerprint(resp("2026-11-24"), "openai-responses", "gpt-5"))
    assert (d.kind, d.first_change) == ("system-changed", "input[0].content[0].text")


def test_chat_tool_call_arguments_change_is_seen():
    def chat(args: str) -> dict:
        return {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"id": "1", "type": "function",
                                  "function": {"name": "f", "arguments": args}}]},
                             {"role": "tool", "tool_call_id": "1", "content": "r"}]}
    d = compare(fingerprint(chat('{"a":1}'), "openai-chat", None),
                fingerprint(chat('{"a":2}'), "openai-chat", None))
    assert (d.kind, d.first_change) == ("message-changed", "messages[1]")


# --- size and speed --------------------------------------------------------------------------

def _deep_size(fp: Fingerprint) -> int:
    parts = [fp, fp.rows, fp.chunks, fp.labels, *fp.labels, fp.settings, fp.model]
    parts += [x for pair in fp.settings for x in (pair, *pair)]
    return sum(sys.getsizeof(p) for p in parts)


def test_200_message_conversation_is_a_few_kb():
    messages = [{"role": "user" if i % 2 == 0 else "assistant",
                 "content": [{"type": "text", "text": f"message {i} " + "word " * 80}]}
                for i in range(200)]
    body = {"model": "m", "tools": tools(), "system": [{"type": "text", "text": system_text()}],
            "messages": messages}
    fp = fp_a(body)
    size = _deep_size(fp)
    print(f"\n200-message fingerprint: {size} bytes, {len(fp)} blocks")
    assert size < 16_000
    assert len(pickle.dumps(fp)) < 16_000


def test_speed_for_a_1mb_body():
    messages = []
    for i in range(400):
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"t{i}", "content": f"output {i}\n" * 150}]})
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": f"thinking about {i} " * 40},
            {"type": "tool_use", "id": f"t{i + 1}", "name": "bash", "input": {"cmd": "ls -la"}}]})
    body = {"model": "m", "tools": tools(30), "system": [{"type": "text", "text": "s " * 20_000}],
            "messages": messages}
    size = len(json.dumps(body))
    assert size > 1_000_000
    t0 = time.perf_counter()
    fp1 = fp_a(body)
    t1 = time.perf_counter()
    body["messages"][501]["content"][0]["text"] = "changed"
    fp2 = fp_a(body)
    d = compare(fp1, fp2)
    t2 = time.perf_counter()
    print(f"\n1 MB body ({len(fp1)} blocks): fingerprint {1000 * (t1 - t0):.1f} ms, "
          f"fingerprint+compare {1000 * (t2 - t1):.1f} ms, packed {len(fp1.rows) + len(fp1.chunks)} B")
    assert d.first_change == "messages[501].content[0].text"
    assert t1 - t0 < 2.0 and t2 - t1 < 3.0


# --- properties ------------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=600)
_message = st.builds(lambda role, text: {"role": role, "content": [{"type": "text", "text": text}]},
                     st.sampled_from(["user", "assistant"]), _text)


@settings(max_examples=60, deadline=None)
@given(st.lists(_message, max_size=6), st.lists(_message, min_size=1, max_size=4), _text)
def test_appending_never_reports_a_change(history, extra, system):
    body = {"system": [{"type": "text", "text": system}], "messages": history}
    longer = {**body, "messages": history + extra}
    assert compare(fp_a(body), fp_a(body)).kind == "identical"
    assert compare(fp_a(body), fp_a(longer)).kind == "appended"
    assert compare(fp_a(longer), fp_a(body)).kind in ("message-removed", "message-changed")


CAPTURES = sorted((Path(__file__).resolve().parent / "fixtures" / "captures").glob("*/*.json"))
API_BY_PATH = {"/v1/messages": "anthropic", "/v1/responses": "openai-responses"}


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_stepped_fingerprint_builds_the_blocks_unpack_decodes(capture):
    """The judgement uses the blocks made while fingerprinting instead of decoding the packed
    rows: they must be the same, field for field, and stepping must not change the result."""
    sent = json.loads(capture.read_text())
    api = API_BY_PATH.get(sent["path"].split("?")[0], "openai-chat")
    body = sent["body"]
    fp, blocks = run_steps(fingerprint_steps(body, api, body.get("model"), every=3))
    assert fp == fingerprint(body, api, body.get("model"))
    assert blocks == fp.unpack()


SYNTHETIC = [
    ("anthropic", {"model": "claude-sonnet-4-5", "tools": tools(3),
                   "system": [{"type": "text", "text": system_text(),
                               "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                   "messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": [
                                    {"type": "thinking", "thinking": "t", "signature": "s"},
                                    {"type": "tool_use", "id": "t1", "name": "tool0",
                                     "input": {"x": "y"}}]},
                                {"role": "user", "content": [
                                    {"type": "tool_result", "tool_use_id": "t1", "content": "ok",
                                     "cache_control": {"type": "ephemeral"}}]}]}),
    ("openai-responses", {"model": "gpt-5", "instructions": system_text(), "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "done"},
        {"type": "reasoning", "summary": [], "encrypted_content": "zz"}]}),
    ("openai-chat", {"model": "gpt-5", "messages": [
        {"role": "system", "content": "x-anthropic-billing-header: cch=1"},
        {"role": "user", "content": [{"type": "text", "text": "a" * 2000},
                                     {"type": "image_url", "image_url": {"url": "data:..."}}]},
        {"role": "assistant", "content": None, "reasoning_content": "r",
         "tool_calls": [{"id": "1", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "out"}]}),
]


@pytest.mark.parametrize(("api", "body"), SYNTHETIC, ids=[s for s, _ in SYNTHETIC])
def test_stepped_blocks_match_unpack_for_every_api(api, body):
    fp, blocks = run_steps(fingerprint_steps(body, api, body["model"], every=2))
    assert blocks == fp.unpack() and len(blocks.all) > 3


def test_fingerprint_steps_yield_every_so_many_blocks():
    body = {"model": "m", "tools": tools(4), "system": system_text(),
            "messages": [{"role": "user", "content": f"turn {i}"} for i in range(20)]}
    steps = fingerprint_steps(body, "anthropic", "m", every=5)
    yields = 0
    with pytest.raises(StopIteration):
        while True:
            next(steps)
            yields += 1
    assert yields == (4 + 1 + 20) // 5
