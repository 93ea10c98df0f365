"""Normalized cache usage from any API's JSON body, SSE events or WebSocket messages.

Where each API keeps its usage, and every provider's spelling of the cache fields, live in
`catalog/usage_fields.yaml`; this module only walks those paths. Provider data is untrusted: odd
values never raise, they count as absent and stay visible in `Usage.raw`.
"""

import json
import logging
import math
from typing import Any

import orjson

from affinity_addon.catalog.usage_fields import ApiFields, usage_fields
from affinity_addon.jsonpath import FieldPath, find_path, get_path
from affinity_addon.record.schema import Usage

logger = logging.getLogger(__name__)


def parse_json(data: bytes | str) -> Any:
    """orjson (several times faster on every response and SSE event); the stdlib takes what
    orjson refuses (NaN, Infinity), so a provider's odd number never costs the usage."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)

_MAX_TOKENS = 2**53  # beyond this a count is garbage, and it would not survive JSON readers
_MAX_EXTRA_LEN = 200
_RAW_MAX_STR = 64  # usage objects hold numbers and short enums, never prompt text
_RAW_MAX_DEPTH = 4
_RAW_MAX_ITEMS = 32

_APIS = usage_fields()


def fields_for(api: str) -> ApiFields:
    try:
        return _APIS[api]
    except KeyError:
        raise ValueError(f"unknown API {api!r} (known: {', '.join(_APIS)})") from None


def _count(value: Any) -> int | None:
    if type(value) is int and 0 <= value <= _MAX_TOKENS:  # bool is an int subclass: excluded
        return value
    return None


def _first_count(obj: dict[str, Any], paths: tuple[FieldPath, ...]) -> int | None:
    """First non-zero valid count, else a valid 0, else None."""
    zero = None
    for path in paths:
        n = _count(get_path(obj, path))
        if n:
            return n
        if n == 0:
            zero = 0
    return zero


def _first_cost(obj: dict[str, Any], paths: tuple[FieldPath, ...]) -> float | None:
    for path in paths:
        v = get_path(obj, path)
        if type(v) in (int, float) and math.isfinite(v) and v >= 0:
            return float(v)
    return None


def plain(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of a usage object: numbers, field names, short strings only."""
    if value is None or type(value) in (bool, int):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value if len(value) <= _RAW_MAX_STR else None
    if depth >= _RAW_MAX_DEPTH:
        return None
    if isinstance(value, dict):
        return {str(k)[:_RAW_MAX_STR]: plain(v, depth + 1)
                for k, v in list(value.items())[:_RAW_MAX_ITEMS]}
    if isinstance(value, list):
        return [plain(v, depth + 1) for v in value[:_RAW_MAX_ITEMS]]
    return None


def normalize_with(fields: ApiFields, raw_usage: dict[str, Any]) -> Usage:
    if not isinstance(raw_usage, dict):
        raw_usage = {}
    read = _first_count(raw_usage, fields.cache_read) or 0
    w5 = _first_count(raw_usage, fields.cache_write_5m)
    w1 = _first_count(raw_usage, fields.cache_write_1h)
    write = _first_count(raw_usage, fields.cache_write)
    if write is None:
        write = (w5 or 0) + (w1 or 0)
    inp = _first_count(raw_usage, fields.input)
    if inp is None:
        parts = [_count(get_path(raw_usage, p)) for p in fields.input_sum]
        inp = sum(n for n in parts if n is not None)
    if not fields.input_includes_cache:
        inp += read + write
    out = (_first_count(raw_usage, fields.output) or 0) + (
        _first_count(raw_usage, fields.output_extra) or 0)
    return Usage(
        input_tokens=inp,
        cache_read_tokens=read,
        cache_write_tokens=write,
        output_tokens=out,
        cache_write_5m_tokens=w5,
        cache_write_1h_tokens=w1,
        cost=_first_cost(raw_usage, fields.cost),
        raw=plain(raw_usage),
    )


def normalize(api: str, raw_usage: dict[str, Any]) -> Usage:
    """One provider usage object -> Usage. Raises ValueError only for an unknown API."""
    return normalize_with(fields_for(api), raw_usage)


