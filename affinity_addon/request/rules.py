"""Rules: which LLM requests to touch and what to add to them.

A rules file is YAML (schema: rules/schema.json). `load_rules(path)` is pure: it returns an
immutable RuleSet or raises ValueError naming the file, the line and the rule.

A rule without actions only observes: its traffic gets usage records and miss verdicts.

How several matching rules combine: every enabled rule whose `match` fits applies, in file
order, until one with `stop: true`. Each action sees the request as the rules before it left it,
so with the default `on_conflict: keep` the first rule (or the client) to set a header or field
wins, and `overwrite` lets a later rule replace it.
"""

import fnmatch
import importlib.resources
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affinity_addon.apis import (
    ANTHROPIC,
    APIS,
    BEDROCK_CONVERSE,
    GEMINI,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
)
from affinity_addon.catalog.volatile import default_volatile
from affinity_addon.catalog.yamlsource import line_of, load_yaml
from affinity_addon.request import affinity_id
from affinity_addon.request.actions import (
    CONFLICT_POLICIES,
    KEEP,
    RemoveBlock,
    SetAction,
    parse_template,
    sample_hosts,
)
from affinity_addon.request.breakpoint_spec import CacheControlSpec, parse_cache_control
from affinity_addon.request.retention import RetentionSpec, parse_retention


def default_rules_file() -> Path:
    """The shipped rules: the checkout's top-level rules/, or the copy inside an installed wheel."""
    checkout = Path(__file__).resolve().parents[2] / "rules" / "default.yaml"
    if checkout.is_file():
        return checkout
    return Path(str(importlib.resources.files("affinity_addon.default_rules") / "default.yaml"))



# API by request path, when a rule does not say. Host-independent on purpose: the same
# APIs are served by many hosts (OpenRouter, DeepSeek, proxies).
# Bedrock's InvokeModel takes each model's own body, so its API comes from the rule (`api:`);
# Converse is one format for every model (botocore's bedrock-runtime service model), and Vertex
# serves Claude's body under publishers/anthropic.
API_BY_PATH: tuple[tuple[str, str], ...] = (
    ("*/messages", ANTHROPIC),
    ("*/chat/completions", OPENAI_CHAT),
    ("*/responses", OPENAI_RESPONSES),
    ("*:generateContent", GEMINI),
    ("*:streamGenerateContent", GEMINI),
    ("/model/*/converse", BEDROCK_CONVERSE),
    ("/model/*/converse-stream", BEDROCK_CONVERSE),
    ("*/publishers/anthropic/models/*:rawPredict", ANTHROPIC),
    ("*/publishers/anthropic/models/*:streamRawPredict", ANTHROPIC),
)

_RULE_KEYS = frozenset(
    {"name", "match", "set_headers", "set_fields", "on_conflict", "cache_control",
     "cache_retention", "remove_blocks", "affinity", "stop", "enabled", "description"}
)
_MATCH_KEYS = frozenset({"host", "path", "model", "method", "api"})
_TOP_KEYS = frozenset({"version", "affinity", "rules"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Headers that frame or route the message (RFC 9110/9112 hop-by-hop and framing fields): a rule
# setting one would desynchronize the body, smuggle a request or retarget the connection.
RESERVED_HEADERS = frozenset({
    "content-length", "transfer-encoding", "host", "connection", "keep-alive", "upgrade", "te",
    "trailer", "proxy-connection", "content-encoding", "expect",
})
_FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")


@dataclass(frozen=True, slots=True)
class Glob:
    patterns: tuple[str, ...]
    regex: re.Pattern[str]

    def matches(self, value: str) -> bool:
        return self.regex.match(value) is not None


def parse_glob(value: Any, *, ignore_case: bool) -> Glob:
    if isinstance(value, str):
        patterns: tuple[str, ...] = (value,)
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        patterns = tuple(value)
    else:
        raise ValueError("must be a glob string or a non-empty list of glob strings")
    if any(not p for p in patterns):
        raise ValueError("empty glob")
    flags = re.IGNORECASE if ignore_case else 0
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), flags)
    return Glob(patterns, regex)


@dataclass(frozen=True)
class Rule:
    name: str
    line: int
    host: Glob
    path: Glob | None = None
    model: Glob | None = None
    methods: frozenset[str] | None = None
    api: str | None = None
    set_headers: tuple[SetAction, ...] = ()
    set_fields: tuple[SetAction, ...] = ()
    cache_control: CacheControlSpec | None = None
    cache_retention: RetentionSpec | None = None
    remove_blocks: tuple[RemoveBlock, ...] = ()
    affinity: affinity_id.AffinityConfig | None = None
    stop: bool = False

    def matches_target(self, host: str, path: str, method: str) -> bool:
        if not self.host.matches(host):
            return False
        if self.path is not None and not self.path.matches(path):
            return False
        return self.methods is None or method.upper() in self.methods

    def matches_model(self, model: str | None) -> bool:
        return self.model is None or (model is not None and self.model.matches(model))

    @property
    def needs_body(self) -> bool:
        return bool(self.model or self.set_fields or self.cache_control is not None
                    or self.cache_retention is not None or self.remove_blocks)


