"""The parts of `scripts/demo`: session (the agent, its transcript and one streamed request),
proxies (the simulator and the mitmdumps), display (the live table and the final figures) and
team (`--agent openai-team`)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
# The simulator and the process helpers are dev tools in tests/, not part of the wheel.
sys.path.insert(0, str(ROOT))
