"""`prices.yaml`: which genai-prices provider a host bills as, local overrides where the table
lacks a model or a route bills differently, and token-equivalent multipliers for models nobody
prices. Parsed here, used by `prices.PriceBook`."""

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from affinity_addon.catalog.yamlsource import line_of

MTOK = 1_000_000


# One kind's price in $/token: ((from_prompt_tokens, price), ...), first entry from -1; a later
# entry applies when the whole prompt is *above* its start (genai-prices' threshold rule).
Tiers = tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class Rates:
    """$/token of each kind for one model on one route, as resolved once per (route, model)."""

    name: str  # what priced it: `anthropic/claude-sonnet-4-5` or `override dashscope -> ...`
    input: Tiers
    cache_read: Tiers
    cache_write_5m: Tiers
    cache_write_1h: Tiers
    output: Tiers

    @property
    def flat(self) -> tuple[float, float, float, float, float] | None:
        """The five prices when none has tiers (the common case), else None."""
        kinds = (self.input, self.cache_read, self.cache_write_5m, self.cache_write_1h,
                 self.output)
        if any(len(k) > 1 for k in kinds):
            return None
        return (kinds[0][0][1], kinds[1][0][1], kinds[2][0][1], kinds[3][0][1], kinds[4][0][1])

    def at(self, prompt: int) -> tuple[float, float, float, float, float]:
        """(input, read, write_5m, write_1h, output) $/token for a prompt of `prompt` tokens."""
        return (_tier(self.input, prompt), _tier(self.cache_read, prompt),
                _tier(self.cache_write_5m, prompt), _tier(self.cache_write_1h, prompt),
                _tier(self.output, prompt))


def _tier(tiers: Tiers, prompt: int) -> float:
    price = tiers[0][1]
    for start, p in tiers[1:]:
        if prompt > start:
            price = p
    return price


