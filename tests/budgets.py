"""How many examples a hypothesis property runs: a few in the development loop
(`pytest -m "not slow"`), all of them in the full suite (CI). Derandomized properties draw the
same examples on every run, so the quick run is a fixed sample of the full one."""

from typing import Any

import pytest


def examples(quick: int, full: int, *values: Any, id: str = "") -> list[Any]:
    """Two pytest params, `(*values, quick)` and `(*values, full)` (marked slow)."""
    prefix = f"{id}-" if id else ""
    return [pytest.param(*values, quick, id=f"{prefix}quick"),
            pytest.param(*values, full, id=f"{prefix}full", marks=pytest.mark.slow)]
