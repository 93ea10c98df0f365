"""Profile the addon's own CPU per request, in-process, on `scripts/bench`'s workloads.

    scripts/hotpath [--scenario NAME] [-n N] [--top K] [--sort tottime|cumtime]

Drives the addons of `addon.py` hook by hook through mitmproxy's dispatch (as a running
mitmdump does, minus the network), with the same options as the bench's addon proxy (JSONL log
on, diagnosis on, summary off), and prints per scenario the addon's microseconds per request
(request + responseheaders + response hooks; with no event loop here, the work the proxy defers
until after the request or the response has gone out runs inline and is counted) and cProfile's
top entries. This is the "where does the time go" companion of `scripts/bench`, which measures
the ratio against bare mitmdump end to end. In-process figures run warm (hot caches, one flow at
a time): the proxy's own CPU per request, measured from /proc, runs 2-3x higher.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The bench's workloads (scripts/benchlib), on the path even when this file is loaded by path.
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import workloads as bench  # noqa: E402
from mitmproxy.test import taddons, tflow, tutils  # noqa: E402

from affinity_addon.mitm.config import DEFAULT_RULES  # noqa: E402
from tests.driver import Affinity  # noqa: E402

OPENAI_USAGE = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-5.6",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1200, "completion_tokens": 5, "total_tokens": 1205,
                          "prompt_tokens_details": {"cached_tokens": 1024}}}
ANTHROPIC_USAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                   "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                   "usage": {"input_tokens": 12, "output_tokens": 5,
                             "cache_creation_input_tokens": 100,
                             "cache_read_input_tokens": 1100}}

# name -> (host, path, body for request i, response body)
Scenario = tuple[str, str, Callable[[int], bytes], dict]


def scenarios() -> dict[str, Scenario]:
    small = bench.stepped(bench.openai_body(2_000))
    big = bench.stepped(bench.openai_body(1_000_000))
    big_anthropic = bench.stepped(bench.anthropic_body(1_000_000))
    return {
        "matched-2k": ("api.openai.com", bench.CHAT_PATH, small, OPENAI_USAGE),
        "conversations-2k": ("api.openai.com", bench.CHAT_PATH,
                             bench.conversations_body(200), OPENAI_USAGE),
        "matched-1m-openai": ("api.openai.com", bench.CHAT_PATH, big, OPENAI_USAGE),
        "matched-1m-anthropic": ("api.anthropic.com", bench.MESSAGES_PATH, big_anthropic,
                                 ANTHROPIC_USAGE),
        "unmatched-2k": ("llm.unlisted.test", bench.CHAT_PATH, small, OPENAI_USAGE),
    }


def one(a: Affinity, host: str, path: str, body: bytes, response: bytes) -> None:
    f = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", method=b"POST",
                                    path=path.encode(),
                                    content=body,
                                    headers=((b"content-type", b"application/json"),
                                             (b"authorization", b"Bearer sk-x"))))
    f.request.timestamp_start = time.time()
    a.request(f)
    f.response = tutils.tresp(content=response,
                              headers=((b"content-type", b"application/json"),))
    a.responseheaders(f)
    a.response(f)


def run(name: str, sc: Scenario, n: int, top: int, sort: str, log: Path) -> None:
    host, path, body, usage = sc
    response = json.dumps(usage).encode()
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(log),
                       affinity_summary=False)
        bodies = [body(i) for i in range(n + 5)]
        for b in bodies[:5]:  # warm-up: rules compiled, key loaded, caches filled
            one(a, host, path, b, response)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for b in bodies[5:]:
            one(a, host, path, b, response)
        prof.disable()
        wall = time.perf_counter() - t0
        # The same loop without the profiler's overhead, for the honest per-request figure.
        bodies = [body(i) for i in range(n + 5, 2 * n + 5)]
        t0 = time.perf_counter()
        for b in bodies:
            one(a, host, path, b, response)
        clean = time.perf_counter() - t0
    # The cost of the test scaffolding (flow objects, hook dispatch with no addon) to subtract.
    with taddons.context() as tctx:
        t0 = time.perf_counter()
        for b in bodies:
            f = tflow.tflow(req=tutils.treq(host=host, port=443, path=path.encode(), content=b))
            f.response = tutils.tresp(content=response)
        base = time.perf_counter() - t0
    print(f"\n== {name}: {len(bodies[0]):,} B body, {n} requests: "
          f"{(clean - base) / n * 1e6:,.0f} us/request of addon "
          f"(profiled {wall / n * 1e6:,.0f} us, scaffolding {base / n * 1e6:,.0f} us)")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats(sort).print_stats(top)
    text = out.getvalue()
    print(text[text.find("   ncalls"):].rstrip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", action="append", help="one of the scenario names (repeatable)")
    p.add_argument("-n", type=int, default=0, help="requests per scenario (default: by size)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sort", default="tottime", choices=("tottime", "cumtime"))
    args = p.parse_args(argv)
    all_sc = scenarios()
    names = args.scenario or list(all_sc)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            n = args.n or (20 if "1m" in name else 2000)
            run(name, all_sc[name], n, args.top, args.sort, Path(tmp) / f"{name}.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
