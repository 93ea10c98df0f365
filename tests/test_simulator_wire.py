"""The provider simulator's wire formats, talked to directly (no proxy): the official SDKs,
usage fields per provider in JSON and SSE, and which provider a request reaches."""

import json
from typing import Any

import anthropic
import openai
import pytest
from mitmproxy.net import encoding

from tests.sim import SimClock, Simulator
from tests.sim_client import (
    BIG,
    anthropic_turn,
    chat,
    convo,
    post,
    post_json,
    responses_turn,
    sized,
    sse_events,
)


@pytest.fixture
def clock() -> SimClock:
    """Virtual time from 0 (conftest's starts at 1e6): times below are absolute."""
    return SimClock()


# --- the basic slice: OpenAI chat and Anthropic through the official SDKs ---------------------

def test_openai_chat_sdk_json_and_stream(sim: Simulator) -> None:
    client = openai.OpenAI(base_url=sim.url + "/p/openai/v1", api_key="sk-test", max_retries=0)
    first = client.chat.completions.create(model="gpt-5.6", messages=convo(0),
                                           prompt_cache_key="conv-1")
    assert first.choices[0].message.content == "ok"
    assert first.id.startswith("chatcmpl-")
    assert first.usage.prompt_tokens > 1024
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(model="gpt-5.6", messages=convo(1),
                                            prompt_cache_key="conv-1")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 1024 <= cached < second.usage.prompt_tokens  # prompt_tokens includes cached tokens
    # GPT-5.6 reads at turn 1's implicit breakpoint (its whole prompt), not in 128-token steps
    assert cached == first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cache_write_tokens == first.usage.prompt_tokens
    stream = client.chat.completions.create(model="gpt-5.6", messages=convo(1), stream=True,
                                            prompt_cache_key="conv-1",
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    reqs = sim.requests
    assert [r.path for r in reqs] == ["/v1/chat/completions"] * 3
    assert {r.provider for r in reqs} == {"openai"} and len({r.replica for r in reqs}) == 1
    assert reqs[1].usage["prompt_tokens_details"]["cached_tokens"] == cached
    assert reqs[0].body["prompt_cache_key"] == "conv-1" and reqs[0].status == 200
    assert reqs[0].header("AUTHORIZATION") == "Bearer sk-test"
    assert json.loads(reqs[0].raw_body) == reqs[0].body


def test_openai_chat_stream_usage_only_when_requested(sim: Simulator) -> None:
    for include, expect_usage in ((None, False), (False, False), (True, True)):
        body = chat(convo(0), stream=True)
        if include is not None:
            body["stream_options"] = {"include_usage": include}
        status, headers, data = post(sim, "/p/openai/v1/chat/completions", body)
        assert status == 200 and headers["content-type"] == "text/event-stream"
        assert headers["transfer-encoding"] == "chunked"
        events = sse_events(data)
        assert events[-1] == (None, "[DONE]")
        chunks = [json.loads(d) for _, d in events[:-1]]
        usage_chunks = [c for c in chunks if c.get("usage")]
        if expect_usage:
            assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
            assert all(c["usage"] is None for c in chunks[:-1])
        else:
            assert usage_chunks == [] and all("usage" not in c for c in chunks)
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_anthropic_sdk_json_and_stream(sim: Simulator) -> None:
    client = anthropic.Anthropic(base_url=sim.url + "/p/anthropic", api_key="sk-ant-test",
                                 max_retries=0)
    system = [{"type": "text", "text": BIG, "cache_control": {"type": "ephemeral"}}]
    first = client.messages.create(model="claude-sonnet-4-6", max_tokens=16, system=system,
                                   messages=[{"role": "user", "content": "hi"}])
    assert first.id.startswith("msg_") and first.content[0].text == "ok"
    written = first.usage.cache_creation_input_tokens
    assert written > 1024 and first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == written
    assert first.usage.input_tokens == 1  # only the unmarked "hi" after the last marker
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=16, system=system,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens == written
    assert final.usage.cache_creation_input_tokens == 0 and final.usage.input_tokens == 1
    assert [r.replica for r in sim.requests] == [0, 0]


def test_anthropic_sse_event_sequence(sim: Simulator) -> None:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 16, "stream": True,
            "system": [{"type": "text", "text": BIG, "cache_control": {"type": "ephemeral",
                                                                       "ttl": "1h"}}],
            "messages": [{"role": "user", "content": "hi"}]}
    status, headers, data = post(sim, "/p/anthropic/v1/messages", body)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = sse_events(data)
    assert [e for e, _ in events] == ["message_start", "content_block_start", "ping",
                                      "content_block_delta", "content_block_stop",
                                      "message_delta", "message_stop"]
    start = json.loads(events[0][1])["message"]["usage"]
    delta = json.loads(events[5][1])["usage"]
    assert start["cache_creation"] == {"ephemeral_5m_input_tokens": 0,
                                       "ephemeral_1h_input_tokens":
                                           start["cache_creation_input_tokens"]}
    assert "cache_creation" not in delta
    assert delta["cache_creation_input_tokens"] == start["cache_creation_input_tokens"] > 1024
    assert json.loads(events[3][1])["delta"]["text"] == "ok"


