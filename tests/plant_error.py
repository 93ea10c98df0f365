"""Test-only mitmproxy script: raises in `response`, after the addon handled the response.

Loaded after the addon (`mitmdump -s affinity_addon/addon.py -s tests/plant_error.py`), it is
what a bug in the addon's response hook looks like from outside: mitmproxy logs "Addon error"
with a traceback and the traffic goes on. The tests' error check (tests/addon_errors.py) must
catch it; AFFINITY_TEST_PLANT_ERROR=1 makes the harness load it into every proxy it starts, and
AFFINITY_TEST_PLANT_ERROR=all makes it raise after each of the addon's traffic hooks.
"""

import os
from typing import Any

# Kept equal to tests.addon_errors.PLANTED (this file runs outside the tests package).
PLANTED = "planted test error"
HOOKS = ("request", "responseheaders", "response", "error", "websocket_message")


class PlantError:
    pass


def _raiser(hook: str) -> Any:
    def planted(self: PlantError, flow: Any) -> None:
        raise RuntimeError(f"{PLANTED} after the addon's {hook} of {flow.request.pretty_host}")
    return planted


for _hook in HOOKS if os.environ.get("AFFINITY_TEST_PLANT_ERROR") == "all" else ("response",):
    setattr(PlantError, _hook, _raiser(_hook))

addons = [PlantError()]
