"""A local fake LLM provider that follows the providers' documented caching behaviour.

Used as the upstream behind mitmproxy by tests, benchmarks and the demo. See `server.Simulator`.
"""

from tests.sim.clock import SimClock
from tests.sim.faults import FAULT_HEADER, Faults, parse_faults
from tests.sim.server import RecordedRequest, SentResponse, Simulator

__all__ = ["FAULT_HEADER", "Faults", "RecordedRequest", "SentResponse", "SimClock", "Simulator",
           "parse_faults"]
