"""Responses fuzzed through the addon in process: SSE streams cut anywhere, junk usage, bad
JSON bodies and WebSocket frames, gigantic events. Every byte passes unchanged and every flow
gets exactly one intact record (see tests/fuzz_rig.py)."""

import copy
import json
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import flow as mflow
from mitmproxy import http, websocket
from mitmproxy.http import Headers
from mitmproxy.net import encoding
from mitmproxy.test import tflow, tutils
from wsproto.frame_protocol import Opcode

from affinity_addon.apis import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from affinity_addon.record.schema import META
from tests.budgets import examples
from tests.fuzz_rig import (
    ANY_JSON,
    API_OF,
    ENCODINGS,
    FUZZ,
    SCALAR,
    STEP_SECONDS,
    TEXT,
    Rig,
    make_flow,
    rig,
)
from tests.sim import wire

# -- response generators -----------------------------------------------------------------------------

USAGE_STYLE = {ANTHROPIC: "anthropic", OPENAI_CHAT: "openai-chat",
               OPENAI_RESPONSES: "openai-responses"}
PATH_OF = {v: k for k, v in API_OF.items()}
JUNK_COUNT = st.one_of(st.integers(-(2**70), -1), st.integers(2**53 + 1, 2**70), TEXT, st.none(),
                       st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                       st.lists(st.integers(), max_size=2), st.dictionaries(TEXT, SCALAR, max_size=2))
COUNTS = st.builds(lambda read, w5, w1, extra: wire.Counts(read + w5 + w1 + extra, read, w5, w1),
                   st.integers(0, 10**6), st.integers(0, 10**5), st.integers(0, 10**5),
                   st.integers(0, 10**6))


def _junk_usage(usage: dict[str, Any], draw: Any) -> dict[str, Any]:
    """Some counters replaced by values no provider should send."""
    out = copy.deepcopy(usage)
    keys = sorted(out)
    for k in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=len(keys), unique=True)):
        out[k] = draw(JUNK_COUNT)
    return out


def _expected(c: wire.Counts) -> dict[str, int]:
    return {"input_tokens": c.prompt, "cache_read_tokens": c.read, "cache_write_tokens": c.write,
            "output_tokens": c.output}


BENIGN_JUNK = [b": keep-alive\n\n", b"event: ping\n\n", b"data: {not json\n\n", b"data: 12\n\n",
               b"id: 7\nretry: 10\n\n", b'data: {"type":"ping"}\n\n', b"data:\n\n",
               b"event: x\ndata: \xff\xfe\n\n", b"nonsense line without colon\n\n"]


def _at(draw: Any, size: int) -> int:
    """A position in 0..size-1, drawn independently of size: the bytes embed the time of day
    (`created`, gzip mtime), and hypothesis needs the same draws to replay an example."""
    return draw(st.integers(0, 9999)) * size // 10_000