# --- usage fields per provider, JSON and SSE ---------------------------------------------------

def stream_chunks(sim: Simulator, path: str, body: dict[str, Any],
                  headers: dict[str, str] | None = None) -> list[Any]:
    status, h, data = post(sim, path, body, headers)
    assert status == 200 and h["content-type"] == "text/event-stream", data
    return [d if d == "[DONE]" else json.loads(d) for _, d in sse_events(data)]


def test_deepseek_usage(sim: Simulator) -> None:
    path = "/p/deepseek/chat/completions"
    post_json(sim, path, chat(convo(0), model="deepseek-chat"))
    _, r = post_json(sim, path, chat(convo(1), model="deepseek-chat"))
    u = r["usage"]
    assert u["prompt_cache_hit_tokens"] > 1024
    assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
    assert "prompt_tokens_details" not in u
    chunks = stream_chunks(sim, path, chat(convo(1), model="deepseek-chat", stream=True,
                                           stream_options={"include_usage": True}))
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"] == []
    u = chunks[-2]["usage"]
    # identical resend: whole 64-token storage units (https://api-docs.deepseek.com/news/news0802)
    assert u["prompt_cache_hit_tokens"] == u["prompt_tokens"] // 64 * 64


def test_moonshot_usage(sim: Simulator) -> None:
    path = "/p/moonshot/v1/chat/completions"
    post_json(sim, path, chat(convo(0), model="kimi-k2.6"))
    _, r = post_json(sim, path, chat(convo(1), model="kimi-k2.6"))
    assert r["usage"]["cached_tokens"] > 1024 and "prompt_tokens_details" not in r["usage"]
    # streaming: usage sits in choices[0].usage of the finish chunk, even without include_usage
    chunks = stream_chunks(sim, path, chat(convo(1), model="kimi-k2.6", stream=True))
    assert chunks[-1] == "[DONE]"
    finish = chunks[-2]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["choices"][0]["usage"]["cached_tokens"] > 1024
    assert all("usage" not in c for c in chunks[:-1])


def test_openrouter_usage_always_streamed(sim: Simulator) -> None:
    path = "/p/openrouter/api/v1/chat/completions"
    _, r = post_json(sim, path, chat(convo(0), model="openai/gpt-5.5"))
    u = r["usage"]
    assert u["cost"] > 0 and u["cost_details"]["upstream_inference_cost"] == u["cost"]
    assert u["prompt_tokens_details"]["cache_write_tokens"] == 0  # free before GPT-5.6
    _, r = post_json(sim, path, chat(convo(0), model="openai/gpt-5.6"))
    assert r["usage"]["prompt_tokens_details"]["cache_write_tokens"] == r["usage"]["prompt_tokens"]
    chunks = stream_chunks(sim, path, chat(convo(0), model="openai/gpt-5.6", stream=True))
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["cost"] > 0


