"""The provider simulator's cache models, talked to directly (no proxy): automatic prefix
caching (thresholds, chunks, idle TTL) and Anthropic's markers (limits, lookback, expiry)."""

from typing import Any

import pytest

from tests.sim import SimClock, Simulator
from tests.sim.cache import anthropic_minimum
from tests.sim_client import (
    BIG,
    OPENAI,
    chat,
    convo,
    post_json,
    sized,
)


@pytest.fixture
def clock() -> SimClock:
    """Virtual time from 0 (conftest's starts at 1e6): times below are absolute."""
    return SimClock()


# --- automatic prefix caching ---------------------------------------------------------------




@pytest.mark.parametrize("tokens,cached", [(1023, 0), (1024, 1024), (1151, 1024), (1152, 1152),
                                           (3000, 2944)])
def test_automatic_cache_threshold_and_increments(sim: Simulator, tokens: int,
                                                  cached: int) -> None:
    body = chat([{"role": "user", "content": sized(tokens)}], prompt_cache_key="k")
    _, first = post_json(sim, "/p/openai/v1/chat/completions", body)
    _, second = post_json(sim, "/p/openai/v1/chat/completions", body)
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"] == tokens
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == cached


def test_automatic_cache_counts_the_common_prefix_in_128_token_chunks(sim: Simulator) -> None:
    path = "/p/openai/v1/chat/completions"
    base = [{"role": "system", "content": sized(1500)}, {"role": "user", "content": sized(600)}]
    post_json(sim, path, chat(base, prompt_cache_key="k"))
    changed = [base[0], {"role": "user", "content": sized(600)[:-1] + "b"}]
    _, r = post_json(sim, path, chat(changed, prompt_cache_key="k"))
    # 1500 + 599 tokens in common, token by token, counted in whole 128-token chunks
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 2048
    changed_first = [{"role": "system", "content": "b" + sized(1500)[1:]}, base[1]]
    _, r = post_json(sim, path, chat(changed_first, prompt_cache_key="k"))
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # the same text under another role is another prompt
    as_user = [{"role": "user", "content": sized(1500)}, base[1]]
    _, r = post_json(sim, path, chat(as_user, prompt_cache_key="k"))
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_markers_and_string_parts_render_the_same_prompt(sim: Simulator) -> None:
    # A string and a one-part text list are the same prompt; a cache_control or
    # prompt_cache_breakpoint directive is not part of it.
    path = "/p/openai/v1/chat/completions"
    post_json(sim, path, chat([{"role": "system", "content": BIG},
                               {"role": "user", "content": "q"}], prompt_cache_key="k"))
    marked = [{"role": "system", "content": [
        {"type": "text", "text": BIG, "prompt_cache_breakpoint": {"mode": "explicit"}}]},
        {"role": "user", "content": [{"type": "text", "text": "q",
                                      "cache_control": {"type": "ephemeral"}}]}]
    _, r = post_json(sim, path, chat(marked, prompt_cache_key="k"))
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == \
        r["usage"]["prompt_tokens"] // 128 * 128


def test_gpt_5_6_caches_at_breakpoints_only(sim: Simulator) -> None:
    def send(msgs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        status, r = post_json(sim, OPENAI, chat(msgs, model="gpt-5.6", prompt_cache_key="k",
                                                **extra))
        assert status == 200, r
        details = r["usage"]["prompt_tokens_details"]
        return {"prompt": r["usage"]["prompt_tokens"], "read": details["cached_tokens"],
                "write": details["cache_write_tokens"]}

    one = send(convo(0))
    assert one == {"prompt": one["prompt"], "read": 0, "write": one["prompt"]}
    two = send(convo(1))  # the implicit breakpoint on turn 1's latest message is read
    assert two["read"] == one["prompt"] and two["write"] == two["prompt"] - one["prompt"]
    # Another conversation with the same system prompt: thousands of shared tokens, but no
    # breakpoint ever ended there, so nothing is read (the pitfall https://developers.openai.com/api/docs/guides/prompt-caching
    # warns of)...
    other = [{"role": "system", "content": BIG}, {"role": "user", "content": "other"}]
    assert send(other)["read"] == 0
    # ...until a request marks the end of the stable prefix.
    marked = [{"role": "system", "content": [{"type": "text", "text": BIG,
                                              "prompt_cache_breakpoint": {"mode": "explicit"}}]},
              {"role": "user", "content": "third"}]
    send(marked)
    fourth = send([marked[0], {"role": "user", "content": "fourth"}])
    assert 1024 < fourth["read"] < fourth["prompt"]
    # explicit mode: no implicit breakpoint, so an unmarked prompt writes nothing
    assert send([{"role": "user", "content": BIG + "!"}],
                prompt_cache_options={"mode": "explicit"})["write"] == 0


def test_gpt_5_6_breakpoint_on_an_unsupported_part_is_a_400(sim: Simulator) -> None:
    # The guide: explicit breakpoints on Chat text, image_url, input_audio, file and refusal
    # parts, Responses input_text, input_image and input_file; anything else is rejected.
    mark = {"prompt_cache_breakpoint": {"mode": "explicit"}}
    ok_chat = [{"role": "system", "content": [{"type": "text", "text": BIG, **mark}]},
               {"role": "assistant", "content": [{"type": "refusal", "refusal": "no", **mark}]},
               {"role": "user", "content": [{"type": "image_url",
                                             "image_url": {"url": "data:,"}, **mark}]}]
    assert post_json(sim, OPENAI, chat(ok_chat, model="gpt-5.6"))[0] == 200
    for bad in ([{"role": "user", "content": "q", **mark}],  # on a message
                [{"role": "user", "content": [{"type": "text", "text": "q",
                                               "prompt_cache_breakpoint": {"mode": "auto"}}]}]):
        status, err = post_json(sim, OPENAI, chat(bad, model="gpt-5.6"))
        assert status == 400 and "prompt_cache_breakpoint" in err["error"]["message"], err
    tools = [{"type": "function", "function": {"name": "f"}, **mark}]
    assert post_json(sim, OPENAI, chat(convo(0), model="gpt-5.6", tools=tools))[0] == 400
    path = "/p/openai/v1/responses"
    ok = {"model": "gpt-5.6", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": BIG, **mark}]},
        {"type": "function_call_output", "call_id": "c",
         "output": [{"type": "input_text", "text": "out", **mark}]}]}
    assert post_json(sim, path, ok)[0] == 200
    replayed = {"model": "gpt-5.6", "input": [
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "a", **mark}]}]}
    assert post_json(sim, path, replayed)[0] == 400


