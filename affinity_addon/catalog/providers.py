"""Loads `providers.yaml`: provider facts as one immutable value, checked once at import."""

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.yamlsource import line_of, load_yaml
from affinity_addon.durations import parse_duration
from affinity_addon.models import MAX_MODEL_CHARS, model_family, normalize_model

_FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")


@dataclass(frozen=True, slots=True)
class RetentionDirective:
    """One way to ask a model for a longer prompt-cache retention: set `field` to `value`."""

    field: str  # dotted body path
    value: str
    seconds: float  # how long it keeps a prefix
    models: tuple[str, ...]  # globs on normalized, undated model names

    def fits(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.models)


@dataclass(frozen=True, slots=True)
class DialectApi:
    """Where one API's content parts may carry a dialect's breakpoint."""

    parts: frozenset[str]  # part types that take it
    roles: frozenset[str]  # roles whose parts take it (and whose string content may convert)
    text_part: str  # the type of the one text part a string content becomes


@dataclass(frozen=True, slots=True)
class BreakpointDialect:
    """A provider's own form of a cache breakpoint (`breakpoint_dialects`)."""

    name: str
    hosts: tuple[str, ...]  # globs on the host
    models: tuple[str, ...]  # globs on normalized, undated model names
    field: str  # the key a content part carries
    value: Mapping[str, Any]  # its value
    ttl: str  # what a marker's lifetime is (the record's label)
    writes: int  # breakpoints a request writes, the implicit one included
    implicit_off: tuple[str, str] | None  # (dotted field, value) that turns the implicit one off
    apis: Mapping[str, DialectApi]  # by API

    def fits(self, model: str | None) -> bool:
        if not isinstance(model, str):
            return False
        name = normalize_model(model_family(model))
        return any(fnmatch.fnmatchcase(name, g) for g in self.models)


@dataclass(frozen=True, slots=True)
class ProviderFacts:
    websocket_terminal_events: tuple[bytes, ...]
    response_cache_headers: tuple[tuple[str, str], ...]  # (lower-case header, upper-case value)
    lookback_blocks: Mapping[str, int]
    last_marker_only_models: tuple[str, ...]
    one_hour_ttl_models: tuple[str, ...]
    key_rpm_limits: Mapping[str, int]  # host glob -> requests a minute per prompt_cache_key
    cache_retention: tuple[RetentionDirective, ...] = ()
    no_cache_directives: tuple[tuple[str, str], ...] = ()  # (host glob, path glob)
    model_in_path: tuple[re.Pattern[str], ...] = ()  # each with a `model` group
    # (scheme name, lower-case header, value prefix) and (scheme name, query parameter)
    signed_headers: tuple[tuple[str, str, str], ...] = ()
    signed_queries: tuple[tuple[str, str], ...] = ()

    def path_model(self, path: str) -> str | None:
        """The model a request's URL names (Bedrock, Vertex, Azure deployments), if any."""
        for pattern in self.model_in_path:
            m = pattern.match(path)
            if m is not None:
                # cut first: percent-encoding triples a name at most, and unquoting a
                # 300,000-character path took 5 MB of small strings for nothing
                return unquote(m["model"][:3 * MAX_MODEL_CHARS])[:MAX_MODEL_CHARS]
        return None

    def signature(self, headers: Mapping[str, str], query: str) -> str | None:
        """The signing scheme that covers this request's body, if any (never its value)."""
        for name, header, prefix in self.signed_headers:
            if headers.get(header, "").lstrip().startswith(prefix):
                return name
        if query:
            params = {p.split("=", 1)[0].lower() for p in query.split("&")}
            for name, param in self.signed_queries:
                if param in params:
                    return name
        return None
    breakpoint_dialects: tuple[BreakpointDialect, ...] = ()

    def breakpoint_dialect(self, host: str) -> BreakpointDialect | None:
        """The host's own breakpoint form; None: it takes `cache_control` markers."""
        host = host.lower()
        return next((d for d in self.breakpoint_dialects
                     if any(fnmatch.fnmatch(host, g) for g in d.hosts)), None)

    @property
    def retention_fields(self) -> tuple[str, ...]:
        """Every field that asks for a retention: a request carries at most one of them."""
        return tuple(dict.fromkeys(d.field for d in self.cache_retention))

    def retention_for(self, model: str | None, seconds: float) -> RetentionDirective | None:
        """The longest retention `model` takes at no extra cost, up to `seconds`."""
        if not isinstance(model, str):
            return None
        name = normalize_model(model_family(model))
        fits = [d for d in self.cache_retention if d.seconds <= seconds and d.fits(name)]
        return max(fits, key=lambda d: d.seconds, default=None)

    def rejects_cache_directives(self, host: str, path: str) -> bool:
        host = host.lower()
        return any(fnmatch.fnmatch(host, h) and fnmatch.fnmatchcase(path, p)
                   for h, p in self.no_cache_directives)

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


def _retention(raw: Any, path: Path) -> tuple[RetentionDirective, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"{path}:{line_of(raw, default=1)}: cache_retention must be a list")
    out = []
    for i, d in enumerate(raw):
        where = f"{path}:{line_of(raw, i, 1)}: cache_retention[{i}]"
        if not isinstance(d, Mapping) or set(d) != {"field", "value", "retention", "models"}:
            raise ValueError(f"{where}: needs exactly field, value, retention and models")
        if not isinstance(d["field"], str) or not _FIELD_PATH.match(d["field"]):
            raise ValueError(f"{where}: field must be a dotted body path like a.b")
        if not isinstance(d["value"], str) or not d["value"]:
            raise ValueError(f"{where}: value must be a non-empty string")
        try:
            seconds = parse_duration(d["retention"])
        except ValueError as e:
            raise ValueError(f"{where}: retention: {e}") from None
        out.append(RetentionDirective(d["field"], d["value"], seconds,
                                      _strings(d["models"], "models", path)))
    return tuple(out)


