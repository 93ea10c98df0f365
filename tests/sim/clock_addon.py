"""Virtual time through a real mitmproxy process (tests and the demo only, never shipped).

    mitmdump -s tests/sim/clock_addon.py -s affinity_addon/addon.py ...

A workload stamps each request with `x-sim-time: <seconds>`, the time the simulator serves it at
(`engine.TIME_HEADER`). This script makes the proxy agree: the flow's `timestamp_start` becomes
that time, so whatever in the proxy counts rates or gaps on `flow.request.timestamp_start` sees
the workload's clock, and an hour of a team's traffic can go through mitmdump in seconds.

It sets the time in `requestheaders`, which mitmproxy runs for every addon before any `request`
hook, so no request-side addon can see the wall-clock value whatever the load order. The header
is left in place: the simulator reads it too. A request without it (or with a value that is not
a finite number) keeps mitmproxy's own time.
"""

import math

from mitmproxy import http

TIME_HEADER = "x-sim-time"  # tests.sim.engine.TIME_HEADER; this script is loaded by file path
_SHIFT = "sim-clock-shift"  # flow.metadata: virtual minus wall seconds, for timestamp_end


def _virtual(flow: http.HTTPFlow) -> float | None:
    value = flow.request.headers.get(TIME_HEADER)
    if value is None:
        return None
    try:
        t = float(value)
    except ValueError:
        return None
    return t if math.isfinite(t) and t >= 0 else None


class VirtualClock:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        t = _virtual(flow)
        if t is not None:
            flow.metadata[_SHIFT] = t - flow.request.timestamp_start
            flow.request.timestamp_start = t

    def request(self, flow: http.HTTPFlow) -> None:
        # The body has arrived by now: keep its upload time (end - start) as it was.
        shift = flow.metadata.get(_SHIFT)
        if isinstance(shift, float) and flow.request.timestamp_end is not None:
            flow.request.timestamp_end += shift


addons = [VirtualClock()]
