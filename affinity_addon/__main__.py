"""The `affinity` command line: `affinity report LOG.jsonl ...` (and `python -m affinity_addon`).

Each subcommand module exposes `add_parser(subparsers)`, which registers its arguments and sets
`run(args) -> int` as the parser default; add a module to SUBCOMMANDS to add a subcommand.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from affinity_addon.cli import proxy, report, run

ADDON_SCRIPT = Path(__file__).resolve().parent / "addon.py"


def _addon_path_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "addon-path", help="print the path of the mitmproxy script",
        description='Print the addon script\'s path, for `mitmdump -s "$(affinity addon-path)"`.')
    p.set_defaults(run=lambda _args: print(ADDON_SCRIPT) or 0)
    return p


SUBCOMMANDS: tuple[Callable[[Any], argparse.ArgumentParser], ...] = (
    report.add_parser, _addon_path_parser, proxy.add_parser, run.add_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="affinity", description="Prompt-cache affinity for LLM agents: tools around the "
                                     "mitmproxy addon's logs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `proxy` and `run` hand the arguments they do not know to mitmproxy (--mode, --set, ...);
    # `run` takes the agent's command after `--`.
    full = list(sys.argv[1:] if argv is None else argv)
    head, tail = (full[:full.index("--")], full[full.index("--") + 1:]) if "--" in full else (full, [])
    args, extra = parser.parse_known_args(head)
    if getattr(args, "passthrough", False):
        args.extra, args.tail = extra, tail
    else:
        args = parser.parse_args(full)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `affinity report ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
