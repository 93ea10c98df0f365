"""Run the simulator as a process: `python -m tests.sim --port 0 --replicas 4`.

Prints exactly one line, `listening on http://127.0.0.1:PORT`, then serves until SIGTERM/SIGINT.
"""

import argparse
import logging
import signal
import sys
import threading

from tests.sim.providers import PROVIDERS
from tests.sim.server import Simulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim",
                                     description="Fake LLM provider with documented caching.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--event-delay", type=float, default=0.0,
                        help="seconds between SSE events")
    parser.add_argument("--default-provider", default="openai", choices=sorted(PROVIDERS))
    parser.add_argument("--auto-ttl", type=float, default=None,
                        help="idle TTL in seconds for every automatic prefix cache")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        stream=sys.stderr)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sim = Simulator(replicas=args.replicas, seed=args.seed, port=args.port,
                    default_provider=args.default_provider, event_delay=args.event_delay,
                    auto_ttl=args.auto_ttl)
    with sim:
        print(f"listening on {sim.url}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