def test_automatic_cache_idle_ttl(sim: Simulator, clock: SimClock) -> None:
    body = chat(convo(0), prompt_cache_key="k")
    path = "/p/openai/v1/chat/completions"
    post_json(sim, path, body)
    clock.advance(590)
    assert post_json(sim, path, body)[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    clock.advance(590)  # the hit above refreshed it
    assert post_json(sim, path, body)[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    clock.advance(601)
    assert post_json(sim, path, body)[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_auto_ttl_override(clock: SimClock) -> None:
    with Simulator(replicas=1, clock=clock, auto_ttl=30) as s:
        body = chat(convo(0))
        post_json(s, "/v1/chat/completions", body)
        clock.advance(31)
        _, r = post_json(s, "/v1/chat/completions", body)
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# --- Anthropic marker caching ---------------------------------------------------------------

def messages_body(blocks: list[dict[str, Any]], model: str = "claude-sonnet-4-6",
                  **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": blocks}],
            **extra}


def text(t: str, ttl: str | None = None, mark: bool = False) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": t}
    if ttl or mark:
        block["cache_control"] = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return block


def anth(sim: Simulator, body: dict[str, Any]) -> tuple[int, Any]:
    return post_json(sim, "/p/anthropic/v1/messages", body)


def test_five_markers_rejected_with_anthropic_message(sim: Simulator) -> None:
    status, err = anth(sim, messages_body([text(f"b{i}", mark=True) for i in range(5)]))
    assert status == 400
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["message"] == \
        "A maximum of 4 blocks with cache_control may be provided. Found 5."
    assert err["request_id"].startswith("req_")
    # the top-level automatic marker takes one of the four slots
    body = messages_body([text(f"b{i}", mark=True) for i in range(4)],
                         cache_control={"type": "ephemeral"})
    status, err = anth(sim, body)
    assert status == 400 and err["error"]["message"].endswith("Found 5.")
    assert anth(sim, messages_body([text(f"b{i}", mark=True) for i in range(4)]))[0] == 200
    assert sim.requests[0].status == 400 and sim.requests[0].replica == -1
    assert sim.requests[0].usage is None


def test_1h_marker_after_5m_rejected(sim: Simulator) -> None:
    body = messages_body([text("x")], system=[text(BIG, mark=True), text("more", ttl="1h")])
    status, err = anth(sim, body)
    assert status == 400
    assert err["error"]["message"].startswith(
        "system.1.cache_control.ttl: a ttl='1h' cache_control block must not come after a "
        "ttl='5m' cache_control block.")
    ok = messages_body([text("q", mark=True)], system=[text(BIG, ttl="1h"), text("more")])
    status, r = anth(sim, ok)
    assert status == 200
    cc = r["usage"]["cache_creation"]
    assert cc["ephemeral_1h_input_tokens"] > 1024 and cc["ephemeral_5m_input_tokens"] > 0
    assert r["usage"]["cache_creation_input_tokens"] == sum(cc.values())


def test_below_model_minimum_is_silently_uncached(sim: Simulator) -> None:
    body = messages_body([text("q")], model="claude-haiku-4-5-20251001",
                         system=[text(BIG, mark=True)])
    for _ in range(2):
        status, r = anth(sim, body)
        assert status == 200
        u = r["usage"]
        assert u["cache_creation_input_tokens"] == 0 and u["cache_read_input_tokens"] == 0
        assert u["input_tokens"] > 1024
    # the same prompt on a 1024-minimum model is cached
    body["model"] = "claude-sonnet-4-5"
    assert anth(sim, body)[1]["usage"]["cache_creation_input_tokens"] > 1024


def test_anthropic_minimum_table() -> None:
    assert anthropic_minimum("claude-opus-4-6") == 4096
    assert anthropic_minimum("claude-haiku-4-5-20251001") == 4096
    assert anthropic_minimum("claude-sonnet-4-5-20250929") == 1024
    assert anthropic_minimum("anthropic/claude-sonnet-4.6") == 1024
    assert anthropic_minimum("claude-opus-4-8[1m]") == 1024
    assert anthropic_minimum("claude-sonnet-5") == 1024
    assert anthropic_minimum("claude-opus-5") == 512
    assert anthropic_minimum("claude-3-5-sonnet-20241022") == 1024
    assert anthropic_minimum("something-else") == 1024


def test_reads_only_at_prefixes_that_ended_at_a_marker(sim: Simulator) -> None:
    # turn 1 marks the end of the first user message: the system prefix alone is never written
    _, r1 = anth(sim, messages_body([text("question one", mark=True)], system=[text(BIG)]))
    assert r1["usage"]["cache_creation_input_tokens"] > 1024
    _, r2 = anth(sim, messages_body([text("question two", mark=True)], system=[text(BIG)]))
    assert r2["usage"]["cache_read_input_tokens"] == 0  # shares the system bytes, but no marker
    # marking the system block writes that prefix; a later request reads it
    anth(sim, messages_body([text("three")], system=[text(BIG, mark=True)]))
    _, r4 = anth(sim, messages_body([text("four", mark=True)], system=[text(BIG)]))
    assert r4["usage"]["cache_read_input_tokens"] > 1024
    # only the "four" block up to its marker is written; nothing after the last marker
    assert 0 < r4["usage"]["cache_creation_input_tokens"] < 20
    assert r4["usage"]["input_tokens"] == 0


@pytest.mark.parametrize("distance,hit", [(1, True), (19, True), (20, False), (25, False)])
def test_twenty_block_lookback(sim: Simulator, distance: int, hit: bool) -> None:
    blocks = [text(BIG)] + [text(f"block {i}") for i in range(30)]
    first = [dict(b) for b in blocks[:5]]
    first[-1] = text(first[-1]["text"], mark=True)
    _, r1 = anth(sim, messages_body(first))
    written = r1["usage"]["cache_creation_input_tokens"]
    assert written > 1024
    second = [dict(b) for b in blocks[:5 + distance]]
    second[-1] = text(second[-1]["text"], mark=True)
    _, r2 = anth(sim, messages_body(second))
    assert r2["usage"]["cache_read_input_tokens"] == (written if hit else 0)
    # an intermediate marker at the old position restores the hit
    second[4] = text(second[4]["text"], mark=True)
    _, r3 = anth(sim, messages_body(second))
    assert r3["usage"]["cache_read_input_tokens"] >= written


def test_marker_ttl_expiry_on_the_sim_clock(sim: Simulator, clock: SimClock) -> None:
    body5 = messages_body([text("q")], system=[text(BIG, mark=True)])
    written = anth(sim, body5)[1]["usage"]["cache_creation_input_tokens"]
    clock.advance(299)
    assert anth(sim, body5)[1]["usage"]["cache_read_input_tokens"] == written
    clock.advance(299)  # a hit refreshes the 5 minutes
    assert anth(sim, body5)[1]["usage"]["cache_read_input_tokens"] == written
    clock.advance(301)
    u = anth(sim, body5)[1]["usage"]
    assert u["cache_read_input_tokens"] == 0 and u["cache_creation_input_tokens"] == written

    body1h = messages_body([text("q")], system=[text(BIG + "!", ttl="1h")])
    anth(sim, body1h)
    clock.advance(3000)
    assert anth(sim, body1h)[1]["usage"]["cache_read_input_tokens"] > 0
    clock.advance(3601)
    assert anth(sim, body1h)[1]["usage"]["cache_read_input_tokens"] == 0


def test_top_level_automatic_marker_moves_forward(sim: Simulator) -> None:
    def body(n: int) -> dict[str, Any]:
        msgs = []
        for i in range(n + 1):
            msgs.append({"role": "user", "content": f"q{i}"})
            if i < n:
                msgs.append({"role": "assistant",
                             "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                         {"type": "text", "text": f"a{i}"}]})
        return {"model": "claude-sonnet-4-6", "max_tokens": 8, "system": BIG, "messages": msgs,
                "cache_control": {"type": "ephemeral"}}

    u1 = anth(sim, body(0))[1]["usage"]
    assert u1["cache_creation_input_tokens"] > 1024 and u1["input_tokens"] == 0
    u2 = anth(sim, body(1))[1]["usage"]
    assert u2["cache_read_input_tokens"] == u1["cache_creation_input_tokens"]
    assert u2["cache_creation_input_tokens"] > 0 and u2["input_tokens"] == 0