@st.composite
def sse_cases(draw: Any) -> dict[str, Any]:
    api = draw(st.sampled_from([ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES]))
    counts = draw(COUNTS)
    usage = wire.USAGE_STYLES[USAGE_STYLE[api]](counts)
    sound = True  # upstream sent a correct stream and it arrived whole
    if draw(st.integers(0, 3)) == 0:
        usage, sound = _junk_usage(usage, draw), False
    ids = wire.Ids("msg_01fuzz", "chatcmpl-fuzz", draw(TEXT))
    events = wire.sse_events(api, "fuzz-model", usage, ids,
                             {"stream_options": {"include_usage": True}}, "include_usage")
    for _ in range(draw(st.integers(0, 3))):  # junk events that carry no usage
        events.insert(draw(st.integers(0, len(events))), draw(st.sampled_from(BENIGN_JUNK)))
    if draw(st.integers(0, 5)) == 0:  # a later usage object with junk values
        junk = {"usage": _junk_usage(usage, draw)} if api != OPENAI_RESPONSES else\
            {"type": "response.completed", "response": {"usage": _junk_usage(usage, draw)}}
        events.insert(len(events) - 1, wire.sse(junk))
        sound = False
    if draw(st.integers(0, 6)) == 0:  # an event's data lines dropped
        i = draw(st.integers(0, len(events) - 1))
        events[i] = b"".join(line for line in events[i].splitlines(keepends=True)
                             if not line.startswith(b"data:"))
        sound = False
    data = b"".join(events)
    eol = draw(st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"]))
    if eol != b"\n":
        data = data.replace(b"\n", eol)
    if draw(st.integers(0, 7)) == 0:
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 4)) == 0:  # cut short upstream
        data, sound = data[: _at(draw, len(data))], False
    enc = draw(st.sampled_from(["none"] * 4 + list(ENCODINGS) + ["gzip, br", "lie", "unknown"]))
    header = None
    if enc in ENCODINGS or enc == "gzip, br":
        header = enc
        wire_data = encoding.encode(data, "gzip") if enc == "gzip, br" else data
        wire_data = encoding.encode(wire_data, "br" if enc == "gzip, br" else enc)
        if draw(st.integers(0, 4)) == 0:  # a compressed stream that ends early
            wire_data, sound = wire_data[: _at(draw, len(wire_data))], False
    elif enc == "lie":
        header, wire_data, sound = draw(st.sampled_from(["gzip", "br", "zstd"])), data, False
    elif enc == "unknown":
        header, wire_data, sound = "x-snappy", data, False
    else:
        wire_data = data
    cuts = sorted({_at(draw, len(wire_data)) for _ in range(draw(st.integers(0, 12)))})
    chunks = [wire_data[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire_data)], strict=True)]
    chunks = [c for c in chunks if c]  # mitmproxy never hands the tap an empty chunk mid-stream
    ended = draw(st.sampled_from(["end", "end", "end", "error"]))
    return {"api": api, "counts": counts, "chunks": chunks, "encoding": header,
            "sound": sound and ended == "end", "ended": ended}


def matched(r: Rig, api: str, model: str = "fuzz-model") -> http.HTTPFlow:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if api == OPENAI_RESPONSES:
        body = {"model": model, "input": "hi"}
    f = make_flow(json.dumps(body).encode(), PATH_OF[api])
    r.addon.request(f)
    assert META in f.metadata
    return f


def check_record(rec: dict[str, Any], f: http.HTTPFlow) -> None:
    assert rec["flow_id"] == f.id
    u = rec["usage"]
    if u is not None:
        for k in ("input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens",
                  "cache_write_5m_tokens", "cache_write_1h_tokens"):
            if k in u:
                assert type(u[k]) is int and 0 <= u[k] <= 2**54, (k, u[k])
        if "cost" in u:
            assert isinstance(u["cost"], float) and u["cost"] >= 0
    assert rec["hit_ratio"] is None or 0 <= rec["hit_ratio"] <= 1
    assert isinstance(rec["complete"], bool)
    json.dumps(rec, allow_nan=False)  # no NaN or Infinity in the log
    json.dumps(f.metadata[META], allow_nan=False)


# -- response fuzzing --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", examples(40, 300))
def test_stream_tap_passes_every_byte_and_records_once(tmp_path, n):
    with rig(tmp_path) as r:
        @settings(FUZZ, max_examples=n)
        @given(case=sse_cases())
        def run(case: dict[str, Any]) -> None:
            f = matched(r, case["api"])
            r.capture.take()
            headers = Headers(content_type="text/event-stream")
            if case["encoding"]:
                headers["content-encoding"] = case["encoding"]
            f.response = tutils.tresp(headers=headers, content=None)
            r.addon.responseheaders(f)
            tap = f.response.stream
            assert callable(tap)
            t = time.monotonic()
            for chunk in case["chunks"]:
                assert tap(chunk) == chunk  # bytes out are the bytes in
            if case["ended"] == "end":
                assert tap(b"") == b""
                r.addon.response(f)
            else:
                f.error = mflow.Error("peer closed connection")
                r.addon.error(f)
            assert time.monotonic() - t < STEP_SECONDS
            r.quiet(f"{case['api']} stream")
            recs = r.new_records()
            assert len(recs) == 1
            rec = recs[0]
            check_record(rec, f)
            assert rec["stream"] is True
            if case["ended"] == "error":
                assert rec["complete"] is False and rec["error"]
            if case["sound"]:
                assert rec["complete"] is True
                assert {k: rec["usage"][k] for k in _expected(case["counts"])}\
                    == _expected(case["counts"])
            r.still_works()

        run()
        assert not len(r.addon.state.exchanges)


