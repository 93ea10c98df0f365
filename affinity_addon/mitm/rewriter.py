"""The request side as an addon: rules -> affinity ID -> rewrite; the prefix fingerprint waits.

Only what must happen before the request leaves happens here. The fingerprint (for the miss
verdict) needs nothing but the parsed body, so it runs in slices once the request is on its way
(`Scheduler.step`), while the provider works on it.
"""

import logging
import time
from functools import partial
from typing import Any

from mitmproxy import http

from affinity_addon.catalog.providers import PROVIDER_FACTS
from affinity_addon.mitm.exchange import Exchange
from affinity_addon.mitm.scheduler import Stepped
from affinity_addon.mitm.state import State
from affinity_addon.models import MAX_MODEL_CHARS
from affinity_addon.record.schema import META
from affinity_addon.request import affinity_id
from affinity_addon.request.rewrite import Outcome, apply_rules
from affinity_addon.views.cache_key_rates import FIELD as CACHE_KEY_FIELD

logger = logging.getLogger(__name__)


def sent_cache_key(outcome: Outcome) -> str | None:
    """The `prompt_cache_key` the provider sees: the rules' (none in a dry run: nothing is sent
    changed), or the client's own, which counts for the provider's rate just the same."""
    key = None if outcome.dry_run else outcome.fields.get(CACHE_KEY_FIELD)
    if key is None and f"field:{CACHE_KEY_FIELD}" in outcome.kept:
        key = outcome.signal
    return key if isinstance(key, str) else None


class Rewriter:
    name = "affinity-rewriter"

    def __init__(self, state: State) -> None:
        self.state = state

    def request(self, flow: http.HTTPFlow) -> None:
        state = self.state
        if flow.response or flow.error or not flow.live or state.ruleset is None:
            return
        settings = state.settings
        host = flow.request.pretty_host  # a header lookup each time: read once
        try:
            result = apply_rules(
                state.ruleset, flow.request, secret=state.secret, host=host,
                dry_run=settings.dry_run,
                hint_for=partial(state.tracker.hint, now=flow.request.timestamp_start)
                if settings.diagnose else None,
                rates=state.family_rates,
                links=state.links if settings.provider_diagnostics else None,
            )
        except RecursionError:
            logger.warning("affinity: request body nested too deeply to inspect; sent unchanged")
            return
        except Exception:  # fail open: an addon bug must never break the request
            logger.exception("affinity: rewrite failed; request sent unchanged")
            return
        if result is None:
            return
        outcome, parsed = result
        if outcome.problems:  # one line per request, whatever went wrong
            logger.warning("affinity: %s %s: %s", flow.request.method, host,
                           "; ".join(outcome.problems))
        # As the client sent them: map-remote and other addons may rewrite the URL later.
        facts = outcome.facts(host=host, path=flow.request.path.split("?", 1)[0],
                              method=flow.request.method)
        load = state.cache_key_load.observe(
            sent_cache_key(outcome), flow.request.timestamp_start,
            PROVIDER_FACTS.key_rpm_limit(host), outcome.cache_key_bucket.get("buckets") if outcome.cache_key_bucket else None)
        exchange = Exchange(facts, load=load, link=outcome.link)
        state.exchanges.start(flow.id, exchange)
        flow.metadata[META] = facts.to_json()  # published for mitmweb, `affinity.why`, saved flows
        if outcome.api and parsed.obj is not None and settings.diagnose:
            try:
                self._observe(flow, exchange, outcome, parsed.obj, host)
            except RecursionError:
                pass  # too deeply nested to fingerprint: no verdict for this one
            except Exception:
                logger.exception("affinity: cannot fingerprint this request; no verdict for it")

    def _observe(self, flow: http.HTTPFlow, exchange: Exchange, outcome: Outcome,
                 body: dict[str, Any], host: str) -> None:
        state = self.state
        assert state.ruleset is not None and outcome.api is not None
        if outcome.affinity_source == "root":  # derived already
            root, client = outcome.affinity_id, None
        else:
            root = outcome.root_id or affinity_id.root_id(body, outcome.api,
                                                          state.ruleset.affinity, state.secret)
            client = outcome.affinity_id
        ids = tuple(i for i in (client, root) if i)
        if not ids:
            return
        # The tracker keeps the model per conversation: a real name's length, not the client's.
        model = outcome.model[:MAX_MODEL_CHARS] if outcome.model else None
        # The tracker reads the body later: this request's body object is never changed again
        # (the rewrite encoded a new one or spliced the raw bytes). The fingerprint starts once
        # the request is on its way, in slices, while the provider works on it.
        job = Stepped(state.tracker.observe_steps(
            body, api=outcome.api, model=model, host=host, keys=ids,
            signal=outcome.signal, ts=flow.request.timestamp_start or time.time(),
            family=outcome.family))
        exchange.fingerprint = job
        state.scheduler.step(job)
