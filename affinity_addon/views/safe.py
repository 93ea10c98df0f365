"""Client- and provider-chosen strings made safe to print and cheap to keep.

Model names, rule names, affinity IDs, miss details and timestamps come from request bodies, the
provider or a log file. Rendered raw they could drive the terminal (OSC 8 links, OSC 52 clipboard
writes, CSI screen clears) or reorder text (bidi overrides); kept raw, one 1 MB model name per
request would grow the live stats by a megabyte each. `label` cuts and escapes them.
"""

import re
from typing import Any

MAX_LABEL = 200  # characters of a label kept and shown
MAX_KEYS = 1000  # distinct models / rules / verdicts per table; the rest are counted as OTHER_KEY
OTHER_KEY = "(other)"

# C0 and C1 controls, DEL, zero-width and bidi controls.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: str, limit: int = MAX_LABEL) -> str:
    """`text` with control characters shown as \\x1b-style escapes, cut to `limit` characters."""
    cut = len(text) > limit
    text = _UNSAFE.sub(_escape, text[:limit])
    if len(text) > limit or cut:
        text = text[:limit - 1] + "…"
    return text


def label(value: Any, limit: int = MAX_LABEL) -> str | None:
    """A non-empty string made printable and short; None for anything else."""
    if type(value) is not str or not value:
        return None
    return printable(value, limit)
