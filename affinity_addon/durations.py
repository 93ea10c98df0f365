"""One duration syntax: a number and a unit, `30s`, `5m`, `1h`, `7d`, `1w` (provider TTLs, report
ages, rule settings alike)."""

import re

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d{1,9}(?:\.\d{1,9})?)\s*([smhdw])\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds: "5m" -> 300.0. Raises ValueError with the accepted form."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"bad duration {text!r}: expected a number and a unit s/m/h/d/w, "
                         "like '5m'")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
