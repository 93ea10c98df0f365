"""Dollar cost of one response: the genai-prices table, the host map and overrides of `prices.yaml`.

The table is the `genai-prices` package (https://github.com/pydantic/genai-prices): list prices
per provider and model, with price changes over time, time-of-day prices and long-context tiers.
It is imported lazily, the first time a model is priced, because importing it costs ~100 ms and
~18 MB (it imports pydantic and an HTTP client; its table is 1.6 MB of Python). Its
`calc_price` costs ~65 µs a call (Decimal arithmetic over a unit registry), so a (provider,
model) pair is looked up once and its prices kept as plain floats; a record then costs a few
multiplications (`Rates.cost`, ~1 µs). The package's network updater (`UpdatePrices`) is never
started: prices change with the installed package, which the report names.

Each token is priced like genai-prices does it: by the most specific price the model has
(a 1h cache write at the 1h price, else the cache-write price, else the input price), all kinds
at the tier the whole prompt falls in (`TieredPrices`: e.g. Sonnet 4.5 above 200k prompt tokens).
"""

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Self

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.price_table import (
    MTOK,
    Equivalents,
    Override,
    Rates,
    Tiers,
    any_glob,
    parse_equivalents,
    parse_override,
    parse_routes,
    table_list,
)
from affinity_addon.catalog.yamlsource import load_yaml

logger = logging.getLogger(__name__)

PRICES_FILE = catalog_file("prices.yaml")
PACKAGE = "genai-prices"
# Client-chosen model strings: at most this many (host, API, model) lookups are remembered.
MAX_MEMO = 2048

# The cost breakdown, in the order of the record's `cost_usd` object.
KINDS = ("input", "cache_write_5m", "cache_write_1h", "cache_read", "output")


def table_version() -> str:
    """`genai-prices 0.2.5`, read from the installed package's metadata (no import)."""
    try:
        return f"{PACKAGE} {metadata.version(PACKAGE)}"
    except metadata.PackageNotFoundError:
        return f"{PACKAGE} (not installed)"


class Cost(NamedTuple):
    """Dollars of one response, by kind of token; `without_cache`: every prompt token at the
    input price, plus the same output."""

    input: float  # prompt tokens neither read from nor written to the cache
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    output: float
    without_cache: float

    @property
    def with_cache(self) -> float:
        return self.input + self.cache_write_5m + self.cache_write_1h + self.cache_read + self.output

    def to_dict(self, priced_as: str | None = None) -> dict[str, Any]:
        """The record's `cost_usd` object; nanodollars are plenty (a token costs ~1e-7 $).
        Spelled out: a comprehension over KINDS took 4 µs a record, this 1.5."""
        i, w5, w1, r, o, without = self
        d: dict[str, Any] = {"input": round(i, 9), "cache_write_5m": round(w5, 9),
                             "cache_write_1h": round(w1, 9), "cache_read": round(r, 9),
                             "output": round(o, 9), "with_cache": round(i + w5 + w1 + r + o, 9),
                             "without_cache": round(without, 9)}
        if priced_as is not None:
            d["priced_as"] = priced_as
        return d


class Priced:
    """Rates ready for the hot path: the five prices of each prompt-size tier, precomputed."""

    __slots__ = ("flat", "rates", "segments")

    def __init__(self, rates: Rates) -> None:
        self.rates = rates
        self.flat = rates.flat
        starts = sorted({start for kind in (rates.input, rates.cache_read, rates.cache_write_5m,
                                            rates.cache_write_1h, rates.output)
                         for start, _ in kind[1:]})
        # Prices change only where a tier starts: (start, the five prices above it), descending.
        self.segments = tuple((start, rates.at(start + 1)) for start in reversed(starts))

    def at(self, prompt: int) -> tuple[float, float, float, float, float]:
        if self.flat is not None:
            return self.flat
        for start, prices in self.segments:
            if prompt > start:
                return prices
        return self.rates.at(0)

    def cost(self, total: int, read: int, write: int, write_1h: int, output: int) -> Cost:
        """Counts as prompt_counts() clamps them: read + write <= total, write_1h <= write."""
        i, r, w5, w1, o = self.flat if self.flat is not None else self.at(total)
        out = output * o
        return Cost((total - read - write) * i, (write - write_1h) * w5, write_1h * w1,
                    read * r, out, total * i + out)

    def input_price(self, total: int = 0) -> float:
        """$/token of an uncached prompt token, at the tier of a `total`-token prompt."""
        return self.at(total)[0]


# --- the table (genai-prices), imported on first use -------------------------------------


@functools.cache
def _snapshot() -> Any:
    # Imported here, not at module level: the proxy pays the import (~100 ms, ~18 MB) only once
    # it prices a response, and `affinity --help` never does.
    from genai_prices import data_snapshot

    return data_snapshot.get_snapshot()


