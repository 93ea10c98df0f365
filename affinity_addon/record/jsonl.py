"""Append-only JSONL writer that several proxy processes can share.

Each record is one `os.write` on an O_APPEND descriptor: POSIX appends are atomic with respect
to each other, so lines from several processes never interleave. A write failure (disk full,
file removed, permissions) never stops the proxy: it is reported once, and the next record tries
again.
"""

import json
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


class JsonlWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._failing = False
        self.written = 0
        self.failed = 0

    def write(self, record: dict[str, Any]) -> bool:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
        data = line.encode("utf-8", "replace")
        try:
            if self._fd is not None and self._moved():
                self.close()  # rotated or removed: write to the file at the path again
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            n = os.write(self._fd, data)
            if n != len(data):
                raise OSError(f"short write ({n} of {len(data)} bytes)")
        except OSError as e:
            self.failed += 1
            if not self._failing:
                self._failing = True
                logger.warning("affinity: cannot write %s (%s); records are being dropped, "
                               "proxying continues", self.path, e)
            return False
        if self._failing:
            self._failing = False
            logger.warning("affinity: writing %s again (%d records were lost)", self.path, self.failed)
        self.written += 1
        return True

    def _moved(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        fst = os.fstat(self._fd)  # type: ignore[arg-type]
        return (st.st_ino, st.st_dev) != (fst.st_ino, fst.st_dev)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
