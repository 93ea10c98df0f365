"""Bad input, fuzzed (issue 7, guarantee 1): the rewrite and the tap never break traffic.

In process, with `mitmproxy.test.taddons` and a rules file that uses every kind of action
(headers, top-level and dotted body fields, `cache_control` on two shapes), hypothesis drives
request bodies (shaped like each API with wrong types everywhere, any JSON, bytes, duplicate keys,
lying or stacked Content-Encoding) and response streams (SSE cut anywhere, events without data,
junk usage values, compressed streams that end early) through the addon. The invariant is:

- requests: the bytes that go upstream are the bytes that came in, or a valid rewrite of them: they
  decode (same Content-Encoding) to the input JSON plus only what the record says the rules added;
  headers gain only the rules' headers, with valid field values;
- responses: every chunk the tap returns is the chunk it got, every flow gets exactly one intact
  JSONL record, and usage is numbers (exactly the upstream's when the stream was sound);
- at most one warning per flow, never an error or traceback, bounded time, and the addon handles
  the next ordinary request normally.

Each bug the fuzzing found has a named test below; the ones still open are strict xfails (so a
fix shows up as an XPASS) and their triggers are kept out of the generators meanwhile.
A few end-to-end cases (50 MB body, lying Content-Encoding) go through a real mitmdump.
"""

import contextlib
import copy
import gzip
import hashlib
import json
import logging
import re
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import flow as mflow
from mitmproxy import http, websocket
from mitmproxy.http import Headers
from mitmproxy.net import encoding
from mitmproxy.test import taddons, tflow, tutils
from wsproto.frame_protocol import Opcode

from affinity_addon.record.schema import META
from affinity_addon.request import body as request_body
from affinity_addon.request import breakpoints
from affinity_addon.request.breakpoint_spec import MAX_MARKERS
from affinity_addon.request.prompt_slots import count_markers
from affinity_addon.shapes import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from tests.driver import Affinity
from tests.sim import wire

HOST = "api.fuzz.test"
CHAT, MESSAGES, RESPONSES, OTHER = ("/v1/chat/completions", "/v1/messages", "/v1/responses",
                                    "/v1/embeddings")
SHAPE_OF = {CHAT: OPENAI_CHAT, MESSAGES: ANTHROPIC, RESPONSES: OPENAI_RESPONSES}

RULES = f"""
version: 1
rules:
  - name: chat
    match: {{host: {HOST}, path: "{CHAT}"}}
    set_headers:
      x-conv: "{{affinity_id}}"
      x-model: "m-{{model}}"
    set_fields:
      prompt_cache_key: "{{affinity_id}}"
      metadata.session: "{{affinity_id}}"
    cache_control: {{strategy: agent, client_markers: fill, min_tokens: 0}}
  - name: messages
    match: {{host: {HOST}, path: "{MESSAGES}"}}
    set_headers:
      x-conv: "{{affinity_id}}"
    set_fields:
      metadata.user_id: "{{affinity_id}}"
    cache_control: {{strategy: agent, client_markers: fill, min_tokens: 0}}
  - name: responses
    match: {{host: {HOST}, path: "{RESPONSES}"}}
    set_fields:
      prompt_cache_key: {{value: "{{affinity_id}}", on_conflict: overwrite}}
  - name: every-path
    match: {{host: {HOST}}}
    set_headers:
      x-rule: "{{rule}}"
"""
# What each path's rules may add to a body (the invariant allows nothing else).
FIELDS_ADDED = {CHAT: {"prompt_cache_key", "metadata.session"}, MESSAGES: {"metadata.user_id"},
                RESPONSES: {"prompt_cache_key"}, OTHER: set()}
HEADERS_ADDED = {CHAT: {"x-conv", "x-model", "x-rule"}, MESSAGES: {"x-conv", "x-rule"},
                 RESPONSES: {"x-rule"}, OTHER: {"x-rule"}}

# RFC 9110 field-value: visible ASCII, obs-text, space and tab; no CR, LF, NUL or other CTLs.
FIELD_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
ENCODINGS = ("gzip", "br", "zstd", "deflate")
FUZZ = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STEP_SECONDS = 5.0  # one tiny flow through the addon; generous for a loaded 2-core machine


# -- the addon in process ------------------------------------------------------------------------

class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        out, self.records = self.records, []
        return out


