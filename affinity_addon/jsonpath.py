"""One JSON-path syntax for the whole addon: `choices[0].usage`, `metadata.user_id`,
`candidates[*].finishReason` (`[*]`: the first list item where the rest of the path resolves).

Rules (`set_fields`, body ID sources) and the usage table use it alike. Paths come from our own
data and rules, never from a request, so parsing is memoized.
"""

import re
from functools import lru_cache
from typing import Any

Key = str | int  # a dict key, a list index, or "*" (first list item that has the rest)
FieldPath = tuple[Key, ...]

_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+|\*)\]")


@lru_cache(maxsize=1024)
def parse_path(text: str) -> FieldPath:
    """`choices[0].usage` -> ("choices", 0, "usage")."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"field path must be a non-empty string, got {text!r}")
    keys: list[Key] = []
    pos = 0
    while pos < len(text):
        if text[pos] == "." and keys and pos + 1 < len(text):
            pos += 1
        m = _SEGMENT.match(text, pos)
        if m is None:
            raise ValueError(f"bad field path {text!r} at character {pos}")
        name, index = m.groups()
        if name is not None:
            keys.append(name)
        else:
            keys.append("*" if index == "*" else int(index))
        pos = m.end()
    return tuple(keys)


def get_path(obj: Any, path: FieldPath) -> Any:
    """The value at `path`, or None; `*` takes the first list item where the rest resolves."""
    for i, key in enumerate(path):
        if key == "*":
            if not isinstance(obj, list):
                return None
            for item in obj:
                found = get_path(item, path[i + 1:])
                if found is not None:
                    return found
            return None
        if isinstance(key, int):
            if not isinstance(obj, list) or key >= len(obj):
                return None
            obj = obj[key]
        else:
            if not isinstance(obj, dict):
                return None
            obj = obj.get(key)
        if obj is None:
            return None
    return obj


def set_path(obj: dict[str, Any], path: FieldPath, value: Any) -> bool:
    """Set a dict-keys-only path, creating missing (or null) parents; False if a parent is not
    an object or the path has list indexes."""
    cur: Any = obj
    for key in path[:-1]:
        if not isinstance(key, str):
            return False
        nxt = cur.get(key)
        if nxt is None:
            nxt = cur[key] = {}
        if not isinstance(nxt, dict):
            return False
        cur = nxt
    if not isinstance(path[-1], str):
        return False
    cur[path[-1]] = value
    return True


_MISSING = object()


def find_path(obj: Any, path: FieldPath) -> tuple[bool, Any]:
    """(is the key at `path` there, its value): a key present as null is (True, None), where
    `get_path` cannot tell it from a missing one. Dict keys and list indexes only, no `*`."""
    for key in path:
        if isinstance(key, int):
            if not isinstance(obj, list) or key >= len(obj):
                return False, None
            obj = obj[key]
        elif isinstance(obj, dict) and key != "*":
            obj = obj.get(key, _MISSING)
            if obj is _MISSING:
                return False, None
        else:
            return False, None
    return True, obj


def has_path(obj: Any, path: str) -> bool:
    """Is the key at dotted `path` in `obj`, even as null (an API may count a null field as
    sent)?"""
    return find_path(obj, parse_path(path))[0]