def test_xai_usage(sim: Simulator) -> None:
    path = "/p/xai/v1/chat/completions"
    for n in range(2):
        _, r = post_json(sim, path, chat(convo(n), model="grok-4"), x_grok_conv_id="c")
    details = r["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] > 1024 and "cache_write_tokens" not in details
    assert details["text_tokens"] == r["usage"]["prompt_tokens"]
    for n in range(2):
        _, r = post_json(sim, "/p/xai/v1/responses", responses_turn(n, prompt_cache_key="c"))
    assert r["object"] == "response" and r["id"].startswith("resp_")
    assert r["usage"]["input_tokens_details"] == {"cached_tokens": r["usage"]["input_tokens_details"]
                                                  ["cached_tokens"]}
    assert r["usage"]["input_tokens_details"]["cached_tokens"] > 1024


def test_openai_responses_sdk(sim: Simulator) -> None:
    client = openai.OpenAI(base_url=sim.url + "/p/openai/v1", api_key="sk-test", max_retries=0)
    first = client.responses.create(model="gpt-5.6", input=responses_turn(0)["input"],
                                    prompt_cache_key="r1")
    assert first.output_text == "ok" and first.usage.input_tokens_details.cached_tokens == 0
    events = list(client.responses.create(model="gpt-5.6", input=responses_turn(1)["input"],
                                          prompt_cache_key="r1", stream=True))
    assert events[0].type == "response.created" and events[0].response.usage is None
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage.input_tokens_details.cached_tokens > 1024
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_codex_sse_and_constraints(sim: Simulator) -> None:
    path = "/p/codex/backend-api/codex/responses"
    chunks = stream_chunks(sim, path, responses_turn(0, stream=True, store=False,
                                                      prompt_cache_key="s"), {"session-id": "s"})
    names = [c["type"] for c in chunks]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert "response.output_text.delta" in names
    usage = chunks[-1]["response"]["usage"]
    assert usage["input_tokens_details"] == {"cached_tokens": 0}
    assert chunks[-1]["response"]["prompt_cache_key"] == "s"

    status, err = post_json(sim, path, responses_turn(0, store=False))
    assert status == 400 and "stream" in err["detail"].lower()
    for extra in ({"prompt_cache_retention": "24h"},
                  {"prompt_cache_options": {"mode": "explicit"}}):
        status, err = post_json(sim, path, responses_turn(0, stream=True, **extra))
        assert status == 400 and next(iter(extra)) in err["detail"]
    nested = responses_turn(0, stream=True)
    nested["input"][1]["content"][0]["prompt_cache_breakpoint"] = {"mode": "explicit"}
    status, err = post_json(sim, path, nested)
    assert status == 400 and "prompt_cache_breakpoint" in err["detail"]


def test_codex_zstd_request_body(sim: Simulator) -> None:
    body = responses_turn(0, stream=True, store=False, prompt_cache_key="z")
    compressed = encoding.encode(json.dumps(body).encode(), "zstd")
    status, _, data = post(sim, "/p/codex/backend-api/codex/responses", None,
                           {"content-encoding": "zstd"}, raw=compressed)
    assert status == 200 and b"response.completed" in data
    req = sim.requests[-1]
    assert req.raw_body == compressed and req.body == body
    assert req.header("Content-Encoding") == "zstd"
    status, _, _ = post(sim, "/p/codex/backend-api/codex/responses", None,
                        {"content-encoding": "zstd"}, raw=b"not zstd at all")
    assert status == 400


def test_openai_rejects_retention_with_options_ttl(sim: Simulator) -> None:
    body = chat(convo(0), prompt_cache_retention="24h", prompt_cache_options={"ttl": "30m"})
    status, err = post_json(sim, "/p/openai/v1/chat/completions", body)
    assert status == 400 and err["error"]["type"] == "invalid_request_error"


def test_gemini_native_usage(sim: Simulator) -> None:
    big = BIG * 2  # Gemini 2.5 caches from 2,048 tokens: https://ai.google.dev/gemini-api/docs/caching
    body = {"systemInstruction": {"parts": [{"text": big}]},
            "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    path = "/p/gemini/v1beta/models/gemini-2.5-flash:generateContent"
    _, first = post_json(sim, path, body)
    meta = first["usageMetadata"]
    assert meta["promptTokenCount"] > 1024 and "cachedContentTokenCount" not in meta
    assert first["modelVersion"] == "gemini-2.5-flash"
    _, second = post_json(sim, path, body)
    assert second["usageMetadata"]["cachedContentTokenCount"] > 1024
    chunks = stream_chunks(sim, path.replace(":generateContent", ":streamGenerateContent") +
                           "?alt=sse", body)
    assert len(chunks) == 2 and chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert "cachedContentTokenCount" not in chunks[0]["usageMetadata"]
    assert chunks[-1]["usageMetadata"]["cachedContentTokenCount"] > 1024
    status, h, data = post(sim, path.replace(":generateContent", ":streamGenerateContent"), body)
    assert status == 200 and h["content-type"] == "application/json"
    assert isinstance(json.loads(data), list)
    assert sim.requests[-1].query == "" and sim.requests[-2].query == "alt=sse"


@pytest.mark.parametrize("model,tokens,cached", [
    ("gemini-2.5-flash", 2000, False), ("gemini-2.5-pro", 2100, True),
    ("gemini-3-flash", 4000, False), ("gemini-3.1-pro-preview", 4200, True)])
def test_gemini_minimum_per_model(sim: Simulator, model: str, tokens: int, cached: bool) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": sized(tokens)}]}]}
    path = f"/p/gemini/v1beta/models/{model}:generateContent"
    post_json(sim, path, body)
    meta = post_json(sim, path, body)[1]["usageMetadata"]
    assert ("cachedContentTokenCount" in meta) is cached, meta


def test_proxy_with_anthropic_sdk_headers(sim: Simulator) -> None:
    client = anthropic.Anthropic(base_url=sim.url + "/p/proxy", api_key="k", max_retries=0,
                                 default_headers={"X-Session-Id": "sess-1"})
    for n in range(3):
        body = anthropic_turn(n)
        client.messages.create(model=body["model"], max_tokens=8, system=body["system"],
                               messages=body["messages"])
    assert len({r.replica for r in sim.requests}) == 1
    assert all(r.provider == "proxy" for r in sim.requests)
    assert sim.requests[-1].usage["cache_read_input_tokens"] > 1024


# --- provider selection --------------------------------------------------------------------

def test_provider_by_prefix_host_or_default(sim: Simulator) -> None:
    post(sim, "/v1/chat/completions", chat(convo(0)), {"Host": "api.x.ai"})
    post(sim, "/v1/messages", anthropic_turn(0), {"Host": "api.anthropic.com:443"})
    post(sim, "/v1/chat/completions", chat(convo(0)), {"Host": "example.com"})
    status, _, _ = post(sim, "/p/nope/v1/chat/completions", chat(convo(0)))
    assert status == 404
    status, err = post_json(sim, "/p/anthropic/v1/complete", {"model": "claude"})
    assert status == 404 and err["error"]["type"] == "not_found_error"
    assert [r.provider for r in sim.requests] == ["xai", "anthropic", "openai", "nope",
                                                  "anthropic"]
    assert sim.requests[-1].path == "/v1/complete"
    with Simulator(default_provider="anthropic") as other:
        assert post(other, "/v1/messages", anthropic_turn(0))[0] == 200
        assert other.requests[0].provider == "anthropic"
    with pytest.raises(ValueError, match="unknown default provider"):
        Simulator(default_provider="nope")


def test_non_json_body_is_a_400(sim: Simulator) -> None:
    status, _, data = post(sim, "/p/openai/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and json.loads(data)["error"]["message"]
    assert sim.requests[0].body is None and sim.requests[0].raw_body == b"{not json"
