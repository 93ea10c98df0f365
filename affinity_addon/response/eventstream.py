"""AWS event streams (`application/vnd.amazon.eventstream`): Bedrock's InvokeModelWithResponseStream
and ConverseStream answers, read from a decoded copy while every byte passes through unchanged.

A frame (as `EventStreamBuffer` in https://github.com/boto/botocore/blob/develop/botocore/eventstream.py
reads it, and botocore's parsers.py its `:message-type`, `:event-type` and `:exception-type`):

    total length (u32 BE) | headers length (u32 BE) | CRC32 of those 8 bytes
    headers: name length (u8), name, value type (u8), value ...
    payload
    CRC32 of everything before it (u32 BE)

Header value types 0/1 are true/false, 2-5 signed 1/2/4/8-byte integers, 6 bytes and 7 a string
(u16 length first), 8 a timestamp (8 bytes), 9 a UUID (16 bytes). botocore caps headers at 128 KiB
and a payload at 24 MiB; so do we.

Why a decoder of our own (~80 lines): botocore is a 16 MB wheel for one module, and its buffer
copies everything it holds on every frame it takes off (`self._data = self._data[n:]`);
smithy-aws-event-stream is a 0.x async reader API on top of smithy-core. mitmproxy pushes raw
chunks into a synchronous callable that must never raise (a raised exception drops the chunk from
the client's stream: docs/mitmproxy-notes.md#streaming), so the tap below keeps at most one
unfinished frame, checks both CRCs with zlib (C), and on a bad frame stops reading (the record says
why) while the bytes keep flowing untouched.
"""

import base64
import logging
import re
import struct
import zlib
from collections.abc import Callable
from typing import Any

from affinity_addon.response.tap import Tap
from affinity_addon.response.usage import UsageReader, parse_json

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.amazon.eventstream"

PRELUDE = 12
MIN_FRAME = PRELUDE + 4
MAX_HEADERS = 128 * 1024
MAX_PAYLOAD = 24 * 1024 * 1024
_U32X3 = struct.Struct("!III")
_U32 = struct.Struct("!I")
# Value type -> (struct format or None for a length-prefixed value, size).
_FIXED: dict[int, tuple[str, int]] = {2: ("!b", 1), 3: ("!h", 2), 4: ("!i", 4), 5: ("!q", 8),
                                      8: ("!q", 8)}

Headers = dict[str, Any]
OnFrame = Callable[[Headers, bytes], None]


class FrameError(ValueError):
    """A frame that is not one: bad lengths, a CRC mismatch, headers that do not parse."""


def parse_headers(data: bytes) -> Headers:
    out: Headers = {}
    pos, end = 0, len(data)
    while pos < end:
        size = data[pos]
        name = data[pos + 1:pos + 1 + size].decode("utf-8", "replace")
        pos += 1 + size
        if pos >= end:
            raise FrameError("header without a value type")
        kind = data[pos]
        pos += 1
        value: Any
        if kind in (0, 1):
            value = kind == 0
        elif kind in _FIXED:
            fmt, n = _FIXED[kind]
            value = struct.unpack_from(fmt, data, pos)[0]
            pos += n
        elif kind in (6, 7):
            (n,) = struct.unpack_from("!H", data, pos)
            raw = data[pos + 2:pos + 2 + n]
            pos += 2 + n
            value = raw.decode("utf-8", "replace") if kind == 7 else raw
        elif kind == 9:
            value = data[pos:pos + 16]
            pos += 16
        else:
            raise FrameError(f"unknown header value type {kind}")
        if pos > end:
            raise FrameError("header value runs past the headers")
        out[name] = value
    return out


