"""`affinity proxy [--web] [mitmproxy args...]`: mitmdump (or mitmweb) with the installed addon
and the shipped rules on 127.0.0.1:8080, and how to point agents at it.

Our defaults come first on the mitmproxy command line and the user's arguments after them, so
the user's `-p`, `--listen-host`, `--mode` or `--set` win (mitmproxy keeps the last value).
"""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ADDON_SCRIPT = Path(__file__).resolve().parent.parent / "addon.py"
DEFAULT_PORT = 8080
DEFAULT_LOG = "affinity.jsonl"
# mitmweb's own default columns plus the flow comment, where the cache line of each flow lives.
WEB_COLUMNS = ["tls", "icon", "path", "method", "status", "size", "time", "comment"]


def confdir() -> Path:
    return Path(os.environ.get("MITMPROXY_CONFDIR") or Path.home() / ".mitmproxy").expanduser()


def default_port() -> int:
    try:
        return int(os.environ.get("AFFINITY_PORT") or DEFAULT_PORT)
    except ValueError:
        return DEFAULT_PORT


def set_value(args: Sequence[str], name: str) -> str | None:
    """The last value mitmproxy arguments give option `name` (`--set name=v`, `--set=name=v`)."""
    found = None
    for i, a in enumerate(args):
        value = a[len("--set="):] if a.startswith("--set=") else (
            args[i + 1] if a == "--set" and i + 1 < len(args) else None)
        if value is not None and value.split("=", 1)[0] == name:
            found = value.split("=", 1)[1] if "=" in value else ""
    return found


def port_of(extra: Sequence[str], default: int) -> int:
    """The port the user's `-p`/`--listen-port` chose (for the banner), else `default`."""
    port = default
    for i, a in enumerate(extra):
        value = a.split("=", 1)[1] if a.startswith("--listen-port=") else (
            extra[i + 1] if a in ("-p", "--listen-port") and i + 1 < len(extra) else None)
        if value is not None and value.isdigit():
            port = int(value)
    return port


def log_of(extra: Sequence[str]) -> str:
    found = set_value(extra, "affinity_log")
    return found if found is not None else os.environ.get("AFFINITY_LOG") or DEFAULT_LOG


def mitm_argv(port: int, extra: Sequence[str], *, web: bool = False,
              log: str | None = None) -> list[str]:
    """mitmproxy's command line (without the program name): our defaults, then `extra`."""
    # mitmproxy refuses an option --set twice: ours only where the user did not set it.
    argv = ["--listen-host", "127.0.0.1", "-p", str(port), "-s", str(ADDON_SCRIPT)]
    if set_value(extra, "confdir") is None:
        argv += ["--set", f"confdir={confdir()}"]
    if set_value(extra, "affinity_log") is None:
        argv += ["--set", f"affinity_log={log or os.environ.get('AFFINITY_LOG') or DEFAULT_LOG}"]
    if web and set_value(extra, "web_columns") is None:
        for col in WEB_COLUMNS:  # a sequence option: one --set per item
            argv += ["--set", f"web_columns={col}"]
    return argv + list(extra)


def banner(port: int, tool: str, log: str, conf: Path | None = None) -> str:
    ca = (conf or confdir()) / "mitmproxy-ca-cert.pem"
    return f"""
affinity: starting {tool} on 127.0.0.1:{port} with the shipped rules; records go to {log}
Easiest: run an agent through it with  affinity run -- <agent command>
Or point an agent at it by hand (in the agent's shell):
  export HTTPS_PROXY=http://127.0.0.1:{port}
  export NODE_EXTRA_CA_CERTS={ca}        # Node agents: Claude Code, Gemini CLI, opencode, pi
  export SSL_CERT_FILE={ca}              # Python httpx (openai/anthropic SDKs), Codex CLI
  export REQUESTS_CA_BUNDLE={ca}         # Python requests
  export CODEX_CA_CERTIFICATE={ca}       # Codex CLI
(the CA is created on first start; SSL_CERT_FILE replaces the trust store, see README)
Or without a CA, reverse mode: affinity proxy --mode reverse:https://api.anthropic.com
  and ANTHROPIC_BASE_URL=http://127.0.0.1:{port} (OPENAI_BASE_URL=http://127.0.0.1:{port}/v1 for OpenAI)
Report: affinity report {log}
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "proxy", help="start the proxy (mitmdump, or mitmweb with --web) with the addon",
        description="Start mitmdump (or mitmweb) with the affinity addon and the shipped rules on "
                    "127.0.0.1:8080 (AFFINITY_PORT). Any further arguments go to mitmproxy, e.g. "
                    "--mode reverse:https://api.anthropic.com or --set affinity_dry_run=true.")
    p.add_argument("--web", action="store_true", help="mitmweb (browser UI on 127.0.0.1:8081)")
    p.set_defaults(run=run, passthrough=True)
    return p


def run(args: argparse.Namespace) -> int:
    extra = list(getattr(args, "extra", []) or [])
    port = default_port()
    tool = "mitmweb" if args.web else "mitmdump"
    conf = set_value(extra, "confdir")
    print(banner(port_of(extra, port), tool, log_of(extra), Path(conf) if conf else None),
          file=sys.stderr, flush=True)
    from mitmproxy.tools import main as mitm_main

    start = mitm_main.mitmweb if args.web else mitm_main.mitmdump
    try:
        start(mitm_argv(port, extra, web=args.web))
    except SystemExit as e:  # mitmproxy exits through sys.exit on startup errors
        return e.code if isinstance(e.code, int) else 1
    return 0
