"""The mitmproxy layer: small single-concern addons sharing one `State`, registered with
mitmproxy as one addon (`Affinity`, bundle.py: one hook lookup per event instead of seven).

`addon.py` (the script mitmproxy loads) registers it; `make_addons()` builds the same for tests
and embedders.
"""

from affinity_addon.mitm import contentview  # noqa: F401  (registers the mitmweb contentview)
from affinity_addon.mitm.bundle import Affinity
from affinity_addon.mitm.commands import Commands
from affinity_addon.mitm.config import Config
from affinity_addon.mitm.metrics import Metrics
from affinity_addon.mitm.otel import OTel
from affinity_addon.mitm.recorder import Recorder
from affinity_addon.mitm.rewriter import Rewriter
from affinity_addon.mitm.scope import Scope
from affinity_addon.mitm.state import State

__all__ = ["Affinity", "Commands", "Config", "Metrics", "OTel", "Recorder", "Rewriter", "Scope", "State", "make_addons"]


def make_addons(state: State | None = None) -> list[object]:
    """The addon list `addon.py` registers: one `Affinity` holding all the parts."""
    return [Affinity(state or State())]
