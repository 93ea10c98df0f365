"""The addon with nothing but the request rewrite: no fingerprint, no verdict, no record.

A measurement variant for `scripts/bench --ceiling`, not a product mode: it is the floor of
what a matched request costs on mitmproxy's event loop (rule, affinity ID, splice), whatever
else moves elsewhere.
"""

import sys
from dataclasses import replace
from pathlib import Path

_root = str(Path(__file__).resolve().parent.parent.parent)
if _root not in sys.path:
    sys.path.insert(0, _root)

from affinity_addon.mitm import Affinity  # noqa: E402


class RewriteOnly(Affinity):
    def __init__(self) -> None:
        super().__init__()
        for hook in ("responseheaders", "response", "error", "websocket_message"):
            self.calls[hook] = ()

    def configure(self, updated: set[str]) -> None:
        self.dispatchers["configure"](updated)
        self.state.settings = replace(self.state.settings, diagnose=False)


addons = [RewriteOnly()]