class Rig:
    def __init__(self, addon: Affinity, tctx: Any, log: Path, capture: _Capture) -> None:
        self.addon, self.tctx, self.log, self.capture = addon, tctx, log, capture
        self._lines = 0

    def new_records(self) -> list[dict[str, Any]]:
        lines = self.log.read_bytes().split(b"\n") if self.log.exists() else [b""]
        assert lines[-1] == b"", "the last JSONL line is torn"
        lines = lines[:-1]
        new, self._lines = lines[self._lines:], len(lines)
        return [json.loads(line) for line in new]

    def quiet(self, what: str) -> int:
        """At most one warning and no error since the last call; returns the warning count."""
        recs = self.capture.take()
        errors = [r for r in recs if r.levelno >= logging.ERROR]
        assert not errors, f"{what}: {errors[0].getMessage()}"
        assert len(recs) <= 1, \
            f"{what}: {len(recs)} warnings: {[r.getMessage() for r in recs]}"
        return len(recs)

    def still_works(self) -> None:
        """The next ordinary request gets the ordinary rewrite."""
        f = make_flow(json.dumps(NORMAL).encode(), CHAT)
        self.addon.request(f)
        body = json.loads(f.request.content)
        aff = f.metadata[META]["affinity_id"]
        dry = f.metadata[META]["dry_run"]
        assert aff and aff.startswith("aff-")
        if not dry:
            assert f.request.headers["x-conv"] == aff and body["prompt_cache_key"] == aff
        self.addon.error(f)  # forget it again, no response will come
        self.capture.take()
        self.new_records()


@contextlib.contextmanager
def rig(tmp: Path, **options: Any) -> Iterator[Rig]:
    tmp.mkdir(parents=True, exist_ok=True)
    rules = tmp / "fuzz-rules.yaml"
    rules.write_text(RULES)
    log = tmp / "fuzz.jsonl"
    capture = _Capture()
    logger = logging.getLogger("affinity_addon")
    logger.addHandler(capture)
    addon = Affinity()
    try:
        with taddons.context(*addon.addons) as tctx:
            tctx.configure(addon.bundle, affinity_rules=str(rules), affinity_log=str(log), **options)
            capture.take()
            yield Rig(addon, tctx, log, capture)
    finally:
        logger.removeHandler(capture)


def make_flow(content: bytes | None, path: str, headers: dict[str, str] | None = None,
              ctype: str = "application/json") -> http.HTTPFlow:
    h = Headers(content_type=ctype)
    for k, v in (headers or {}).items():
        h[k] = v
    return tflow.tflow(req=tutils.treq(method=b"POST", host=HOST, port=443, scheme=b"https",
                                       authority=b"", path=path.encode(), headers=h,
                                       content=content))


NORMAL = {"model": "gpt-5", "messages": [{"role": "system", "content": "Be terse."},
                                         {"role": "user", "content": "hello"}]}


# -- request generators ----------------------------------------------------------------------------

TEXT = st.text(max_size=24)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                   st.floats(allow_nan=False, allow_infinity=False), TEXT)
ANY_JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
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
        "input": st.one_of(MESSAGE_LIST, TEXT),  # a string is a valid Responses input "instructions": st.one_of(TEXT, ANY_JSON),
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


# -- undoing a rewrite -------------------------------------------------------------------------------

_PATH_TOKEN = re.compile(r"([A-Za-z_]+)|\[(\d+)\]")


def _keys(path: str) -> list[str | int]:
    return [int(i) if i else name for name, i in _PATH_TOKEN.findall(path)]


def _lookup(obj: Any, parts: list[str]) -> tuple[bool, Any]:
    for p in parts:
        if not isinstance(obj, dict) or p not in obj:
            return False, None
        obj = obj[p]
    return True, obj


def _undo_field(out: dict[str, Any], orig: dict[str, Any], path: str) -> None:
    parts = path.split(".")
    found, value = _lookup(orig, parts)
    _, parent = _lookup(out, parts[:-1])
    assert isinstance(parent, dict), f"added field {path} is not in the body sent"
    if found:
        parent[parts[-1]] = value  # an overwrite: put the client's value back
        return
    del parent[parts[-1]]
    for k in range(len(parts) - 1, 0, -1):  # parents the rule had to create
        _, node = _lookup(out, parts[:k])
        if node != {}:
            break
        had, before = _lookup(orig, parts[:k])
        holder = _lookup(out, parts[: k - 1])[1]
        if not had:
            del holder[parts[k - 1]]
        else:
            holder[parts[k - 1]] = before


