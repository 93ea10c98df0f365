"""`usage_fields.yaml`: where each API keeps its usage, and every provider's spelling of
the cache fields (JSON, SSE events, WebSocket messages), parsed once."""

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from affinity_addon.apis import APIS
from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.yamlsource import TableError, load_table
from affinity_addon.jsonpath import FieldPath, parse_path

FIELDS_FILE = catalog_file("usage_fields.yaml")


@dataclass(frozen=True, slots=True)
class ApiFields:
    """One API's usage knowledge, parsed from the YAML table."""

    usage_at: tuple[FieldPath, ...]
    overlay: bool
    input_includes_cache: bool
    input: tuple[FieldPath, ...]
    input_sum: tuple[FieldPath, ...]
    cache_read: tuple[FieldPath, ...]
    cache_write: tuple[FieldPath, ...]
    cache_write_5m: tuple[FieldPath, ...]
    cache_write_1h: tuple[FieldPath, ...]
    output: tuple[FieldPath, ...]
    output_extra: tuple[FieldPath, ...]
    cost: tuple[FieldPath, ...]
    terminal: tuple[tuple[tuple[FieldPath, frozenset[str] | None], ...], ...]
    done_sentinel: bool
    needles: re.Pattern[bytes] | None  # None: parse every event
    terminal_events: frozenset[str]  # SSE event names that end the stream by themselves
    extras: tuple[tuple[str, tuple[FieldPath, ...]], ...]


_FIELD_LISTS = ("input", "input_sum", "cache_read", "cache_write", "cache_write_5m",
                "cache_write_1h", "output", "output_extra", "cost")


def _paths(spec: dict[str, Any], key: str, where: str) -> tuple[FieldPath, ...]:
    value = spec.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{where}.{key} must be a list of field paths")
    return tuple(parse_path(p) for p in value)


def parse_api_fields(spec: Any, where: str) -> ApiFields:
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a mapping")
    merge = spec.get("merge", "replace")
    if merge not in ("overlay", "replace"):
        raise ValueError(f"{where}.merge must be 'overlay' or 'replace', got {merge!r}")
    terminal = []
    for i, rule in enumerate(spec.get("terminal") or []):
        if not isinstance(rule, dict) or not rule:
            raise ValueError(f"{where}.terminal[{i}] must be a non-empty mapping")
        conds = []
        for path, values in rule.items():
            if values is not None and not isinstance(values, list):
                raise ValueError(f"{where}.terminal[{i}].{path} must be a list or null")
            conds.append((parse_path(path),
                          None if values is None else frozenset(str(v) for v in values)))
        terminal.append(tuple(conds))
    extras = spec.get("extras") or {}
    if not isinstance(extras, dict):
        raise ValueError(f"{where}.extras must be a mapping")
    needles = spec.get("needles") or []
    if not isinstance(needles, list) or not all(isinstance(n, str) and n for n in needles):
        raise ValueError(f"{where}.needles must be a list of non-empty strings")
    return ApiFields(
        usage_at=_paths(spec, "usage_at", where),
        overlay=merge == "overlay",
        input_includes_cache=bool(spec.get("input_includes_cache", True)),
        **{k: _paths(spec, k, where) for k in _FIELD_LISTS},
        terminal=tuple(terminal),
        done_sentinel=bool(spec.get("done_sentinel", False)),
        needles=re.compile(b"|".join(re.escape(n.encode()) for n in needles)) if needles else None,
        terminal_events=frozenset().union(*(
            allowed for rule in terminal for path, allowed in rule
            if len(rule) == 1 and path == ("type",) and allowed is not None)),
        extras=tuple((str(k), _paths(extras, k, f"{where}.extras")) for k in extras),
    )


def parse_table(doc: Any) -> dict[str, ApiFields]:
    """The YAML document -> {API: fields}."""
    if not isinstance(doc, dict) or not isinstance(doc.get("apis"), dict):
        raise ValueError("usage fields table needs a `apis` mapping")
    out = {}
    for name, spec in doc["apis"].items():
        try:
            out[name] = parse_api_fields(spec, f"apis.{name}")
        except ValueError as e:
            raise TableError(str(e), doc["apis"], name) from None
    return out


def _complete(doc: Any) -> dict[str, ApiFields]:
    apis = parse_table(doc)
    missing = set(APIS) - set(apis)
    if missing:
        raise TableError(f"no usage fields for apis {sorted(missing)}", doc, "apis")
    return apis


@cache
def usage_fields() -> dict[str, ApiFields]:
    return load_table(FIELDS_FILE, _complete)
