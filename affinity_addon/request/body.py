"""The JSON body of a request: read once (bounded decoding, orjson with a stdlib fallback for
what orjson refuses), and written back either as a splice of new top-level keys (every other
byte as the client sent it) or re-encoded.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from mitmproxy import http

from affinity_addon.decoding import DecodeLimit, decode_body
from affinity_addon.request.header_map import HeaderMap, header_map

_WS = b" \t\r\n"


@dataclass
class ParsedBody:
    obj: dict[str, Any] | None = None
    text: bytes | None = None  # decoded bytes the object came from
    problem: str | None = None  # why there is no object (for one warning line)
    # Parsed by the stdlib because orjson refused it (NaN/Infinity, integers beyond 64 bits):
    # write it back with the stdlib too, which round-trips those values.
    exotic: bool = False
    over_limit: bool = False  # decodes past the bound: the flow is left alone entirely
    # Parsed by orjson without looking for integers beyond 64 bits (which it reads as floats):
    # harmless for reading fields and for a splice; `exact()` settles it before a re-encode.
    unchecked: bool = False

    def exact(self) -> dict[str, Any] | None:
        """The object, re-read by the stdlib if the text holds an integer beyond 64 bits (so
        that a re-encode writes it back exactly). Checked once, only when a re-encode needs it:
        the scan costs half an orjson parse, and most rewrites are a splice."""
        if self.unchecked and self.text is not None:
            self.unchecked = False
            if _has_long_digits(self.text):
                self.obj = json.loads(self.text.decode("utf-8"))
        return self.obj


# Codings mitmproxy can re-encode a rewritten body with (mitmproxy.net.encoding).
_REENCODABLE = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})


def is_json_type(content_type: str | None) -> bool:
    """JSON media types (application/json, application/*+json) and a missing Content-Type: a
    JSON-looking body sent as text/plain or form data is not ours to rewrite (the upstream does
    not read it as a JSON API request, so an added field would only alter the client's data)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not media:
        return True
    kind, _, sub = media.partition("/")
    return kind == "application" and (sub == "json" or sub.endswith("+json"))


# orjson reads integers beyond 64 bits as floats (changing them on re-encode); only a run of
# 19+ digits can be one, so such bodies are parsed by the stdlib, which keeps them exact.
# (translate + `in` scans a MB in under a millisecond; a regex takes ten times longer.)
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19
# orjson reserves ~13x the body while parsing and encoding (an arena, mostly never touched),
# the stdlib ~2-4x but 2-3x slower on object-heavy bodies: huge bodies are rare, and there
# memory matters more than speed.
ORJSON_MAX = 8 << 20


_STRIDE = 9  # a run of 19 digits holds two digits 9 bytes apart at multiples of 9
_MAX_SPOTS = 64  # then the body is full of digits: scan it whole


def _has_long_digits(text: bytes) -> bool:
    """Is there a run of 19+ ASCII digits? Looks at every 9th byte first: a run of 19 digits
    starting at s covers m <= s + 8 and m + 9 <= s + 17, both multiples of 9, so two
    neighbouring samples are digits; only there (the bytes around them) is the text read
    (a 1 MB body: ~0.05 ms instead of ~0.5 ms for a scan of every byte)."""
    sample = text[::_STRIDE].translate(_DIGITS_TO_ZERO)
    i = sample.find(b"00")
    spots = 0
    while i != -1:
        # samples i and i + 1 are bytes 9i and 9i + 9; a run whose first multiple of 9 is 9i
        # starts at most 8 bytes before it, so its first 19 digits lie in this window
        if _LONG_DIGITS in text[max(0, i * _STRIDE - 18):(i + 1) * _STRIDE + 19].translate(
                _DIGITS_TO_ZERO):
            return True
        spots += 1
        if spots > _MAX_SPOTS:
            return _LONG_DIGITS in text.translate(_DIGITS_TO_ZERO)
        i = sample.find(b"00", i + 1)
    return False


def loads(text: bytes, *, exact: bool = True) -> tuple[Any, bool]:
    """(value, exotic). orjson is faster; the stdlib takes what it refuses (NaN, 1e400, lone
    surrogates), and such "exotic" bodies are never re-serialized: that would not round-trip.
    `exact=False` skips the scan for integers beyond 64 bits (see `ParsedBody.exact`)."""
    if len(text) > ORJSON_MAX:
        obj = json.loads(text.decode("utf-8"))  # UTF-8 only, as below
        return obj, not _standard(obj)
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        # Decode as UTF-8 ourselves: json.loads(bytes) would also accept UTF-16/32, which the
        # byte splice would then corrupt.
        return json.loads(text.decode("utf-8")), True
    if exact and _has_long_digits(text):
        obj = json.loads(text.decode("utf-8"))
    return obj, False


def _standard(obj: Any) -> bool:
    """False if a value would not round-trip through JSON (NaN/inf, lone surrogates)."""
    try:
        json.dumps(obj, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return False
    return True


def parse_body(request: http.Request, headers: HeaderMap | None = None) -> ParsedBody:
    raw = request.raw_content
    if raw is None:
        return ParsedBody(problem="body was streamed (stream_large_bodies); not rewritten")
    if not raw:
        return ParsedBody()
    hm = header_map(request.headers) if headers is None else headers
    ctype = hm.get("content-type")
    if not is_json_type(ctype):
        return ParsedBody(problem=f"body is not JSON (Content-Type: {(ctype or '')[:80]!r})")
    enc = hm.get("content-encoding", "")
    if enc.strip().lower() not in _REENCODABLE:
        # A rewritten body is re-encoded by mitmproxy (`request.content = ...`), which knows one
        # coding at a time: a stacked or unknown one would go upstream with no Content-Encoding.
        return ParsedBody(problem=f"body could not be decoded (Content-Encoding: {enc[:80]!r})")
    try:
        # Bounded (decoding.py): mitmproxy's get_content() would inflate a bomb without limit.
        text = decode_body(raw, enc)
    except DecodeLimit as e:
        return ParsedBody(problem=f"body not inspected: {e}", over_limit=True)
    except ValueError:
        return ParsedBody(problem=f"body could not be decoded (Content-Encoding: {enc[:80]!r})")
    if text.lstrip(_WS)[:1] != b"{":
        return ParsedBody(text=text, problem="body is not a JSON object")
    try:
        obj, exotic = loads(text, exact=False)
    except (ValueError, RecursionError) as e:
        return ParsedBody(text=text, problem=f"body is not valid JSON ({type(e).__name__})")
    if not isinstance(obj, dict):
        return ParsedBody(text=text, problem="body is not a JSON object")
    return ParsedBody(obj, text, exotic=exotic, unchecked=not exotic)


def dumps(obj: Any, large: bool = False) -> bytes:
    # Compact and UTF-8 like the clients' own encoders; keeps key order.
    if not large:
        try:
            return orjson.dumps(obj)
        except TypeError:  # integers beyond 64 bits: the stdlib writes them exactly
            pass
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def splice_top_level(text: bytes, items: Mapping[str, Any], empty: bool) -> bytes:
    """Insert new top-level keys right after the object's opening brace."""
    start = text.index(b"{") + 1
    ins = b",".join(dumps(k) + b":" + dumps(v) for k, v in items.items())
    return text[:start] + ins + (b"" if empty else b",") + text[start:]