def _added_markers(orig: dict[str, Any], markers: list[dict[str, str]]
                   ) -> list[breakpoints.AddedMarker]:
    out = []
    for m in markers:
        keys = _keys(m["path"])
        holder: Any = orig
        for k in keys[:-1]:
            holder = holder[k] if isinstance(holder, dict | list) else None
        out.append(breakpoints.AddedMarker(m["path"], m["ttl"], converted=isinstance(holder, str)))
    return out


def _reject(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=True)


def check_request(before_raw: bytes, before_fields: tuple, f: http.HTTPFlow, path: str,
                  dry: bool, warnings: int = 1) -> None:
    """The upstream bytes are the input bytes, or a valid rewrite of them (see module doc)."""
    req, rec = f.request, f.metadata.get(META)
    if rec is None:  # every path matches the every-path rule: only a logged reason skips it
        assert warnings >= 1, "no record and no warning saying why"
        assert req.raw_content == before_raw and tuple(req.headers.fields) == before_fields
        return
    added_h = rec["added"]["headers"]
    assert set(added_h) <= HEADERS_ADDED[path]
    assert set(rec["added"]["fields"]) <= FIELDS_ADDED[path]
    assert path in (CHAT, MESSAGES) or not rec["added"]["markers"]
    # Headers: the client's, plus the rules' (appended; every rule here keeps client values).
    after = Counter((k.lower(), v) for k, v in req.headers.fields if k.lower() != b"content-length")
    want = Counter((k.lower(), v) for k, v in before_fields if k.lower() != b"content-length")
    if not dry:
        want.update((k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in added_h.items())
    assert after == want
    for k, v in req.headers.fields:
        assert FIELD_VALUE.match(v), f"header {k!r} has an invalid value {v!r}"
    if "content-length" in req.headers:
        assert int(req.headers["content-length"]) == len(req.raw_content)
    changes = rec is not None and (rec["added"]["fields"] or rec["added"]["markers"])
    if req.raw_content == before_raw:
        assert dry or not changes, f"the record claims body changes that were not sent: {rec}"
        return
    assert not dry and changes, "the body changed without a recorded reason"
    enc = req.headers.get("content-encoding", "identity")
    constants: list[str] = []  # NaN/Infinity are not JSON: only an input that had them may
    obj_in = json.loads(encoding.decode(before_raw, enc).decode("utf-8"),
                        parse_constant=lambda c: constants.append(c) or float(c))
    sent = encoding.decode(req.raw_content, enc).decode("utf-8")  # strict: valid UTF-8
    obj_out = json.loads(sent, parse_constant=_reject if not constants else None)
    for target, value in rec["added"]["fields"].items():
        assert _lookup(obj_out, target.split("."))[1] == value, f"{target} is not what was sent"
        assert value == rec["affinity_id"]
    if rec["added"]["markers"]:
        assert count_markers(obj_out, SHAPE_OF[path]) <= MAX_MARKERS
    breakpoints.strip_added(obj_out, _added_markers(obj_in, rec["added"]["markers"]))
    for target in reversed(list(rec["added"]["fields"])):
        _undo_field(obj_out, obj_in, target)
    assert _canon(obj_out) == _canon(obj_in)


# -- request fuzzing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dry", [False, True], ids=["rewrite", "dry-run"])
def test_request_rewrite_is_valid_or_identical(tmp_path, dry):
    with rig(tmp_path, affinity_dry_run=dry) as r:
        @settings(FUZZ, max_examples=150 if dry else 500)
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


# -- bugs the fuzzing found: fixed in 53a2e89, or still open (strict xfail) --------------------

def _one(r: Rig, body: bytes, path: str) -> tuple[http.HTTPFlow, list[str]]:
    """One request through the addon, checked; returns the flow and the warnings it logged."""
    f = make_flow(body, path)
    before_raw, before_fields = f.request.raw_content, tuple(f.request.headers.fields)
    r.addon.request(f)
    recs = r.capture.take()
    assert all(x.levelno < logging.ERROR for x in recs) and len(recs) <= 1, recs
    check_request(before_raw, before_fields, f, path, False, len(recs))
    return f, [x.getMessage() for x in recs]


def test_header_templates_never_carry_control_characters(tmp_path):
    # The {model} header template used to copy CR/LF from the body: header injection.
    with rig(tmp_path) as r:
        body = json.dumps({"model": "gpt\r\nx-injected: 1", "messages": []}).encode()
        f, warned = _one(r, body, CHAT)
        assert "x-model" not in f.request.headers and "x-injected" not in f.request.headers
        assert len(warned) == 1 and "control characters" in warned[0]
        assert f.request.headers["x-rule"] == "every-path"  # the other headers still apply


def test_a_null_field_is_replaced_not_shadowed(tmp_path):
    # It used to be spliced in front of the null, which then won when the body was parsed.
    with rig(tmp_path) as r:
        body = json.dumps({"model": "gpt-5", "prompt_cache_key": None, "input": "hi"}).encode()
        f, _ = _one(r, body, RESPONSES)
        sent = json.loads(f.request.content)
        assert sent["prompt_cache_key"] == f.metadata[META]["affinity_id"] is not None


def test_an_unhashable_role_leaves_the_request_whole(tmp_path):
    # `role in SYSTEM_ROLES` raised TypeError after the headers were set: half a rewrite.
    with rig(tmp_path) as r:
        for role in ([], {}, [["system"]]):
            body = json.dumps({"model": "gpt-5", "messages": [{"role": role, "content": "hi"}]})
            f, _ = _one(r, body.encode(), CHAT)
            assert f.metadata[META]["rules"] == ["chat", "every-path"]


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_messages_as_a_string_is_not_a_message_list(tmp_path, path):
    # A string `messages` was planned as a message; the marker was then assigned into it.
    with rig(tmp_path) as r:
        body = json.dumps({"model": "claude-sonnet-4-5", "messages": "hi"}).encode()
        f, _ = _one(r, body, path)
        assert json.loads(f.request.content)["messages"] == "hi"
        assert f.metadata[META]["added"]["markers"] == []


@pytest.mark.parametrize("number", ["-9223372036854775809", "18446744073709551616", "1" * 40])
def test_integers_beyond_64_bits_survive_a_reserialize(tmp_path, number):
    # orjson read them as floats, so a reserialized body changed their value.
    with rig(tmp_path) as r:
        body = b'{"model":"gpt-5","seed":%s,"messages":[{"role":"user","content":"hi"}]}' % (
            number.encode())
        f, _ = _one(r, body, CHAT)
        assert f.metadata[META]["body_write"] == "reserialize"
        assert b'"seed":' + number.encode() + b"," in f.request.content


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30)), max_size=60),
       st.randoms(use_true_random=False))
