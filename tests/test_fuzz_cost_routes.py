"""The routes added after tests/test_fuzz_cost.py's generator was fixed, under the same budgets
of CPU time and memory (its `check`): GPT-5.6 breakpoints, Claude Code's billing block removed on
another provider's Anthropic endpoint, provider diagnostics linked on Anthropic and OpenAI,
Bedrock (InvokeModel with the model in the URL, Converse's cachePoints), Vertex rawPredict. And
the AWS event stream tap, which reads every chunk of a Bedrock stream on mitmproxy's loop:
adversarial streams cost it linear time and bounded memory, whatever the frames claim."""

import gc
import json
import struct
import time
import tracemalloc
import zlib
from typing import Any

import pytest

from affinity_addon.catalog.diagnostics import default_diagnostics
from affinity_addon.request.provider_link import ResponseLinks
from affinity_addon.response.eventstream import EventStreamTap
from tests.sim.eventstream import event_frame, frame
from tests.test_fuzz_cost import CONST_MEM, CONST_MS, MB, MEM_PER_BYTE, MS_PER_MB, check

pytestmark = pytest.mark.slow  # timing and memory benchmarks

BILLING = "x-anthropic-billing-header: cc_version=2.1.197.14a; cc_entrypoint=cli;"
BEARER = {"authorization": "Bearer ABSKQmVkcm9ja0FQSUtleQ"}
SONNET_URL = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0"
VERTEX = ("us-east5-aiplatform.googleapis.com",
          "/v1/projects/p/locations/us-east5/publishers/anthropic/models/"
          "claude-sonnet-4-5@20250929:rawPredict")
TINY = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}] * 25_000
PARTS = [{"type": "text", "text": "a"}] * 50_000


def converse(messages: int, blocks: int, system: int, tools: int) -> dict[str, Any]:
    # Blocks of 8 characters, not 1: `{"text": "x"}` alone peaks at 27.6x in orjson.loads (a
    # 12-byte object becomes a ~180-byte dict on top of orjson's arena, measured), the parse's
    # share that test_fuzz_cost.py's factor already prices, not the addon's.
    return {"system": [{"text": "s" * 30}] * system,
            "messages": [{"role": "user" if i % 2 == 0 else "assistant",
                          "content": [{"text": "x" * 8}] * blocks} for i in range(messages)],
            "toolConfig": {"tools": [{"toolSpec": {"name": f"t{i}", "inputSchema": {
                "json": {"type": "object"}}}} for i in range(tools)]}}


