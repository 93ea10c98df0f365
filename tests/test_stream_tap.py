import gzip
import json
import logging
import random
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_addon.decoding import make_decoder
from affinity_addon.response.stream_tap import StreamTap
from affinity_addon.response.usage import UsageReader

FIXTURES = Path(__file__).parent / "fixtures" / "usage"
EXPECTED: dict[str, dict[str, Any]] = json.loads((FIXTURES / "expected.json").read_text())
SSE_FIXTURES = sorted(n for n in EXPECTED if n.endswith(".sse"))
ONE_PER_API = ["anthropic.sse", "openai_chat.sse", "responses.sse", "gemini.sse"]


def _zstd_compressor() -> Callable[[list[bytes]], bytes]:
    """Same fallback order as the decoder, so the test runs on mitmproxy 12.2 and 12.3."""
    try:
        try:
            from compression import zstd  # type: ignore[import-not-found]
        except ImportError:
            from backports import zstd  # type: ignore[import-not-found,no-redef]

        def compress(events: list[bytes]) -> bytes:
            c = zstd.ZstdCompressor()
            return b"".join(c.compress(e, c.FLUSH_BLOCK) for e in events) + c.flush()
    except ImportError:
        import zstandard

        def compress(events: list[bytes]) -> bytes:
            c = zstandard.ZstdCompressor().compressobj()
            out = [c.compress(e) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for e in events]
            return b"".join(out) + c.flush()

    return compress


def _zlib(wbits: int) -> Callable[[list[bytes]], bytes]:
    def compress(events: list[bytes]) -> bytes:
        c = zlib.compressobj(wbits=wbits)
        return b"".join(c.compress(e) + c.flush(zlib.Z_SYNC_FLUSH) for e in events) + c.flush()

    return compress


def _brotli(events: list[bytes]) -> bytes:
    c = brotli.Compressor()
    return b"".join(c.process(e) + c.flush() for e in events) + c.finish()


# Compressed the way streaming servers do it: one flush per event, so each event can be read
# as soon as it arrives.
ENCODERS: dict[str, Callable[[list[bytes]], bytes]] = {
    "identity": lambda events: b"".join(events),
    "gzip": _zlib(31),
    "deflate": _zlib(15),
    "br": _brotli,
    "zstd": _zstd_compressor(),
}


def split_events(raw: bytes) -> list[bytes]:
    parts = raw.split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def encoded(name: str, encoding: str, raw: bytes | None = None) -> bytes:
    return ENCODERS[encoding](split_events(raw if raw is not None else fixture(name)))


class Run:
    """One stream through a tap into a reader, checking the bytes on the way out."""

    def __init__(self, name: str, encoding: str | None, keep_limit: int = 0, **kw: Any) -> None:
        case = EXPECTED[name]
        self.reader = UsageReader(case["api"])
        self.tap = StreamTap(encoding, self.reader.feed_event, keep_limit=keep_limit, **kw)
        self.out: list[bytes] = []

    def feed(self, chunks: list[bytes]) -> "Run":
        for chunk in [*chunks, b""]:
            result = self.tap(chunk)
            assert result is chunk
            self.out.append(result)
        assert self.tap.ended
        return self

    def usage(self) -> dict[str, Any] | None:
        u = self.reader.usage()
        return u.to_dict() if u else None


def check(name: str, run: Run, wire: bytes) -> None:
    assert b"".join(run.out) == wire
    assert run.tap.failed is None
    assert run.usage() == EXPECTED[name]["usage"]
    assert run.reader.terminal is EXPECTED[name]["terminal"]
    assert run.tap.events == EXPECTED[name]["events"]


@pytest.mark.parametrize("name", SSE_FIXTURES)
@pytest.mark.parametrize("encoding", list(ENCODERS))
def test_whole_stream(name: str, encoding: str) -> None:
    wire = encoded(name, encoding)
    check(name, Run(name, encoding).feed([wire]), wire)


@pytest.mark.parametrize("name", ONE_PER_API)
@pytest.mark.parametrize("encoding", ["identity", "gzip", "br", "zstd"])
def test_every_byte_boundary(name: str, encoding: str) -> None:
    wire = encoded(name, encoding)
    for i in range(1, len(wire)):
        check(name, Run(name, encoding).feed([wire[:i], wire[i:]]), wire)


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
@pytest.mark.parametrize("name", ONE_PER_API)
def test_every_byte_boundary_other_line_ends(name: str, newline: bytes) -> None:
    wire = fixture(name).replace(b"\n", newline)
    for i in range(1, len(wire)):
        check(name, Run(name, None).feed([wire[:i], wire[i:]]), wire)


