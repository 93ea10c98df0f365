"""Prompt-cache price multipliers and the cost of one response's prompt with and without caching.

The table lives in `catalog/prices.yaml` (first match wins, by host / model / API-shape globs), so a
new model or a price change is a data edit. Costs are in USD when the entry knows the model's base
input price, otherwise in "input-token equivalents": tokens weighted by their multiplier, which
still compares cached against uncached for the same model.
"""

import fnmatch
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import yaml

from affinity_addon.catalog import catalog_file

logger = logging.getLogger(__name__)

DEFAULT_PRICES = catalog_file("prices.yaml")

USD = "usd"
TOKEN_EQUIVALENTS = "input-token-equivalents"


@dataclass(frozen=True, slots=True)
class Price:
    """Multipliers of the base input price for one model."""

    name: str
    read: float
    write_5m: float
    write_1h: float
    input_usd_per_mtok: float | None = None

    @property
    def unit(self) -> str:
        return USD if self.input_usd_per_mtok is not None else TOKEN_EQUIVALENTS


@dataclass(frozen=True, slots=True)
class PriceRule:
    hosts: tuple[str, ...]  # empty: any host
    models: tuple[str, ...]
    providers: tuple[str, ...]
    price: Price

    def matches(self, model: str, provider: str, host: str) -> bool:
        return (_any_glob(self.hosts, host) and _any_glob(self.models, model)
                and _any_glob(self.providers, provider))


@dataclass(frozen=True, slots=True)
class CostEstimate:
    with_cache: float
    without_cache: float
    saved: float  # negative when writes cost more than the reads gave back (a cold, short chat)
    unit: str

    @classmethod
    def of(cls, with_cache: float, without_cache: float, unit: str) -> Self:
        return cls(with_cache, without_cache, without_cache - with_cache, unit)


# A price that changes nothing: what an unmatched request costs when even the table's own
# fallback entry is missing (a user table without `default`).
NEUTRAL = Price("neutral", read=1.0, write_5m=1.0, write_1h=1.0)


def _any_glob(globs: tuple[str, ...], value: str) -> bool:
    return not globs or any(fnmatch.fnmatchcase(value, g) for g in globs)


def _globs(entry: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = entry.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: `{key}` must be a glob or a list of globs")
    return tuple(v.lower() for v in value)


def _rate(entry: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: `{key}` must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: `{key}` must not be negative")
    return float(value)


def parse_rule(entry: Any, index: int = 0) -> PriceRule:
    """One table entry; raises ValueError naming the entry and the problem."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"price entry {index}: expected a mapping, got {type(entry).__name__}")
    name = entry.get("name", f"entry-{index}")
    where = f"price entry {index} ({name})"
    unknown = set(entry) - {"name", "host", "model", "provider", "read", "write", "write_5m",
                            "write_1h", "input_usd_per_mtok"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    if "read" not in entry:
        raise ValueError(f"{where}: `read` is required")
    write = _rate(entry, "write", where, 1.0) if "write" in entry else None
    if write is not None and ("write_5m" in entry or "write_1h" in entry):
        raise ValueError(f"{where}: give either `write` or `write_5m`/`write_1h`, not both")
    write_5m = write if write is not None else _rate(entry, "write_5m", where, 1.0)
    # An unlisted 1h rate is at least the 5m one: no provider makes the longer TTL cheaper.
    write_1h = write if write is not None else _rate(entry, "write_1h", where, write_5m)
    base = entry.get("input_usd_per_mtok")
    price = Price(
        name=str(name),
        read=_rate(entry, "read", where),
        write_5m=write_5m,
        write_1h=write_1h,
        input_usd_per_mtok=None if base is None else _rate(entry, "input_usd_per_mtok", where),
    )
    return PriceRule(_globs(entry, "host", where), _globs(entry, "model", where),
                     _globs(entry, "provider", where), price)


def parse_prices(data: Any) -> tuple[PriceRule, ...]:
    """A whole table: `{"prices": [entry, ...]}` (or the bare list)."""
    if isinstance(data, Mapping):
        data = data.get("prices")
    if not isinstance(data, Sequence) or isinstance(data, str):
        raise ValueError("price table: expected a `prices:` list")
    return tuple(parse_rule(e, i) for i, e in enumerate(data))


class PriceTable:
    """Ordered price rules with a lookup memo: a log has few distinct (model, host) pairs."""

    def __init__(self, rules: Sequence[PriceRule]) -> None:
        self.rules = tuple(rules)
        self._memo: dict[tuple[str, str, str], Price] = {}

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PRICES) -> Self:
        with open(path, encoding="utf-8") as f:
            return cls(parse_prices(yaml.safe_load(f)))

    def price_for(self, model: str | None, provider: str | None = None,
                  host: str | None = None) -> Price:
        key = ((model or "").lower(), (provider or "").lower(), (host or "").lower())
        price = self._memo.get(key)
        if price is None:
            price = next((r.price for r in self.rules if r.matches(*key)), NEUTRAL)
            self._memo[key] = price
        return price


@functools.cache
def default_table() -> PriceTable:
    return PriceTable.load(DEFAULT_PRICES)


def price_for(model: str | None, provider: str | None = None, host: str | None = None) -> Price:
    """The built-in table's price for a request (provider = API shape, host = request host)."""
    return default_table().price_for(model, provider, host)


def _tokens(value: Any) -> int:
    if type(value) is int:  # the common case, first: this runs for every line of a big log
        return value if 0 < value <= 10**15 else 0  # larger is junk (10**400 overflows floats)
    if isinstance(value, float) and 0 < value < 1e18:  # json.loads accepts Infinity and NaN
        return int(value)
    return 0


def prompt_counts(usage: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(input, read, write, write_1h) from a logged usage object, clamped so that
    read + write <= input and write_1h <= write; junk values count as 0."""
    total = _tokens(usage.get("input_tokens"))
    read = min(_tokens(usage.get("cache_read_tokens")), total)
    write = min(_tokens(usage.get("cache_write_tokens")), total - read)
    write_1h = min(_tokens(usage.get("cache_write_1h_tokens")), write)
    return total, read, write, write_1h


def weighted_prompt(total: int, read: int, write: int, write_1h: int, price: Price) -> float:
    """The prompt in input-token equivalents: each token times its multiplier."""
    # Providers that do not split writes by TTL write at their short/default TTL.
    return (total - read - write + read * price.read + (write - write_1h) * price.write_5m
            + write_1h * price.write_1h)
