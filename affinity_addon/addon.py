"""mitmproxy entry script: `mitmdump -s affinity_addon/addon.py` (or `mitmweb -s ...`).

mitmproxy runs this file outside any package, so the checkout root goes on sys.path and the
addons are imported from the package; this file stays a thin list (hot reload watches it).
"""

import sys
from pathlib import Path

_root = str(Path(__file__).resolve().parent.parent)
if _root not in sys.path:
    sys.path.insert(0, _root)

from affinity_addon.mitm import Affinity  # noqa: E402

# One addon for mitmproxy to dispatch to; in it, in this order (mitm/bundle.py):
#   Config    options (mitm/options.py), the rules file (hot reload) and the JSONL log
#   Scope     decrypt only the LLM hosts the rules name
#   Rewriter  request: affinity ID, headers, body fields, cache breakpoints
#   Recorder  response: usage from JSON/SSE/WebSocket, verdict, record
#   Metrics   Prometheus /metrics, /healthz, /readyz (affinity_metrics=HOST:PORT)
#   OTel      one OpenTelemetry span per LLM response (affinity_otel=true)
#   Commands  affinity.stats/why/reset/reload, the shutdown summary
addons = [Affinity()]