@pytest.mark.parametrize("name", SSE_FIXTURES)
@pytest.mark.parametrize("encoding", list(ENCODERS))
def test_random_slices(name: str, encoding: str) -> None:
    wire = encoded(name, encoding)
    rnd = random.Random(f"{name}/{encoding}")
    for _ in range(25):
        chunks, pos = [], 0
        while pos < len(wire):
            n = rnd.choice([1, 2, 3, 7, 16, 61, 200, 4096])
            chunks.append(wire[pos:pos + n])
            pos += n
        check(name, Run(name, encoding).feed(chunks), wire)


def test_raw_deflate_and_stacked_encodings() -> None:
    name = "responses.sse"
    raw_deflate = encoded(name, "identity")
    c = zlib.compressobj(wbits=-15)
    raw_deflate = c.compress(raw_deflate) + c.flush()
    check(name, Run(name, "deflate").feed([raw_deflate[:1], raw_deflate[1:]]), raw_deflate)
    stacked = _brotli([encoded(name, "gzip")])  # gzip applied first, then br
    check(name, Run(name, "gzip, br").feed([stacked[:5], stacked[5:]]), stacked)
    check(name, Run(name, "GZIP").feed([encoded(name, "gzip")]), encoded(name, "gzip"))


def test_multi_member_gzip_and_multi_frame_zstd() -> None:
    name = "anthropic.sse"
    events = split_events(fixture(name))
    members = b"".join(gzip.compress(e) for e in events)  # a fresh gzip member per event
    check(name, Run(name, "gzip").feed([members[:9], members[9:]]), members)
    frames = b"".join(ENCODERS["zstd"]([e]) for e in events)
    check(name, Run(name, "zstd").feed([frames]), frames)


def collect(data: list[bytes], **kw: Any) -> tuple[StreamTap, list[tuple[str | None, bytes]]]:
    events: list[tuple[str | None, bytes]] = []
    tap = StreamTap(kw.pop("encoding", None), lambda n, d: events.append((n, d)), **kw)
    for chunk in [*data, b""]:
        assert tap(chunk) is chunk
    return tap, events


def test_sse_field_rules() -> None:
    stream = (b"\xef\xbb\xbf: comment\n"
              b"event: one\ndata: line1\ndata:line2\ndata\nid: 7\nretry: 10\nunknown: x\n\n"
              b"data: {\"a\":1}\n\n"
              b"event: no-data\n\n"
              b"data:  two spaces\n\n"
              b"event: tail\ndata: no blank line at the end")
    for split in range(1, len(stream)):
        tap, events = collect([stream[:split], stream[split:]])
        assert events == [("one", b"line1\nline2\n"), (None, b'{"a":1}'),
                          (None, b" two spaces"), ("tail", b"no blank line at the end")]
        assert tap.events == 4 and tap.failed is None


def test_bom_split_and_not_a_bom() -> None:
    assert collect([b"\xef", b"\xbb", b"\xbfdata: x\n\n"])[1] == [(None, b"x")]
    assert collect([b"\xef"])[1] == []
    # Bytes that only start like a BOM are kept (they are garbage, but not ours to drop).
    assert collect([b"\xefdata: x\n\ndata: y\n\n"])[1] == [(None, b"y")]


def test_callback_errors_are_swallowed_and_parsing_goes_on() -> None:
    seen: list[bytes] = []

    def on_event(name: str | None, data: bytes) -> None:
        seen.append(data)
        raise RuntimeError("handler bug")

    wire = fixture("openai_chat.sse")
    tap = StreamTap(None, on_event)
    assert tap(wire) is wire
    assert tap(b"") == b""
    assert tap.events == 4 and len(seen) == 4 and tap.failed is None


