"""Loads `providers.yaml`: provider facts as one immutable value, checked once at import."""

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.yamlsource import line_of, load_yaml


@dataclass(frozen=True, slots=True)
class ProviderFacts:
    websocket_terminal_events: tuple[bytes, ...]
    response_cache_headers: tuple[tuple[str, str], ...]  # (lower-case header, upper-case value)
    lookback_blocks: Mapping[str, int]
    last_marker_only_models: tuple[str, ...]
    one_hour_ttl_models: tuple[str, ...]
    key_rpm_limits: Mapping[str, int]  # host glob -> requests a minute per prompt_cache_key

    def key_rpm_limit(self, host: str) -> int | None:
        """The documented overflow rate of a host's prompt_cache_key routing, if it has one."""
        host = host.lower()
        return next((v for g, v in self.key_rpm_limits.items() if fnmatch.fnmatch(host, g)), None)

    def is_response_cache_hit(self, headers: Mapping[str, str]) -> bool:
        return any(str(headers.get(name, "")).upper() == value
                   for name, value in self.response_cache_headers)


def _strings(raw: Any, what: str, path: Path) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise ValueError(f"{path}:{line_of(raw, default=1)}: {what} must be a list of strings")
    return tuple(raw)


def parse_provider_facts(path: Path) -> ProviderFacts:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a mapping")
    headers = data.get("response_cache_headers") or {}
    lookback = data.get("lookback_blocks") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ValueError(f"{path}:{line_of(data, 'response_cache_headers', 1)}: "
                         "response_cache_headers maps header names to values")
    if not isinstance(lookback, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in lookback.values()):
        raise ValueError(f"{path}:{line_of(data, 'lookback_blocks', 1)}: "
                         "lookback_blocks maps API shapes to positive integers")
    limits = data.get("key_rpm_limits") or {}
    if not isinstance(limits, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in limits.values()):
        raise ValueError(f"{path}:{line_of(data, 'key_rpm_limits', 1)}: "
                         "key_rpm_limits maps host globs to positive integers")
    return ProviderFacts(
        websocket_terminal_events=tuple(
            e.encode() for e in _strings(data.get("websocket_terminal_events"),
                                         "websocket_terminal_events", path)),
        response_cache_headers=tuple((k.lower(), v.upper()) for k, v in headers.items()),
        lookback_blocks=dict(lookback),
        last_marker_only_models=_strings(data.get("last_marker_only_models", []),
                                         "last_marker_only_models", path),
        one_hour_ttl_models=_strings(data.get("one_hour_ttl_models", []),
                                     "one_hour_ttl_models", path),
        key_rpm_limits={str(k).lower(): v for k, v in limits.items()},
    )


PROVIDER_FACTS = parse_provider_facts(catalog_file("providers.yaml"))
