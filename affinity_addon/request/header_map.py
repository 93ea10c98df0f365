"""A request's headers as one lowercase-keyed dict, read in one pass.

mitmproxy's `Headers.get(name)` scans and lowercases every field on each call; the request path
asks for a handful of names (content type and coding, the session headers, the headers the rules
set), several times each: about 15 µs of a 2 KB request's rewrite (measured in process).
"""

from collections.abc import Mapping


class HeaderMap(dict[str, str]):
    """Lowercased name -> value, as `Headers.get` reads it: repeated fields joined by ", "."""

    __slots__ = ()


def header_map(headers: Mapping[str, str]) -> HeaderMap:
    if isinstance(headers, HeaderMap):
        return headers
    out = HeaderMap()
    fields = getattr(headers, "fields", None)  # mitmproxy Headers: the raw (name, value) bytes
    if fields is not None:
        for k, v in fields:
            # As mitmproxy does: names compared as ASCII-lowercased bytes, UTF-8 with
            # surrogateescape both ways.
            name = k.lower().decode("utf-8", "surrogateescape")
            value = v.decode("utf-8", "surrogateescape")
            out[name] = f"{out[name]}, {value}" if name in out else value
        return out
    for k, value in headers.items():
        name = k.lower()
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out