@st.composite
def json_cases(draw: Any) -> dict[str, Any]:
    api = draw(st.sampled_from([ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES]))
    counts = draw(COUNTS)
    usage = wire.USAGE_STYLES[USAGE_STYLE[api]](counts)
    sound = True
    if draw(st.booleans()):
        usage, sound = _junk_usage(usage, draw), False
    obj = wire.json_body(api, "fuzz-model", usage, wire.Ids("msg_01f", "chatcmpl-f"), {})
    how = draw(st.sampled_from(["ok"] * 5 + ["truncate", "bytes", "any-json", "deep", "html"]))
    if how == "ok":
        body = json.dumps(obj).encode()
    else:
        sound = False
        body = {"truncate": json.dumps(obj).encode()[: _at(draw, 40)],
                "bytes": draw(st.binary(max_size=100)),
                "any-json": json.dumps(draw(ANY_JSON)).encode(),
                "deep": b'{"usage":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                "html": b"<html>502 Bad Gateway</html>"}[how]
    headers = Headers(content_type=draw(st.sampled_from(["application/json", "text/html", ""])))
    enc = draw(st.sampled_from(["none"] * 3 + list(ENCODINGS) + ["lie"]))
    if enc in ENCODINGS:
        body = encoding.encode(body, enc)
        headers["content-encoding"] = enc
    elif enc == "lie":
        headers["content-encoding"], sound = "gzip", False
    status = draw(st.sampled_from([200, 200, 200, 400, 429, 500, 529]))
    return {"api": api, "counts": counts, "body": body, "headers": headers,
            "status": status, "sound": sound and status == 200}


@pytest.mark.parametrize("n", examples(30, 200))
def test_json_responses_with_bad_bodies_and_usage(tmp_path, n):
    with rig(tmp_path) as r:
        @settings(FUZZ, max_examples=n)
        @given(case=json_cases())
        def run(case: dict[str, Any]) -> None:
            f = matched(r, case["api"])
            r.capture.take()
            f.response = tutils.tresp(status_code=case["status"], headers=case["headers"],
                                      content=b"")
            f.response.raw_content = case["body"]  # as received, whatever the header says
            r.addon.responseheaders(f)
            assert not f.response.stream
            r.addon.response(f)
            r.quiet(f"{case['api']} JSON response")
            assert f.response.raw_content == case["body"]
            recs = r.new_records()
            assert len(recs) == 1
            check_record(recs[0], f)
            assert recs[0]["status"] == case["status"] and recs[0]["stream"] is False
            if case["sound"]:
                assert {k: recs[0]["usage"][k] for k in _expected(case["counts"])}\
                    == _expected(case["counts"])
            r.still_works()

        run()


@st.composite
def ws_cases(draw: Any) -> list[tuple[bool, bool, bytes]]:
    frames = []
    for _ in range(draw(st.integers(1, 6))):
        counts = draw(COUNTS)
        usage = wire.USAGE_STYLES["openai-responses"](counts)
        if draw(st.booleans()):
            usage = _junk_usage(usage, draw)
        kind = draw(st.sampled_from(["completed", "completed", "delta", "junk", "binary"]))
        if kind == "completed":
            content = json.dumps({"type": draw(st.sampled_from(
                ["response.completed", "response.failed", "response.incomplete"])),
                "response": {"usage": usage, "status": "completed"}}).encode()
        elif kind == "delta":
            content = json.dumps({"type": "response.output_text.delta", "delta": "x"}).encode()
        elif kind == "junk":
            content = draw(st.sampled_from([b"response.completed", b"{", b"[]",
                                            b'{"type":"response.completed","response":5}']))
        else:
            content = draw(st.binary(max_size=40)) + b"response.completed"
        frames.append((draw(st.booleans()) and kind == "delta", kind != "binary", content))
    return frames


def _is_terminal(content: bytes) -> bool:
    try:
        obj = json.loads(content)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("type") in (
        "response.completed", "response.failed", "response.incomplete")


def test_websocket_frames_with_bad_usage(tmp_path):
    with rig(tmp_path) as r:
        @settings(FUZZ, max_examples=60)
        @given(frames=ws_cases())
        def run(frames: list[tuple[bool, bool, bytes]]) -> None:
            f = tflow.twebsocketflow()
            # the exchange of a matched Responses request, moved to this WebSocket flow
            state = r.addon.state
            state.exchanges.start(f.id, state.exchanges.end(matched(r, OPENAI_RESPONSES).id))
            r.capture.take()
            r.new_records()
            f.websocket.messages = []
            terminal = 0
            for from_client, text, content in frames:
                f.websocket.messages.append(websocket.WebSocketMessage(
                    Opcode.TEXT if text else Opcode.BINARY, from_client, content, time.time()))
                r.addon.websocket_message(f)
                if text and not from_client:
                    terminal += _is_terminal(content)
            r.quiet("websocket frames")
            recs = r.new_records()
            assert len(recs) == terminal
            for rec in recs:
                check_record(rec, f)
                assert rec["transport"] == "websocket"
            r.addon.state.exchanges.open.clear()  # the request flows above never got a response

        run()


# -- giant events ------------------------------------------------------------------------------

def _feed(tap: Any, data: bytes, size: int = 64 * 1024) -> None:
    for i in range(0, len(data), size):
        chunk = data[i:i + size]
        assert tap(chunk) is chunk


def _giant_stream(event_bytes: int, newline: bool) -> tuple[bytes, wire.Counts]:
    counts = wire.Counts(5000, 4096, 0, 0)
    usage = wire.USAGE_STYLES["openai-chat"](counts)
    events = wire.sse_events(OPENAI_CHAT, "m", usage, wire.Ids("a", "b"),
                             {"stream_options": {"include_usage": True}}, "include_usage")
    giant = b"data: " + json.dumps({"pad": "x" * event_bytes}).encode()
    giant += b"\n\n" if newline else b""
    return events[0] + giant + b"".join(events[1:]), counts


@pytest.mark.parametrize("newline", [True, False], ids=["one-event", "no-line-end"])
def test_a_gigantic_event_costs_bounded_memory_and_passes_unchanged(tmp_path, newline):
    data, _ = _giant_stream(24 << 20, newline)
    with rig(tmp_path) as r:
        f = matched(r, OPENAI_CHAT)
        f.response = tutils.tresp(headers=Headers(content_type="text/event-stream"), content=None)
        r.addon.responseheaders(f)
        tracemalloc.start()
        try:
            t = time.monotonic()
            _feed(f.response.stream, data)
            f.response.stream(b"")
            elapsed = time.monotonic() - t
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        r.addon.response(f)
        r.quiet("gigantic event")
        assert elapsed < 20, elapsed
        # The tap gives up on an event at 8 MiB; nothing holds the 24 MiB.
        assert peak < 24 << 20, f"peak {peak >> 20} MiB"
        assert len(r.new_records()) == 1
        r.still_works()


def test_usage_after_a_gigantic_event_is_still_read(tmp_path):
    # One over-long event used to stop parsing for good: usage lost, logged complete=false.
    data, counts = _giant_stream(9 << 20, True)  # e.g. one base64 image in a Gemini event
    with rig(tmp_path) as r:
        f = matched(r, OPENAI_CHAT)
        f.response = tutils.tresp(headers=Headers(content_type="text/event-stream"), content=None)
        r.addon.responseheaders(f)
        _feed(f.response.stream, data)
        f.response.stream(b"")
        r.addon.response(f)
        (rec,) = r.new_records()
        assert rec["complete"] is True and rec["usage"]["cache_read_tokens"] == counts.read
