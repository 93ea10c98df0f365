"""Statistics of the samples and the processes' counters read from /proc."""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
from collections.abc import Iterator
from pathlib import Path


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary_ms(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "median_ms": statistics.median(xs) * 1e3,
            "p90_ms": quantile(xs, 0.9) * 1e3, "min_ms": min(xs) * 1e3}


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    # The client's own collector pauses would land in random samples of either proxy.
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def proc_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            vals[key] = int(rest.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, with its reaped children's (a live child, such
    as the ceiling's worker process, is counted by `children_cpu`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu(pid: int) -> float:
    total = 0.0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError, ValueError):
                    total += proc_cpu(int(child))
    return total


def idle_seconds() -> float:
    """Idle CPU seconds of the whole machine so far (all cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[4]) / os.sysconf("SC_CLK_TCK")