def _endpoints(raw: Any, path: Path) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not all(
            isinstance(e, Mapping) and set(e) == {"host", "path"}
            and all(isinstance(v, str) and v for v in e.values()) for e in raw):
        raise ValueError(f"{path}:{line_of(raw, default=1)}: no_cache_directives must be a list "
                         "of {host: glob, path: glob}")
    return tuple((e["host"].lower(), e["path"]) for e in raw)


def _path_patterns(raw: Any, path: Path) -> tuple[re.Pattern[str], ...]:
    where = f"{path}:{line_of(raw, default=1)}: model_in_path"
    out = []
    for p in _strings(raw, "model_in_path", path):
        try:
            pattern = re.compile(p)
        except re.error as e:
            raise ValueError(f"{where}: {p!r}: {e}") from None
        if "model" not in pattern.groupindex:
            raise ValueError(f"{where}: {p!r} has no (?P<model>...) group")
        out.append(pattern)
    return tuple(out)


def _signed(raw: Any, path: Path) -> tuple[tuple[tuple[str, str, str], ...],
                                            tuple[tuple[str, str], ...]]:
    where = f"{path}:{line_of(raw, default=1)}: signed_requests"
    if not isinstance(raw, list):
        raise ValueError(f"{where} must be a list")
    headers, queries = [], []
    for i, e in enumerate(raw):
        ok = isinstance(e, Mapping) and all(isinstance(v, str) and v for v in e.values())
        if ok and set(e) == {"name", "header", "prefix"}:
            headers.append((e["name"], e["header"].lower(), e["prefix"]))
        elif ok and set(e) == {"name", "query"}:
            queries.append((e["name"], e["query"].lower()))
        else:
            raise ValueError(f"{path}:{line_of(raw, i, 1)}: signed_requests[{i}] needs name and "
                             "either header and prefix, or query")
    return tuple(headers), tuple(queries)


_DIALECT_KEYS = {"name", "hosts", "models", "field", "value", "ttl", "writes", "implicit_off",
                 "apis"}


def _dialects(raw: Any, path: Path) -> tuple[BreakpointDialect, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"{path}:{line_of(raw, default=1)}: breakpoint_dialects must be a list")
    out = []
    for i, d in enumerate(raw):
        where = f"{path}:{line_of(raw, i, 1)}: breakpoint_dialects[{i}]"
        if not isinstance(d, Mapping) or set(d) - {"implicit_off"} != _DIALECT_KEYS - {"implicit_off"}:
            raise ValueError(f"{where}: needs exactly {', '.join(sorted(_DIALECT_KEYS))} "
                             "(implicit_off optional)")
        if not all(isinstance(d[k], str) and d[k] for k in ("name", "field", "ttl")):
            raise ValueError(f"{where}: name, field and ttl must be non-empty strings")
        if not isinstance(d["value"], Mapping):
            raise ValueError(f"{where}: value must be a mapping")
        writes = d["writes"]
        if not isinstance(writes, int) or isinstance(writes, bool) or writes < 1:
            raise ValueError(f"{where}: writes must be a positive integer")
        off = d.get("implicit_off")
        if off is not None and not (isinstance(off, Mapping) and set(off) == {"field", "value"}
                                    and isinstance(off["field"], str)
                                    and _FIELD_PATH.match(off["field"])
                                    and isinstance(off["value"], str)):
            raise ValueError(f"{where}: implicit_off must be {{field: a.b, value: string}}")
        apis = d["apis"]
        if not isinstance(apis, Mapping) or not apis:
            raise ValueError(f"{where}: apis maps APIs to {{parts, roles, text_part}}")
        by_api = {}
        for name, spec in apis.items():
            if not isinstance(spec, Mapping) or set(spec) != {"parts", "roles", "text_part"}\
                    or not isinstance(spec["text_part"], str):
                raise ValueError(f"{where}: apis.{name} needs exactly parts, roles, text_part")
            by_api[str(name)] = DialectApi(frozenset(_strings(spec["parts"], "parts", path)),
                                           frozenset(_strings(spec["roles"], "roles", path)),
                                           spec["text_part"])
        out.append(BreakpointDialect(
            d["name"], tuple(h.lower() for h in _strings(d["hosts"], "hosts", path)),
            _strings(d["models"], "models", path), d["field"], dict(d["value"]), d["ttl"],
            writes, (off["field"], off["value"]) if off is not None else None, by_api))
    return tuple(out)


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
                         "lookback_blocks maps APIs to positive integers")
    limits = data.get("key_rpm_limits") or {}
    if not isinstance(limits, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in limits.values()):
        raise ValueError(f"{path}:{line_of(data, 'key_rpm_limits', 1)}: "
                         "key_rpm_limits maps host globs to positive integers")
    signed = _signed(data.get("signed_requests", []), path)
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
        cache_retention=_retention(data.get("cache_retention", []), path),
        no_cache_directives=_endpoints(data.get("no_cache_directives", []), path),
        model_in_path=_path_patterns(data.get("model_in_path", []), path),
        signed_headers=signed[0],
        signed_queries=signed[1],
        breakpoint_dialects=_dialects(data.get("breakpoint_dialects", []), path),
    )


PROVIDER_FACTS = parse_provider_facts(catalog_file("providers.yaml"))
