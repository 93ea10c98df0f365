"""mitmproxy entry script: `mitmdump -s affinity_addon/addon.py` (or `mitmweb -s ...`).

mitmproxy runs this file outside any package, so the checkout root goes on sys.path and the
real addon is imported from the package; this file stays a thin shim (hot reload watches it).
"""

import sys
from pathlib import Path

_root = str(Path(__file__).resolve().parent.parent)
if _root not in sys.path:
    sys.path.insert(0, _root)

from affinity_addon.mitm.cache_affinity import CacheAffinity  # noqa: E402

addons = [CacheAffinity()]
