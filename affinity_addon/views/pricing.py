"""What the views price with: dollars from `catalog/prices.py`, and cache multipliers.

Dollars (`PriceTable.priced`) come from the genai-prices table with the host map and overrides of
`catalog/prices.yaml`. The multipliers (`Price`: a cache read or write as a multiple of the input
price) are what the TTL advisor replays with and what token-equivalent costs weigh by: for a
priced model they are its own prices divided by its input price; for a model nobody prices, the
file's `token_equivalents` (e.g. an Anthropic-shaped request is cached the Anthropic way), else
1x (no saving claimed).
"""

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from affinity_addon.catalog.prices import MAX_MEMO, PRICES_FILE, PriceBook, Priced, default_book

USD = "usd"
TOKEN_EQUIVALENTS = "input-token-equivalents"
DEFAULT_PRICES = PRICES_FILE


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
class CostEstimate:
    with_cache: float
    without_cache: float
    saved: float  # negative when writes cost more than the reads gave back (a cold, short chat)
    unit: str

    @classmethod
    def of(cls, with_cache: float, without_cache: float, unit: str) -> Self:
        return cls(with_cache, without_cache, without_cache - with_cache, unit)


# What a model nobody prices and no `token_equivalents` entry covers is weighed with: no saving
# is claimed for it.
NEUTRAL = Price("neutral", read=1.0, write_5m=1.0, write_1h=1.0)


def multipliers(priced: Priced) -> Price:
    """A priced model's cache prices as multiples of its input price (at the base tier)."""
    i, r, w5, w1, _ = priced.at(0)
    if i <= 0:  # a free model: nothing to save
        return Price(priced.rates.name, 1.0, 1.0, 1.0, 0.0)
    return Price(priced.rates.name, r / i, w5 / i, w1 / i, i * 1_000_000)


class PriceTable:
    """A `PriceBook` seen by the views, with a memo per raw (model, API, host)."""

    def __init__(self, book: PriceBook | None = None) -> None:
        self.book = book or default_book()
        self._memo: dict[tuple[str | None, str | None, str | None], Price] = {}

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PRICES) -> Self:
        return cls(PriceBook.load(path))

    @property
    def version(self) -> str:
        return self.book.version

    def priced(self, model: str | None, api: str | None = None, host: str | None = None,
               when: float | str | datetime | None = None) -> Priced | None:
        """Dollar prices of a request at `when` (epoch seconds or ISO text; default now)."""
        return self.book.priced(host, api, model, when)

    def price_for(self, model: str | None, api: str | None = None,
                  host: str | None = None) -> Price:
        key = (model, api, host)
        price = self._memo.get(key)
        if price is None:
            if len(self._memo) >= MAX_MEMO:
                self._memo.clear()
            priced = self.book.priced(host, api, model)
            if priced is not None:
                price = multipliers(priced)
            else:
                eq = self.book.equivalents_for(host, api, model)
                price = NEUTRAL if eq is None else Price(eq.name, eq.read, eq.write_5m,
                                                         eq.write_1h)
            self._memo[key] = price
        return price


@functools.cache
def default_table() -> PriceTable:
    return PriceTable()


def price_for(model: str | None, api: str | None = None, host: str | None = None) -> Price:
    """The built-in table's multipliers for a request (its API and host)."""
    return default_table().price_for(model, api, host)


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
