"""Applies matching rules to one request: affinity headers, body fields, cache retention, markers.

The request body is parsed at most once, and only when a rule whose host and path fit needs
it. It is written back through mitmproxy's decoded `content`, so a zstd/gzip/br body stays
compressed and Content-Length stays right. When every body change is a new top-level key (the
common case: `prompt_cache_key`, `session_id`), the key is spliced in after the opening brace
and every other byte of the body stays exactly as the client sent it.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from affinity_addon.apis import ANTHROPIC
from affinity_addon.catalog.profiles import IGNORED, profile_for
from affinity_addon.catalog.providers import PROVIDER_FACTS
from affinity_addon.jsonpath import get_path, has_path, parse_path, set_path
from affinity_addon.models import MAX_MODEL_CHARS
from affinity_addon.record.schema import RequestFacts
from affinity_addon.request import affinity_id
from affinity_addon.request.actions import KEEP, SetAction
from affinity_addon.request.body import (
    ORJSON_MAX,
    ParsedBody,
    dumps,
    parse_body,
    splice_top_level,
)
from affinity_addon.request.breakpoint_spec import AUTO_TTL, HintFor, markers_for
from affinity_addon.request.family_key import FamilyRates, family_hash, family_key
from affinity_addon.request.header_map import HeaderMap, header_map
from affinity_addon.request.prompt import HEAD_FIELDS, MESSAGES_KEY, root_segments
from affinity_addon.request.provider_link import Ask, LinkKeys, ResponseLinks, Thread
from affinity_addon.request.removal import mentions, remove_blocks
from affinity_addon.request.retention import retention_action
from affinity_addon.request.rules import Rule, RuleSet, api_for, match_models

logger = logging.getLogger(__name__)

# Characters a header value must not hold (a template filled from a hostile body: no injection).
_CONTROL = frozenset(map(chr, [*range(0x20), 0x7F]))


@dataclass
class Outcome:
    """What the rules did to one request, while they do it; `facts()` is its final form."""

    rules: list[str]
    api: str | None
    model: str | None
    affinity_id: str | None
    affinity_source: str | None
    dry_run: bool
    headers: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    markers: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)  # `remove_blocks`: path, name, size
    body_write: str = "none"  # none | splice | reserialize
    problems: list[str] = field(default_factory=list)  # logged as one warning per request
    signal: str | None = None  # the routing value the provider will see (None: none at all)
    # Why the changes were computed but not sent although the proxy is not in a dry run: the
    # request is signed over its body ("signed (aws-sigv4)").
    rewrite_skipped: str | None = None
    cache_key_bucket: dict[str, Any] | None = None  # {family_key}: strategy, bucket(s)
    # The prompt family (keyed hash), when the tracker asked for it (`ttl: auto`); not logged.
    family: str | None = None
    # The conversation's root ID under the rules file's affinity config, when the provider-
    # diagnostics link computed it (the tracker's key then needs no second hash; not logged).
    root_id: str | None = None
    # Provider cache diagnostics: what the request asks the provider, and the conversation
    # thread whose response id the next request will name.
    diagnostics: Ask | None = None
    link: Thread | None = None

    def facts(self, *, host: str, path: str, method: str) -> RequestFacts:
        """What the rules did, as the record will say it."""
        added: dict[str, Any] = {"headers": dict(self.headers), "fields": dict(self.fields),
                                 "markers": list(self.markers)}
        if self.removed:  # only then: records of other routes keep their API
            added["removed"] = list(self.removed)
        return RequestFacts(
            rule=self.rules[0], rules=tuple(self.rules), api=self.api,
            # Client-chosen: the log and the stats keep at most a real model name's length.
            model=self.model[:MAX_MODEL_CHARS] if self.model else self.model,
            affinity_id=self.affinity_id, affinity_source=self.affinity_source,
            dry_run=self.dry_run, added=added, kept=tuple(self.kept), body_write=self.body_write,
            warning="; ".join(self.problems) or None, host=host, path=path, method=method,
            cache_key_bucket=dict(self.cache_key_bucket) if self.cache_key_bucket else None,
            rewrite_skipped=self.rewrite_skipped,
            diagnostics=self.diagnostics.to_json() if self.diagnostics else None)


class _Roots:
    """The body's `root_segments`, walked once for both the affinity ID and the prompt family
    (each walk is a few µs of a small request's rewrite)."""

    __slots__ = ("body", "api", "value")

    def __init__(self, body: dict[str, Any] | None, api: str | None) -> None:
        self.body, self.api = body, api
        self.value: affinity_id.Root | None = None

    def __call__(self) -> affinity_id.Root:
        if self.value is None:
            self.value = root_segments(self.body or {}, self.api or "")
        return self.value

    def clear(self) -> None:
        self.value = None


# Top-level fields a root can come from (system prompts, the conversation).
_ROOT_FIELDS = frozenset({*HEAD_FIELDS, *MESSAGES_KEY.values()})


_told: set[tuple[str, str]] = set()


def _ignored_once(rule: str, host: str) -> None:
    """A rule asks for markers on a route whose cache profile says they are ignored: say so once
    per rule and host, not on every request."""
    if (rule, host) not in _told and len(_told) < 256:
        _told.add((rule, host))
        logger.info("affinity: rule %r asks for cache markers on %s, whose API ignores them "
                    "(catalog/cache_profiles.yaml); none added there", rule, host)


def _top_key(path: str) -> str:
    return path.split(".", 1)[0].split("[", 1)[0]


def _render(action: SetAction, facts: Mapping[str, str | None]) -> Any:
    return action.template.render(facts)


def _routing_signal(matched: list[Rule], headers: HeaderMap, body: dict[str, Any] | None,
                    out: Outcome, dry_run: bool) -> str | None:
    """The routing value the provider will see: `headers` are the client's, and `out.headers`
    what the rewrite set on top of them (not in a dry run)."""
    for rule in matched:
        for a in rule.set_headers:
            sent: str | None = headers.get(a.target)  # in a dry run: the client's own, if any
            if not dry_run and a.target in out.headers:
                sent = out.headers[a.target]
            if sent:
                return sent
        if body is None:
            continue
        for a in rule.set_fields:
            if dry_run and a.target in out.fields:
                continue  # computed but not sent
            v = get_path(body, parse_path(a.target))
            if isinstance(v, str) and v:
                return v
    return None


class _Rewrite:
    """Steps 3-5 for one request: compute every header, field and marker first, encode the
    body once, and only then apply, so a failure anywhere leaves the request as the client sent
    it."""

    def __init__(self, request: http.Request, headers: HeaderMap, parsed: ParsedBody,
                 out: Outcome, facts: dict[str, Any], secret: str, rates: FamilyRates | None,
                 root: "_Roots", affinity: affinity_id.AffinityConfig) -> None:
        self.request, self.parsed, self.out, self.facts = request, parsed, out, facts
        self.client_headers = headers
        self.root = root  # the body's root segments, walked once for the ID and the family
        self.affinity = affinity
        self.body = parsed.obj
        self.secret, self.rates = secret, rates
        self.body_changed = False
        self.must_reserialize = False
        self.new_top: dict[str, Any] = {}  # keys added at the top level, in order (the splice)

    def render(self, a: SetAction) -> Any:
        facts, out = self.facts, self.out
        if "family_key" in a.template.fields and "family_key" not in facts:
            fk = None
            if out.affinity_id is not None and self.body is not None and out.api is not None:
                fk, bucket, count = family_key(self.body, out.api, out.affinity_id,
                                               self.rates or FamilyRates(),
                                               self.request.timestamp_start or 0.0, self.secret,
                                               self.root()[0], out.model)
                out.cache_key_bucket = {"strategy": "family", "bucket": bucket,
                                        "buckets": count}
            facts["family_key"] = fk
        return _render(a, facts)

    def family(self) -> str | None:
        """The request's prompt family (model family, tools, system prompt: a keyed hash), made
        once and before any marker is added (markers are left out of it anyway)."""
        out = self.out
        if out.family is None and self.body is not None and out.api is not None:
            out.family = family_hash(self.body, out.api, self.secret, self.root()[0],
                                     out.model)
        return out.family

    def headers(self, rule: Rule) -> None:
        out = self.out
        for a in rule.set_headers:
            if a.needs_affinity and out.affinity_id is None:
                continue
            present = a.target in out.headers or a.target in self.client_headers
            if present and a.on_conflict == KEEP:
                if a.target not in out.headers:
                    out.kept.append(f"header:{a.target}")
                continue
            value = str(self.render(a))
            if not _CONTROL.isdisjoint(value):  # e.g. {model} from a hostile body: no header injection
                out.problems.append(f"rule {rule.name!r}: header {a.target} value has control "
                                    "characters; not set")
                continue
            try:  # as mitmproxy will: a failure while applying would leave half a rewrite
                value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                out.problems.append(f"rule {rule.name!r}: header {a.target} value cannot be "
                                    "encoded; not set")
                continue
            out.headers[a.target] = value

    def fields(self, rule: Rule) -> None:
        for a in rule.set_fields:
            self.set_field(rule, a)

    def set_field(self, rule: Rule, a: SetAction) -> None:
        out, body = self.out, self.body
        assert body is not None
        if a.needs_affinity and out.affinity_id is None:
            return
        current = get_path(body, parse_path(a.target))
        present_as_null = current is None and "." not in a.target and a.target in body
        if current is not None and a.on_conflict == KEEP:
            if a.target not in out.fields:
                out.kept.append(f"field:{a.target}")
            return
        value = self.render(a)
        if current == value:
            return
        if "." in a.target or current is not None or present_as_null or a.target in self.new_top:
            body = self._exact()  # this body will be re-encoded, not spliced
            current = get_path(body, parse_path(a.target))
        if not set_path(body, parse_path(a.target), value):
            out.problems.append(f"rule {rule.name!r}: cannot set {a.target}: a parent is not an object")
            return
        out.fields[a.target] = value
        if _top_key(a.target) in _ROOT_FIELDS:
            self.root.clear()  # a rule rewrote part of the prompt's root: walk it again
        self.body_changed = True
        if "." in a.target or current is not None or present_as_null or a.target in self.new_top:
            self.must_reserialize = True
        else:
            self.new_top[a.target] = value

    def retention(self, rule: Rule) -> None:
        if rule.cache_retention is None or self.body is None:
            return
        action, kept = retention_action(rule.cache_retention, self.body, self.out.model,
                                        self.facts["host"], self.facts["path"])
        if kept is not None and kept not in self.out.fields:  # kept: the client's, not a rule's
            self.out.kept.append(f"field:{kept}")
        if action is not None:
            self.set_field(rule, action)

    def provider_diagnostics(self, links: ResponseLinks) -> None:
        """Name the conversation's previous response in the field the provider reads (catalog
        data: host, path, models, field), where it offers cache diagnostics; keep the client's
        own. Nothing anywhere else, on other models, or on a host that refused the field."""
        out, body = self.out, self.body
        host, path = self.facts["host"], self.facts["path"]
        source = links.source_for(host, path)
        if source is None or body is None or out.api is None or out.affinity_id is None:
            return
        req = source.request
        own = has_path(body, req.owner)
        if not own and not source.takes(out.model):
            return
        known = out.affinity_id if out.affinity_source == "root" else None  # hashed already
        root, opening = affinity_id.root_parts(body, out.api, self.affinity, self.secret,
                                               self.root, opening=True, known=known)
        out.root_id = root
        msgs = body.get(MESSAGES_KEY.get(out.api, ""))
        keys = LinkKeys(out.affinity_id, root, opening, isinstance(msgs, list) and len(msgs) > 1)
        out.link, previous = links.link(keys)
        if own:  # the client's own: kept as sent, its answer recorded all the same
            named = get_path(body, parse_path(req.link))
            out.kept.append(f"field:{req.owner}")
            out.diagnostics = Ask(source.name, named if isinstance(named, str) else None,
                                  "client")
            return
        if links.refused_by(host) or (previous is None and not req.first):
            return
        if req.top not in body and any(has_path(body, f) for f in req.unless):
            return  # a combination the provider may refuse (see the catalog entry)
        if not self.add_value(req.link, previous):
            out.problems.append(f"provider diagnostics: cannot set {req.link}: a parent is "
                                "not an object")
            return
        if not out.dry_run:
            out.diagnostics = Ask(source.name, previous, "proxy")

    def add_value(self, target: str, value: Any) -> bool:
        """Set a dotted field the rules know nothing of (a new top-level key is spliced)."""
        top = _top_key(target)
        if top in self.body_keys():
            body = self._exact()  # nested into an object the client sent: a re-encode
            if not set_path(body, parse_path(target), value):
                return False
            self.must_reserialize = True
        else:
            obj = self.body
            assert obj is not None
            set_path(obj, parse_path(target), value)
            self.new_top[top] = obj[top]
        self.out.fields[target] = value
        self.body_changed = True
        return True

    def body_keys(self) -> set[str]:
        """The body's top-level keys other than those added for a splice."""
        return {k for k in (self.body or {}) if k not in self.new_top}

    def _exact(self) -> dict[str, Any]:
        """The body as it must be before a re-encode (`ParsedBody.exact`); keys already added
        for a splice are carried over to a re-read object."""
        before = self.body
        obj = self.parsed.exact()
        assert obj is not None
        if obj is not before:
            obj.update(self.new_top)
            self.body = obj
        return obj

    def remove(self, matched: list[Rule]) -> None:
        """`remove_blocks` of every matched rule, before any rule sets a field or places a
        marker: the planner and the fingerprint see the prompt the provider will see."""
        specs = tuple({s.name: s for r in matched for s in r.remove_blocks}.values())
        if not specs or self.body is None or self.out.api != ANTHROPIC:
            return
        if not mentions(self.body.get("system"), specs):
            return  # the common case: nothing to remove, and the body stays as it was
        body = self._exact()  # a removal means a re-encode
        removed, problems = remove_blocks(body, specs, self.facts["host"])
        self.out.problems.extend(problems)
        if removed:
            self.out.removed.extend(removed)
            self.root.clear()  # the system prompt changed under the root's segments
            self.body_changed = self.must_reserialize = True

    def breakpoints(self, rule: Rule, hint_for: HintFor | None) -> None:
        from affinity_addon.request import breakpoints

        out, body = self.out, self.body
        if rule.cache_control is None or out.api is None or body is None:
            return
        host, path = self.facts["host"], self.facts["path"]
        if PROVIDER_FACTS.rejects_cache_directives(host, path):
            return  # the Codex backend answers 400 to any cache directive, whatever a rule says
        if profile_for(host, out.api, out.model).markers == IGNORED:
            _ignored_once(rule.name, host)
            return
        markers = markers_for(host, out.model)
        if markers is None:
            return  # a host with breakpoints of its own that this model does not take
        blocks = breakpoints.block_count(body, out.api)
        if blocks > breakpoints.plan_limit(len(self.parsed.text or b"")):
            out.problems.append(f"rule {rule.name!r}: {blocks} prompt blocks are too many to "
                                "plan breakpoints for; none added")
            return
        hint = None
        if hint_for is not None:
            # Only `ttl: auto` reads the family's rhythm; the hash is made only if asked for.
            auto = rule.cache_control.ttl == AUTO_TTL
            hint = hint_for(out.affinity_id, family=self.family if auto else None)
        body = self._exact()  # markers mean a re-encode
        added = breakpoints.plan_breakpoints(body, out.api, out.model, rule.cache_control, hint,
                                             markers=markers, host=host)
        if not added:
            return
        out.markers.extend({"path": m.path, "ttl": m.ttl} for m in added)
        if out.rewrite_skipped:
            # A signed body goes as the client signed it: the plan is recorded, then undone,
            # so the fingerprint and the verdict judge the prompt that was sent.
            breakpoints.strip_added(body, added)
        else:
            self.body_changed = self.must_reserialize = True

    def encode(self) -> bytes | None:
        """The new body, spliced where only new top-level keys were added, else re-encoded."""
        out, body, text = self.out, self.body, self.parsed.text
        if not self.body_changed or body is None or text is None:
            return None
        if self.must_reserialize and self.parsed.exotic:
            out.problems.append("body holds values JSON cannot re-encode losslessly (NaN, 1e400, "
                                "lone surrogates); body not rewritten")
            out.fields.clear()
            out.markers.clear()
            out.removed.clear()
            return None
        if self.must_reserialize:
            out.body_write = "reserialize"
            return dumps(body, large=len(text) > ORJSON_MAX)
        out.body_write = "splice"
        return splice_top_level(text, self.new_top, empty=len(body) == len(self.new_top))


def apply_rules(
    ruleset: RuleSet,
    request: http.Request,
    *,
    secret: str,
    dry_run: bool = False,
    parsed: ParsedBody | None = None,
    hint_for: HintFor | None = None,
    rates: FamilyRates | None = None,
    host: str | None = None,
    links: ResponseLinks | None = None,
) -> tuple[Outcome, ParsedBody] | None:
    """Rewrite `request` in place (unless dry_run). None when no rule matches.

    `secret`: this installation's key for the hashes behind affinity IDs (`affinity_key`).
    `hint_for(affinity_id, family=...)`: what the tracker knows of the conversation's previous
    requests (a `breakpoints.PlanHint`), so the planner can mark the blocks that stayed stable,
    and the TTL `ttl: auto` should use.
    `rates`: this proxy's request rates per prompt family, for `{family_key}` (a fresh count
    when None). `host`: `request.pretty_host`, when the caller has it already.
    `links`: the conversations' previous response ids, for provider cache diagnostics (None:
    none asked for)."""
    host = request.pretty_host if host is None else host
    method = request.method
    path = request.path.split("?", 1)[0]
    candidates = ruleset.candidates(host, path, method)  # host and path first: no body parse
    if not candidates:
        return None
    headers = header_map(request.headers)  # the client's, read once
    if parsed is None:
        parsed = parse_body(request, headers)
    if parsed.over_limit:  # unobserved and unchanged, with one warning
        logger.warning("affinity: %s %s: %s; sent unchanged and not recorded", method, host,
                       parsed.problem)
        return None
    body = parsed.obj
    model = body.get("model") if body is not None and isinstance(body.get("model"), str) else None
    if model is None:  # Bedrock, Vertex and Azure deployments name it in the URL
        model = PROVIDER_FACTS.path_model(path)
    matched = match_models(candidates, model)  # 1. which rules
    if not matched:
        return None
    # A body the client signed (AWS SigV4 hashes the payload into its signature) is never
    # changed: the rules run as in a dry run, and the record says why nothing was sent.
    signed = PROVIDER_FACTS.signature(headers, request.path.partition("?")[2])
    if signed is not None:
        dry_run = True
    # 2. the conversation: its API and affinity ID
    api = next((r.api for r in matched if r.api), None) or api_for(path)
    aff_config = next((r.affinity for r in matched if r.affinity), ruleset.affinity)
    root = _Roots(body, api)
    aff, source = affinity_id.derive(aff_config, headers, body, api, secret, root)
    out = Outcome([r.name for r in matched], api, model, aff, source, dry_run)
    if signed is not None:
        out.rewrite_skipped = f"signed ({signed})"
    if parsed.problem and any(r.needs_body for r in matched):
        out.problems.append(parsed.problem + "; sent unchanged")
    facts = {"affinity_id": aff, "affinity_source": source, "model": model, "host": host,
             "path": path, "method": method, "rule": matched[0].name}
    rw = _Rewrite(request, headers, parsed, out, facts, secret, rates, root, aff_config)
    if body is not None:  # 3. blocks the rules take out, then rule by rule: headers, fields,
        rw.remove(matched)  # retention and breakpoints
    for rule in matched:
        facts["rule"] = rule.name
        rw.headers(rule)
        if body is not None:
            rw.fields(rule)
            rw.retention(rule)
            rw.breakpoints(rule, hint_for)
    if links is not None and body is not None:
        try:  # 3b. the provider's own diagnosis, where it offers one
            rw.provider_diagnostics(links)
        except Exception:  # fail open: the request goes without it
            logger.exception("affinity: provider diagnostics not added")
    new = rw.encode()  # 4. the body, encoded once
    if not dry_run:  # 5. apply: nothing before this line touched the request
        for name, value in out.headers.items():
            request.headers[name] = value
        if new is not None:
            request.content = new
    out.signal = _routing_signal(matched, headers, rw.body, out, dry_run)
    if aff_config is not ruleset.affinity:
        out.root_id = None  # a rule's own affinity config: not the root the tracker keys by
    return out, parsed
