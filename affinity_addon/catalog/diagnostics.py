"""`provider_diagnostics.yaml`: where a provider explains its own cache misses when asked, the
request field that asks, and where the answer comes back; parsed once, immutable."""

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.yamlsource import TableError, load_table
from affinity_addon.jsonpath import FieldPath, parse_path
from affinity_addon.models import model_family, normalize_model

DIAGNOSTICS_FILE = catalog_file("provider_diagnostics.yaml")

_FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")
_VERSIONED = re.compile(r"^([a-z][a-z-]*?-?)(\d+)(?:[.-](\d+))?")


def model_name(model: str | None) -> str:
    """The name the `models` globs see: lower case, no vendor prefix, dates or tags, dots as
    dashes (`openai/gpt-5.6-mini-2026-07-01` -> `gpt-5-6-mini`)."""
    return normalize_model(model_family(model)) if isinstance(model, str) else ""


@dataclass(frozen=True, slots=True)
class ModelsFrom:
    """A model line from one version on: `gpt-5.6` takes gpt-5.6(-*), gpt-5.7, gpt-6, ..."""

    prefix: str  # normalized, e.g. "gpt-"
    version: tuple[int, int]

    def fits(self, name: str) -> bool:
        if not name.startswith(self.prefix):
            return False
        m = re.match(r"(\d+)(?:-(\d+))?(?![0-9])", name[len(self.prefix):])
        return m is not None and (int(m[1]), int(m[2] or 0)) >= self.version


@dataclass(frozen=True, slots=True)
class RequestSide:
    link: str  # dotted body path of the previous response id
    first: bool  # a conversation's first request sends the link as null
    owner: str  # present in the client's body: the client asked itself
    unless: tuple[str, ...]  # fields that stop the injection when the link's object is absent

    @property
    def top(self) -> str:
        """The top-level key the link lives under."""
        return self.link.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class AnswerSide:
    at: tuple[FieldPath, ...]
    on_null: str | None  # the result when the object is there as null after a comparison
    pending: str | None  # a key whose null value means "still comparing"
    result: tuple[FieldPath, ...]
    missed_tokens: tuple[FieldPath, ...]


@dataclass(frozen=True, slots=True)
class DiagnosticsSource:
    name: str  # "anthropic" | "openai": the record's `provider_diagnosis.source`
    hosts: tuple[str, ...]
    paths: tuple[str, ...]
    models: tuple[str, ...]
    models_from: ModelsFrom | None
    request: RequestSide
    answer: AnswerSide
    rejected_if_named: tuple[str, ...]
    error_at: tuple[FieldPath, ...]  # where a 400's JSON body has its message

    def serves(self, host: str, path: str) -> bool:
        host = host.lower()
        return (any(fnmatch.fnmatch(host, h) for h in self.hosts)
                and any(fnmatch.fnmatchcase(path, p) for p in self.paths))

    def takes(self, model: str | None) -> bool:
        """Does the provider diagnose requests for this model?"""
        name = model_name(model)
        if not name:
            return False
        if self.models_from is not None and self.models_from.fits(name):
            return True
        return any(fnmatch.fnmatchcase(name, g) for g in self.models)

    def names_field(self, message: str) -> bool:
        """Does a provider's error message name the field we added?"""
        return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message)
                   for n in self.rejected_if_named)


@dataclass(frozen=True, slots=True)
class DiagnosticsTable:
    sources: tuple[DiagnosticsSource, ...]

    def for_target(self, host: str, path: str) -> DiagnosticsSource | None:
        """The source that serves this host and path (any model), if one does."""
        return next((s for s in self.sources if s.serves(host, path)), None)

    def by_name(self, name: Any) -> DiagnosticsSource | None:
        return next((s for s in self.sources if s.name == name), None)


def _strings(raw: Any, what: str, node: Any, key: Any = None) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise TableError(f"{what} must be a list of non-empty strings", node, key)
    return tuple(raw)


def _field(raw: Any, what: str, node: Any, key: Any) -> str:
    if not isinstance(raw, str) or not _FIELD_PATH.match(raw):
        raise TableError(f"{what} must be a dotted body path like a.b", node, key)
    return raw


