"""Bad input, fuzzed: the rewrite and the tap never break traffic (shared parts).

In process, with `mitmproxy.test.taddons` and a rules file that uses every kind of action
(headers, top-level and dotted body fields, `cache_control` on two APIs), hypothesis drives
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

The generators and properties are in tests/test_fuzz_requests.py and tests/test_fuzz_responses.py;
each bug the fuzzing found has a named test in tests/test_fuzz_request_findings.py; a 50 MB body
and lying Content-Encodings go through a real mitmdump in tests/test_e2e_bad_bodies.py.
"""

import contextlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.http import Headers
from mitmproxy.net import encoding
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.apis import ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES
from affinity_addon.record.schema import META
from tests.driver import Affinity

HOST = "api.fuzz.test"
CHAT, MESSAGES, RESPONSES, OTHER = ("/v1/chat/completions", "/v1/messages", "/v1/responses",
                                    "/v1/embeddings")
API_OF = {CHAT: OPENAI_CHAT, MESSAGES: ANTHROPIC, RESPONSES: OPENAI_RESPONSES}

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


# Any JSON value, small: for every place a field of any type may show up.
TEXT = st.text(max_size=24)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                   st.floats(allow_nan=False, allow_infinity=False), TEXT)
ANY_JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)


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
        assert len(recs) <= 1,\
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


def _at(obj: Any, keys: list[str | int]) -> Any:
    for k in keys:
        obj = obj[k]
    return obj


def _at_or_none(obj: Any, keys: list[str | int]) -> Any:
    for k in keys:
        if isinstance(k, int) and isinstance(obj, list) and k < len(obj) or isinstance(k, str) and isinstance(obj, dict) and k in obj:
            obj = obj[k]
        else:
            return None
    return obj


# Anthropic: "A maximum of 4 blocks with cache_control may be provided", the automatic top-level
# marker included (https://platform.claude.com/docs/en/build-with-claude/prompt-caching).
MAX_MARKERS = 4
MARKER_KEYS = ("cache_control", "prompt_cache_breakpoint")


def client_markers(body: Any) -> int:
    """The markers a body carries where providers count them: the top level, tools, system
    blocks, messages, their content blocks and a tool result's own blocks."""
    def held(x: Any) -> int:
        return sum(x.get(k) is not None for k in MARKER_KEYS) if isinstance(x, dict) else 0

    if not isinstance(body, dict):
        return 0
    n = held(body)
    for section in ("tools", "system"):
        if isinstance(body.get(section), list):
            n += sum(held(x) for x in body[section])
    for msg in body.get("messages") if isinstance(body.get("messages"), list) else ():
        n += held(msg)
        content = msg.get("content") if isinstance(msg, dict) else None
        for block in content if isinstance(content, list) else ():
            n += held(block)
            inner = block.get("content") if isinstance(block, dict) else None
            n += sum(held(x) for x in inner) if isinstance(inner, list) else 0
    return n


def unmark(out: dict[str, Any], orig: dict[str, Any], markers: list[dict[str, str]]) -> None:
    """Takes the markers the record says were added out of the body sent, walking it by their
    paths (not with the addon's own undo): each must be exactly the marker of its TTL, and a
    string the rewrite turned into a one-part list to carry it goes back to the string."""
    for m in reversed(markers):
        want = {"type": "ephemeral", "ttl": "1h"} if m["ttl"] == "1h" else {"type": "ephemeral"}
        *up, last = _keys(m["path"])
        if not up:  # Anthropic's automatic marker, on the body itself
            assert last == "cache_control" and out.get(last) == want, m
            del out[last]
            continue
        holder = _at(out, up)
        block = holder[last]
        assert isinstance(block, dict) and block.get("cache_control") == want,\
            f"no {want} at {m['path']}: {block!r:.200}"
        del block["cache_control"]
        was = _at_or_none(orig, up)
        if isinstance(was, str):  # converted: the client sent a plain string there
            assert last == 0 and holder == [{"type": "text", "text": was}],\
                f"{m['path']}: the string became {holder!r:.200}"
            _at(out, up[:-1])[up[-1]] = was


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
        assert client_markers(obj_in) + len(rec["added"]["markers"]) <= MAX_MARKERS
    unmark(obj_out, obj_in, rec["added"]["markers"])
    for target in reversed(list(rec["added"]["fields"])):
        _undo_field(obj_out, obj_in, target)
    assert _canon(obj_out) == _canon(obj_in)


def one_request(r: Rig, body: bytes, path: str) -> tuple[http.HTTPFlow, list[str]]:
    """One request through the addon, checked; returns the flow and the warnings it logged."""
    f = make_flow(body, path)
    before_raw, before_fields = f.request.raw_content, tuple(f.request.headers.fields)
    r.addon.request(f)
    recs = r.capture.take()
    assert all(x.levelno < logging.ERROR for x in recs) and len(recs) <= 1, recs
    check_request(before_raw, before_fields, f, path, False, len(recs))
    return f, [x.getMessage() for x in recs]