@settings(max_examples=400, deadline=None)
def test_long_digit_scan_finds_every_run_of_19(runs, rnd):
    # The sampled scan (every 9th byte first) must answer as a scan of every byte does, for
    # runs of digits of any length at any offset, and for bodies full of digits.
    parts = []
    for digits, other in runs:
        parts.append(bytes(rnd.choice(b"0123456789") for _ in range(digits)))
        parts.append(b"x" * other)
    text = b"".join(parts)
    naive = b"0" * 19 in text.translate(bytes.maketrans(b"123456789", b"000000000"))
    assert request_body._has_long_digits(text) == naive


@pytest.mark.parametrize("offset", range(0, 20))
@pytest.mark.parametrize("length", [18, 19, 20, 27, 28])
def test_long_digit_scan_at_every_alignment(offset, length):
    text = b"a" * offset + b"1" * length + b"b" * 30
    assert request_body._has_long_digits(text) == (length >= 19)
    many = (b"12345678 " * 200) + text  # many near misses first: the whole-body fallback
    assert request_body._has_long_digits(many) == (length >= 19)


@pytest.mark.parametrize("exotic", [b'"x":1e400', b'"x":"\\ud800 hi"', b'"x":-1E+999'])
def test_bodies_json_cannot_round_trip_go_out_unchanged(tmp_path, exotic):
    # 1e400 was written back as `Infinity` and a lone surrogate as invalid UTF-8.
    with rig(tmp_path) as r:
        body = (b'{"model":"gpt-5",' + exotic + b',"input":"hi",'
                b'"messages":[{"role":"user","content":"hi"}]}')
        f, warned = _one(r, body, CHAT)  # the dotted metadata.session needs a reserialize
        assert f.request.raw_content == body and len(warned) == 1
        assert f.request.headers["x-conv"] == f.metadata[META]["affinity_id"]
        f, warned = _one(r, body, RESPONSES)  # a top-level splice keeps every other byte
        assert f.metadata[META]["body_write"] == "splice" and not warned
        assert f.request.raw_content.endswith(body[1:])


def test_several_problems_in_one_request_make_one_warning(tmp_path):
    with rig(tmp_path) as r:
        body = {"model": "gpt\r\n", "metadata": [],
                "messages": [{"role": "user", "content": "hi"}]}
        f = make_flow(json.dumps(body).encode(), CHAT)
        r.addon.request(f)
        r.quiet("a request with two problems")


