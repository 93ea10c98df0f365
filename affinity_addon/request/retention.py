"""`cache_retention`: a rule asks for a longer prompt-cache retention, the catalog says how.

A rule gives only a duration; which field asks for it, and with which value, depends on the
request's model and is data (`cache_retention` in catalog/providers.yaml): OpenAI's
`prompt_cache_retention: "24h"` up to gpt-5.5, `prompt_cache_options.ttl` on GPT-5.6+. OpenAI
rejects a request carrying both, and the Codex backend any of them (docs/providers.md, sections
"OpenAI Chat Completions and Responses" and "ChatGPT Codex backend"), so the directive is never
added next to another one, nor on an endpoint in `no_cache_directives`.
"""

from dataclasses import dataclass
from typing import Any

from affinity_addon.catalog.providers import PROVIDER_FACTS
from affinity_addon.durations import parse_duration
from affinity_addon.jsonpath import has_path
from affinity_addon.request.actions import CONFLICT_POLICIES, KEEP, SetAction, Template


@dataclass(frozen=True, slots=True)
class RetentionSpec:
    """Ask for the longest prompt-cache retention the request's model takes at no extra cost,
    up to `seconds`."""

    seconds: float
    on_conflict: str = KEEP


def parse_retention(value: Any, default_policy: str = KEEP) -> RetentionSpec:
    """`24h`, or `{value: 24h, on_conflict: keep|overwrite}`. Raises ValueError with a reason."""
    policy = default_policy
    if isinstance(value, dict):
        if set(value) - {"value", "on_conflict"} or "value" not in value:
            raise ValueError("use a duration like 24h, or {value: 24h, on_conflict: keep|overwrite}")
        policy = value.get("on_conflict", default_policy)
        if policy not in CONFLICT_POLICIES:
            raise ValueError(f"on_conflict must be keep or overwrite, not {policy!r}")
        value = value["value"]
    seconds = parse_duration(value)
    offered = sorted({d.seconds for d in PROVIDER_FACTS.cache_retention})
    if not any(s <= seconds for s in offered):
        known = ", ".join(_duration_text(s) for s in offered) or "none"
        raise ValueError(f"no model offers a retention of {value} or less (catalog/providers.yaml "
                         f"cache_retention has: {known}), so it would never apply")
    return RetentionSpec(seconds, policy)


def _duration_text(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def retention_action(spec: RetentionSpec, body: dict[str, Any], model: str | None, host: str,
                     path: str) -> tuple[SetAction | None, str | None]:
    """(the field action for this request's model, or None; the other directive already in the
    body that forbids adding one, or None). The action then goes through the rewrite like a
    `set_fields` entry: `on_conflict` decides about a value already in its own field."""
    if PROVIDER_FACTS.rejects_cache_directives(host, path):
        return None, None  # the Codex backend answers 400 to any cache directive
    directive = PROVIDER_FACTS.retention_for(model, spec.seconds)
    if directive is None:
        return None, None  # no longer retention for this model, or not at no extra cost
    for other in PROVIDER_FACTS.retention_fields:
        # Two directives are rejected: one already there (the client's or an earlier rule's)
        # wins, whatever on_conflict says.
        if other != directive.field and has_path(body, other):
            return None, other
    return SetAction(directive.field, Template(directive.value, frozenset()),
                     spec.on_conflict), None