def _matches(obj: dict[str, Any], rule: tuple[tuple[FieldPath, frozenset[str] | None], ...]) -> bool:
    for path, allowed in rule:
        if path[0] not in obj:
            return False
        v = get_path(obj, path)
        if v is None or v == "" or isinstance(v, dict | list):
            return False
        if allowed is not None and str(v) not in allowed:
            return False
    return True


class UsageReader:
    """Accumulates one response's usage from whatever pieces the transport delivers.

    Feed it a whole JSON body, each SSE event, or each WebSocket message; it never raises.
    `answer_at`: where the provider's cache diagnostics object may be (catalog/
    provider_diagnostics.yaml); `answer_seen` and `answer` (a sanitized copy) say what came.
    """

    def __init__(self, api: str, answer_at: tuple[FieldPath, ...] = ()) -> None:
        self.api = api
        self._fields = fields_for(api)
        self._raw: dict[str, Any] | None = None
        self.extras: dict[str, Any] = {}
        self.terminal = False
        self.messages = 0  # JSON objects seen, for diagnostics
        self._answer_at = answer_at
        self.answer_seen = False
        self.answer: Any = None

    def feed_event(self, event: str | None, data: bytes | str) -> None:
        """One SSE event (or one WebSocket text message: `feed_event(None, message.content)`)."""
        try:
            if isinstance(data, str):
                data = data.encode("utf-8", "surrogatepass")
            if len(data) < 16 and data.strip() == b"[DONE]":
                if self._fields.done_sentinel:
                    self.terminal = True
                return
            needles = self._fields.needles
            if needles is not None and needles.search(data) is None:
                if event in self._fields.terminal_events:
                    self.terminal = True
                return
            obj = parse_json(data)
        except (ValueError, UnicodeError):
            return  # keep-alives, junk, truncated JSON: not usage
        except Exception as e:
            logger.debug("usage reader ignored an event: %s: %s", type(e).__name__, e)
            return
        self.feed_json(obj)

    def feed_json(self, obj: Any) -> None:
        try:
            if isinstance(obj, list):  # Gemini without alt=sse streams a JSON array of chunks
                for item in obj:
                    self._feed_one(item)
            else:
                self._feed_one(obj)
        except Exception as e:  # a bad table or a truly odd object must not break the flow
            logger.debug("usage reader ignored a message: %s: %s", type(e).__name__, e)

    def _feed_one(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        self.messages += 1
        f = self._fields
        # Most events lack most of the paths: checking the first key inline skips the walk.
        for path in f.usage_at:
            if path[0] not in obj:
                continue
            usage = get_path(obj, path)
            if isinstance(usage, dict) and usage:
                if f.overlay and self._raw is not None:
                    self._raw = {**self._raw, **{k: v for k, v in usage.items() if v is not None}}
                else:
                    self._raw = dict(usage)
                break
        for key, paths in f.extras:
            for path in paths:
                if path[0] not in obj:
                    continue
                v = get_path(obj, path)
                if isinstance(v, str) and v:
                    self.extras[key] = v[:_MAX_EXTRA_LEN]
                    break
                if _count(v) is not None:
                    self.extras[key] = v
                    break
        if not self.terminal and any(_matches(obj, rule) for rule in f.terminal):
            self.terminal = True
        for path in self._answer_at:
            if path[0] not in obj:
                continue
            found, value = find_path(obj, path)
            # A later event's object wins (a Responses stream has it only on the terminal
            # event), but never a null over one already seen.
            if found and (value is not None or not self.answer_seen):
                self.answer_seen, self.answer = True, plain(value)
                break

    @property
    def raw(self) -> dict[str, Any] | None:
        """The accumulated provider usage object (sanitized), or None."""
        return plain(self._raw) if self._raw is not None else None

    def usage(self) -> Usage | None:
        if self._raw is None:
            return None
        try:
            return normalize_with(self._fields, self._raw)
        except Exception as e:
            logger.debug("usage normalization failed: %s: %s", type(e).__name__, e)
            return None
