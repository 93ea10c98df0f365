"""Test-only mitmproxy script: raises in `response`, after the addon handled the response.

Loaded after the addon (`mitmdump -s affinity_addon/addon.py -s tests/plant_error.py`), it is
what a bug in the addon's response hook looks like from outside: mitmproxy logs "Addon error"
with a traceback and the traffic goes on. The tests' error check (tests/addon_errors.py) must
catch it; AFFINITY_TEST_PLANT_ERROR=1 makes the harness load it into every proxy it starts.
"""

from mitmproxy import http

# Kept equal to tests.addon_errors.PLANTED (this file runs outside the tests package).
PLANTED = "planted test error"


class PlantError:
    def response(self, flow: http.HTTPFlow) -> None:
        raise RuntimeError(f"{PLANTED} after the addon's response to {flow.request.pretty_host}")


addons = [PlantError()]
