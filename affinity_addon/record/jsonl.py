"""Append-only JSONL writer that several proxy processes can share.

Each record is one `os.write` on an O_APPEND descriptor: POSIX appends are atomic with respect
to each other, so lines from several processes never interleave. A write failure (disk full,
file removed, permissions) never stops the proxy: it is reported once, and the next record tries
again.

A write cut short (disk full, a signal) is finished in a loop; if the rest can't be written, the
torn line is ended with a newline before the next record, so it costs one line, never the next
record too. The reader (`views.report`) also resyncs inside a torn line.
"""

import json
import logging
import os
from typing import Any

import orjson

logger = logging.getLogger(__name__)


def _encode(record: dict[str, Any]) -> bytes:
    # orjson writes compact UTF-8 like the stdlib line below; the stdlib takes what it refuses
    # (lone surrogates, integers beyond 64 bits) and anything else through str().
    try:
        return orjson.dumps(record, default=str) + b"\n"
    except (TypeError, orjson.JSONEncodeError):
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
        return (line + "\n").encode("utf-8", "replace")


class JsonlWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._inode: tuple[int, int] = (0, 0)  # of the open file: a file never changes its own
        self._open()
        self.failing = False  # the last write failed (readiness: the log is not writable)
        self._torn = False  # the file ends in part of a line
        self.written = 0
        self.failed = 0

    def write(self, record: dict[str, Any]) -> bool:
        data = _encode(record)
        try:
            if self._fd is not None and self._moved():
                self.close()  # rotated or removed: write to the file at the path again
            if self._fd is None:
                self._open()
                self._torn = False  # a new file
            if self._torn:
                data = b"\n" + data
            self._write_all(data)
        except OSError as e:
            self.failed += 1
            if not self.failing:
                self.failing = True
                logger.warning("affinity: cannot write %s (%s); records are being dropped, "
                               "proxying continues", self.path, e)
            return False
        if self.failing:
            self.failing = False
            logger.warning("affinity: writing %s again (%d records were lost)", self.path, self.failed)
        self.written += 1
        return True

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)  # type: ignore[arg-type]
            except OSError:
                if len(view) < len(data):
                    self._torn = True
                raise
            if n <= 0:
                self._torn = len(view) < len(data)
                raise OSError(f"short write ({len(data) - len(view)} of {len(data)} bytes)")
            view = view[n:]
        self._torn = False

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(self._fd)
        self._inode = (st.st_ino, st.st_dev)

    def _moved(self) -> bool:
        # One stat per record (the open file's inode is known): rotated or removed is seen at once.
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_ino, st.st_dev) != self._inode

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