def _paths(raw: Any, what: str, node: Any, key: Any) -> tuple[FieldPath, ...]:
    items = _strings(raw, what, node, key)
    try:
        return tuple(parse_path(p) for p in items)
    except ValueError as e:
        raise TableError(f"{what}: {e}", node, key) from None


def _models(raw: Any, where: str, node: Any) -> tuple[tuple[str, ...], ModelsFrom | None]:
    if isinstance(raw, Mapping):
        if set(raw) != {"from"} or not isinstance(raw["from"], str):
            raise TableError(f"{where}.models: use a list of globs or {{from: <model>}}", node,
                             "models")
        m = _VERSIONED.match(model_name(raw["from"]))
        if m is None:
            raise TableError(f"{where}.models.from: {raw['from']!r} has no version number", node,
                             "models")
        return (), ModelsFrom(m[1], (int(m[2]), int(m[3] or 0)))
    return _strings(raw, f"{where}.models", node, "models"), None


def _mapping(raw: Any, keys: set[str], optional: set[str], what: str, node: Any,
             key: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping) or not keys <= set(raw) or set(raw) - keys - optional:
        need = ", ".join(sorted(keys)) + (f" (optional: {', '.join(sorted(optional))})"
                                          if optional else "")
        raise TableError(f"{what} needs {need}", node, key)
    return raw


def _source(raw: Any, i: int, items: Any) -> DiagnosticsSource:
    where = f"sources[{i}]"
    raw = _mapping(raw, {"name", "hosts", "paths", "models", "request", "answer",
                         "rejected_if_named", "error_at"}, set(), where, items, i)
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise TableError(f"{where}.name must be a non-empty string", raw, "name")
    req = _mapping(raw["request"], {"link", "first", "owner", "unless"}, set(),
                   f"{where}.request", raw, "request")
    if not isinstance(req["first"], bool):
        raise TableError(f"{where}.request.first must be true or false", req, "first")
    ans = _mapping(raw["answer"], {"at", "result", "missed_tokens"}, {"on_null", "pending"},
                   f"{where}.answer", raw, "answer")
    for key in ("on_null", "pending"):
        if key in ans and not (isinstance(ans[key], str) and ans[key]):
            raise TableError(f"{where}.answer.{key} must be a non-empty string", ans, key)
    models, models_from = _models(raw["models"], where, raw)
    return DiagnosticsSource(
        name=raw["name"],
        hosts=tuple(h.lower() for h in _strings(raw["hosts"], f"{where}.hosts", raw, "hosts")),
        paths=_strings(raw["paths"], f"{where}.paths", raw, "paths"),
        models=models, models_from=models_from,
        request=RequestSide(
            link=_field(req["link"], f"{where}.request.link", req, "link"),
            first=req["first"],
            owner=_field(req["owner"], f"{where}.request.owner", req, "owner"),
            unless=tuple(_field(u, f"{where}.request.unless", req, "unless")
                         for u in (req["unless"] if isinstance(req["unless"], list) else [None]))),
        answer=AnswerSide(
            at=_paths(ans["at"], f"{where}.answer.at", ans, "at"),
            on_null=ans.get("on_null"), pending=ans.get("pending"),
            result=_paths(ans["result"], f"{where}.answer.result", ans, "result"),
            missed_tokens=_paths(ans["missed_tokens"], f"{where}.answer.missed_tokens", ans,
                                 "missed_tokens")),
        rejected_if_named=_strings(raw["rejected_if_named"], f"{where}.rejected_if_named", raw,
                                   "rejected_if_named"),
        error_at=_paths(raw["error_at"], f"{where}.error_at", raw, "error_at"),
    )


def parse_diagnostics(data: Any) -> DiagnosticsTable:
    if not isinstance(data, Mapping) or set(data) != {"sources"}:
        raise TableError("provider_diagnostics: expected a mapping with 'sources'", data)
    items = data["sources"]
    if not isinstance(items, list):
        raise TableError("sources must be a list", data, "sources")
    sources = tuple(_source(s, i, items) for i, s in enumerate(items))
    if len({s.name for s in sources}) != len(sources):
        raise TableError("source names must be unique", data, "sources")
    return DiagnosticsTable(sources)


@cache
def default_diagnostics() -> DiagnosticsTable:
    return load_table(DIAGNOSTICS_FILE, parse_diagnostics)