def _globs(entry: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = entry.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: `{key}` must be a glob or a list of globs")
    return tuple(v.lower() for v in value)


def any_glob(globs: tuple[str, ...], value: str) -> bool:
    return not globs or any(fnmatch.fnmatchcase(value, g) for g in globs)


def _number(entry: Mapping[str, Any], key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: `{key}` must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: `{key}` must not be negative")
    return float(value)


def _multipliers(entry: Mapping[str, Any], where: str) -> dict[str, float]:
    """`read`, `write` | `write_5m`/`write_1h` given in an entry, as {kind: multiplier}."""
    if "write" in entry and ("write_5m" in entry or "write_1h" in entry):
        raise ValueError(f"{where}: give either `write` or `write_5m`/`write_1h`, not both")
    out: dict[str, float] = {}
    for key, kinds in (("read", ("cache_read",)), ("write", ("cache_write_5m", "cache_write_1h")),
                       ("write_5m", ("cache_write_5m",)), ("write_1h", ("cache_write_1h",))):
        value = _number(entry, key, where)
        if value is not None:
            out.update(dict.fromkeys(kinds, value))
    return out


@dataclass(frozen=True, slots=True)
class Match:
    """Host / model / API globs (empty: any)."""

    hosts: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    apis: tuple[str, ...] = ()

    @classmethod
    def of(cls, entry: Mapping[str, Any], where: str) -> Self:
        return cls(_globs(entry, "host", where), _globs(entry, "model", where),
                   _globs(entry, "api", where))

    def matches(self, host: str, api: str, model: str) -> bool:
        return (any_glob(self.hosts, host) and any_glob(self.models, model)
                and any_glob(self.apis, api))


@dataclass(frozen=True, slots=True)
class Override:
    name: str
    match: Match
    source: str
    price_as_provider: str | None = None
    price_as_model: str | None = None  # may hold `{model}`
    input: float | None = None  # $/MTok
    output: float | None = None
    multipliers: Mapping[str, float] | None = None  # kind -> multiple of the input price

    def transform(self, rates: Rates) -> Rates:
        """The table's rates with this entry's output price and cache multipliers."""
        changes: dict[str, Any] = {"name": f"{rates.name} ({self.name})"}
        if self.output is not None:
            changes["output"] = ((-1, self.output / MTOK),)
        for kind, m in (self.multipliers or {}).items():
            changes[kind] = tuple((start, p * m) for start, p in rates.input)
        return dataclasses.replace(rates, **changes)

    def own_rates(self) -> Rates | None:
        """This entry's prices alone, when it gives an input price."""
        if self.input is None:
            return None
        base = ((-1, self.input / MTOK),)
        rates = Rates(self.name, base, base, base, base, ((-1, (self.output or 0.0) / MTOK),))
        return dataclasses.replace(self.transform(rates), name=f"override {self.name}")


@dataclass(frozen=True, slots=True)
class Equivalents:
    """Cache multipliers for token-equivalent costs of models nobody prices."""

    name: str
    match: Match
    read: float
    write_5m: float
    write_1h: float


def _where(section: str, index: int, name: str | None, entry: Any) -> str:
    """`override 3 (dashscope, line 72)`: the line when the entry came from a file."""
    line = line_of(entry)
    notes = [n for n in (name, f"line {line}" if line else None) if n]
    return f"{section} {index}" + (f" ({', '.join(notes)})" if notes else "")


def parse_override(entry: Any, index: int = 0) -> Override:
    """One `overrides:` entry; raises ValueError naming the entry and the problem."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"override {index}: expected a mapping, got {type(entry).__name__}")
    name = str(entry.get("name", f"override-{index}"))
    where = _where("override", index, name, entry)
    unknown = set(entry) - {"name", "host", "model", "api", "price_as", "input_usd_per_mtok",
                            "output_usd_per_mtok", "read", "write", "write_5m", "write_1h",
                            "source"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    source = entry.get("source")
    if not isinstance(source, str) or not source.startswith("https://"):
        raise ValueError(f"{where}: `source` must be the public https:// URL of the price")
    price_as = entry.get("price_as")
    pa_provider = pa_model = None
    if price_as is not None:
        if not isinstance(price_as, Mapping) or not set(price_as) <= {"provider", "model"}\
                or not price_as or not all(isinstance(v, str) and v for v in price_as.values()):
            raise ValueError(f"{where}: `price_as` must be {{provider: ID, model: NAME}}")
        pa_provider, pa_model = price_as.get("provider"), price_as.get("model")
    inp = _number(entry, "input_usd_per_mtok", where)
    if inp is not None and price_as is not None:
        raise ValueError(f"{where}: give either `price_as` or `input_usd_per_mtok`, not both")
    multipliers = _multipliers(entry, where)
    output = _number(entry, "output_usd_per_mtok", where)
    if price_as is None and inp is None and not multipliers and output is None:
        raise ValueError(f"{where}: changes nothing (give `price_as`, prices or multipliers)")
    return Override(name, Match.of(entry, where), source, pa_provider, pa_model, inp, output,
                    multipliers or None)


def parse_equivalents(entry: Any, index: int = 0) -> Equivalents:
    if not isinstance(entry, Mapping):
        raise ValueError(f"token_equivalents {index}: expected a mapping")
    name = str(entry.get("name", f"equivalents-{index}"))
    where = _where("token_equivalents", index, name, entry)
    unknown = set(entry) - {"name", "host", "model", "api", "read", "write", "write_5m",
                            "write_1h", "source"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    m = _multipliers(entry, where)
    if "cache_read" not in m:
        raise ValueError(f"{where}: `read` is required")
    w5 = m.get("cache_write_5m", 1.0)
    # An unlisted 1h rate is at least the 5m one: no provider makes the longer TTL cheaper.
    return Equivalents(name, Match.of(entry, where), m["cache_read"], w5,
                       m.get("cache_write_1h", w5))


def parse_routes(data: Any) -> tuple[tuple[tuple[str, ...], str], ...]:
    if data is None:
        return ()
    if not isinstance(data, Sequence) or isinstance(data, str):
        raise ValueError("prices: `providers` must be a list of {host, id}")
    routes = []
    for i, entry in enumerate(data):
        where = _where("providers", i, None, entry)
        if not isinstance(entry, Mapping) or set(entry) != {"host", "id"}\
                or not isinstance(entry["id"], str) or not entry["id"]:
            raise ValueError(f"{where}: expected {{host: GLOB(S), id: GENAI_PRICES_ID}}")
        routes.append((_globs(entry, "host", where), entry["id"]))
    return tuple(routes)


def table_list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise ValueError(f"prices: `{key}` must be a list")
    return value