# name -> (host, path, body, headers, provider diagnostics linked)
CASES: dict[str, tuple[str, str, Any, dict[str, str] | None, bool]] = {
    "GPT-5.6 chat, 50,000 tiny messages": (
        "api.openai.com", "/v1/chat/completions", {"model": "gpt-5.6", "messages": TINY}, None,
        False),
    "GPT-5.6 chat, 50,000 text parts": (
        "api.openai.com", "/v1/chat/completions",
        {"model": "gpt-5.6", "messages": [{"role": "user", "content": PARTS}]}, None, False),
    "GPT-5.6 responses, 8,000 system items, diagnostics linked": (
        "api.openai.com", "/v1/responses",
        {"model": "gpt-5.6", "input": [{"role": "system", "content": "s" * 30}] * 8000
         + [{"role": "user", "content": "hi"}]}, None, True),
    "Anthropic, 50,000 tiny messages, diagnostics linked": (
        "api.anthropic.com", "/v1/messages", {"model": "claude-sonnet-4-5", "messages": TINY},
        None, True),
    "DeepSeek Anthropic, 10,000 billing blocks": (
        "api.deepseek.com", "/anthropic/v1/messages",
        {"model": "claude-sonnet-4-5", "system": [{"type": "text", "text": BILLING}] * 10_000,
         "messages": [{"role": "user", "content": "hi"}]}, None, False),
    "DeepSeek Anthropic, a 6 MB block behind the billing header": (
        "api.deepseek.com", "/anthropic/v1/messages",
        {"model": "claude-sonnet-4-5",
         "system": [{"type": "text", "text": BILLING + "\n" + "x" * 6_000_000}],
         "messages": [{"role": "user", "content": "hi"}]}, None, False),
    "Bedrock invoke, 50,000 tiny messages": (
        "bedrock-runtime.us-east-1.amazonaws.com", SONNET_URL + "/invoke",
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 8, "messages": TINY}, BEARER,
        False),
    "Bedrock invoke, a 300,000-character model id": (
        "bedrock-runtime.us-east-1.amazonaws.com", "/model/" + "a%3A" * 75_000 + "/invoke",
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 8,
         "messages": [{"role": "user", "content": "hi"}]}, BEARER, False),
    "Bedrock converse, 30,000 messages": (
        "bedrock-runtime.us-east-1.amazonaws.com", SONNET_URL + "/converse",
        converse(30_000, 1, 1, 0), BEARER, False),
    "Bedrock converse, 50,000 blocks in one message": (
        "bedrock-runtime.us-east-1.amazonaws.com", SONNET_URL + "/converse",
        converse(1, 50_000, 1, 0), BEARER, False),
    "Bedrock converse, 8,000 system blocks and 20,000 tools": (
        "bedrock-runtime.us-east-1.amazonaws.com", SONNET_URL + "/converse",
        converse(1, 1, 8000, 20_000), BEARER, False),
    "Vertex rawPredict, 50,000 tiny messages": (
        *VERTEX, {"anthropic_version": "vertex-2023-10-16", "max_tokens": 8, "messages": TINY},
        None, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_new_routes_are_within_budget(name: str) -> None:
    host, path, body, headers, linked = CASES[name]
    kw = {"links": ResponseLinks(default_diagnostics())} if linked else {}
    check(host, path, json.dumps(body).encode(), headers, **kw)


def _tap_cost(chunks: list[bytes]) -> tuple[float, int, EventStreamTap]:
    """(CPU seconds, best of three; tracemalloc peak) of feeding `chunks` through a tap."""
    best, tap = float("inf"), None
    for _ in range(3):
        tap = EventStreamTap(None, lambda headers, payload: None)
        gc.collect()
        t = time.thread_time()
        for c in chunks:
            tap(c)
        tap(b"")
        best = min(best, time.thread_time() - t)
    tap = EventStreamTap(None, lambda headers, payload: None)
    gc.collect()
    tracemalloc.start()
    try:
        for c in chunks:
            tap(c)
        tap(b"")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return best, peak, tap


def _prelude(total: int, headers: int) -> bytes:
    head = struct.pack("!II", total, headers)
    return head + struct.pack("!I", zlib.crc32(head))


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


MANY = b"".join(event_frame("chunk", {"bytes": "eyJ0eXBlIjoicGluZyJ9"}) for _ in range(40_000))
STREAMS = {
    # 40,000 small frames, in the chunk sizes a socket delivers, and one byte at a time
    "40,000 frames in 16 KiB chunks": (_split(MANY, 16 << 10), None),
    "10,000 frames, 1 byte per chunk": (_split(MANY[:len(MANY) // 4], 1), None),
    # one frame that claims the largest payload AWS allows, then trickles in
    "a 24 MiB frame, 64 KiB at a time": (_split(frame({":event-type": "chunk"},
                                                       b"x" * (24 << 20)), 64 << 10), None),
    # lengths no frame can have: stops at once, whatever follows
    "a broken prelude, then 8 MB": ([b"\xff" * 16] + _split(b"\x00" * 8_000_000, 16 << 10),
                                    "prelude CRC"),
    "impossible lengths, then 8 MB": ([_prelude(1 << 31, 0)] + _split(b"\x00" * 8_000_000, 16 << 10),
                                      "impossible lengths"),
    "a bad message CRC, then 40,000 frames": (_split(MANY[:-1] + bytes([MANY[-1] ^ 1]), 16 << 10),
                                              "message CRC"),
    # 10,000 headers in one frame, under the 128 KiB header cap
    "a frame of tiny headers": ([frame({f"h{i}": "" for i in range(10_000)}, b"{}")], None),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_adversarial_event_streams_cost_linear_time_and_bounded_memory(name: str) -> None:
    chunks, failure = STREAMS[name]
    size = sum(len(c) for c in chunks)
    cpu, peak, tap = _tap_cost(chunks)
    # CPU per chunk counts too: a 1-byte chunk costs a call however small it is
    budget = (MS_PER_MB * size / MB + CONST_MS) / 1000 + len(chunks) * 5e-6
    assert cpu <= budget, f"{size / MB:.2f} MB took {cpu * 1000:.0f} ms (budget {budget * 1000:.0f})"
    # at most one unfinished frame (and the chunk being read) is held: memory follows the
    # largest frame and chunk, not the stream. The frame itself, once in the buffer (which
    # over-allocates an eighth as it grows) and once as the payload handed on: 2.25x.
    largest = max(24 << 20 if "24 MiB" in name else 200_000, max(len(c) for c in chunks))
    assert peak <= 2.25 * largest + CONST_MEM, f"peak {peak / MB:.1f} MB for {size / MB:.1f} MB"
    assert peak <= MEM_PER_BYTE * size + CONST_MEM
    if failure:
        assert tap.failed is not None and failure in tap.failed
    else:
        assert tap.failed is None, tap.failed
