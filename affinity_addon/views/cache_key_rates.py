"""Request rate per OpenAI `prompt_cache_key` and per prompt family: does a key overflow?

OpenAI routes a request by a hash of the prompt's first ~256 tokens combined with
`prompt_cache_key`; a prefix+key pair above ~15 requests a minute overflows to other machines,
which have not cached the prefix (https://developers.openai.com/api/docs/guides/prompt-caching).
So the number to watch is each key's busiest minute. A `{family_key}` key is
`fam-<family>-<bucket>`: the family's busiest minute over TARGET_RPM is the bucket count it calls
for (the same rule as `request/family_key.py`).

Only hosts with a documented per-key limit count (catalog/providers.yaml `key_rpm_limits`:
api.openai.com; xAI and Mistral route a key per conversation, without one). Only keys the rules
added are in the log (`added.fields.prompt_cache_key`); a key the client
sent itself is not recorded, so its traffic is not counted here. Memory is bounded: a few
integers per key, at most `max_tracked` keys and families. When the table is full, keys idle for
over a minute whose busiest minute stayed under TARGET_RPM are forgotten (at most once a minute:
per-conversation keys come and go, and they never overflow); if none is, later keys are counted
as untracked.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from affinity_addon.buckets import OVERFLOW_RPM, TARGET_RPM, buckets_for
from affinity_addon.catalog.providers import PROVIDER_FACTS
from affinity_addon.views.safe import printable
from affinity_addon.views.ttl import record_start

FIELD = "prompt_cache_key"
MAX_TRACKED = 10_000
_FAMILY = re.compile(r"fam-([0-9a-f]{1,64})-(\d{1,4})\Z")
_MINUTE = 60.0


def family_of(key: str) -> str | None:
    """The family hash of a `{family_key}` value, None for any other key."""
    m = _FAMILY.match(key)
    return m.group(1) if m else None


def short_key(key: str, n: int = 12) -> str:
    """A key for a table cell: a family key keeps its bucket (`fam-0123abcd…-3`)."""
    m = _FAMILY.match(key)
    if m:
        return f"fam-{m.group(1)[:8]}…-{m.group(2)}" if len(m.group(1)) > 8 else key
    return key if len(key) <= n else key[:n] + "…"


recommended_buckets = buckets_for  # the same rule as `FamilyRates.buckets`


@dataclass(slots=True)
class Rate:
    """Per-minute counts of one key or family: this minute, the one before, the busiest."""

    minute: int = -1
    count: int = 0
    previous: int = 0  # the count of the minute before `minute` (0 if that minute was idle)
    busiest: int = 0
    requests: int = 0
    buckets: int = 0  # the largest `{family_key}` bucket count seen (families only)
    limit: int = OVERFLOW_RPM  # the host's documented requests a minute per key

    @property
    def overflows(self) -> bool:
        return self.busiest > self.limit

    def add(self, t: float) -> None:
        minute = int(t // _MINUTE)
        if minute > self.minute:  # records come roughly in order; a late one joins this minute
            self.previous = self.count if minute == self.minute + 1 else 0
            self.minute, self.count = minute, 0
        self.count += 1
        self.requests += 1
        self.busiest = max(self.busiest, self.count)

    def last_minute(self, t: float) -> float:
        """Requests in the 60 s up to `t`: this minute's count plus the share of the previous
        minute still inside the window (the sliding-window counter estimate)."""
        minute = int(t // _MINUTE)
        if minute == self.minute:
            return self.count + self.previous * (1 - (t % _MINUTE) / _MINUTE)
        if minute == self.minute + 1:
            return self.count * (1 - (t % _MINUTE) / _MINUTE)
        return 0.0


class CacheKeyRates:
    """Feed records (`add`) or live requests (`observe`); read `rows()`, `to_dict()`, `line()`.

    `instances`: how many proxies share the traffic; live rates are scaled by it (a log read by
    `affinity report` holds what it holds, so the report keeps 1)."""

    def __init__(self, instances: int = 1, max_tracked: int = MAX_TRACKED) -> None:
        self.instances = max(instances, 1)
        self.max_tracked = max_tracked
        self.keys: dict[str, Rate] = {}
        self.families: dict[str, Rate] = {}
        self.untracked = 0
        self.forgotten = 0  # quiet keys dropped to make room (still counted in `to_dict`)
        self._pruned: dict[int, int] = {}  # table id -> the minute it was last pruned

    def _rate(self, table: dict[str, Rate], name: str, t: float, limit: int) -> Rate | None:
        rate = table.get(name)
        if rate is None:
            minute = int(t // _MINUTE)
            if len(table) >= self.max_tracked and self._pruned.get(id(table)) != minute:
                self._pruned[id(table)] = minute
                quiet = [k for k, r in table.items()
                         if r.minute < minute - 1 and r.busiest <= TARGET_RPM]
                for k in quiet:
                    del table[k]
                if table is self.keys:
                    self.forgotten += len(quiet)
            if len(table) < self.max_tracked:
                rate = table[name] = Rate(limit=limit)
        return rate

    def count(self, key: str, t: float, buckets: int | None = None,
              limit: int = OVERFLOW_RPM) -> tuple[Rate | None, Rate | None]:
        rate = self._rate(self.keys, key, t, limit)
        if rate is None:
            self.untracked += 1
        else:
            rate.add(t)
        family = family_of(key)
        fam = self._rate(self.families, family, t, limit) if family else None
        if fam is not None:
            fam.add(t)
            if buckets:
                fam.buckets = max(fam.buckets, buckets)
        return rate, fam

    def add(self, r: Mapping[str, Any]) -> None:
        """Count one JSONL record whose rules added a prompt_cache_key."""
        added = r.get("added")
        fields = added.get("fields") if isinstance(added, Mapping) else None
        key = fields.get(FIELD) if isinstance(fields, Mapping) else None
        host = r.get("host")
        limit = PROVIDER_FACTS.key_rpm_limit(host) if isinstance(host, str) else None
        if not isinstance(key, str) or not key or limit is None:
            return
        start = record_start(r)
        if start is None:
            return
        k = r.get("cache_key_bucket", r.get("key"))  # `key` in older logs
        buckets = k.get("buckets") if isinstance(k, Mapping) else None
        self.count(key, start, buckets if isinstance(buckets, int) and buckets > 0 else None,
                   limit)

    def observe(self, key: str | None, t: float | None, limit: int | None,
                buckets: int | None) -> dict[str, Any] | None:
        """Count a request carrying `key` at send time `t`, on a host whose documented limit is
        `limit` requests a minute per key; the load its verdict needs (plain data), or None
        when it carries no key or the host has no limit."""
        if not isinstance(key, str) or not key or t is None or limit is None:
            return None
        rate, fam = self.count(key, t, buckets, limit)
        return {
            "limit": limit,
            "key_rpm": round(rate.last_minute(t) * self.instances, 1) if rate else None,
            "family_rpm": round(fam.last_minute(t) * self.instances, 1) if fam else None,
            "buckets": buckets,
        }

    def rows(self, top: int | None = 10) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(families, keys), busiest first; rates in requests a minute (busiest minute)."""
        n = self.instances
        fams: list[dict[str, Any]] = [{"family": printable(f), "requests": r.requests, "busiest_rpm": r.busiest * n,
                 "buckets_used": r.buckets or None,
                 "buckets_recommended": recommended_buckets(r.busiest * n)}
                for f, r in self.families.items()]
        keys: list[dict[str, Any]] = [{"key": printable(k), "family": family_of(k), "requests": r.requests,
                 "busiest_rpm": r.busiest * n, "overflow_likely": r.busiest * n > r.limit}
                for k, r in self.keys.items()]
        fams.sort(key=lambda d: -int(d["busiest_rpm"]))
        keys.sort(key=lambda d: -int(d["busiest_rpm"]))
        return fams[:top], keys[:top]

    def to_dict(self, top: int | None = 10) -> dict[str, Any]:
        fams, keys = self.rows(top)
        return {
            "overflow_rpm": OVERFLOW_RPM,
            "target_rpm": TARGET_RPM,
            "keys": len(self.keys) + self.forgotten,
            "families": len(self.families),
            "keys_overflow_likely": sum(r.busiest * self.instances > r.limit
                                        for r in self.keys.values()),
            "untracked_requests": self.untracked,
            "by_family": fams,
            "by_key": keys,
            "note": "only keys the rules added are logged; a client's own prompt_cache_key is "
                    "not counted",
        }

    def line(self) -> str | None:
        """One line for the live summary, None without prompt_cache_key traffic."""
        if not self.keys:
            return None
        fams, keys = self.rows(1)
        over = sum(r.busiest * self.instances > r.limit for r in self.keys.values())
        text = (f"Keys: {len(self.keys)} prompt_cache_key(s), busiest {keys[0]['busiest_rpm']} "
                f"RPM; {over} above ~{OVERFLOW_RPM} RPM (overflow likely)")
        if fams:
            f = fams[0]
            text += (f"; busiest family {f['busiest_rpm']} RPM -> {f['buckets_recommended']} "
                     f"bucket(s) recommended (using {f['buckets_used'] or '-'})")
        return text


def cache_key_rates(records: Iterable[Mapping[str, Any]]) -> CacheKeyRates:
    rates = CacheKeyRates()
    for r in records:
        rates.add(r)
    return rates
