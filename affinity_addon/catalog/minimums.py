"""`cache_minimums.yaml`: the smallest cacheable prompt per model (fnmatch globs, first match)."""

from functools import cache
from typing import Any

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.yamlsource import TableError, load_table

MINIMUMS_FILE = catalog_file("cache_minimums.yaml")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_minimums(data: Any) -> tuple[tuple[str, int], ...]:
    """Validates the table: a mapping of model glob to token count."""
    if not isinstance(data, dict) or not data:
        raise TableError("cache minimums must be a non-empty mapping of model glob to tokens")
    table: list[tuple[str, int]] = []
    for glob, tokens in data.items():
        if not isinstance(glob, str) or not _is_int(tokens) or tokens < 0:
            raise TableError(f"bad cache minimum entry {glob!r}: {tokens!r}", data, glob)
        table.append((glob.lower(), tokens))
    return tuple(table)


@cache
def minimums() -> tuple[tuple[str, int], ...]:
    return load_table(MINIMUMS_FILE, parse_minimums)
