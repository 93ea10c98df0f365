"""The mitmproxy layer: small single-concern addons sharing one `State`.

`addon.py` (the script mitmproxy loads) lists them; `make_addons()` builds the same list for tests
and embedders.
"""

from affinity_addon.mitm.commands import Commands
from affinity_addon.mitm.config import Config
from affinity_addon.mitm.instance import Instance
from affinity_addon.mitm.metrics import Metrics
from affinity_addon.mitm.otel import OTel
from affinity_addon.mitm.recorder import Recorder
from affinity_addon.mitm.rewriter import Rewriter
from affinity_addon.mitm.scope import Scope
from affinity_addon.mitm.state import State
from affinity_addon.views import contentview  # noqa: F401  (registers the mitmweb contentview)

__all__ = ["Commands", "Config", "Instance", "Metrics", "OTel", "Recorder", "Rewriter", "Scope", "State", "make_addons"]


def make_addons(state: State | None = None) -> list[object]:
    """Config first (options and rules), then the request side, the response side, commands."""
    state = state or State()
    config = Config(state)
    return [config, Scope(state), Instance(state), Rewriter(state), Recorder(state),
            Metrics(state), OTel(state), Commands(state, config)]
