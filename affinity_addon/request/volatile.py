"""Prompt parts agents rebuild every turn or on resume, as data (catalog/volatile.yaml).

The planner keeps the rolling marker off such blocks, and the conversation root leaves them
out (blocks) or masks them (dates), so neither depends on text that moves between requests.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import yaml

from affinity_addon.catalog import catalog_file

VOLATILE_FILE = catalog_file("volatile.yaml")


HEAD = 4096  # block patterns look at the start of a block: bounded regex cost per block


@dataclass(frozen=True, slots=True)
class Volatile:
    blocks: tuple[re.Pattern[str], ...] = ()
    root_masks: tuple[re.Pattern[str], ...] = ()
    _any: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One alternation, one scan per block (the planner checks every message block).
        if self.blocks:
            joined = "|".join(f"(?:{p.pattern})" for p in self.blocks)
            object.__setattr__(self, "_any", re.compile(joined))

    def block(self, text: str) -> bool:
        """Does a block starting with `text` match a volatile pattern (first HEAD chars)?"""
        return bool(text) and self._any is not None and self._any.search(text, 0, HEAD) is not None


def compile_patterns(raw: Any, what: str) -> tuple[re.Pattern[str], ...]:
    """A list of regexes; raises ValueError naming the bad one."""
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise ValueError(f"{what} must be a list of regexes")
    out = []
    for p in raw:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what}: invalid regex {p!r}: {e}") from None
    return tuple(out)


def parse_volatile(data: Any) -> Volatile:
    if not isinstance(data, dict) or set(data) - {"blocks", "root_masks"}:
        raise ValueError("volatile: expected a mapping with 'blocks' and 'root_masks'")
    return Volatile(compile_patterns(data.get("blocks", []), "blocks"),
                    compile_patterns(data.get("root_masks", []), "root_masks"))


@cache
def default_volatile() -> Volatile:
    return parse_volatile(yaml.safe_load(VOLATILE_FILE.read_text(encoding="utf-8")))


def mask(text: str, patterns: Iterable[re.Pattern[str]]) -> str:
    for p in patterns:
        text = p.sub("", text)
    return text