class EventStreamTap(Tap):
    """A `flow.response.stream` callable for AWS event streams: returns every chunk as it came,
    decodes a copy frame by frame and hands each frame's headers and payload to `on_frame`.
    Same surface as the SSE tap (`failed`, `skipped`, `ended`, `kept`, `events`)."""

    what = "event stream tap"

    def __init__(self, content_encoding: str | None, on_frame: OnFrame,
                 keep_limit: int = 0) -> None:
        # frames are never skipped (`skipped` stays 0): a frame too big to hold is a bad frame
        super().__init__(content_encoding, keep_limit)
        self._on_frame = on_frame
        self._buf = bytearray()
        self._callback_failed = False

    def _end(self) -> None:
        if self.failed is None and self._buf:
            self._fail(f"the stream ended inside a frame ({len(self._buf)} bytes of it)")

    def _feed(self, decoded: bytes) -> None:
        self._buf += decoded
        try:
            self._frames()
        except (FrameError, struct.error) as e:
            self._fail(f"event stream frame {self.events + 1}: {e}")

    def _frames(self) -> None:
        buf = self._buf
        pos = 0
        while len(buf) - pos >= PRELUDE:
            total, head, crc = _U32X3.unpack_from(buf, pos)
            if zlib.crc32(buf[pos:pos + 8]) != crc:
                raise FrameError("prelude CRC mismatch")
            if total < MIN_FRAME or head > MAX_HEADERS or head > total - MIN_FRAME\
                    or total - head - MIN_FRAME > MAX_PAYLOAD:
                raise FrameError(f"impossible lengths (total {total}, headers {head})")
            if len(buf) - pos < total:
                break  # the rest of this frame is still on its way
            end = pos + total
            (message_crc,) = _U32.unpack_from(buf, end - 4)
            # Through a memoryview: a bytearray slice copies, and a 24 MiB frame then peaked at
            # three copies of itself (measured: 76.7 MB for a 25.2 MB stream), now at two.
            view = memoryview(buf)
            try:
                if zlib.crc32(view[pos + 8:end - 4], crc) != message_crc:
                    raise FrameError("message CRC mismatch")
                headers = parse_headers(bytes(view[pos + PRELUDE:pos + PRELUDE + head]))
                payload = bytes(view[pos + PRELUDE + head:end - 4])
            finally:
                view.release()  # the buffer is resized below: no export may stay open
            pos = end
            self.events += 1
            self._dispatch(headers, payload)
        if pos:
            del buf[:pos]  # once per chunk: at most one unfinished frame stays behind

    def _dispatch(self, headers: Headers, payload: bytes) -> None:
        try:
            self._on_frame(headers, payload)
        except Exception as e:
            if not self._callback_failed:
                self._callback_failed = True
                logger.debug("event stream frame handler raised %s: %s (later errors not logged)",
                             type(e).__name__, e)

    def _reset(self) -> None:
        self._buf = bytearray()


_EVENT_NAME = re.compile(r"[^A-Za-z0-9_]")


def bedrock_frames(reader: UsageReader) -> OnFrame:
    """Bedrock's events, as the usage reader of the request's API reads them.

    InvokeModelWithResponseStream sends each of the model's own stream events (Anthropic's
    `message_start`, ..., `message_stop`) as a `chunk` event whose payload is
    `{"bytes": <base64 of the event's JSON>}` (`PayloadPart` in botocore's bedrock-runtime
    service model): the decoded event goes to the reader like an SSE event's data. ConverseStream
    events (`messageStart`, ..., `metadata`) go in as `{"<event type>": <payload>}`, the API the
    AWS SDKs give them. An `exception` (or `error`) frame ends the stream with its type as the
    error.
    """

    def on_frame(headers: Headers, payload: bytes) -> None:
        kind = headers.get(":message-type", "event")
        if kind == "event":
            name = headers.get(":event-type")
            if not isinstance(name, str):
                return
            if name == "chunk":
                part = parse_json(payload)
                data = part.get("bytes") if isinstance(part, dict) else None
                if isinstance(data, str):
                    reader.feed_event(None, base64.b64decode(data))
                return
            # as one event's JSON: the reader parses it only if it may carry usage (its API's
            # `needles`), so a stream's many contentBlockDelta frames are never parsed
            key = _EVENT_NAME.sub("", name).encode()  # AWS names: letters; nothing to escape
            reader.feed_event(name, b'{"' + key + b'":' + (payload or b"{}") + b"}")
        else:
            code = headers.get(":exception-type") or headers.get(":error-code") or kind
            reader.feed_json({"error": {"type": str(code)[:100]}})

    return on_frame

