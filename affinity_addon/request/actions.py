"""What a rule sets: a header or body field (`SetAction`) to a template's value, and what to do
when the client set it already (`on_conflict`); and what a rule takes out of the prompt
(`RemoveBlock`: a block the catalog names)."""

import fnmatch
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEEP = "keep"
OVERWRITE = "overwrite"
CONFLICT_POLICIES = (KEEP, OVERWRITE)

# Values a template may use. All are derived from the request, never its prompt text.
TEMPLATE_FIELDS = frozenset(
    {"affinity_id", "affinity_source", "family_key", "model", "host", "path", "method", "rule"}
)


@dataclass(frozen=True, slots=True)
class Template:
    """A value with `{field}` placeholders (str.format syntax), or a JSON literal."""

    source: Any
    fields: frozenset[str]

    def render(self, facts: Mapping[str, str | None]) -> Any:
        if not isinstance(self.source, str) or not self.fields:
            return self.source
        return self.source.format_map({k: facts.get(k) or "" for k in self.fields})


def parse_template(value: Any) -> Template:
    if isinstance(value, bool | int | float) or value is None:
        return Template(value, frozenset())
    if not isinstance(value, str):
        raise ValueError(f"value must be a string template or a scalar, not {type(value).__name__}")
    names: set[str] = set()
    try:
        for _, name, spec, conv in string.Formatter().parse(value):
            if name is None:
                continue
            if name not in TEMPLATE_FIELDS:
                raise ValueError(
                    f"unknown template field {{{name}}}; known: {', '.join(sorted(TEMPLATE_FIELDS))}"
                )
            if spec or conv:
                raise ValueError(f"format specs are not supported in {{{name}}}")
            names.add(name)
    except ValueError as e:
        if "template field" in str(e) or "format specs" in str(e):
            raise
        raise ValueError(f"bad template {value!r}: {e}") from e
    return Template(value, frozenset(names))


@dataclass(frozen=True, slots=True)
class SetAction:
    target: str  # lower-case header name, or a dotted body path
    template: Template
    on_conflict: str = KEEP

    @property
    def needs_affinity(self) -> bool:
        return not self.template.fields.isdisjoint({"affinity_id", "affinity_source",
                                                    "family_key"})


@dataclass(frozen=True, slots=True)
class RemoveBlock:
    """`remove_blocks`: take the system-prompt text blocks that the catalog's named pattern
    (catalog/volatile.yaml) matches out of the request, whole; never on the hosts that read the
    block (`kept_on`, the pattern's `stripped_by`)."""

    name: str
    pattern: re.Pattern[str]
    kept_on: tuple[str, ...] = ()  # lower-case host globs

    def kept_at(self, host: str) -> bool:
        host = host.lower()
        return any(fnmatch.fnmatchcase(host, g) for g in self.kept_on)


def sample_hosts(globs: tuple[str, ...]) -> tuple[str, ...]:
    """A host name each glob matches (`*` as a region-like label: `*-aiplatform.googleapis.com`
    -> `us-east5-aiplatform.googleapis.com`), to test a rule's host glob against at load."""
    return tuple(g.replace("*", "us-east5").replace("?", "x") for g in globs)
