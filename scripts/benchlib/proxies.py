"""The bench's processes: the simulator and the mitmdumps under test, each stopped by its PID."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.addon_errors import plant_args
from tests.procs import clean_env, free_port, listening_port, wait_port

from . import ROOT

ADDON = ROOT / "affinity_addon" / "addon.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"

# Listener name -> (host the client believes it talks to, simulator provider that plays it).
ROUTES: dict[str, tuple[str, str]] = {
    "openai": ("api.openai.com", "openai"),
    "anthropic": ("api.anthropic.com", "anthropic"),
    "unlisted": ("llm.unlisted.test", "openai"),  # no rule names it: the addon must stay out
}


class Processes:
    """Every child the bench starts; `stop_all` ends them by PID (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def add(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.procs.append((name, proc))

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        while self.procs:
            _, proc = self.procs.pop()
            self.stop(proc)



def start_simulator(procs: Processes, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    err = (tmp / "simulator.err").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.sim", "--port", "0", "--replicas", "4"],
        stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT, env=clean_env())
    procs.add("simulator", proc)
    return proc, listening_port(proc)


@dataclass
class Proxy:
    name: str
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path | None
    output: Path
    options: dict[str, str] | None = None
    script: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_proxy(procs: Processes, tmp: Path, name: str, sim_port: int, *, addon: bool,
                options: dict[str, str] | None = None, script: Path | None = None) -> Proxy:
    d = tmp / name
    d.mkdir()
    ports = {route: free_port() for route in ROUTES}
    sim_url = f"http://127.0.0.1:{sim_port}"
    # flow_detail=0: no per-flow console line, so the proxies' own printing does not drown the
    # addon's cost; both proxies get exactly the same flags.
    args = [str(MITMDUMP), "--set", f"confdir={d / 'confdir'}",
            "--set", "connection_strategy=lazy", "--set", "upstream_cert=false",
            "--set", "flow_detail=0", "--set", "termlog_verbosity=warn"]
    for route, (host, provider) in ROUTES.items():
        args += ["--mode", f"reverse:https://{host}@127.0.0.1:{ports[route]}",
                 "--map-remote", f"#^https?://{re.escape(host)}(:443)?/#{sim_url}/p/{provider}/"]
    log = None
    if addon:
        log = d / "affinity.jsonl"
        # Provider diagnostics off: with the field, the simulator fingerprints every prompt to
        # answer it (upstream work bare mitmdump's requests never ask for), which would count
        # against the addon: ~1-2 ms on the 1 MB Anthropic row, measured.
        args += ["-s", str(script or ADDON), "--set", f"affinity_log={log}",
                 "--set", "affinity_summary=false", "--set", "affinity_provider_diagnostics=false",
                 *plant_args()]  # the tests' planted error
    for k, v in (options or {}).items():
        args += ["--set", f"{k}={v}"]
    output = d / "output.txt"
    with output.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=d, env=clean_env())
    procs.add(name, proc)
    return Proxy(name, proc, ports, log, output, options, script)


def wait_proxy(proxy: Proxy) -> None:
    try:
        for port in proxy.ports.values():
            wait_port(port, proxy.proc, proxy.name)
    except Exception as e:
        text = proxy.output.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{proxy.name} did not start: {e}\n{text}") from None


def restart_until_listening(procs: Processes, proxy: Proxy, tmp: Path, sim_port: int) -> Proxy:
    # Ports come from bind-to-0-and-release, so another process may take one before mitmdump
    # binds it (other test runs share this machine): start again on fresh ports then.
    for attempt in range(3):
        try:
            wait_proxy(proxy)
            return proxy
        except RuntimeError:
            Processes.stop(proxy.proc)
            if attempt == 2 or "address already in use" not in (
                    proxy.output.read_text(errors="replace").lower()):
                raise
            shutil.rmtree(tmp / proxy.name, ignore_errors=True)
            proxy = start_proxy(procs, tmp, proxy.name, sim_port, addon=proxy.log is not None,
                                options=proxy.options, script=proxy.script)
    raise AssertionError("unreachable")
