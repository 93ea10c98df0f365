"""Request bodies fuzzed through the addon in process: the bytes sent upstream are the input
bytes or a valid rewrite of them (see tests/fuzz_rig.py), with at most one warning."""

import json
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.net import encoding

from affinity_addon.record.schema import META
from tests.budgets import examples
from tests.fuzz_rig import (
    ANY_JSON,
    CHAT,
    ENCODINGS,
    FUZZ,
    MESSAGES,
    OTHER,
    RESPONSES,
    STEP_SECONDS,
    TEXT,
    check_request,
    make_flow,
    rig,
)

# -- request generators ----------------------------------------------------------------------------

NOT_NULL = ANY_JSON.filter(lambda v: v is not None)
MODEL = st.one_of(  # the chat rule puts {model} in a header: control characters included
    st.sampled_from(["gpt-5", "claude-sonnet-4-5", "claude-opus-4-7", "gemini-2.5-pro",
                     "anthropic/claude-sonnet-4.5", "google/gemini-2.5-flash", "",
                     "gpt\r\nx-injected: 1"]),
    TEXT, ANY_JSON)
MARKER = st.one_of(st.just({"type": "ephemeral"}), st.just({"type": "ephemeral", "ttl": "1h"}),
                   ANY_JSON)
BLOCK = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking",
                              "redacted_thinking", "input_text", "other"])},
    optional={"text": st.one_of(TEXT, ANY_JSON), "cache_control": MARKER,
              "content": st.lists(ANY_JSON, max_size=2), "id": TEXT})
CONTENT = st.one_of(TEXT, st.lists(st.one_of(BLOCK, ANY_JSON), max_size=4), ANY_JSON)
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "developer", "tool"]),
                       ANY_JSON)},
    optional={"content": CONTENT, "name": TEXT, "tool_calls": ANY_JSON})
MESSAGE_LIST = st.one_of(st.lists(st.one_of(MESSAGE, MESSAGE, ANY_JSON), max_size=6), ANY_JSON)
SYSTEM = st.one_of(TEXT, st.lists(st.one_of(BLOCK, ANY_JSON), max_size=3), ANY_JSON)
TOOLS = st.one_of(st.lists(st.fixed_dictionaries({"name": TEXT}, optional={
    "cache_control": MARKER, "input_schema": ANY_JSON}), max_size=3), ANY_JSON)
METADATA = st.one_of(st.dictionaries(st.sampled_from(["user_id", "session", "x"]), ANY_JSON,
                                     max_size=2), ANY_JSON)
KNOWN = {"model", "messages", "system", "input", "instructions", "tools", "metadata",
         "prompt_cache_key", "stream"}
SHAPED = st.builds(
    lambda known, extra: {**{k: v for k, v in extra.items() if k not in KNOWN}, **known},
    st.fixed_dictionaries({}, optional={
        "model": MODEL, "messages": MESSAGE_LIST, "system": SYSTEM,
        "input": st.one_of(MESSAGE_LIST, TEXT),  # a string is a valid Responses input
        "instructions": st.one_of(TEXT, ANY_JSON),
        "tools": TOOLS, "metadata": METADATA, "prompt_cache_key": ANY_JSON,
        "stream": st.booleans()}),
    st.dictionaries(TEXT, ANY_JSON, max_size=2))


def _serialize(obj: Any, style: str, draw: Any) -> bytes:
    if style == "pretty":
        return json.dumps(obj, indent=2).encode()
    if style == "ascii":
        return json.dumps(obj, ensure_ascii=True).encode()
    if style == "whitespace":
        return b" \r\n\t" + json.dumps(obj, ensure_ascii=False).encode() + b"\n "
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    if style == "exotic":  # valid JSON the fast parser refuses: lone surrogates, 1e400
        extra = draw(st.sampled_from([b'"zz":"\\ud800"', b'"zz\\udfff":1', b'"zz":1e400',
                                      b'"zz":-1E+999', b'"zz":[0.1e-99999]']))
        return b"{" + extra + (b"," + text[1:] if obj else b"}")
    if style == "dupkey" and isinstance(obj, dict) and obj:
        # An earlier duplicate of an existing key: JSON parsers keep the last one.
        key = draw(st.sampled_from(sorted(obj)))
        dup = json.dumps({key: draw(NOT_NULL)}, ensure_ascii=False)[1:-1].encode()
        return b"{" + dup + b"," + text[1:]
    return text