@pytest.mark.parametrize("body", [{"system": ["a", "b"], "messages": []},
                                  {"messages": [{"role": "user", "content": ["x", "y"]}]}],
                         ids=["system", "content"])
def test_string_elements_of_a_block_list_are_never_dropped(tmp_path, body):
    with rig(tmp_path) as r:
        _one(r, json.dumps(body).encode(), MESSAGES)


@pytest.mark.parametrize("where", ["content", "extra-key"])
def test_deep_nesting_is_one_warning_not_a_traceback(tmp_path, where):
    # A body nested ~1000 deep (json.loads takes it) used to log tracebacks at ERROR.
    nested = "[" * 1500 + "]" * 1500
    inner = nested if where == "content" else '"hi","x":' + nested
    body = '{"model":"gpt-5","messages":[{"role":"user","content":' + inner + "}]}"
    with rig(tmp_path) as r:
        for path in (CHAT, MESSAGES):
            _one(r, body.encode(), path)
        r.still_works()


def test_very_deep_nesting_beyond_the_parser_is_one_warning(tmp_path):
    body = '{"messages":[{"role":"user","content":' + "[" * 100_000 + "]" * 100_000 + "}]}"
    with rig(tmp_path) as r:
        f = make_flow(body.encode(), CHAT)
        before = f.request.raw_content
        r.addon.request(f)
        recs = r.capture.take()
        assert len(recs) == 1 and "RecursionError" in recs[0].getMessage()
        assert f.request.raw_content == before
        r.still_works()


# -- response generators -----------------------------------------------------------------------------

USAGE_STYLE = {ANTHROPIC: "anthropic", OPENAI_CHAT: "openai-chat",
               OPENAI_RESPONSES: "openai-responses"}
PATH_OF = {v: k for k, v in SHAPE_OF.items()}
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
    shape = draw(st.sampled_from([ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES]))
    counts = draw(COUNTS)
    usage = wire.USAGE_STYLES[USAGE_STYLE[shape]](counts)
    sound = True  # upstream sent a correct stream and it arrived whole
    if draw(st.integers(0, 3)) == 0:
        usage, sound = _junk_usage(usage, draw), False
    ids = wire.Ids("msg_01fuzz", "chatcmpl-fuzz", draw(TEXT))
    events = wire.sse_events(shape, "fuzz-model", usage, ids,
                             {"stream_options": {"include_usage": True}}, "include_usage")
    for _ in range(draw(st.integers(0, 3))):  # junk events that carry no usage
        events.insert(draw(st.integers(0, len(events))), draw(st.sampled_from(BENIGN_JUNK)))
    if draw(st.integers(0, 5)) == 0:  # a later usage object with junk values
        junk = {"usage": _junk_usage(usage, draw)} if shape != OPENAI_RESPONSES else \
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
    return {"shape": shape, "counts": counts, "chunks": chunks, "encoding": header,
            "sound": sound and ended == "end", "ended": ended}


def matched(r: Rig, shape: str, model: str = "fuzz-model") -> http.HTTPFlow:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if shape == OPENAI_RESPONSES:
        body = {"model": model, "input": "hi"}
    f = make_flow(json.dumps(body).encode(), PATH_OF[shape])
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

def test_stream_tap_passes_every_byte_and_records_once(tmp_path):
    with rig(tmp_path) as r:
        @settings(FUZZ, max_examples=300)
        @given(case=sse_cases())
        def run(case: dict[str, Any]) -> None:
            f = matched(r, case["shape"])
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
            r.quiet(f"{case['shape']} stream")
            recs = r.new_records()
            assert len(recs) == 1
            rec = recs[0]
            check_record(rec, f)
            assert rec["stream"] is True
            if case["ended"] == "error":
                assert rec["complete"] is False and rec["error"]
            if case["sound"]:
                assert rec["complete"] is True
                assert {k: rec["usage"][k] for k in _expected(case["counts"])} \
                    == _expected(case["counts"])
            r.still_works()

        run()
        assert not len(r.addon.state.exchanges)


@st.composite
def json_cases(draw: Any) -> dict[str, Any]:
    shape = draw(st.sampled_from([ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES]))
    counts = draw(COUNTS)
    usage = wire.USAGE_STYLES[USAGE_STYLE[shape]](counts)
    sound = True
    if draw(st.booleans()):
        usage, sound = _junk_usage(usage, draw), False
    obj = wire.json_body(shape, "fuzz-model", usage, wire.Ids("msg_01f", "chatcmpl-f"), {})
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
    return {"shape": shape, "counts": counts, "body": body, "headers": headers,
            "status": status, "sound": sound and status == 200}


