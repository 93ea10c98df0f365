"""`volatile.yaml`: prompt parts agents rebuild every turn or on resume, as named patterns.

The planner keeps the rolling marker off such blocks, the conversation root leaves them out
(blocks) or masks them (dates), and the miss diagnosis ignores a block where the provider leaves
it out of the cached prefix (`uncached_in`, on the hosts of `stripped_by`), so none of them
depends on text that moves between requests. A rule's `remove_blocks` names a block here to take
it out of the request (never on a `stripped_by` host, which reads it).
"""

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.yamlsource import TableError, load_table

VOLATILE_FILE = catalog_file("volatile.yaml")

HEAD = 4096  # block patterns look at the start of a block: bounded regex cost per block
SECTIONS = ("system", "tools", "messages")


@dataclass(frozen=True, slots=True)
class VolatileBlock:
    name: str
    pattern: re.Pattern[str]
    uncached_in: tuple[str, ...] = ()
    # Host globs whose API reads the block and takes it out of the prompt before caching;
    # empty: `uncached_in` holds on every host.
    stripped_by: tuple[str, ...] = ()

    def stripped_on(self, host: str) -> bool:
        """Does `host` take this block out of the prompt before caching?"""
        host = host.lower()
        return any(fnmatch.fnmatchcase(host, g) for g in self.stripped_by)

    def uncached_on(self, host: str | None) -> bool:
        """Is the block left out of the cached prefix on `host` (None: any host that does)?"""
        return host is None or not self.stripped_by or self.stripped_on(host)


@dataclass(frozen=True, slots=True)
class Volatile:
    named: tuple[VolatileBlock, ...] = ()
    root_masks: tuple[re.Pattern[str], ...] = ()
    _any: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One alternation, one scan per block (the planner checks every message block).
        if self.named:
            joined = "|".join(f"(?:{b.pattern.pattern})" for b in self.named)
            object.__setattr__(self, "_any", re.compile(joined))

    @property
    def blocks(self) -> tuple[re.Pattern[str], ...]:
        return tuple(b.pattern for b in self.named)

    def block(self, text: str) -> bool:
        """Does a block starting with `text` match a volatile pattern (first HEAD chars)?"""
        return bool(text) and self._any is not None and self._any.search(text, 0, HEAD) is not None

    def named_block(self, name: str) -> VolatileBlock:
        """The entry called `name`; KeyError when the table has none."""
        for b in self.named:
            if b.name == name:
                return b
        raise KeyError(name)

    def pattern(self, name: str) -> re.Pattern[str]:
        """The pattern called `name`; KeyError when the table has none."""
        return self.named_block(name).pattern

    def uncached(self, host: str | None = None) -> dict[str, tuple[str, ...]]:
        """{section: regexes of blocks the provider at `host` leaves out of the cached prefix
        there}; without a host, every block that some provider leaves out."""
        out: dict[str, tuple[str, ...]] = {}
        for b in self.named:
            if not b.uncached_on(host):
                continue
            for section in b.uncached_in:
                out[section] = (*out.get(section, ()), b.pattern.pattern)
        return out


def compile_patterns(raw: Any, what: str) -> tuple[re.Pattern[str], ...]:
    """A list of regexes; raises ValueError naming the bad one."""
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise TableError(f"{what} must be a list of regexes", raw)
    out = []
    for i, p in enumerate(raw):
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise TableError(f"{what}: invalid regex {p!r}: {e}", raw, i) from None
    return tuple(out)


_BLOCK_KEYS = frozenset({"name", "pattern", "uncached_in", "stripped_by"})


def _block(raw: Any, i: int, items: Any) -> VolatileBlock:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not isinstance(
            raw.get("pattern"), str) or set(raw) - _BLOCK_KEYS:
        raise TableError(f"blocks[{i}] must be a mapping with a name, a pattern and optionally "
                         "uncached_in and stripped_by", items, i)
    try:
        pattern = re.compile(raw["pattern"])
    except re.error as e:
        raise TableError(f"blocks[{i}]: invalid regex {raw['pattern']!r}: {e}", raw,
                         "pattern") from None
    sections = raw.get("uncached_in") or []
    if not isinstance(sections, list) or not set(sections) <= set(SECTIONS):
        raise TableError(f"blocks[{i}].uncached_in must list sections of {SECTIONS}", raw,
                         "uncached_in")
    hosts = raw.get("stripped_by") or []
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise TableError(f"blocks[{i}].stripped_by must be a list of host globs", raw,
                         "stripped_by")
    return VolatileBlock(raw["name"], pattern, tuple(sections),
                         tuple(h.lower() for h in hosts))


def parse_volatile(data: Any) -> Volatile:
    if not isinstance(data, Mapping) or set(data) - {"blocks", "root_masks"}:
        raise TableError("volatile: expected a mapping with 'blocks' and 'root_masks'")
    items = data.get("blocks", [])
    if not isinstance(items, list):
        raise TableError("blocks must be a list", data, "blocks")
    named = tuple(_block(b, i, items) for i, b in enumerate(items))
    if len({b.name for b in named}) != len(named):
        raise TableError("block names must be unique", data, "blocks")
    return Volatile(named, compile_patterns(data.get("root_masks", []), "root_masks"))


@cache
def default_volatile() -> Volatile:
    return load_table(VOLATILE_FILE, parse_volatile)


def mask(text: str, patterns: Iterable[re.Pattern[str]]) -> str:
    for p in patterns:
        text = p.sub("", text)
    return text