@st.composite
def request_cases(draw: Any) -> tuple[str, bytes, dict[str, str]]:
    path = draw(st.sampled_from([CHAT, CHAT, MESSAGES, MESSAGES, RESPONSES, OTHER]))
    kind = draw(st.sampled_from(["shaped"] * 6 + ["any-json", "bytes", "empty", "broken"]))
    if kind == "shaped":
        body = _serialize(draw(SHAPED), draw(st.sampled_from(
            ["compact", "compact", "pretty", "ascii", "whitespace", "dupkey", "exotic"])), draw)
    elif kind == "any-json":
        body = json.dumps(draw(ANY_JSON)).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "empty":
        body = b""
    else:  # not JSON, or not UTF-8 JSON
        good = json.dumps(draw(SHAPED), ensure_ascii=False).encode()
        how = draw(st.sampled_from(["truncate", "garbage", "bom", "utf16", "latin1", "nan",
                                    "deep"]))
        if how == "truncate":
            body = good[: draw(st.integers(0, max(len(good) - 1, 0)))]
        elif how == "garbage":
            body = good + draw(st.sampled_from([b"x", b"}", b"{}", b"\x00", b",", b"]"]))
        elif how == "bom":
            body = b"\xef\xbb\xbf" + good
        elif how == "utf16":
            body = good.decode().encode("utf-16")
        elif how == "latin1":
            body = good.replace(b'"', b'"\xe9', 1) if b'"' in good else b"{\xff}"
        elif how == "nan":
            body = b'{"model":"gpt-5","temperature":NaN,"messages":[]}'
        else:
            depth = draw(st.sampled_from([500, 990, 1500, 5000]))
            body = (b'{"model":"gpt-5","messages":[{"role":"user","content":'
                    + b"[" * depth + b"]" * depth + b"}]}")
    headers: dict[str, str] = {}
    enc = draw(st.sampled_from(["none"] * 6 + list(ENCODINGS) + ["gzip, br", "lie", "unknown"]))
    if enc in ENCODINGS:
        body = encoding.encode(body, enc)
        headers["content-encoding"] = enc
    elif enc == "gzip, br":  # stacked, applied left to right
        body = encoding.encode(encoding.encode(body, "gzip"), "br")
        headers["content-encoding"] = enc
    elif enc == "lie":
        said, real = draw(st.sampled_from(
            [("gzip", None), ("br", None), ("zstd", "gzip"), ("deflate", "br"),
             ("identity", "gzip"), ("gzip, br", "gzip"), ("gzip", "gzip, br")]))
        if real == "gzip, br":
            body = encoding.encode(encoding.encode(body, "gzip"), "br")
        elif real:
            body = encoding.encode(body, real)
        headers["content-encoding"] = said
    elif enc == "unknown":
        headers["content-encoding"] = "x-snappy"
    if draw(st.booleans()):
        headers["x-session-id"] = draw(st.sampled_from(["s-1", "conv:42", "a" * 80, "é", ""]))
    return path, body, headers


# -- request fuzzing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dry, n", [*examples(50, 500, False, id="rewrite"),
                                     *examples(20, 150, True, id="dry-run")])
def test_request_rewrite_is_valid_or_identical(tmp_path, dry, n):
    with rig(tmp_path, affinity_dry_run=dry) as r:
        @settings(FUZZ, max_examples=n)
        @given(case=request_cases())
        def run(case: tuple[str, bytes, dict[str, str]]) -> None:
            path, body, headers = case
            f = make_flow(body, path, headers)
            before_raw, before_fields = f.request.raw_content, tuple(f.request.headers.fields)
            t = time.monotonic()
            r.addon.request(f)
            assert time.monotonic() - t < STEP_SECONDS
            warned = r.quiet(f"request to {path}")
            check_request(before_raw, before_fields, f, path, dry, warned)
            r.addon.error(f)  # the flow ends without a response: its pending state goes
            assert len(r.new_records()) == (1 if META in f.metadata else 0)
            r.still_works()

        run()
        assert not len(r.addon.state.exchanges)


def test_empty_body_with_json_type_passes_with_header_rules_only(tmp_path):
    with rig(tmp_path) as r:
        f = make_flow(b"", CHAT, {"x-session-id": "conv-7"})
        r.addon.request(f)
        r.quiet("empty body")
        assert f.request.raw_content == b""
        assert f.request.headers["x-conv"] == "conv-7" and "content-length" not in f.request.headers


def test_wrong_types_where_lists_and_strings_belong(tmp_path):
    cases = [{"model": "gpt-5", "messages": 5}, {"model": "gpt-5", "messages": [{"content": None}]},
             {"model": "claude-sonnet-4-5", "system": {}, "messages": []}, {"input": 5},
             {"system": 5, "tools": [5], "messages": {"a": 1}}, {"input": [5, None]},
             {"model": 7, "messages": [{"role": "user", "content": {"text": 1}}], "tools": "x"},
             {"messages": [None, 1, "s", [], {"role": None, "content": [None, 5, {"type": 3}]}]}]
    with rig(tmp_path) as r:
        for body in cases:
            for path in (CHAT, MESSAGES, RESPONSES):
                f = make_flow(json.dumps(body).encode(), path)
                before_raw, before_fields = f.request.raw_content, tuple(f.request.headers.fields)
                r.addon.request(f)
                r.quiet(f"{body} to {path}")
                check_request(before_raw, before_fields, f, path, False)
        r.still_works()


def test_fifty_megabyte_body_in_bounded_time_and_memory(tmp_path):
    big = "x" * (50 << 20)
    body = json.dumps({"model": "gpt-5", "input": [{"role": "user", "content": big}]}).encode()
    del big
    with rig(tmp_path) as r:
        f = make_flow(body, RESPONSES)
        tracemalloc.start()
        try:
            t = time.monotonic()
            r.addon.request(f)
            elapsed = time.monotonic() - t
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        r.quiet("50 MB body")
        sent = json.loads(f.request.content)
        assert sent["prompt_cache_key"] == f.metadata[META]["affinity_id"]
        assert len(f.request.raw_content) == len(body) + len(f.metadata[META]["affinity_id"]) + 22
        print(f"50 MiB body in process: {elapsed:.1f}s, peak {peak >> 20} MiB traced")
        assert peak < 20 * len(body), f"peak {peak >> 20} MiB for a {len(body) >> 20} MiB body"
        assert elapsed < 30, elapsed
        r.still_works()
