"""The parts of `scripts/bench`: proxies (start and stop the processes), client (the load
generator's HTTP/1.1 connection), workloads (request bodies), stats (medians, /proc), measure (the
four measurements), report (tables, targets, JSON) and runs (the full run and --ceiling)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
# The simulator and the process helpers are dev tools in tests/, not part of the wheel.
sys.path.insert(0, str(ROOT))
