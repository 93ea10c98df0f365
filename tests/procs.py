"""Starting and stopping the local processes of tests, benchmarks and the demo.

Everything listens on 127.0.0.1; every process is stopped by its PID.
"""

import os
import re
import selectors
import socket
import subprocess
import time

from affinity_addon.cli.run import stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str = "process",
              timeout: float = 30.0) -> None:
    """Until something accepts connections on the port; raises if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what}: nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


def listening_port(proc: subprocess.Popen, what: str = "the simulator",
                   timeout: float = 30.0) -> int:
    """The port from the `listening on http://127.0.0.1:PORT` line a child prints on stdout."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=timeout):
        raise RuntimeError(f"{what} did not start within {timeout:.0f} s")
    line = proc.stdout.readline().decode()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not m:
        raise RuntimeError(f"{what} did not print its address: {line!r}")
    return int(m.group(1))


# The same stop as `affinity run` uses for the proxy it started: SIGTERM, then SIGKILL.
stop_pid = stop


def clean_env() -> dict[str, str]:
    # A proxy variable in the caller's shell must not send loopback traffic anywhere else.
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
