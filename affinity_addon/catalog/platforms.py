"""`platforms.yaml`: clouds that serve a provider's API under rules of their own (Bedrock, Vertex):
minimums, 1-hour TTL models, whether the top-level automatic marker is taken."""

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.minimums import parse_minimums
from affinity_addon.catalog.yamlsource import TableError, load_table

PLATFORMS_FILE = catalog_file("platforms.yaml")
_KEYS = frozenset({"hosts", "automatic_cache_control", "minimums", "one_hour_ttl_models"})


@dataclass(frozen=True, slots=True)
class Platform:
    name: str
    hosts: tuple[str, ...]
    automatic_cache_control: bool = True
    minimums: tuple[tuple[str, int], ...] = ()
    one_hour_ttl_models: tuple[str, ...] | None = None  # None: the general list

    def serves(self, host: str) -> bool:
        return any(fnmatch.fnmatchcase(host, h) for h in self.hosts)

    def minimum(self, name: str) -> int | None:
        """The platform's own minimum for a normalized model name, if it has one."""
        return next((t for g, t in self.minimums if fnmatch.fnmatchcase(name, g)), None)


def _strings(value: Any, where: Mapping, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v
                                                           for v in value):
        raise TableError(f"{key} must be a non-empty list of strings", where, key)
    return tuple(v.lower() for v in value)


def parse_platforms(data: Any) -> tuple[Platform, ...]:
    if not isinstance(data, Mapping) or not isinstance(data.get("platforms"), Mapping):
        raise TableError("platforms: expected a mapping with a 'platforms' mapping")
    out = []
    for name, spec in data["platforms"].items():
        if not isinstance(spec, Mapping):
            raise TableError(f"platform {name!r} must be a mapping", data["platforms"], name)
        unknown = sorted(str(k) for k in set(spec) - _KEYS)
        if unknown:
            raise TableError(f"platform {name!r}: unknown key {unknown[0]!r}", spec, unknown[0])
        automatic = spec.get("automatic_cache_control", True)
        if not isinstance(automatic, bool):
            raise TableError("automatic_cache_control must be true or false", spec,
                             "automatic_cache_control")
        minimums = parse_minimums(spec["minimums"]) if "minimums" in spec else ()
        hour = spec.get("one_hour_ttl_models")
        out.append(Platform(str(name), _strings(spec.get("hosts"), spec, "hosts"), automatic,
                            minimums,
                            None if hour is None else _strings(hour, spec, "one_hour_ttl_models")))
    return tuple(out)


@cache
def platforms() -> tuple[Platform, ...]:
    return load_table(PLATFORMS_FILE, parse_platforms)


@lru_cache(maxsize=1024)  # a handful of hosts in practice; the globs cost more than the lookup
def platform_for(host: str | None) -> Platform | None:
    if not host:
        return None
    host = host.lower()
    return next((p for p in platforms() if p.serves(host)), None)