def warm_up() -> None:
    """Import the table now (at proxy start), not on the first priced response: the import holds
    the event loop ~100-200 ms, which the first answer's record would otherwise wait behind."""
    try:
        _snapshot()
    except Exception:  # an unusable table: records are unpriced, said when they are priced
        logger.debug("affinity: price table not loaded", exc_info=True)


def _decimal_tiers(price: Any) -> Tiers | None:
    """A genai-prices price (Decimal $/MTok or TieredPrices) as $/token tiers."""
    if price is None:
        return None
    base = getattr(price, "base", None)
    if base is None:
        return ((-1, float(price) / MTOK),)
    return ((-1, float(base) / MTOK),
            *((int(t.start), float(t.price) / MTOK) for t in sorted(price.tiers,
                                                                  key=lambda t: t.start)))


def rates_from_model_price(name: str, mp: Any) -> Rates | None:
    """Our five kinds from a genai-prices `ModelPrice`; None without an input price."""
    get = functools.partial(getattr, mp)
    inp = _decimal_tiers(get("input_mtok", None))
    if inp is None:
        return None
    write = _decimal_tiers(get("cache_write_mtok", None))
    return Rates(
        name=name,
        input=inp,
        cache_read=_decimal_tiers(get("cache_read_mtok", None)) or inp,
        cache_write_5m=_decimal_tiers(get("cache_write_5m_mtok", None)) or write or inp,
        cache_write_1h=_decimal_tiers(get("cache_write_1h_mtok", None)) or write or inp,
        output=_decimal_tiers(get("output_mtok", None)) or ((-1, 0.0),),
    )


def _when(when: float | str | datetime | None) -> datetime:
    if isinstance(when, datetime):
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    if isinstance(when, int | float) and math.isfinite(when):
        return datetime.fromtimestamp(when, UTC)
    if isinstance(when, str):
        try:
            parsed = datetime.fromisoformat(when)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime.now(UTC)