@pytest.mark.parametrize("garbage", [b"\x00\xff" * 100, b"not compressed at all\n\n",
                                     gzip.compress(b"data: x\n\n", mtime=0) + b"trailing junk"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_bad_compression_never_raises(garbage: bytes, encoding: str) -> None:
    chunks = [garbage[i:i + 13] for i in range(0, len(garbage), 13)] + [b"data: late\n\n"]
    tap, events = collect(chunks, encoding=encoding)
    assert tap.bytes_in == sum(len(c) for c in chunks)
    # brotli has no header, but these inputs are invalid anyway
    assert tap.failed is not None and tap.failed.startswith(f"corrupt {encoding} data: ")
    if encoding == "gzip" and garbage.startswith(b"\x1f\x8b"):
        assert events == [(None, b"x")]  # the valid member before the junk was read


def test_truncated_gzip_keeps_what_was_decoded() -> None:
    name = "anthropic.sse"
    wire = encoded(name, "gzip")
    cut = wire[: len(wire) * 2 // 3]
    run = Run(name, "gzip").feed([cut])
    assert b"".join(run.out) == cut
    u = run.reader.usage()  # message_start was in the first part: its input counts are read
    assert u is not None and (u.input_tokens, u.cache_read_tokens, u.cache_write_tokens)\
        == (22322, 20480, 1800)
    assert not run.reader.terminal


def test_unknown_encoding_passes_bytes_and_counts() -> None:
    tap, events = collect([b"abc", b"def"], encoding="compress")
    assert events == [] and tap.bytes_in == 6 and "compress" in (tap.failed or "")


def test_giant_event_is_skipped_and_parsing_resumes() -> None:
    big = b"data: " + b"x" * (9 * 1024 * 1024)
    chunks = [b"data: {\"n\":1}\n\n"] + [big[i:i + 65536] for i in range(0, len(big), 65536)]
    chunks += [b"\n\ndata: after\n\n"]
    t0 = time.perf_counter()
    tap, events = collect(chunks, keep_limit=1024)
    elapsed = time.perf_counter() - t0
    assert events == [(None, b'{"n":1}'), (None, b"after")]
    assert tap.skipped == 1 and tap.failed is None
    assert tap.bytes_in == sum(len(c) for c in chunks)
    assert tap.kept is None  # over the keep cap
    assert elapsed < 2, elapsed  # no quadratic rescans of the growing line


def test_many_data_lines_hit_the_cap() -> None:
    line = b"data: " + b"y" * 1000 + b"\n"
    tap, events = collect([line] * 200 + [b"\n", b"data: next\n\n"], max_event=100_000)
    assert events == [(None, b"next")] and tap.skipped == 1 and tap.failed is None


def test_cap_also_holds_for_small_chunks_of_one_line() -> None:
    tap, events = collect([b"data: "] + [b"z" * 10] * 2000 + [b"\r\n\r\ndata: x\r\n\r\n"],
                          max_event=4096)
    assert tap.skipped == 1 and events == [(None, b"x")]


def test_kept_bytes() -> None:
    wire = encoded("gemini.sse", "br")
    tap, _ = collect([wire[:10], wire[10:]], encoding="br", keep_limit=len(wire))
    assert tap.kept == wire
    tap, _ = collect([wire[:10], wire[10:]], encoding="br", keep_limit=len(wire) - 1)
    assert tap.kept is None
    tap, _ = collect([wire], encoding="br")
    assert tap.kept is None


def test_chunks_after_end_and_odd_chunk_types() -> None:
    tap, events = collect([bytearray(b"data: a\n\n"), memoryview(b"data: b\n\n")])
    assert events == [(None, b"a"), (None, b"b")]
    late = b"data: late\n\n"
    assert tap(late) is late and tap.events == 2
    weird: Any = 12345  # not bytes at all: still handed back, never raised on
    tap2 = StreamTap(None, lambda n, d: None)
    assert tap2(weird) is weird
    assert tap2.failed is not None and tap2.failed.startswith("internal error: TypeError")


def test_make_decoder() -> None:
    assert make_decoder(None) is not None and make_decoder("identity")(b"x") == b"x"
    assert make_decoder(" , identity") is not None
    assert make_decoder("compress") is None
    assert make_decoder("gzip, snappy") is None
    bomb = gzip.compress(b"\0" * 10_000_000)
    dec = make_decoder("gzip", max_output=1_000_000)
    assert dec is not None
    with pytest.raises(ValueError, match="more than"):
        dec(bomb)
    dec = make_decoder("gzip")
    assert dec is not None
    assert b"".join(dec(bomb[i:i + 4096]) for i in range(0, len(bomb), 4096)) == b"\0" * 10_000_000


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_decompression_bomb_is_refused(encoding: str) -> None:
    bomb = ENCODERS[encoding]([b"data: " + b"0" * 5_000_000 + b"\n\n"])
    dec = make_decoder(encoding, max_output=1_000_000)
    assert dec is not None
    with pytest.raises(ValueError, match="more than"):
        dec(bomb)
    tap, events = collect([bomb[:100], bomb[100:]], encoding=encoding)
    assert events == [(None, b"0" * 5_000_000)]  # under the default caps it is just big
    tap = StreamTap(encoding, lambda n, d: None, max_event=1_000_000)
    assert tap(bomb) is bomb
    assert tap.skipped == 1


@pytest.mark.slow  # a benchmark
def test_microbenchmark_1mb_stream(capsys: pytest.CaptureFixture[str]) -> None:
    rnd = random.Random(1)
    words = ["cache", "prefix", "token", "stream", "proxy", "usage", "the", "a", "of", "model"]

    def delta() -> bytes:
        text = " ".join(rnd.choice(words) for _ in range(20))
        return (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                b'"delta":{"type":"text_delta","text":"' + text.encode() + b'"}}\n\n')

    head, tail = fixture("anthropic.sse").split(b"event: content_block_delta", 1)
    deltas: list[bytes] = []
    while sum(map(len, deltas)) < 1_000_000:
        deltas.append(delta())
    events = split_events(head) + deltas + split_events(b"event: content_block_delta" + tail)
    body = b"".join(events)
    for encoding in ("identity", "gzip"):
        wire = ENCODERS[encoding](events)
        chunks = [wire[i:i + 4096] for i in range(0, len(wire), 4096)]
        run = Run("anthropic.sse", encoding)
        t0 = time.perf_counter()
        run.feed(chunks)
        dt = time.perf_counter() - t0
        assert run.usage() == EXPECTED["anthropic.sse"]["usage"]
        assert b"".join(run.out) == wire
        with capsys.disabled():
            print(f"\n[bench] {len(body) / 1e6:.2f} MB SSE as {encoding} ({len(chunks)} chunks of"
                  f" 4 KiB, {run.tap.events} events): {dt * 1000:.1f} ms,"
                  f" {len(body) / dt / 1e6:.0f} MB/s")


sse_text = st.text(st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=30)
sse_event = st.tuples(st.none() | st.text("abcdefghij._", min_size=1, max_size=12),
                      st.lists(sse_text, min_size=1, max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.lists(sse_event, max_size=8), st.sampled_from([b"\n", b"\r\n", b"\r"]),
       st.sampled_from(["identity", "gzip", "br", "zstd"]), st.data())
def test_any_chunking_gives_the_same_events(events: list[tuple[str | None, list[str]]],
                                            newline: bytes, encoding: str, data: Any) -> None:
    blocks = []
    for name, lines in events:
        block = [f"event: {name}".encode()] if name is not None else []
        block += [b"data: " + line.encode() for line in lines]
        blocks.append(newline.join(block) + newline * 2)
    wire = ENCODERS[encoding](blocks)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(wire) - 1, 1)), max_size=12)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    tap, seen = collect([c for c in chunks if c], encoding=encoding)
    assert tap.failed is None
    assert seen == [(name, "\n".join(lines).encode()) for name, lines in events]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=10),
       st.sampled_from([None, "gzip", "deflate", "br", "zstd", "gzip, br", "bogus"]))
def test_garbage_never_raises(chunks: list[bytes], encoding: str | None) -> None:
    out = []
    tap = StreamTap(encoding, lambda n, d: None, keep_limit=100, max_event=50)
    for chunk in [*chunks, b""]:
        result = tap(chunk)
        assert result is chunk
        out.append(result)
    assert b"".join(out) == b"".join(chunks)
    assert tap.ended


def test_callback_error_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def boom(name: str | None, data: bytes) -> None:
        raise KeyError("nope")

    with caplog.at_level(logging.DEBUG, logger="affinity_addon.response.stream_tap"):
        tap, _ = collect([b"data: 1\n\ndata: 2\n\ndata: 3\n\n"])
        tap2 = StreamTap(None, boom)
        tap2(b"data: 1\n\ndata: 2\n\ndata: 3\n\n")
    assert tap2.events == 3
    assert sum("raised KeyError" in r.getMessage() for r in caplog.records) == 1
