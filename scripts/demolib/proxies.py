"""The demo's processes: simulators and mitmdumps on loopback, each stopped by its PID."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.procs import free_port

from . import ROOT
from .session import Agent

ADDON = ROOT / "affinity_addon" / "addon.py"
CLOCK = ROOT / "tests" / "sim" / "clock_addon.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
EVENT_DELAY = 0.05  # seconds between SSE events: a short stream, long enough to see buffering


class Processes:
    """Everything this script starts; `stop_all` ends each by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, env=env, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        while self.procs:
            proc = self.procs.pop()
            if proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, output: Path | None = None,
              timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
                continue
        break
    tail = output.read_text(errors="replace")[-2000:] if output and output.exists() else ""
    raise RuntimeError(f"{what} did not start listening on 127.0.0.1:{port}\n{tail}")


def start_simulator(procs: Processes, err: Path, replicas: int = 4, seed: int = 0,
                    event_delay: float = EVENT_DELAY) -> subprocess.Popen[bytes]:
    with err.open("wb") as f:
        return procs.start([sys.executable, "-m", "tests.sim", "--port", "0",
                            "--replicas", str(replicas), "--seed", str(seed),
                            "--event-delay", str(event_delay)],
                           stdout=subprocess.PIPE, stderr=f, cwd=ROOT)


@dataclass
class Proxy:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    output: Path
    log: Path | None


def start_proxy(procs: Processes, d: Path, name: str, agent: Agent, sim_port: int,
                addon: bool, scripts: tuple[Path, ...] = (),
                options: dict[str, str] | None = None) -> Proxy:
    """`scripts` load before the addon; `options` are more `--set`s."""
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [str(MITMDUMP), "--set", f"confdir={d / 'confdir'}",
            "--set", "connection_strategy=lazy", "--set", "upstream_cert=false",
            "--set", "termlog_verbosity=warn", "--set", "flow_detail=0",
            "--mode", f"reverse:https://{agent.host}@127.0.0.1:{port}",
            "--map-remote",
            f"#^https?://{re.escape(agent.host)}(:443)?/#http://127.0.0.1:{sim_port}/p/{agent.provider}/"]
    for script in scripts:
        args += ["-s", str(script)]
    log = None
    if addon:
        log = d / "affinity.jsonl"
        args += ["-s", str(ADDON), "--set", f"affinity_log={log}",
                 "--set", "affinity_summary=false"]
    for k, v in (options or {}).items():
        args += ["--set", f"{k}={v}"]
    output = d / f"{name}-output.txt"
    with output.open("wb") as f:
        proc = procs.start(args, stdout=f, stderr=subprocess.STDOUT, cwd=d)
    return Proxy(name, proc, port, output, log)
