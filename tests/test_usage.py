import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_addon import apis
from affinity_addon.catalog.diagnostics import default_diagnostics
from affinity_addon.catalog.usage_fields import parse_table
from affinity_addon.jsonpath import get_path, parse_path
from affinity_addon.response.eventstream import EventStreamTap, bedrock_frames
from affinity_addon.response.provider_answer import Answer, read_answer
from affinity_addon.response.usage import (
    UsageReader,
    normalize,
    plain,
)

FIXTURES = Path(__file__).parent / "fixtures" / "usage"
EXPECTED: dict[str, dict[str, Any]] = json.loads((FIXTURES / "expected.json").read_text())


def sse_events(text: bytes) -> list[tuple[str | None, bytes]]:
    """A deliberately naive SSE split (LF only): the tap has its own tests."""
    events = []
    for block in text.split(b"\n\n"):
        name, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
        if data:
            events.append((name, b"\n".join(data)))
    return events


def read_fixture(name: str) -> UsageReader:
    case = EXPECTED[name]
    source = default_diagnostics().by_name(case["answer"]["source"]) if "answer" in case else None
    reader = UsageReader(case["api"], source.answer.at if source else ())
    raw = (FIXTURES / name).read_bytes()
    if name.endswith(".json"):
        reader.feed_json(json.loads(raw))
    elif name.endswith(".jsonl"):  # WebSocket messages, as the websocket_message hook sees them
        for line in raw.splitlines():
            reader.feed_event(None, line)
    elif name.endswith(".eventstream"):  # Bedrock's AWS event stream, in uneven small chunks
        tap = EventStreamTap(None, bedrock_frames(reader))
        for i in range(0, len(raw), 37):
            tap(raw[i:i + 37])
        tap(b"")
        assert tap.failed is None
    else:
        for event, data in sse_events(raw):
            reader.feed_event(event, data)
    return reader


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_usage(name: str) -> None:
    case = EXPECTED[name]
    reader = read_fixture(name)
    usage = reader.usage()
    assert usage is not None
    assert usage.to_dict() == case["usage"]
    for key, value in case["extras"].items():
        assert reader.extras.get(key) == value, key
    assert reader.terminal is case["terminal"]
    assert usage.raw  # the provider's object is kept for usage_raw
    if "answer" in case:  # the provider's cache diagnosis, where the catalog says it is
        source = default_diagnostics().by_name(case["answer"]["source"])
        assert source is not None
        answer = read_answer(source.answer, reader.answer_seen, reader.answer, compared=True)
        assert (answer.result, answer.missed_tokens) == (case["answer"]["result"],
                                                         case["answer"]["missed_tokens"])


def test_every_api_has_fixtures() -> None:
    assert {c["api"] for c in EXPECTED.values()} == set(apis.APIS)


def test_anthropic_hit_ratio_counts_cache_in_input() -> None:
    usage = read_fixture("anthropic.json").usage()
    assert usage is not None
    assert usage.hit_ratio == pytest.approx(20480 / 22322)
    assert usage.uncached_tokens == 42


