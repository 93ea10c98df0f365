"""End-to-end harness: a real `mitmdump` process with the addon, in front of the simulator.

Every process started here is stopped by its PID when the test ends; everything listens on
127.0.0.1 only. Traffic for public provider hosts never leaves the machine: mitmproxy's
map-remote sends it to the simulator, with lazy connects so the real host is never resolved.
"""

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.addon_errors import check_output, plant_args
from tests.procs import clean_env, free_port, stop_pid, wait_port

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "affinity_addon" / "addon.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
MITMWEB = Path(sys.executable).parent / "mitmweb"

# Provider hosts and the simulator provider that plays them.
HOSTS: dict[str, str] = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.x.ai": "xai",
    "openrouter.ai": "openrouter",
    "chatgpt.com": "codex",
    "api.deepseek.com": "deepseek",
    "api.fireworks.ai": "fireworks",
    # Anthropic-compatible endpoints of other providers (and their OpenAI-compatible paths)
    "api.moonshot.ai": "moonshot",
    "api.kimi.com": "kimi",
    "api.z.ai": "zai",
    "api.minimax.io": "minimax",
    "dashscope-intl.aliyuncs.com": "dashscope",
    "llm.unlisted.test": "openai",  # a host no rule names
    "bedrock-runtime.us-east-1.amazonaws.com": "bedrock",
    "bedrock-runtime-fips.us-east-1.amazonaws.com": "bedrock",
    "bedrock-mantle.us-east-1.api.aws": "bedrock",
    "us-east5-aiplatform.googleapis.com": "vertex",
    "aiplatform.googleapis.com": "vertex",
    "res-test.openai.azure.com": "azure",
}


def map_remote_args(sim_url: str,
                    hosts: Iterable[str] | Mapping[str, str] = HOSTS) -> list[str]:
    """`/p/<provider>@<host>/`: the simulator learns which provider plays the host, and which
    host the client addressed (map-remote rewrites the Host header, which SigV4 signed).
    `hosts`: names from HOSTS, or a mapping of host to simulator provider of its own."""
    table = hosts if isinstance(hosts, Mapping) else HOSTS
    args = []
    for host in hosts:
        args += ["--map-remote",
                 f"#^https?://{re.escape(host)}(:443)?/#{sim_url}/p/{table[host]}@{host}/"]
    return args


@dataclass
class Proxy:
    proc: subprocess.Popen
    port: int
    confdir: Path
    log: Path
    output: Path
    web_port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Regexes of the errors this proxy is meant to log (each must occur); any other addon
    # error, traceback or affinity error line in its output fails `check`.
    expect_errors: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        # Complete lines only: the proxy may be writing the next record while the test reads
        # (one write() per record, but a reader can see the file between two of them).
        text = self.log.read_text()
        lines = text.split("\n")[:-1]  # the part after the last newline is still being written
        return [json.loads(line) for line in lines if line.strip()]

    def wait_records(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            recs = self.records()
            if len(recs) >= n or time.monotonic() > deadline:
                return recs
            time.sleep(0.05)

    def stop(self) -> str:
        stop_pid(self.proc)
        return self.output.read_text(errors="replace")

    def check(self) -> None:
        """Raise AddonErrorLogged if the (stopped) process logged an addon error."""
        check_output(self.output.read_text(errors="replace"), f"mitmdump ({self.output})",
                     self.expect_errors)


def start_proxy(
    tmp: Path,
    sim_url: str | None,
    *,
    addon: bool = True,
    mode: str | None = None,
    options: Mapping[str, str] | None = None,
    extra_args: Iterable[str] = (),
    web: bool = False,
    hosts: Iterable[str] = HOSTS,
    scripts: Iterable[Path] = (),
    expect_errors: Iterable[str] = (),
) -> Proxy:
    """`scripts`: more `-s` scripts, loaded before the addon (e.g. tests/sim/clock_addon.py).
    `expect_errors`: regexes of the errors the test provokes (see `Proxy.check`)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    confdir = tmp / "confdir"
    log = tmp / "affinity.jsonl"
    output = tmp / "mitm-output.txt"
    binary = MITMWEB if web else MITMDUMP
    args = [str(binary), "--listen-host", "127.0.0.1", "-p", str(port),
            "--set", f"confdir={confdir}", "--set", "connection_strategy=lazy",
            "--set", "upstream_cert=false", "--set", "termlog_verbosity=info"]
    web_port = None
    if web:
        web_port = free_port()
        args += ["--set", "web_open_browser=false", "--set", f"web_port={web_port}",
                 "--set", "web_host=127.0.0.1", "--set", "web_password=test-token"]
    if mode:
        args += ["--mode", f"{mode}@{port}"]
    if sim_url:
        args += map_remote_args(sim_url, hosts)
    for script in scripts:
        args += ["-s", str(script)]
    if addon:
        args += ["-s", str(ADDON), "--set", f"affinity_log={log}", *plant_args()]
    for k, v in (options or {}).items():
        args += ["--set", f"{k}={v}"]
    args += list(extra_args)
    env = clean_env()
    out = output.open("wb")
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=tmp)
    try:
        wait_port(port, proc, "mitmdump")
        if web_port:
            wait_port(web_port, proc, "mitmweb")
    except Exception:
        stop_pid(proc)
        raise RuntimeError("mitmdump did not start:\n" + output.read_text(errors="replace")) from None
    return Proxy(proc, port, confdir, log, output, web_port, expect_errors=tuple(expect_errors))


def hit_ratio(usages: Iterable[Mapping[str, int]]) -> float:
    """Token-weighted hit ratio over normalized usage dicts."""
    us = list(usages)
    total = sum(u["input_tokens"] for u in us)
    return sum(u["cache_read_tokens"] for u in us) / total if total else 0.0
