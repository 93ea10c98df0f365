"""mitmproxy entry script: `mitmdump -s affinity_addon/addon.py` (or `mitmweb -s ...`).

mitmproxy runs this file outside any package, so the checkout root goes on sys.path and the
addons are imported from the package; this file stays a thin list (hot reload watches it).
"""

import sys
from pathlib import Path

_root = str(Path(__file__).resolve().parent.parent)
if _root not in sys.path:
    sys.path.insert(0, _root)

from affinity_addon.mitm import (  # noqa: E402
    Commands,
    Config,
    Instance,
    Metrics,
    OTel,
    Recorder,
    Rewriter,
    Scope,
    State,
)

state = State()
config = Config(state)  # options, the rules file (hot reload) and the JSONL log
addons = [
    config,
    Scope(state),  # decrypt only the LLM hosts the rules name
    Instance(state),  # affinity_instance: which proxy wrote a record (gateways)
    Rewriter(state),  # request: affinity ID, headers, body fields, cache breakpoints
    Recorder(state),  # response: usage from JSON/SSE/WebSocket, verdict, record
    Metrics(state),  # Prometheus /metrics, /healthz, /readyz (affinity_metrics=HOST:PORT)
    OTel(state),  # one OpenTelemetry span per LLM response (affinity_otel=true)
    Commands(state, config),  # affinity.stats/why/reset/reload, the shutdown summary
]
