"""The one bounded Content-Encoding decoder for everything the addon decodes.

Request bodies (the rewrite), non-streamed JSON responses (usage) and SSE streams (the tap) all
decode through `make_decoder`/`decode_body`, so one set of bounds holds everywhere (client and
server choose the bytes and their encoding, so a decompression bomb must stay cheap anywhere):

- per flow: at most `MAX_FLOW_OUTPUT` decoded bytes (64 MiB), counted at every stage of a
  stacked encoding, so a 420-byte brotli body can no longer allocate 256 MiB;
- per input chunk of a stream: at most `MAX_CHUNK_OUTPUT` decoded bytes (8 MiB), so no chunk can
  hold the event loop longer than decoding that much (~20-100 ms);
- incremental: input is fed `SLICE` bytes at a time, with an output limit on every call
  (zlib/zstd `max_length`, brotli `output_buffer_limit`), so nothing is decoded past a cap and
  a chunk of thousands of tiny gzip members costs linear time, not a copy of the rest per member.

Past a cap the decoder raises `DecodeLimit` (a ValueError): the caller stops observing the flow
and lets it pass unchanged, with one warning. The addon lives in one module at the top level
because the request side (rewrite), the response side (tap, JSON usage) and mitm glue share it.

Every decoder is a callable `bytes -> bytes` that keeps its state between calls and raises
ValueError on corrupt input; `finished` says whether the input so far ended cleanly.
"""

import functools
import logging
import zlib
from collections.abc import Buffer, Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)

MAX_FLOW_OUTPUT = 64 * 1024 * 1024
MAX_CHUNK_OUTPUT = 8 * 1024 * 1024
SLICE = 1024  # input bytes per decompress call: bounds the copy of leftover input per member
# Output per decompress call: decoders size their buffer by the limit they are given, so asking
# for "up to 64 MiB" at once can cost a 64 MiB buffer on top of what was decoded so far.
STEP = 256 * 1024
# zstandard's decompressobj (mitmproxy 12.2.x) has no output limit; a zstd block of 3-4 input
# bytes can expand to 128 KiB, so it gets input in small pieces to bound each call's output.
_ZSTANDARD_SLICE = 16

# Kept for callers that name the old per-chunk cap.
DEFAULT_MAX_OUTPUT = MAX_CHUNK_OUTPUT


class DecodeLimit(ValueError):
    """The decoded size passed a cap: the flow goes through unobserved."""


class Decoder(Protocol):
    def __call__(self, data: bytes, /) -> bytes: ...

    @property
    def finished(self) -> bool: ...


class _Budget:
    """Output limits of one decoding stage: per call and per flow."""

    def __init__(self, name: str, per_call: int, total: int) -> None:
        self.name = name
        self.per_call = per_call
        self.left = total
        self.total = total
        self.call_left = per_call

    def room(self) -> int:
        return min(self.call_left, self.left)

    def take(self, n: int) -> None:
        if n > self.left:
            raise DecodeLimit(f"{self.name} data decodes to more than {self.total} bytes")
        if n > self.call_left:
            raise DecodeLimit(f"a {self.name} chunk decodes to more than {self.per_call} bytes")
        self.left -= n
        self.call_left -= n


class _Inner(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: Buffer, /, max_length: int = ...) -> bytes: ...


class _Frames:
    """zlib/zstd streams with `decompress(data, max_length)`; several members/frames in a row
    (servers flush by ending one and starting the next) each get a fresh decompress object."""

    def __init__(self, factory: Callable[[], _Inner], budget: _Budget, slice_size: int = SLICE,
                 bounded: bool = True) -> None:
        self._factory = factory
        self._budget = budget
        self._slice = slice_size
        self._bounded = bounded
        self._inner: _Inner | None = None
        self._started = False

    @property
    def finished(self) -> bool:
        return self._started and self._inner is None

    def __call__(self, data: bytes) -> bytes:
        b = self._budget
        b.call_left = b.per_call
        out: list[bytes] = []
        view = memoryview(data)
        for start in range(0, len(view), self._slice):
            piece: bytes | memoryview = view[start:start + self._slice]
            more = bool(piece)
            while more:
                if self._inner is None:
                    self._inner = self._factory()
                    self._started = True
                step = min(b.room() + 1, STEP)
                try:
                    if self._bounded:
                        got = self._inner.decompress(piece, step)
                    else:
                        got = self._inner.decompress(piece)
                except Exception as e:  # zlib.error, zstd errors: all mean corrupt input
                    raise ValueError(f"corrupt {b.name} data: {e}") from e
                b.take(len(got))  # over the room: raises before anything else is kept
                out.append(got)
                if self._inner.eof:
                    piece = self._inner.unused_data  # at most one slice: the copy stays small
                    self._inner = None
                    more = bool(piece)
                elif self._bounded and len(got) >= step:
                    # Output-limited: zlib keeps the rest of the input in unconsumed_tail, zstd
                    # inside itself; either way ask again, each call bounded by `step`.
                    piece = getattr(self._inner, "unconsumed_tail", b"")
                else:
                    more = False  # under the limit: the whole piece was consumed
        return b"".join(out)