@dataclass(frozen=True)
class RuleSet:
    source: str
    rules: tuple[Rule, ...]
    affinity: affinity_id.AffinityConfig
    _cache: dict[tuple[str, str, str], tuple[Rule, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def candidates(self, host: str, path: str, method: str) -> tuple[Rule, ...]:
        """Rules whose host/path/method fit; the model check needs the body and comes later."""
        key = (host, path, method)
        hit = self._cache.get(key)
        if hit is None:
            hit = tuple(r for r in self.rules if r.matches_target(host, path, method))
            if len(path) + len(host) > 512:  # client-chosen: memoize only ordinary sizes
                return hit
            if len(self._cache) > 4096:  # paths can carry ids; keep the memo bounded
                self._cache.clear()
            self._cache[key] = hit
        return hit


def match_models(candidates: tuple[Rule, ...], model: str | None) -> list[Rule]:
    """The rules (host and path already fit) whose model glob fits too, in file order, until
    one says `stop`."""
    matched: list[Rule] = []
    for rule in candidates:
        if rule.matches_model(model):
            matched.append(rule)
            if rule.stop:
                break
    return matched


def api_for(path: str, given: str | None = None) -> str | None:
    """The API a request speaks: the rule's `api:` when it gives one, else by its path."""
    if given:
        return given
    for glob, api in API_BY_PATH:
        if fnmatch.fnmatchcase(path, glob):
            return api
    return None


class _Where:
    """Builds 'file:line: rule X: ...' messages."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, obj: Any, key: Any, msg: str, rule: str | None = None) -> ValueError:
        line = line_of(obj, key)
        loc = f"{self.source}:{line}" if line else self.source
        who = f" rule {rule!r}:" if rule else ""
        return ValueError(f"{loc}:{who} {msg}")


def _parse_actions(where: _Where, rule: Mapping, key: str, name: str, default_policy: str,
                   is_header: bool) -> tuple[SetAction, ...]:
    spec = rule.get(key)
    if spec is None:
        return ()
    if not isinstance(spec, Mapping):
        raise where.error(rule, key, f"{key} must be a mapping of name: value", name)
    actions: list[SetAction] = []
    for target, value in spec.items():
        if not isinstance(target, str) or not target:
            raise where.error(spec, target, f"{key}: bad name {target!r}", name)
        if is_header and not _HEADER_NAME.match(target):
            raise where.error(spec, target, f"{key}: {target!r} is not a valid header name", name)
        if is_header and target.lower() in RESERVED_HEADERS:
            raise where.error(spec, target, f"{key}: {target!r} frames or routes the request; "
                              "rules may not set it", name)
        if not is_header and not _FIELD_PATH.match(target):
            raise where.error(
                spec, target, f"{key}: {target!r} is not a dotted field path like a.b.c", name
            )
        policy = default_policy
        if isinstance(value, Mapping):
            extra = set(value) - {"value", "on_conflict"}
            if extra or "value" not in value:
                raise where.error(
                    spec, target, f"{key}.{target}: use {{value: ..., on_conflict: keep|overwrite}}",
                    name,
                )
            policy = value.get("on_conflict", default_policy)
            if policy not in CONFLICT_POLICIES:
                raise where.error(value, "on_conflict", f"on_conflict must be keep or overwrite, not {policy!r}", name)
            value = value["value"]
        try:
            template = parse_template(value)
        except ValueError as e:
            raise where.error(spec, target, f"{key}.{target}: {e}", name) from None
        if is_header and not isinstance(template.source, str):
            raise where.error(spec, target, f"{key}.{target}: header values must be strings", name)
        actions.append(SetAction(target.lower() if is_header else target, template, policy))
    return tuple(actions)


def _parse_removals(where: _Where, raw: Mapping, name: str, host: Glob,
                    api: str | None) -> tuple[RemoveBlock, ...]:
    """`remove_blocks: [name, ...]`: catalog patterns (catalog/volatile.yaml) whose system-prompt
    blocks the rule takes out. Refused where the host glob reaches a host that reads the block
    (its `stripped_by`): Anthropic's API and Vertex use Claude Code's billing block."""
    spec = raw.get("remove_blocks")
    if spec is None:
        return ()
    names = [spec] if isinstance(spec, str) else spec
    if not isinstance(names, list) or not names or not all(
            isinstance(n, str) and n for n in names):
        raise where.error(raw, "remove_blocks", "remove_blocks must be a list of block names "
                          "from affinity_addon/catalog/volatile.yaml", name)
    if api is not None and api != ANTHROPIC:
        raise where.error(raw, "remove_blocks", "remove_blocks takes blocks out of an Anthropic "
                          f"Messages system prompt; match.api is {api!r}", name)
    table = default_volatile()
    out = []
    for block_name in dict.fromkeys(names):
        try:
            block = table.named_block(block_name)
        except KeyError:
            known = ", ".join(b.name for b in table.named)
            raise where.error(raw, "remove_blocks", f"remove_blocks: no block named "
                              f"{block_name!r} in the catalog (known: {known})", name) from None
        for sample in sample_hosts(block.stripped_by):
            if host.matches(sample):
                raise where.error(
                    raw, "remove_blocks",
                    f"remove_blocks: {block_name!r} must stay on {sample}, whose API reads it "
                    f"(and takes it out before caching); match.host {list(host.patterns)} "
                    "reaches it: name the hosts to remove it on", name)
        out.append(RemoveBlock(block.name, block.pattern, block.stripped_by))
    return tuple(out)


def _parse_rule(where: _Where, raw: Any, index: int, rules_list: Any) -> Rule | None:
    if not isinstance(raw, Mapping):
        raise where.error(rules_list, index, f"rules[{index}] must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise where.error(raw, None, f"rules[{index}] needs a non-empty 'name'")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        k = sorted(map(str, unknown))[0]
        raise where.error(raw, k, f"unknown key {k!r} (known: {', '.join(sorted(_RULE_KEYS))})", name)
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise where.error(raw, "enabled", "enabled must be true or false", name)
    match = raw.get("match")
    if not isinstance(match, Mapping):
        raise where.error(raw, "match" if "match" in raw else None, "needs a 'match' mapping with at least 'host'", name)
    unknown = set(match) - _MATCH_KEYS
    if unknown:
        k = sorted(map(str, unknown))[0]
        raise where.error(match, k, f"match: unknown key {k!r} (known: {', '.join(sorted(_MATCH_KEYS))})", name)
    if "host" not in match:
        raise where.error(match, None, "match needs a 'host' glob", name)
    globs: dict[str, Glob | None] = {}
    for k in ("host", "path", "model"):
        if k in match:
            try:
                globs[k] = parse_glob(match[k], ignore_case=(k == "host"))
            except ValueError as e:
                raise where.error(match, k, f"match.{k}: {e}", name) from None
    methods = None
    if "method" in match:
        m = match["method"]
        ms = [m] if isinstance(m, str) else m
        if not isinstance(ms, list) or not ms or not all(isinstance(x, str) for x in ms):
            raise where.error(match, "method", "match.method must be a method or a list of methods", name)
        methods = frozenset(x.upper() for x in ms)
    api = match.get("api")
    if api is not None and api not in APIS:
        raise where.error(match, "api", f"match.api must be one of {', '.join(APIS)}", name)
    policy = raw.get("on_conflict", KEEP)
    if policy not in CONFLICT_POLICIES:
        raise where.error(raw, "on_conflict", f"on_conflict must be keep or overwrite, not {policy!r}", name)
    stop = raw.get("stop", False)
    if not isinstance(stop, bool):
        raise where.error(raw, "stop", "stop must be true or false", name)
    set_headers = _parse_actions(where, raw, "set_headers", name, policy, is_header=True)
    set_fields = _parse_actions(where, raw, "set_fields", name, policy, is_header=False)
    cache_control = None
    if raw.get("cache_control") not in (None, False):

        try:
            cache_control = parse_cache_control(raw["cache_control"])
        except ValueError as e:
            raise where.error(raw, "cache_control", f"cache_control: {e}", name) from None
    retention = None
    if raw.get("cache_retention") not in (None, False):

        try:
            retention = parse_retention(raw["cache_retention"], policy)
        except ValueError as e:
            raise where.error(raw, "cache_retention", f"cache_retention: {e}", name) from None
    host = globs["host"]
    assert host is not None  # `match.host` is required; checked above
    removals = _parse_removals(where, raw, name, host, api)
    aff = None
    if "affinity" in raw:
        try:
            aff = affinity_id.parse_affinity_config(raw["affinity"])
        except ValueError as e:
            raise where.error(raw, "affinity", f"affinity: {e}", name) from None
    if not enabled:
        return None
    return Rule(
        name=name, line=line_of(raw), host=host, path=globs.get("path"),
        model=globs.get("model"), methods=methods, api=api, set_headers=set_headers,
        set_fields=set_fields, cache_control=cache_control, cache_retention=retention,
        remove_blocks=removals, affinity=aff, stop=stop,
    )


def parse_rules(data: Any, source: str = "<rules>") -> RuleSet:
    where = _Where(source)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise where.error(data, None, "the top level must be a mapping with 'rules:'")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        k = sorted(map(str, unknown))[0]
        raise where.error(data, k, f"unknown top-level key {k!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    if data.get("version", 1) != 1:
        raise where.error(data, "version", "unsupported version (this addon reads version: 1)")
    try:
        aff = affinity_id.parse_affinity_config(data.get("affinity"))
    except ValueError as e:
        raise where.error(data, "affinity", f"affinity: {e}") from None
    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, list):
        raise where.error(data, "rules", "'rules' must be a list")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, raw in enumerate(rules_raw):
        rule = _parse_rule(where, raw, i, rules_raw)
        if isinstance(raw, Mapping):
            if raw["name"] in names:
                raise where.error(raw, "name", "duplicate rule name", raw["name"])
            names.add(raw["name"])
        if rule is not None:
            rules.append(rule)
    return RuleSet(source=source, rules=tuple(rules), affinity=aff)


def load_rules(path: str | Path) -> RuleSet:
    p = Path(path).expanduser()
    return parse_rules(load_yaml(p), str(p))
