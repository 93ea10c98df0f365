"""Fault injection for the simulator, asked for per request with an `x-sim-fault` header.

The header holds directives separated by `;` or `,`, for example
`x-sim-fault: reset-after-events=2` or `x-sim-fault: slowloris-ms=50; slowloris-bytes=16`:

| directive | effect |
|---|---|
| `status=N` | answer N (400-599) with the provider's error JSON; the caches are not touched; `429` and `529` add `retry-after: 1` |
| `reset-after-events=N` | send the headers and the first N SSE events, then reset the connection (TCP RST); a JSON reply is reset right after its headers |
| `reset-after-bytes=N` | send N bytes of the (encoded) body, then reset the connection |
| `close-after-events=N` | like `reset-after-events`, but close the connection cleanly (FIN) without ending the chunked body |
| `slowloris-ms=N` | trickle the body: `slowloris-bytes` bytes (default 1) at a time, N ms apart |
| `slowloris-bytes=N` | piece size for `slowloris-ms` |
| `truncate-gzip` | gzip the body and cut the compressed stream short (no trailer, half of the last piece), but end the HTTP message normally |
| `pad-event-bytes=N` | SSE: put one extra event first whose JSON data carries N bytes of padding |
| `diagnosis=WORD` | a request that asked for cache diagnostics gets WORD as the answer (`pending`, `malformed`, or a result such as `tools_changed`: a provider surprise); see `diagnostics.py` |
| `reject-diagnostics` | a request that carries the cache diagnostics field is answered 400 naming it |

Unknown or malformed directives are answered with 400, so a typo in a test is loud.
"""

import re
from dataclasses import dataclass, fields
from typing import Any

FAULT_HEADER = "x-sim-fault"

_FLAGS = ("truncate_gzip", "reject_diagnostics")
_WORDS = ("diagnosis",)
_WORD = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class Faults:
    status: int | None = None
    reset_after_events: int | None = None
    reset_after_bytes: int | None = None
    close_after_events: int | None = None
    slowloris_ms: int = 0
    slowloris_bytes: int = 1
    truncate_gzip: bool = False
    pad_event_bytes: int = 0
    diagnosis: str | None = None
    reject_diagnostics: bool = False

    @property
    def any(self) -> bool:
        return self != NO_FAULTS


NO_FAULTS = Faults()


def parse_faults(value: str | None) -> Faults:
    """Parses an `x-sim-fault` header value; raises ValueError with a readable message."""
    if not value or not value.strip():
        return NO_FAULTS
    known = {f.name for f in fields(Faults)}
    kw: dict[str, Any] = {}
    for item in value.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        name, sep, arg = item.partition("=")
        key = name.strip().lower().replace("-", "_")
        if key not in known:
            raise ValueError(f"unknown fault {name.strip()!r}")
        if key in _FLAGS:
            if sep:
                raise ValueError(f"fault {name.strip()!r} takes no value")
            kw[key] = True
            continue
        if key in _WORDS:
            word = arg.strip()
            if not _WORD.fullmatch(word):
                raise ValueError(f"fault {name.strip()!r} needs a word like tools_changed, "
                                 f"got {word!r}")
            kw[key] = word
            continue
        try:
            n = int(arg.strip())
        except ValueError:
            raise ValueError(f"fault {name.strip()!r} needs an integer, got {arg.strip()!r}") \
                from None
        if n < 0:
            raise ValueError(f"fault {name.strip()!r} must not be negative")
        kw[key] = n
    faults = Faults(**kw)
    if faults.status is not None and not 400 <= faults.status <= 599:
        raise ValueError(f"status must be 400-599, got {faults.status}")
    if faults.slowloris_bytes < 1:
        raise ValueError("slowloris-bytes must be at least 1")
    return faults