class _Deflate:
    """HTTP `deflate` is meant to be zlib-wrapped, but many servers send raw deflate."""

    def __init__(self, budget: _Budget) -> None:
        self._budget = budget
        self._head = b""
        self._frames: _Frames | None = None

    @property
    def finished(self) -> bool:
        return self._frames is not None and self._frames.finished

    def __call__(self, data: bytes) -> bytes:
        if self._frames is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            b0, b1 = self._head[0], self._head[1]
            zlib_wrapped = b0 & 0x0F == 8 and (b0 << 8 | b1) % 31 == 0
            wbits = zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS
            self._frames = _Frames(lambda: zlib.decompressobj(wbits), self._budget)
            data, self._head = self._head, b""
        return self._frames(data)


@functools.cache
def brotli_bounded() -> bool:
    """Whether the installed brotli can limit its output (brotli >= 1.2: output_buffer_limit)."""
    try:
        import brotli

        brotli.Decompressor().process(b"", output_buffer_limit=1)
    except (ImportError, TypeError):
        return False
    except Exception:  # an error about the empty input: the keyword itself is known
        return True
    return True


class _Brotli:
    def __init__(self, budget: _Budget) -> None:
        import brotli  # a mitmproxy dependency

        self._inner: Any = brotli.Decompressor()
        self._error: type[Exception] = brotli.error
        self._budget = budget

    @property
    def finished(self) -> bool:
        return bool(self._inner.is_finished())

    def _process(self, data: bytes) -> tuple[bytes, bool]:
        """(output, limited): limited means brotli may hold more output for an empty call."""
        limit = min(self._budget.room() + 1, STEP)
        try:
            got = self._inner.process(data, output_buffer_limit=limit)
        except self._error as e:
            raise ValueError(f"corrupt br data: {e}") from e
        self._budget.take(len(got))
        return got, len(got) >= limit or not self._inner.can_accept_more_data()

    def __call__(self, data: bytes) -> bytes:
        b = self._budget
        b.call_left = b.per_call
        out: list[bytes] = []
        view = memoryview(data)
        for start in range(0, len(view), SLICE):
            got, limited = self._process(bytes(view[start:start + SLICE]))
            out.append(got)
            # At the limit brotli keeps the rest: drain it (each call bounded) before new input.
            while limited and got:
                got, limited = self._process(b"")
                out.append(got)
        return b"".join(out)


def _zstd_factory() -> tuple[Callable[[], _Inner], bool] | None:
    """(factory, takes max_length): 3.14 stdlib, mitmproxy 12.3's backports.zstd, or the
    `zstandard` package that mitmproxy 12.2.x uses."""
    try:
        from compression import zstd  # type: ignore[import-not-found]

        return zstd.ZstdDecompressor, True
    except ImportError:
        pass
    try:
        from backports import zstd  # type: ignore[no-redef,unused-ignore]

        return zstd.ZstdDecompressor, True
    except ImportError:
        pass
    return _zstandard_factory()


def _zstandard_factory() -> tuple[Callable[[], _Inner], bool] | None:
    try:
        import zstandard
    except ImportError:
        return None
    return (lambda: zstandard.ZstdDecompressor().decompressobj()), False


class _Identity:
    finished = True

    def __init__(self, budget: _Budget) -> None:
        self._budget = budget

    def __call__(self, data: bytes) -> bytes:
        self._budget.call_left = self._budget.per_call
        self._budget.take(len(data))
        return data


def _one(encoding: str, budget: _Budget) -> Decoder | None:
    if encoding in ("gzip", "x-gzip"):
        return _Frames(lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), budget)
    if encoding == "deflate":
        return _Deflate(budget)
    if encoding == "br":
        return _Brotli(budget) if brotli_bounded() else None
    if encoding == "zstd":
        found = _zstd_factory()
        if found is None:
            return None
        factory, bounded = found
        return _Frames(factory, budget, SLICE if bounded else _ZSTANDARD_SLICE, bounded)
    return None


class _Chain:
    def __init__(self, steps: list[Decoder]) -> None:
        self._steps = steps

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self._steps)

    def __call__(self, data: bytes) -> bytes:
        for step in self._steps:
            data = step(data)
        return data


def make_decoder(content_encoding: str | None, max_output: int = MAX_CHUNK_OUTPUT,
                 max_total: int = MAX_FLOW_OUTPUT) -> Decoder | None:
    """An incremental, bounded decoder for a Content-Encoding value; None if unsupported.

    `max_output` caps what one call may return, `max_total` all calls together (DecodeLimit).
    Stacked codings ("gzip, br") were applied left to right, so they are undone right to left;
    every stage has its own budget, so an intermediate stage can't blow up either.
    """
    names = [n.strip().lower() for n in (content_encoding or "").split(",")]
    names = [n for n in names if n not in ("", "identity")]
    if not names:
        return _Identity(_Budget("identity", max_output, max_total))
    steps: list[Decoder] = []
    for name in reversed(names):
        step = _one(name, _Budget(name, max_output, max_total))
        if step is None:
            logger.debug("no bounded decoder for content-encoding %r", name)
            return None
        steps.append(step)
    return steps[0] if len(steps) == 1 else _Chain(steps)


def decode_body(raw: bytes, content_encoding: str | None,
                max_total: int = MAX_FLOW_OUTPUT) -> bytes:
    """A whole (request or response) body, decoded within `max_total` bytes.

    Raises DecodeLimit past the cap, ValueError for an unsupported coding or corrupt or
    truncated data (like mitmproxy's strict `get_content`, but bounded).
    """
    dec = make_decoder(content_encoding, max_output=max_total, max_total=max_total)
    if dec is None:
        raise ValueError(f"unsupported content-encoding {content_encoding!r}")
    out = dec(raw)
    if raw and not dec.finished:
        raise ValueError(f"truncated {content_encoding} data")
    return out
