"""Option validation that works around how mitmproxy loads `-s` scripts.

`--set name=value` for a script's option is held back ("deferred") until the script declares
the option; if the value then fails to parse as the option's type, mitmproxy drops the whole
script without a word (measured with mitmproxy 12.3.1: exit status 0, nothing logged even with
-v; `process_deferred` in mitmproxy/optmanager.py, docs/mitmproxy-notes.md). `check_deferred`
runs in `load`, before the options exist, parses our raw values itself and logs an error naming
the option: mitmproxy's startup error check then exits with status 1 instead of running without
the addon.
"""

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_TRUE = {"", "true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"expected true or false, not {raw!r}")


def parse_nonneg_int(raw: str) -> int:
    try:
        v = int(raw.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, not {raw!r}") from None
    if v < 0:
        raise ValueError(f"must not be negative: {v}")
    return v


def parse_positive_int(raw: str) -> int:
    v = parse_nonneg_int(raw)
    if v < 1:
        raise ValueError(f"must be at least 1: {v}")
    return v


def parse_scope(raw: str) -> str:
    v = raw.strip()
    if v not in ("rules", "all"):
        raise ValueError(f"expected 'rules' or 'all', not {raw!r}")
    return v


# Typed options we declare, and how their raw --set strings parse.
RAW_PARSERS: dict[str, Callable[[str], Any]] = {
    "affinity_dry_run": parse_bool,
    "affinity_summary": parse_bool,
    "affinity_diagnose": parse_bool,
    "affinity_keep_bodies": parse_nonneg_int,
    "affinity_scope": parse_scope,
    "affinity_max_conversations": parse_nonneg_int,
    "affinity_instances": parse_positive_int,
}

# Checks run in configure on the typed values (ValueError -> OptionsError).
def _nonneg(v: Any) -> None:
    if not isinstance(v, int) or v < 0:
        raise ValueError(f"must be a whole number >= 0, not {v!r}")


def _positive(v: Any) -> None:
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"must be a whole number >= 1, not {v!r}")


OPTION_PARSERS: dict[str, Callable[[Any], Any]] = {
    "affinity_keep_bodies": _nonneg,
    "affinity_instances": _positive,
}


def check_deferred(options: Any) -> None:
    deferred = getattr(options, "deferred", None)
    if not isinstance(deferred, dict):
        return
    for name, parse in RAW_PARSERS.items():
        held = deferred.get(name)
        if held is None:
            continue
        values = getattr(held, "val", None)
        if not isinstance(values, list):
            continue
        try:
            if len(values) > 1:
                raise ValueError("given more than once")
            parsed = parse(values[0] if values else "")
        except ValueError as e:
            logger.error("Cannot parse option %s: %s", name, e)
            del deferred[name]
            continue
        # Hand mitmproxy a spelling it accepts (it only knows true/false/toggle for bools).
        held.val = [("true" if parsed else "false")] if isinstance(parsed, bool) else [str(parsed)]
