"""A local fake LLM provider that follows the providers' documented caching behaviour.

Used as the upstream behind mitmproxy by tests, benchmarks and the demo. See `server.Simulator`.
"""

from affinity_addon.simulator.clock import SimClock
from affinity_addon.simulator.server import RecordedRequest, Simulator

__all__ = ["RecordedRequest", "SimClock", "Simulator"]