def test_json_responses_with_bad_bodies_and_usage(tmp_path):
    with rig(tmp_path) as r:
        @FUZZ
        @given(case=json_cases())
        def run(case: dict[str, Any]) -> None:
            f = matched(r, case["shape"])
            r.capture.take()
            f.response = tutils.tresp(status_code=case["status"], headers=case["headers"],
                                      content=b"")
            f.response.raw_content = case["body"]  # as received, whatever the header says
            r.addon.responseheaders(f)
            assert not f.response.stream
            r.addon.response(f)
            r.quiet(f"{case['shape']} JSON response")
            assert f.response.raw_content == case["body"]
            recs = r.new_records()
            assert len(recs) == 1
            check_record(recs[0], f)
            assert recs[0]["status"] == case["status"] and recs[0]["stream"] is False
            if case["sound"]:
                assert {k: recs[0]["usage"][k] for k in _expected(case["counts"])} \
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


# -- end to end through mitmdump -----------------------------------------------------------------

def _sim_request(sim: Any, marker: str) -> Any:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for rec in sim.requests:
            if rec.header("x-fuzz-id") == marker:
                return rec
        time.sleep(0.05)
    raise AssertionError(f"the simulator never got request {marker}")


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_e2e_fifty_megabytes_and_lying_encodings_reach_upstream_unchanged(sim, proxy_factory):
    proxy = proxy_factory()
    client = httpx2.Client(proxy=proxy.url, timeout=120)
    url_x = "http://api.x.ai/v1/chat/completions"  # header-only rule: the body must not change
    url_o = "http://api.openai.com/v1/chat/completions"  # body rule: cannot decode, so unchanged
    chat = {"model": "grok-4", "messages": [{"role": "user", "content": "hi"}]}
    try:
        big = json.dumps({"model": "grok-4", "messages": [
            {"role": "system", "content": "s" * (50 << 20)},
            {"role": "user", "content": "hi"}]}).encode()
        t = time.monotonic()
        resp = client.post(url_x, content=big, headers={"content-type": "application/json",
                                                        "x-fuzz-id": "big"})
        elapsed = time.monotonic() - t
        assert resp.status_code == 200, resp.text
        up = _sim_request(sim, "big")
        assert hashlib.sha256(up.raw_body).digest() == hashlib.sha256(big).digest()
        assert up.header("x-grok-conv-id") is not None  # the header rule still applied
        assert elapsed < 45, elapsed
        hwm = _vm_hwm_kib(proxy.proc.pid)
        print(f"50 MiB body through mitmdump: {elapsed:.1f}s, peak RSS {hwm >> 10} MiB")
        assert hwm < 2 << 20, f"mitmdump peaked at {hwm >> 10} MiB for a 50 MiB body"
        del big

        plain = json.dumps(chat).encode()
        lies = {"gzip-says-gzip-but-plain": (plain, "gzip"),
                "stacked-but-only-gzip": (gzip.compress(plain), "gzip, br"),
                "stacked-for-real": (encoding.encode(gzip.compress(plain), "br"), "gzip, br"),
                "deflate-says-zstd": (zlib.compress(plain), "zstd"),
                "unknown-coding": (plain, "x-snappy")}
        for name, (raw, enc) in lies.items():
            resp = client.post(url_o, content=raw, headers={
                "content-type": "application/json", "content-encoding": enc, "x-fuzz-id": name})
            assert resp.status_code in (200, 400), (name, resp.status_code)
            up = _sim_request(sim, name)
            assert up.raw_body == raw, name
            assert up.header("content-encoding") == enc, name

        # And the next ordinary request is served and rewritten as usual.
        resp = client.post(url_o, json=dict(chat, model="gpt-5"), headers={"x-fuzz-id": "next"})
        assert resp.status_code == 200
        up = _sim_request(sim, "next")
        assert up.body["prompt_cache_key"].startswith("fam-")  # the default {family_key}
    finally:
        client.close()
    recs = proxy.wait_records(2 + len(lies))
    assert len(recs) == 2 + len(lies)
    out = proxy.stop()
    assert "Traceback" not in out and "has crashed" not in out
    # One warning per undecodable body, none for the big one.
    assert out.count("could not be decoded") == out.count("sent unchanged") == len(lies), out
