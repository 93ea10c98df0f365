"""What the affinity parts share: the loaded rules and settings, the stores that outlive a
flow (tracker, rates, live summary), the open exchanges and the deferred work.

mitmproxy's addons are single-concern classes (config, scope, rewrite, record, commands); they
see one `State` instead of reaching into each other. `Config` replaces what the options decide
(rules, settings, log, stores sized by options) at configure; the rest only reads and records.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from affinity_addon.catalog.diagnostics import default_diagnostics
from affinity_addon.diagnosis.tracker import MissTracker
from affinity_addon.mitm.exchange import Exchanges
from affinity_addon.mitm.options import Settings
from affinity_addon.mitm.scheduler import Scheduler
from affinity_addon.record.jsonl import JsonlWriter
from affinity_addon.record.schema import Record
from affinity_addon.request.family_key import FamilyRates
from affinity_addon.request.provider_link import ResponseLinks
from affinity_addon.request.rules import RuleSet
from affinity_addon.views.aggregate import Aggregator
from affinity_addon.views.cache_key_rates import CacheKeyRates
from affinity_addon.views.ttl import TtlAdvisor

logger = logging.getLogger(__name__)

STATS_CONVERSATIONS = 2000  # live summary: conversations tracked one by one (memory bound)

# Called with (record, its JSON dict) for every finished record: metrics, OpenTelemetry. A sink
# must be quick and must not raise (the recorder logs and skips a failing one).
Sink = Callable[[Record, dict[str, Any]], None]


def new_stats() -> Aggregator:
    return Aggregator(keep_series=False, max_conversations=STATS_CONVERSATIONS)


def new_ttl_advisor() -> TtlAdvisor:
    return TtlAdvisor(max_conversations=STATS_CONVERSATIONS)


def new_links(capacity: int = 10_000) -> ResponseLinks:
    return ResponseLinks(default_diagnostics(), capacity)


@dataclass
class State:
    ruleset: RuleSet | None = None
    settings: Settings = field(default_factory=Settings)
    secret: str = ""  # affinity_key, or this installation's key file (keyfile.resolve)
    writer: JsonlWriter | None = None
    stats: Aggregator = field(default_factory=new_stats)
    # What the cache TTL cost so far (all-5m / all-1h / auto), for the summary: a few numbers
    # per conversation.
    ttl: TtlAdvisor = field(default_factory=new_ttl_advisor)
    tracker: MissTracker = field(default_factory=MissTracker)
    # Each conversation's latest response id, for the provider's cache diagnostics: filled by
    # the recorder, read by the rewrite (request/provider_link.py).
    links: ResponseLinks = field(default_factory=new_links)
    # This proxy's request rate per prompt family: how many `{family_key}` buckets to use.
    family_rates: FamilyRates = field(default_factory=FamilyRates)
    # Requests a minute per prompt_cache_key: `cache_key_load` counts at send time (the `overflow`
    # verdict's evidence), `cache_key_rates` counts records (the summary line), like `ttl`.
    cache_key_load: CacheKeyRates = field(default_factory=CacheKeyRates)
    cache_key_rates: CacheKeyRates = field(default_factory=CacheKeyRates)
    sinks: list[Sink] = field(default_factory=list)
    exchanges: Exchanges = field(default_factory=Exchanges)
    scheduler: Scheduler = field(default_factory=Scheduler)
    warned: set[str] = field(default_factory=set)

    def in_scope(self, host: str) -> bool:
        rs = self.ruleset
        return rs is not None and any(r.host.matches(host) for r in rs.rules)

    def warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            logger.warning(msg, *args)
