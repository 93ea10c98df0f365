"""A local fake LLM provider that follows the providers' documented caching behaviour.

Used as the upstream behind mitmproxy by tests, benchmarks and the demo. See `server.Simulator`.
An independent oracle for the addon: it imports nothing from `affinity_addon` (a test checks).
- `render`: each API's prompt as the provider reads it (order, blocks, tokens);
- `cache`: automatic prefix caching, GPT-5.6+ breakpoints, Anthropic markers;
- `routing`: which replica serves a request, per provider (OpenAI prefix+key with RPM overflow,
  per-conversation keys, OpenRouter sticky pins, shared caches);
- `providers`: the provider table; `engine`: one request without sockets; `server`: HTTP;
- `workload`: solo and team agent traffic on virtual time, straight into the engine.
Per-request virtual time: header `x-sim-time: <seconds>` (see `engine`); faults: `x-sim-fault`.
"""

from tests.sim.clock import SimClock
from tests.sim.faults import FAULT_HEADER, Faults, parse_faults
from tests.sim.server import RecordedRequest, SentResponse, Simulator

__all__ = ["FAULT_HEADER", "Faults", "RecordedRequest", "SentResponse", "SimClock", "Simulator",
           "parse_faults"]
