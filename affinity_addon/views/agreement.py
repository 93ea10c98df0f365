"""How often the provider's own cache diagnosis agreed with ours (`provider_diagnosis` in the
records, docs/log-format.md), counted by (provider's answer, our verdict) pair. Disagreements come
first: each is a blind spot of our diagnosis or a provider surprise worth a look.

Records before `provider_diagnosis` carried the Anthropic beta's `provider_miss_reason`; such a
line counts as an Anthropic answer that was not weighed (agrees null).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from affinity_addon.views.safe import MAX_KEYS, OTHER_KEY, label

MAX_EXAMPLES = 3


class PairExample(NamedTuple):
    """A disagreement to look at: ids and our detail, never prompt text."""

    ts: str | None
    flow_id: str | None
    affinity_id: str | None
    model: str | None
    compared_to: str | None
    missed_tokens: int | None
    miss_detail: str | None


@dataclass(slots=True)
class Pair:
    source: str
    provider: str  # the provider's result
    ours: str  # our verdict (miss_reason)
    agrees: bool | None
    requests: int = 0
    examples: list[PairExample] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "provider": self.provider, "ours": self.ours,
                "agrees": self.agrees, "requests": self.requests,
                "examples": [e._asdict() for e in self.examples]}


def said(record: Mapping[str, Any]) -> tuple[str, str, bool | None, Mapping[str, Any]] | None:
    """(source, result, agrees, the diagnosis object) of a record whose provider answered a
    comparison; None when it did not (or the line has nothing readable)."""
    pd = record.get("provider_diagnosis")
    if isinstance(pd, Mapping):
        result = label(pd.get("result"), 64)
        if result is None:
            return None
        agrees = pd.get("agrees")
        return (label(pd.get("source"), 32) or "?", result,
                agrees if type(agrees) is bool else None, pd)
    old = label(record.get("provider_miss_reason"), 64)  # logs written before the field
    return ("anthropic", old, None, {}) if old is not None else None


@dataclass(slots=True)
class Agreement:
    compared: int = 0  # records with a provider result
    agree: int = 0
    disagree: int = 0
    pairs: dict[tuple[str, str, str, bool | None], Pair] = field(default_factory=dict)

    @property
    def unjudged(self) -> int:
        return self.compared - self.agree - self.disagree

    def add(self, record: Mapping[str, Any]) -> None:
        got = said(record)
        if got is None:
            return
        source, result, agrees, pd = got
        self.compared += 1
        if agrees is True:
            self.agree += 1
        elif agrees is False:
            self.disagree += 1
        ours = label(record.get("miss_reason"), 64) or "(none)"
        key = (source, result, ours, agrees)
        pair = self.pairs.get(key)
        if pair is None:
            if len(self.pairs) >= MAX_KEYS:  # provider- and log-chosen strings: bounded
                key = (OTHER_KEY, OTHER_KEY, OTHER_KEY, agrees)
                pair = self.pairs.get(key)
            if pair is None:
                pair = self.pairs[key] = Pair(*key)
        pair.requests += 1
        if agrees is False and len(pair.examples) < MAX_EXAMPLES:
            missed = pd.get("missed_tokens")
            pair.examples.append(PairExample(
                label(record.get("ts"), 64), label(record.get("flow_id"), 64),
                label(record.get("affinity_id"), 80), label(record.get("model")),
                label(pd.get("compared_to"), 128),
                missed if type(missed) is int else None, label(record.get("miss_detail"), 400)))

    def rows(self) -> list[Pair]:
        """Disagreements first, then the pairs not weighed, then agreements; most requests
        first within each."""
        order = {False: 0, None: 1, True: 2}
        return sorted(self.pairs.values(),
                      key=lambda p: (order[p.agrees], -p.requests, p.source, p.provider, p.ours))

    def summary(self) -> str:
        return (f"{self.compared} request(s) the provider diagnosed itself: {self.agree} agree "
                f"with our verdict, {self.disagree} disagree, {self.unjudged} not weighed "
                "(nothing compared, pending, not found, unavailable, or a different previous "
                "request)")

    def to_dict(self) -> dict[str, Any]:
        return {"compared": self.compared, "agree": self.agree, "disagree": self.disagree,
                "unjudged": self.unjudged, "pairs": [p.to_dict() for p in self.rows()]}
