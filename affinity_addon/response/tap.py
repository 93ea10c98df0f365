"""What every `flow.response.stream` callable of the addon does, whatever the stream's framing
(SSE in stream_tap.py, AWS event streams in eventstream.py): return each chunk object unchanged,
count and optionally keep the raw bytes for mitmweb, decode a copy (bounded, incremental), hand it
to the framing, and turn every failure into `failed` instead of raising.

mitmproxy calls the stream callable synchronously for every raw (still compressed) chunk and
once more with b"" at the end. An exception there drops the chunk and silently corrupts the
client's stream (measured: the client got 4 of 5 events and status 200; `server_event` in
mitmproxy/proxy/server.py, docs/mitmproxy-notes.md#streaming).
"""

import logging

from affinity_addon.decoding import DecodeLimit, make_decoder

logger = logging.getLogger(__name__)


class Tap:
    """The pass-through part; a subclass reads the decoded bytes (`_feed`), finishes at the end
    of the stream (`_end`) and drops what it holds when parsing stops (`_reset`)."""

    what = "stream tap"  # for the debug line when parsing stops

    def __init__(self, content_encoding: str | None, keep_limit: int = 0) -> None:
        self._keep_limit = keep_limit
        self._kept: bytearray | None = bytearray() if keep_limit > 0 else None
        self.ended = False
        self.events = 0
        self.bytes_in = 0
        self.skipped = 0
        self.failed: str | None = None
        try:
            self._decode = make_decoder(content_encoding)
        except Exception:  # a header value of the wrong type: count bytes, parse nothing
            self._decode = None
        if self._decode is None:
            self.failed = f"unsupported content-encoding {content_encoding!r}"

    @property
    def kept(self) -> bytes | None:
        return bytes(self._kept) if self._kept is not None else None

    def __call__(self, chunk: bytes) -> bytes:
        try:
            self._take(chunk)
        except Exception as e:  # a bug here must never reach mitmproxy's stream layer
            self._fail(f"internal error: {type(e).__name__}: {e}")
        return chunk

    def _take(self, chunk: bytes) -> None:
        if self.ended:
            return
        if not chunk:
            self.ended = True
            self._end()
            return
        self.bytes_in += len(chunk)
        if self._kept is not None:
            if len(self._kept) + len(chunk) <= self._keep_limit:
                self._kept += chunk
            else:
                self._kept = None
        if self.failed is not None or self._decode is None:
            return
        try:
            decoded = self._decode(bytes(chunk))
        except DecodeLimit as e:  # a bomb or a runaway stream: one warning, then pass through
            logger.warning("affinity: %s; the stream passes through unobserved", e)
            self._fail(str(e))
            return
        except ValueError as e:
            self._fail(str(e))
            return
        if decoded:
            self._feed(decoded)

    def _feed(self, decoded: bytes) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            logger.debug("%s stopped parsing: %s", self.what, reason)
        self._reset()