def test_anthropic_message_delta_overrides_only_non_null_fields() -> None:
    r = UsageReader(apis.ANTHROPIC)
    r.feed_json({"type": "message_start", "message": {"id": "msg_1", "usage": {
        "input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1}}})
    assert not r.terminal
    r.feed_json({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {
        "input_tokens": None, "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 7, "output_tokens": 99}})
    r.feed_json({"type": "message_stop"})
    usage = r.usage()
    assert usage is not None
    assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
            usage.output_tokens) == (117, 7, 100, 99)
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (100, 0)
    assert r.extras["stop_reason"] == "tool_use"
    assert r.terminal


def test_anthropic_without_message_stop_is_not_terminal() -> None:
    r = UsageReader(apis.ANTHROPIC)
    for event, data in sse_events((FIXTURES / "anthropic.sse").read_bytes())[:-1]:
        r.feed_event(event, data)
    u = r.usage()  # message_delta came before the missing message_stop: the whole usage
    assert u is not None and u.to_dict() == EXPECTED["anthropic.sse"]["usage"]
    assert not r.terminal


def test_anthropic_write_split_sums_when_total_missing() -> None:
    u = normalize(apis.ANTHROPIC, {"input_tokens": 5, "cache_creation": {
        "ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 70}})
    assert (u.cache_write_tokens, u.input_tokens) == (100, 105)


def _answer(api: str, source: str, *objs: Any, compared: bool = True) -> Answer:
    spec = default_diagnostics().by_name(source)
    assert spec is not None
    r = UsageReader(api, spec.answer.at)
    for obj in objs:
        r.feed_event(None, json.dumps(obj).encode())
    return read_answer(spec.answer, r.answer_seen, r.answer, compared=compared)


def test_anthropic_diagnosis_pending_null_and_nothing_asked() -> None:
    start = {"type": "message_start", "message": {"id": "msg_2", "usage": {"input_tokens": 1}}}
    pending = {**start, "message": {**start["message"],
                                    "diagnostics": {"cache_miss_reason": None}}}
    assert _answer(apis.ANTHROPIC, "anthropic", pending).result == "pending"
    null = {**start, "message": {**start["message"], "diagnostics": None}}
    assert _answer(apis.ANTHROPIC, "anthropic", null).result == "no-divergence"
    # An opt-in without a comparison is answered with null too: nothing was compared.
    assert _answer(apis.ANTHROPIC, "anthropic", null, compared=False).result is None
    assert _answer(apis.ANTHROPIC, "anthropic", start).result is None  # not there at all


def test_responses_diagnosis_on_the_terminal_event_wins_over_nulls() -> None:
    created = {"type": "response.created", "response": {"id": "resp_1", "usage": None,
                                                        "prompt_cache_diagnostics": None}}
    done = {"type": "response.completed", "response": {
        "id": "resp_1", "usage": {"input_tokens": 5},
        "prompt_cache_diagnostics": {"type": "comparison_response_not_found"}}}
    assert _answer(apis.OPENAI_RESPONSES, "openai", created, done).result ==\
        "comparison_response_not_found"
    # OpenAI has no "null means no divergence": a null is no answer.
    assert _answer(apis.OPENAI_RESPONSES, "openai", created).result is None


@pytest.mark.parametrize("diagnostics", [
    "oops", 42, [1, 2], {"cache_miss_reason": "tools_changed"},
    {"cache_miss_reason": {"type": 7}}, {"cache_miss_reason": {"type": "x" * 500}},
    {"cache_miss_reason": {"type": "\u001b[2Jcleared"}},
])
def test_malformed_anthropic_diagnosis_reads_as_no_result(diagnostics: Any) -> None:
    answer = _answer(apis.ANTHROPIC, "anthropic", {
        "id": "msg_3", "type": "message", "diagnostics": diagnostics,
        "usage": {"input_tokens": 1}})
    assert answer.result is None and answer.malformed


def test_unknown_result_type_is_kept_as_given() -> None:
    answer = _answer(apis.ANTHROPIC, "anthropic", {
        "id": "msg_4", "type": "message", "usage": {"input_tokens": 1},
        "diagnostics": {"cache_miss_reason": {"type": "speed_changed",
                                              "cache_missed_input_tokens": True}}})
    assert (answer.result, answer.missed_tokens, answer.malformed) == ("speed_changed", None,
                                                                       False)


def test_chat_last_usage_chunk_wins() -> None:
    r = UsageReader(apis.OPENAI_CHAT)
    # Some servers report running usage on every chunk; only the final figures count.
    r.feed_event(None, b'{"choices":[],"usage":{"prompt_tokens":50,"completion_tokens":1}}')
    r.feed_event(None, b'{"choices":[],"usage":{"prompt_tokens":50,"completion_tokens":9,'
                       b'"prompt_tokens_details":{"cached_tokens":32}}}')
    assert not r.terminal
    r.feed_event(None, b"[DONE]")
    assert r.terminal
    u = r.usage()
    assert u is not None
    assert (u.input_tokens, u.cache_read_tokens, u.output_tokens) == (50, 32, 9)


def test_chat_compat_zero_does_not_hide_native_field() -> None:
    # A provider filling the OpenAI field with 0 next to its own count must not read as a miss.
    u = normalize(apis.OPENAI_CHAT, {"prompt_tokens": 19, "cached_tokens": 12,
                                        "prompt_tokens_details": {"cached_tokens": 0}})
    assert u.cache_read_tokens == 12


def test_deepseek_without_prompt_tokens_sums_hit_and_miss() -> None:
    u = normalize(apis.OPENAI_CHAT, {"prompt_cache_hit_tokens": 640,
                                        "prompt_cache_miss_tokens": 60, "completion_tokens": 3})
    assert (u.input_tokens, u.cache_read_tokens, u.output_tokens) == (700, 640, 3)


def test_gemini_compat_miss_without_details() -> None:
    for raw in ({"prompt_tokens": 100}, {"prompt_tokens": 100, "prompt_tokens_details": None},
                {"prompt_tokens": 100, "prompt_tokens_details": {}}):
        u = normalize(apis.OPENAI_CHAT, raw)
        assert (u.input_tokens, u.cache_read_tokens, u.hit_ratio) == (100, 0, 0.0)


def test_openrouter_cost_and_zero_cost() -> None:
    assert normalize(apis.OPENAI_CHAT, {"prompt_tokens": 1, "cost": 0}).cost == 0.0
    assert normalize(apis.OPENAI_CHAT, {"prompt_tokens": 1, "cost": 0.5}).cost == 0.5
    for bad in (-1, "0.5", True, float("nan"), float("inf"), None):
        assert normalize(apis.OPENAI_CHAT, {"prompt_tokens": 1, "cost": bad}).cost is None


def test_responses_created_with_null_usage_is_no_usage() -> None:
    r = UsageReader(apis.OPENAI_RESPONSES)
    r.feed_event("response.created", b'{"type":"response.created","response":{"id":"resp_1",'
                                     b'"status":"in_progress","usage":null}}')
    assert r.usage() is None
    assert r.extras["response_id"] == "resp_1"
    assert not r.terminal


def test_responses_cache_write_optional() -> None:
    u = normalize(apis.OPENAI_RESPONSES, {"input_tokens": 100,
                                             "input_tokens_details": {"cached_tokens": 64}})
    assert (u.cache_read_tokens, u.cache_write_tokens) == (64, 0)


def test_responses_non_stream_in_progress_is_not_terminal() -> None:
    r = UsageReader(apis.OPENAI_RESPONSES)
    r.feed_json({"id": "resp_bg", "object": "response", "status": "queued", "usage": None})
    assert not r.terminal


def test_gemini_sse_uses_last_usage_metadata() -> None:
    r = UsageReader(apis.GEMINI)
    r.feed_json({"usageMetadata": {"promptTokenCount": 10, "cachedContentTokenCount": 8,
                                   "candidatesTokenCount": 1}})
    r.feed_json({"usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 4},
                 "candidates": [{"finishReason": "MAX_TOKENS"}]})
    u = r.usage()
    assert u is not None
    assert (u.input_tokens, u.cache_read_tokens, u.output_tokens) == (10, 0, 4)
    assert r.terminal
    assert r.extras["stop_reason"] == "MAX_TOKENS"


def test_gemini_blocked_prompt_is_terminal() -> None:
    r = UsageReader(apis.GEMINI)
    r.feed_json({"promptFeedback": {"blockReason": "SAFETY"},
                 "usageMetadata": {"promptTokenCount": 7}})
    assert r.terminal
    assert r.extras["stop_reason"] == "SAFETY"


@pytest.mark.parametrize("bad", [-5, "12", None, 3.0, 2.5, True, False, [1], {"a": 1}, 2**60])
def test_invalid_counts_are_absent_and_raw_is_kept(bad: Any) -> None:
    raw = {"prompt_tokens": bad, "completion_tokens": bad,
           "prompt_tokens_details": {"cached_tokens": bad, "cache_write_tokens": bad}}
    u = normalize(apis.OPENAI_CHAT, raw)
    assert (u.input_tokens, u.cache_read_tokens, u.cache_write_tokens, u.output_tokens) == (0,) * 4
    assert u.raw["prompt_tokens"] == plain(bad)
    assert "prompt_tokens" in u.raw


def test_invalid_anthropic_fields_next_to_valid_ones() -> None:
    u = normalize(apis.ANTHROPIC, {"input_tokens": 10, "cache_read_input_tokens": "90",
                                      "cache_creation_input_tokens": -1, "output_tokens": 2})
    assert (u.input_tokens, u.cache_read_tokens, u.cache_write_tokens) == (10, 0, 0)
    assert u.raw["cache_read_input_tokens"] == "90"


def test_normalize_odd_inputs() -> None:
    assert normalize(apis.GEMINI, {}).to_dict() == {
        "input_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0, "output_tokens": 0}
    assert normalize(apis.GEMINI, "nope").input_tokens == 0  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown API"):
        normalize("bedrock-invoke", {})  # no such API: InvokeModel bodies are each model's own
    with pytest.raises(ValueError, match="unknown API"):
        UsageReader("nope")


def test_raw_keeps_numbers_and_names_not_text() -> None:
    secret = "You are a helpful assistant. " * 10
    u = normalize(apis.ANTHROPIC, {"input_tokens": 1, "service_tier": "standard",
                                      "note": secret, "nested": {"deep": {"deeper": {"x": {"y": 1}}}},
                                      "bad": float("nan"), "obj": object()})
    assert u.raw["service_tier"] == "standard"
    assert u.raw["note"] is None
    assert u.raw["bad"] is None and u.raw["obj"] is None
    assert secret not in json.dumps(u.raw)
    assert u.raw["nested"]["deep"]["deeper"]["x"] is None  # depth capped
    json.dumps(u.to_dict())


INFINITE_COUNT = b'{"usage": {"prompt_tokens": 1e400}}'


@pytest.mark.parametrize("data", [
    b"", b"   ", b"not json", b'{"truncated": ', b"[1, 2, 3]", b"42", b'"usage"', b"null",
    b"\xff\xfe usage", b'{"usage": "string"}', b'{"usage": [1]}', b'{"usage": {}}',
    b'{"response": {"usage": 5}}', b'{"choices": "x", "usage": null}', b"[DONE] trailing",
    INFINITE_COUNT, b'{"a":' * 5000 + b"1" + b"}" * 5000,
])
@pytest.mark.parametrize("api", apis.APIS)
def test_junk_events_never_raise(api: str, data: bytes) -> None:
    r = UsageReader(api)
    r.feed_event("message_delta", data)
    r.feed_event(None, data)
    u = r.usage()
    # Nothing here ends a stream or names an error, and none of it is a usage object, except a
    # `usage` with a count that is not a count (1e400 is infinite): present, every count absent.
    assert not r.terminal and r.extras == {}
    if data == INFINITE_COUNT and api != apis.GEMINI:  # Gemini's usage is usageMetadata
        assert u is not None and u.to_dict() == {
            "input_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0,
            "output_tokens": 0}
    else:
        assert u is None


def test_done_only_ends_chat_streams() -> None:
    chat, responses = UsageReader(apis.OPENAI_CHAT), UsageReader(apis.OPENAI_RESPONSES)
    for r in (chat, responses):
        r.feed_event(None, b"[DONE]\n")
    assert chat.terminal and not responses.terminal


def test_feed_event_accepts_str_websocket_messages() -> None:
    r = UsageReader(apis.OPENAI_RESPONSES)
    r.feed_event(None, '{"type":"response.completed","response":{"usage":{"input_tokens":3,'
                       '"input_tokens_details":{"cached_tokens":2}}}}')
    u = r.usage()
    assert u is not None and u.cache_read_tokens == 2 and r.terminal


def test_events_without_needles_are_skipped_but_terminal_name_counts() -> None:
    r = UsageReader(apis.ANTHROPIC)
    r.feed_event("content_block_delta", b'{"type":"content_block_delta","delta":{"text":"x"}}')
    assert r.messages == 0  # not parsed at all
    r.feed_event("message_stop", b"{}")
    assert r.terminal


def test_text_mentioning_usage_is_harmless() -> None:
    r = UsageReader(apis.OPENAI_RESPONSES)
    r.feed_event("response.output_text.delta",
                 b'{"type":"response.output_text.delta","delta":"\\"usage\\": response.completed"}')
    assert r.usage() is None and not r.terminal
    assert r.messages == 0  # escaped quotes in text never look like a key
    r.feed_event(None, b'{"delta": "usage", "usage" : null}')  # a spaced key still counts
    assert r.messages == 1


def test_paths() -> None:
    assert parse_path("choices[0].usage") == ("choices", 0, "usage")
    assert parse_path("candidates[*].finishReason") == ("candidates", "*", "finishReason")
    for bad in ("", "a..b", ".a", "a.", "a[x]", "a[", 3):
        with pytest.raises(ValueError):
            parse_path(bad)  # type: ignore[arg-type]
    obj = {"c": [{"x": None}, {"x": "second"}], "l": [1]}
    assert get_path(obj, parse_path("c[*].x")) == "second"
    assert get_path(obj, parse_path("c[5].x")) is None
    assert get_path(obj, parse_path("l.x")) is None
    assert get_path(obj, parse_path("c.x")) is None


@pytest.mark.parametrize("doc, reason", [
    (None, "apis"),
    ({"apis": {"a": []}}, "mapping"),
    ({"apis": {"a": {"merge": "sum"}}}, "merge"),
    ({"apis": {"a": {"input": "prompt_tokens"}}}, "list"),
    ({"apis": {"a": {"input": ["a..b"]}}}, "bad field path"),
    ({"apis": {"a": {"terminal": [{}]}}}, "non-empty"),
    ({"apis": {"a": {"terminal": [{"type": "x"}]}}}, "list or null"),
    ({"apis": {"a": {"needles": [""]}}}, "needles"),
])
def test_table_errors(doc: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_table(doc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from([
        "usage", "usageMetadata", "response", "message", "choices", "type", "prompt_tokens",
        "input_tokens", "cached_tokens", "prompt_tokens_details", "cache_read_input_tokens",
        "promptTokenCount", "cost", "candidates", "finishReason", "object", "status", "0"]),
        children, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(apis.APIS), st.lists(json_values, max_size=4))
def test_any_json_never_raises(api: str, messages: list[Any]) -> None:
    r = UsageReader(api)
    for m in messages:
        r.feed_json(m)
        r.feed_event(None, json.dumps(m).encode())
    u = r.usage()
    if u is not None:
        for n in (u.input_tokens, u.cache_read_tokens, u.cache_write_tokens, u.output_tokens):
            assert type(n) is int and n >= 0
        json.dumps(u.to_dict())
        json.dumps(u.raw)


@pytest.mark.parametrize("api, event, body, error_type", [
    (apis.ANTHROPIC, "error", {"type": "error", "error": {"type": "overloaded_error",
                                                            "message": "Overloaded"}},
     "overloaded_error"),
    (apis.OPENAI_CHAT, None, {"error": {"message": "x", "type": "rate_limit_error"}},
     "rate_limit_error"),
    (apis.OPENAI_RESPONSES, "error", {"type": "error", "code": "context_length_exceeded",
                                         "message": "x", "param": None},
     "context_length_exceeded"),
    (apis.GEMINI, None, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}},
     "RESOURCE_EXHAUSTED"),
])
def test_error_events_give_error_type_not_message(api: str, event: str | None,
                                                  body: dict[str, Any], error_type: str) -> None:
    r = UsageReader(api)
    r.feed_event(event, json.dumps(body).encode())
    assert r.extras == {"error_type": error_type}
    assert r.usage() is None and not r.terminal
