"""A `flow.response.stream` callable that reads SSE events without ever touching the bytes
(the pass-through, decoding and failure handling are `tap.Tap`'s)."""

import logging
import re
from collections.abc import Callable

from affinity_addon.response.tap import Tap

logger = logging.getLogger(__name__)

OnEvent = Callable[[str | None, bytes], None]


# One SSE event bigger than this (e.g. a runaway line without a newline) stops parsing: holding
# it would cost memory for every stream, and no usage-bearing event is anywhere near it.
DEFAULT_MAX_EVENT = 8 * 1024 * 1024

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class StreamTap(Tap):
    """Splits a (possibly compressed) SSE byte stream into events and hands them to `on_event`.

    Follows the WHATWG event-stream rules: lines end in CRLF, LF or CR; a blank line dispatches
    the event; `data:` lines are joined with "\\n"; `:` lines are comments. At the end of stream a
    pending event is dispatched too, since mitmproxy only sends the final b"" on a normal end.
    """

    def __init__(self, content_encoding: str | None, on_event: OnEvent,
                 keep_limit: int = 0, max_event: int = DEFAULT_MAX_EVENT) -> None:
        super().__init__(content_encoding, keep_limit)
        self._on_event = on_event
        self._max_event = max_event
        self._buf = bytearray()
        self._name: str | None = None
        self._data: list[bytes] = []
        self._data_size = 0
        self._started = False
        self._scanned = 0
        self._cr = False
        self._callback_failed = False
        # Events over max_event are dropped, not parsed (the bytes still flow), and parsing
        # resumes at the next event: usage usually comes after a big content event.
        self._skip_line = False  # discarding the rest of an over-long line
        self._skip_event = False  # ignoring lines until the blank line that ends the event

    def _end(self) -> None:
        if self.failed is None:
            self._split(final=True)
            self._dispatch()
            self._buf.clear()

    def _feed(self, decoded: bytes) -> None:
        if not self._started:
            self._buf += decoded
            if len(self._buf) < len(_BOM) and _BOM.startswith(bytes(self._buf)):
                return
            self._started = True
            if self._buf.startswith(_BOM):
                del self._buf[: len(_BOM)]
        else:
            self._buf += decoded
        if not self._cr and b"\r" in decoded:
            self._cr = True
            self._scanned = 0
        if self._skip_line and not self._drop_line_rest():
            return
        # Only new data can complete a line: nothing to do until it brings a line end.
        if self._cr or b"\n" in decoded:
            self._split(final=False)
        if self.failed is None and len(self._buf) + self._data_size > self._max_event:
            self._oversized()
            if len(self._buf) > self._max_event // 2:  # the big part is an unfinished line
                self._buf.clear()
                self._scanned = 0
                self._skip_line = True

    def _oversized(self) -> None:
        self.skipped += 1
        self._name, self._data, self._data_size = None, [], 0
        self._skip_event = True

    def _drop_line_rest(self) -> bool:
        """Discard up to the end of the over-long line; False while it has not ended yet."""
        m = _LINE_END.search(self._buf)
        if m is None:
            self._buf.clear()
            return False
        del self._buf[:m.start()]  # keep the line end: the line splitter handles CR/CRLF/LF
        self._skip_line = False
        self._scanned = 0
        return True

    def _split(self, final: bool) -> None:
        if self._cr:
            self._split_any(final)
        else:
            self._split_lf(final)

    def _split_lf(self, final: bool) -> None:
        """The common case, LF-only streams: one C-level split per chunk."""
        lines = bytes(self._buf).split(b"\n")
        rest = lines.pop()
        for line in lines:
            self._line(line)
            if self.failed is not None:
                return
        if final and rest:
            self._line(rest)
            rest = b""
        self._buf = bytearray(rest)

    def _split_any(self, final: bool) -> None:
        """Streams that use CR or CRLF somewhere: a CR may end a line on its own."""
        buf = self._buf
        pos = 0
        end = len(buf)
        # The kept tail holds no line end yet, so don't rescan it: a long line arriving in small
        # chunks would otherwise cost quadratic time.
        m = _LINE_END.search(buf, self._scanned)
        while m is not None:
            # A CR at the very end may be the first half of a CRLF split across chunks.
            if m.end() == end and not final and m.group() == b"\r":
                break
            self._line(bytes(buf[pos:m.start()]))
            pos = m.end()
            if self.failed is not None:
                return
            m = _LINE_END.search(buf, pos)
        if final and pos < end:
            self._line(bytes(buf[pos:]))
            pos = end
        del buf[:pos]
        self._scanned = max(len(buf) - 1, 0)

    def _line(self, line: bytes) -> None:
        if self._skip_event:
            if not line:
                self._skip_event = False
            return
        if not line:
            self._dispatch()
            return
        if line[0] == 0x3A:  # ":" comment / keep-alive
            return
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self._max_event:
                self._oversized()
        elif field == b"event":
            self._name = value.decode("utf-8", "replace")

    def _dispatch(self) -> None:
        name, data = self._name, self._data
        self._name, self._data, self._data_size = None, [], 0
        if not data:
            return
        self.events += 1
        try:
            self._on_event(name, b"\n".join(data))
        except Exception as e:
            if not self._callback_failed:
                self._callback_failed = True
                logger.debug("SSE event handler raised %s: %s (later errors not logged)",
                             type(e).__name__, e)

    def _reset(self) -> None:
        self._buf = bytearray()
        self._scanned = 0
        self._data, self._data_size, self._name = [], 0, None
