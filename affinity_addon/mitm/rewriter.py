"""The request side as an addon: rules -> affinity ID -> rewrite; the prefix fingerprint waits.

Only what must happen before the request leaves happens here. The fingerprint (for the miss
verdict) needs nothing but the parsed body, so the recorder computes it after the response has
gone back to the client (`State.defer`).
"""

import logging
import time
from functools import partial
from typing import Any

from mitmproxy import http

from affinity_addon.mitm.state import State, Stepped
from affinity_addon.models import MAX_MODEL_CHARS
from affinity_addon.record.schema import META
from affinity_addon.request import affinity_id
from affinity_addon.request.rewrite import Outcome, apply_rules

logger = logging.getLogger(__name__)

MAX_PENDING = 50_000  # flows that never finished; should not happen


class Rewriter:
    name = "affinity-rewriter"

    def __init__(self, state: State) -> None:
        self.state = state

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.state.ruleset is None:
            return
        host = flow.request.pretty_host  # a header lookup each time: read once
        try:
            result = apply_rules(
                self.state.ruleset, flow.request, key=self.state.key, host=host,
                dry_run=self.state.dry_run,
                hint_for=partial(self.state.tracker.hint, now=flow.request.timestamp_start)
                if self.state.diagnose else None,
                rates=self.state.family_rates,
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
        flow.metadata[META] = outcome.to_meta(
            host=host, path=flow.request.path.split("?", 1)[0], method=flow.request.method)
        flow.metadata[META]["load"] = self.state.key_load.observe(outcome, flow.request, host)
        if outcome.shape and parsed.obj is not None and self.state.diagnose:
            try:
                self._observe(flow, outcome, parsed.obj, host)
            except RecursionError:
                pass  # too deeply nested to fingerprint: no verdict for this one
            except Exception:
                logger.exception("affinity: cannot fingerprint this request; no verdict for it")

    def _observe(self, flow: http.HTTPFlow, outcome: Outcome, body: dict[str, Any],
                 host: str) -> None:
        state = self.state
        assert state.ruleset is not None and outcome.shape is not None
        if outcome.affinity_source == "root":  # derived already
            root, client = outcome.affinity_id, None
        else:
            root = affinity_id.root_id(body, outcome.shape, state.ruleset.affinity, state.key)
            client = outcome.affinity_id
        keys = tuple(k for k in (client, root) if k)
        if not keys:
            return
        if len(state.pending) > MAX_PENDING:
            state.pending.clear()
        # The tracker keeps the model per conversation: a real name's length, not the client's.
        model = outcome.model[:MAX_MODEL_CHARS] if outcome.model else None
        # The tracker reads the body later: this request's body object is never changed again
        # (the rewrite encoded a new one or spliced the raw bytes). The fingerprint starts once
        # the request is on its way, in slices, while the provider works on it.
        job = Stepped(state.tracker.observe_steps(
            body, shape=outcome.shape, model=model, host=host, keys=keys,
            signal=outcome.signal, ts=flow.request.timestamp_start or time.time(),
            family=outcome.family))
        state.pending[flow.id] = job
        state.step(job)
