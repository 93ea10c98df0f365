"""`cache_profiles.yaml`: how each route caches (automatic or at markers, TTL, minimum), for the
per-response miss verdict. First match wins."""

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.yamlsource import TableError, load_table
from affinity_addon.durations import parse_duration

PROFILES = catalog_file("cache_profiles.yaml")

# What a route does with `cache_control` markers: `honoured` (they decide what is cached, or
# add to the automatic cache), `ignored` (the provider documents or was measured to cache the
# same without them: the planner adds none there), `unknown` (no public source says).
HONOURED, IGNORED, UNKNOWN = "honoured", "ignored", "unknown"
MARKERS = (HONOURED, IGNORED, UNKNOWN)
BY_API = "by-api"  # lookback_blocks: the API's own (providers.yaml `lookback_blocks`)


@dataclass(frozen=True, slots=True)
class Profile:
    hosts: tuple[str, ...]
    models: tuple[str, ...]
    apis: tuple[str, ...]
    automatic: bool
    ttl_seconds: float
    min_tokens: int | None  # None: by model (cache_minimums.yaml)
    markers: str = HONOURED
    # Blocks a marker looks back for an earlier entry: None (no limit: prefix caching),
    # BY_API (the API's documented number), or a number.
    lookback_blocks: int | str | None = BY_API

    def matches(self, host: str, api: str | None, model: str | None) -> bool:
        if self.hosts and not any(fnmatch.fnmatch(host.lower(), h) for h in self.hosts):
            return False
        if self.apis and api not in self.apis:
            return False
        return not self.models or (model is not None and any(fnmatch.fnmatchcase(model, m) for m in self.models))


def _tuple(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(str(x) for x in v)


def parse_profiles(data: Any) -> tuple[Profile, ...]:
    if not isinstance(data, Mapping) or not isinstance(data.get("profiles"), list):
        raise TableError("cache profiles: expected a mapping with a 'profiles' list")
    out = []
    for i, p in enumerate(data["profiles"]):
        if not isinstance(p, Mapping):
            raise TableError(f"profiles[{i}] must be a mapping", data["profiles"], i)
        m = p.get("match") or {}
        mt = p.get("min_tokens", "auto")
        if mt != "auto" and not isinstance(mt, int):
            raise TableError(f"profiles[{i}]: min_tokens must be 'auto' or a number", p,
                             "min_tokens")
        try:
            ttl = parse_duration(p.get("ttl", "5m"))
        except ValueError as e:
            raise TableError(f"profiles[{i}].ttl: {e}", p, "ttl") from None
        markers = p.get("markers", HONOURED)
        if markers not in MARKERS:
            raise TableError(f"profiles[{i}]: markers must be one of {', '.join(MARKERS)}", p,
                             "markers")
        lookback = p.get("lookback_blocks", BY_API)
        if lookback not in (None, BY_API) and (
                not isinstance(lookback, int) or isinstance(lookback, bool) or lookback < 1):
            raise TableError(f"profiles[{i}]: lookback_blocks must be {BY_API!r}, null (no "
                             "limit) or a positive number", p, "lookback_blocks")
        unknown = set(p) - _KEYS
        if unknown:
            k = sorted(map(str, unknown))[0]
            raise TableError(f"profiles[{i}]: unknown key {k!r}", p, k)
        out.append(Profile(_tuple(m.get("host")), _tuple(m.get("model")), _tuple(m.get("api")),
                           bool(p.get("automatic", True)), ttl, None if mt == "auto" else mt,
                           markers, lookback))
    return tuple(out)


_KEYS = frozenset({"match", "automatic", "ttl", "min_tokens", "markers", "lookback_blocks"})


@cache
def default_profiles() -> tuple[Profile, ...]:
    return load_table(PROFILES, parse_profiles)


@lru_cache(maxsize=1024)  # a few hosts x APIs x models; the globs cost more than the lookup
def profile_for(host: str, api: str | None, model: str | None) -> Profile:
    for p in default_profiles():
        if p.matches(host, api, model):
            return p
    return Profile((), (), (), True, 600.0, 1024)
