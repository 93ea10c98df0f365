"""`affinity run [--port N] [mitmproxy args...] -- <agent command...>`: one agent through the proxy.

Sets the proxy and CA variables for every runtime an agent may be written in, starts a proxy
on the port if none listens there (and stops it when the agent exits), and prints the cache
summary of the records this session added to the log. For Claude Code on another provider's
Anthropic-compatible endpoint it also turns off Claude Code's billing block
(`CLAUDE_CODE_ATTRIBUTION_HEADER=0`), unless the user set that variable.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from affinity_addon.catalog.volatile import default_volatile
from affinity_addon.cli.proxy import confdir, default_port, log_of, set_value

START_TIMEOUT = 30.0
BUNDLE_NAME = "affinity-ca-bundle.pem"


def listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def ca_bundle(ca: Path) -> Path:
    """certifi's roots plus the mitmproxy CA: Python clients that take one bundle file
    (SSL_CERT_FILE, REQUESTS_CA_BUNDLE) keep trusting every other host."""
    try:
        import certifi

        roots = Path(certifi.where()).read_bytes()
    except (ImportError, OSError):
        roots = b""
    bundle = ca.parent / BUNDLE_NAME
    tmp = bundle.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(roots.rstrip(b"\n") + b"\n" + ca.read_bytes())
    tmp.replace(bundle)  # atomic: a second `affinity run` never reads half a bundle
    return bundle


def agent_env(port: int, ca: Path, bundle: Path, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    url = f"http://127.0.0.1:{port}"
    env.update({
        "HTTPS_PROXY": url, "https_proxy": url,
        "NODE_EXTRA_CA_CERTS": str(ca),  # Node adds it to its roots
        "SSL_CERT_FILE": str(bundle), "REQUESTS_CA_BUNDLE": str(bundle),  # Python: replaces them
        "CODEX_CA_CERTIFICATE": str(ca),
    })
    no_proxy = [h for h in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if h]
    for h in ("localhost", "127.0.0.1"):
        if h not in no_proxy:
            no_proxy.append(h)
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy)
    return env


# Claude Code's switch for its billing block: "0", "false", "no" or "off" leaves it out
# (https://code.claude.com/docs/en/llm-gateway-protocol).
ATTRIBUTION = "CLAUDE_CODE_ATTRIBUTION_HEADER"
# Where Claude Code talks to Bedrock, Vertex or Foundry instead, ANTHROPIC_BASE_URL is not used.
_CLOUDS = ("CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX", "CLAUDE_CODE_USE_FOUNDRY")
_FALSY = frozenset({"", "0", "false", "no", "off"})


def attribution_env(env: Mapping[str, str]) -> dict[str, str]:
    """`CLAUDE_CODE_ATTRIBUTION_HEADER=0` when the agent's ANTHROPIC_BASE_URL is another
    provider's: Claude Code's billing block is read and removed by api.anthropic.com, but any
    other upstream caches it as prompt text at token 0, different for every conversation, so
    no new conversation or subagent reads the system prompt and tools the last one cached.
    Claude Code's gateway docs recommend the switch. Nothing when the user set it (either way),
    on a first-party host (the catalog's `claude-code-billing` `stripped_by`), or when a cloud
    provider is selected."""
    base = env.get("ANTHROPIC_BASE_URL", "").strip()
    if ATTRIBUTION in env or not base or any(
            env.get(v, "").strip().lower() not in _FALSY for v in _CLOUDS):
        return {}
    try:
        host = urlsplit(base if "//" in base else f"//{base}").hostname
    except ValueError:
        return {}
    if not host or default_volatile().named_block("claude-code-billing").stripped_on(host):
        return {}
    return {ATTRIBUTION: "0"}


def start_proxy(port: int, extra: list[str], output: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["AFFINITY_PORT"] = str(port)
    argv = [sys.executable, "-m", "affinity_addon", "proxy", *extra,
            "--set", "affinity_summary=false"]  # this command prints the session's summary
    with output.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = output.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the proxy did not start on 127.0.0.1:{port}:\n{tail}")
            time.sleep(0.05)
    except BaseException:  # also Ctrl-C while it starts: never leave our proxy behind
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def new_records(log: Path, offset: int) -> list[dict[str, Any]]:
    try:
        with log.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return []
    out = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written by another process
        if isinstance(rec, dict):
            out.append(rec)
    return out


def print_summary(records: list[dict[str, Any]], log: Path) -> None:
    from rich.console import Console

    from affinity_addon.views.aggregate import Aggregator
    from affinity_addon.views.console import render_summary

    console = Console(file=sys.stderr)
    if not records:
        console.print(f"affinity: no LLM responses recorded in this session (log: {log})")
        return
    agg = Aggregator()
    agg.add_all(records)
    console.print(f"\naffinity: this session, {len(records)} LLM responses (log: {log})")
    render_summary(agg, console)


def run_agent(command: list[str], env: dict[str, str]) -> int:
    """Run the agent to its end. Ctrl-C reaches it directly (same process group); a SIGTERM to
    us is passed on to it, so we still stop our proxy and print the summary afterwards."""
    try:
        agent = subprocess.Popen(command, env=env)
    except OSError as e:
        print(f"affinity run: cannot start {command[0]}: {e}", file=sys.stderr)
        return 127
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, lambda *_: agent.send_signal(signal.SIGTERM))
    try:
        code = agent.wait()
        return 128 - code if code < 0 else code  # killed by signal N: status 128+N, as shells say
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run", help="run one agent through the proxy and print its cache summary",
        description="Run an agent with HTTPS_PROXY and the CA variables of its runtime set "
                    "(Node, Python, Codex), starting a proxy on the port if none listens there. "
                    "Arguments before -- that are not ours go to mitmproxy.",
        usage="affinity run [--port N] [mitmproxy args...] -- AGENT [ARGS...]")
    p.add_argument("--port", type=int, default=None, help="proxy port (default 8080, AFFINITY_PORT)")
    p.set_defaults(run=run, passthrough=True)
    return p


def run(args: argparse.Namespace) -> int:
    command = list(getattr(args, "tail", []) or [])
    if not command:
        print("affinity run: no agent command (affinity run -- claude ...)", file=sys.stderr)
        return 2
    extra = list(getattr(args, "extra", []) or [])
    port = args.port or default_port()
    log = Path(log_of(extra)).expanduser()
    given = set_value(extra, "confdir")
    conf = Path(given).expanduser() if given else confdir()
    proc = None
    if listening(port):
        print(f"affinity: using the proxy already listening on 127.0.0.1:{port} "
              f"(session summary from {log})", file=sys.stderr)
    else:
        conf.mkdir(parents=True, exist_ok=True)
        try:
            proc = start_proxy(port, extra, conf / f"affinity-run-{port}.log")
        except RuntimeError as e:
            print(f"affinity run: {e}", file=sys.stderr)
            return 1
    try:
        ca = conf / "mitmproxy-ca-cert.pem"
        if not ca.is_file():
            print(f"affinity run: no mitmproxy CA at {ca}", file=sys.stderr)
            return 1
        env = agent_env(port, ca, ca_bundle(ca), dict(os.environ))
        added = attribution_env(env)
        if added:
            print(f"affinity: {ATTRIBUTION}=0 for the agent: ANTHROPIC_BASE_URL is not "
                  "Anthropic's, where Claude Code's billing block would be cached as a "
                  f"different prompt for every conversation (set {ATTRIBUTION} yourself to "
                  "choose otherwise)", file=sys.stderr)
            env.update(added)
        offset = log.stat().st_size if log.exists() else 0
        code = run_agent(command, env)
    finally:
        if proc is not None:
            stop(proc)
    print_summary(new_records(log, offset), log)
    return code