class _Entry:
    """One (route, model)'s prices: fixed, or a genai-prices model whose price depends on the
    request time (price changes, DeepSeek's peak hours), resolved per distinct price."""

    __slots__ = ("fixed", "info", "last", "memo", "name", "transform")

    def __init__(self, name: str, fixed: Priced | None = None, info: Any = None,
                 transform: Callable[[Rates], Rates] | None = None) -> None:
        self.name, self.fixed, self.info, self.transform = name, fixed, info, transform
        self.memo: dict[int, Priced | None] = {}
        self.last: tuple[Any, Priced | None] = (None, None)

    def at(self, when: float | str | datetime | None) -> Priced | None:
        if self.fixed is not None:
            return self.fixed
        # Prices change on the minute (16:30 UTC, a start date): one answer per minute, so a
        # log's run of records in one minute costs a comparison, not a genai-prices lookup (9 µs).
        minute = (when[:16] if isinstance(when, str) else int(when // 60)
                  if isinstance(when, int | float) and math.isfinite(when) else None)
        if minute is not None and self.last[0] == minute:
            return self.last[1]
        priced = self._resolve(when)
        if minute is not None:
            self.last = (minute, priced)
        return priced

    def _resolve(self, when: float | str | datetime | None) -> Priced | None:
        mp = self.info.get_prices(_when(when))
        key = id(mp)  # the model's ModelPrice objects live as long as the table
        if key not in self.memo:
            rates = rates_from_model_price(self.name, mp)
            if rates is not None and self.transform is not None:
                rates = self.transform(rates)
            self.memo[key] = None if rates is None else Priced(rates)
        return self.memo[key]


def _library_entry(provider_id: str | None, model: str, host: str,
                   transform: Callable[[Rates], Rates] | None = None,
                   name_prefix: str = "") -> _Entry | None:
    """The genai-prices model for (provider id, model); unknown id: by URL, then by name."""
    snap = _snapshot()
    attempts: list[tuple[str | None, str | None]] = (
        [(provider_id, None)] if provider_id else [(None, f"https://{host}"), (None, None)])
    for pid, url in attempts:
        try:
            provider, info = snap.find_provider_model(model, None, pid, url)
        except (LookupError, ValueError):
            continue
        name = f"{name_prefix}{provider.id}/{info.id}"
        if not isinstance(info.prices, list):  # one price for all time
            rates = rates_from_model_price(name, info.prices)
            if rates is not None and transform is not None:
                rates = transform(rates)
            return _Entry(name, fixed=Priced(rates)) if rates is not None else None
        return _Entry(name, info=info, transform=transform)
    return None


class UsageLike(Protocol):
    """record.schema.Usage, which this layer does not import (catalog sits below record)."""

    @property
    def input_tokens(self) -> int: ...
    @property
    def cache_read_tokens(self) -> int: ...
    @property
    def cache_write_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cache_write_1h_tokens(self) -> int | None: ...


class PriceBook:
    """Prices a (host, API, model): an override, else the table under the host's provider
    id; remembers every answer (a log has few distinct models)."""

    def __init__(self, routes: Sequence[tuple[tuple[str, ...], str]] = (),
                 overrides: Sequence[Override] = (), equivalents: Sequence[Equivalents] = (),
                 *, source: str = "built-in") -> None:
        self.routes = tuple(routes)
        self.overrides = tuple(overrides)
        self.equivalents = tuple(equivalents)
        self.source = source
        self._memo: dict[tuple[str, str, str], _Entry | None] = {}
        self._failed = False

    @classmethod
    def parse(cls, data: Any, source: str = "built-in") -> Self:
        if not isinstance(data, Mapping):
            raise ValueError("prices: expected a mapping with `providers`, `overrides`, "
                             "`token_equivalents`")
        unknown = set(data) - {"providers", "overrides", "token_equivalents"}
        if unknown:
            raise ValueError(f"prices: unknown keys {sorted(unknown)}")
        return cls(parse_routes(data.get("providers")),
                   [parse_override(e, i) for i, e in enumerate(table_list(data, "overrides"))],
                   [parse_equivalents(e, i) for i, e in
                    enumerate(table_list(data, "token_equivalents"))], source=source)

    @classmethod
    def load(cls, path: str | Path = PRICES_FILE) -> Self:
        path = Path(path)
        return cls.parse(load_yaml(path), "built-in" if path == PRICES_FILE else str(path))

    @property
    def version(self) -> str:
        """What prices the costs: the table's version, and a user's file if one is used."""
        v = table_version()
        return v if self.source == "built-in" else f"{v} with {self.source}"

    def provider_id(self, host: str) -> str | None:
        host = host.lower()
        return next((pid for globs, pid in self.routes if any_glob(globs, host)), None)

    def _resolve(self, host: str, api: str, model: str) -> _Entry | None:
        lhost, lapi, lmodel = host.lower(), api.lower(), model.lower()
        pid = self.provider_id(lhost)
        for o in self.overrides:
            if not o.match.matches(lhost, lapi, lmodel):
                continue
            own = o.own_rates()
            if own is not None:
                return _Entry(own.name, fixed=Priced(own))
            ref = (o.price_as_model or model).replace("{model}", model)
            return _library_entry(o.price_as_provider or pid, ref, lhost, o.transform)
        return _library_entry(pid, model, lhost)

    def entry(self, host: str | None, api: str | None, model: str | None) -> _Entry | None:
        if not model:
            return None
        key = (host or "", api or "", model)
        try:
            return self._memo[key]
        except KeyError:
            pass
        if len(self._memo) >= MAX_MEMO:
            self._memo.clear()
        try:
            found = self._resolve(*key)
        except ImportError:
            if not self._failed:
                logger.warning("affinity: the %s package is not installed: costs are not priced "
                               "in dollars", PACKAGE)
                self._failed = True
            found = None
        self._memo[key] = found
        return found

    def priced(self, host: str | None, api: str | None, model: str | None,
               when: float | str | datetime | None = None) -> Priced | None:
        """The prices of one request (at `when`: epoch seconds, ISO text; default now)."""
        entry = self.entry(host, api, model)
        return None if entry is None else entry.at(when)

    def equivalents_for(self, host: str | None, api: str | None,
                        model: str | None) -> Equivalents | None:
        key = ((host or "").lower(), (api or "").lower(), (model or "").lower())
        return next((e for e in self.equivalents if e.match.matches(*key)), None)


@functools.cache
def default_book() -> PriceBook:
    return PriceBook.load(PRICES_FILE)


def record_cost(host: str | None, api: str | None, model: str | None,
                usage: UsageLike | None, when: float | None = None) -> dict[str, Any] | None:
    """The record's `cost_usd` object, or None when nobody prices the model (or no usage).

    Never raises: a price lookup must not cost a record."""
    if usage is None:
        return None
    try:
        priced = default_book().priced(host, api, model, when)
        if priced is None:
            return None
        total = max(usage.input_tokens, 0)
        read = min(max(usage.cache_read_tokens, 0), total)
        write = min(max(usage.cache_write_tokens, 0), total - read)
        write_1h = min(max(usage.cache_write_1h_tokens or 0, 0), write)
        return priced.cost(total, read, write, write_1h, max(usage.output_tokens, 0)).to_dict(
            priced.rates.name)
    except Exception:
        logger.warning("affinity: could not price %r on %r", model, host, exc_info=True)
        return None
