"""Incremental Content-Encoding decoders for streamed response bodies.

mitmproxy hands a stream callable the raw, still compressed chunks (mitmproxy.md G3), so the tap
decodes a copy chunk by chunk. Every decoder here is a callable `bytes -> bytes` that keeps its
state between calls and raises `ValueError` on corrupt input.
"""

import logging
import zlib
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)

Decoder = Callable[[bytes], bytes]

# A decompression bomb must not take the proxy's memory with it: one chunk of a few KiB that
# decodes to more than this is refused (a real SSE chunk decodes to a few KiB).
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024


class _Inner(Protocol):
    """The part of zlib/zstd decompress objects the frame loop relies on."""

    eof: bool
    unused_data: bytes

    def decompress(self, data: bytes, /, *args: int) -> bytes: ...


def _zstd_factory() -> tuple[Callable[[], _Inner], bool] | None:
    """The first zstd implementation available: 3.14 stdlib, mitmproxy 12.3's, mitmproxy 12.2's."""
    try:
        from compression import zstd  # type: ignore[import-not-found]

        return zstd.ZstdDecompressor, True
    except ImportError:
        pass
    try:
        from backports import zstd  # type: ignore[import-not-found,no-redef]

        return zstd.ZstdDecompressor, True
    except ImportError:
        pass
    try:
        import zstandard

        return (lambda: zstandard.ZstdDecompressor().decompressobj()), False
    except ImportError:
        return None


class _Frames:
    """Decodes a sequence of independent members/frames (gzip members, zstd frames).

    Servers may flush by ending one frame and starting the next; a single decompress object stops
    at the first end of frame and leaves the rest in `unused_data`, so start a fresh one there.
    """

    def __init__(self, factory: Callable[[], _Inner], name: str, max_output: int,
                 bounded: bool = True) -> None:
        self._factory = factory
        self._bounded = bounded  # decompress() takes max_length: a bomb stops at the cap
        self._name = name
        self._max_output = max_output
        self._inner: _Inner | None = None

    def __call__(self, data: bytes) -> bytes:
        out: list[bytes] = []
        size = 0
        while data:
            if self._inner is None:
                self._inner = self._factory()
            room = self._max_output - size
            try:
                if self._bounded:
                    piece = self._inner.decompress(data, room + 1)
                else:
                    piece = self._inner.decompress(data)
            except Exception as e:  # zlib.error, zstd errors: all mean corrupt input
                raise ValueError(f"corrupt {self._name} data: {e}") from e
            if len(piece) > room:
                raise ValueError(f"{self._name} chunk decodes to more than {self._max_output} bytes")
            size += len(piece)
            out.append(piece)
            if not self._inner.eof:
                break
            data = self._inner.unused_data
            self._inner = None
        return b"".join(out)


def _gzip_member() -> _Inner:
    return zlib.decompressobj(16 + zlib.MAX_WBITS)


class _Deflate:
    """HTTP `deflate` is meant to be zlib-wrapped, but many servers send raw deflate."""

    def __init__(self, max_output: int) -> None:
        self._max_output = max_output
        self._head = b""
        self._frames: _Frames | None = None

    def __call__(self, data: bytes) -> bytes:
        if self._frames is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            b0, b1 = self._head[0], self._head[1]
            zlib_wrapped = b0 & 0x0F == 8 and (b0 << 8 | b1) % 31 == 0
            wbits = zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS
            self._frames = _Frames(lambda: zlib.decompressobj(wbits), "deflate", self._max_output)
            data, self._head = self._head, b""
        return self._frames(data)


class _Brotli:
    def __init__(self, max_output: int) -> None:
        import brotli  # a mitmproxy dependency

        self._inner: Any = brotli.Decompressor()
        self._error: type[Exception] = brotli.error
        self._max_output = max_output

    def __call__(self, data: bytes) -> bytes:
        try:
            out = self._inner.process(data)
        except self._error as e:
            raise ValueError(f"corrupt br data: {e}") from e
        if len(out) > self._max_output:
            raise ValueError(f"br chunk decodes to more than {self._max_output} bytes")
        return out


def _identity(data: bytes) -> bytes:
    return data


def _one(encoding: str, max_output: int) -> Decoder | None:
    if encoding in ("", "identity"):
        return _identity
    if encoding in ("gzip", "x-gzip"):
        return _Frames(_gzip_member, "gzip", max_output)
    if encoding == "deflate":
        return _Deflate(max_output)
    if encoding == "br":
        try:
            return _Brotli(max_output)
        except ImportError:
            return None
    if encoding == "zstd":
        found = _zstd_factory()
        if found is None:
            return None
        factory, bounded = found
        return _Frames(factory, "zstd", max_output, bounded)
    return None


def make_decoder(content_encoding: str | None,
                 max_output: int = DEFAULT_MAX_OUTPUT) -> Decoder | None:
    """An incremental decoder for a Content-Encoding header value, None if unsupported.

    Stacked codings ("gzip, br") were applied left to right, so they are undone right to left.
    """
    names = [n.strip().lower() for n in (content_encoding or "").split(",")]
    names = [n for n in names if n not in ("", "identity")]
    if not names:
        return _identity
    steps: list[Decoder] = []
    for name in reversed(names):
        step = _one(name, max_output)
        if step is None:
            logger.debug("no incremental decoder for content-encoding %r", name)
            return None
        steps.append(step)
    if len(steps) == 1:
        return steps[0]

    def chain(data: bytes) -> bytes:
        for step in steps:
            data = step(data)
        return data

    return chain
