"""The mitmproxy addon: rules -> affinity ID -> rewrite -> upstream -> usage record."""

import logging
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from affinity_addon import affinity_id
from affinity_addon.options import OPTION_PARSERS, check_deferred
from affinity_addon.rewrite import apply_rules
from affinity_addon.rules import RuleSet, load_rules

logger = logging.getLogger(__name__)

DEFAULT_RULES = Path(__file__).resolve().parent.parent / "rules" / "default.yaml"
META = "affinity"  # flow.metadata key: plain data only (mitmproxy must be able to save flows)


class CacheAffinity:
    def __init__(self) -> None:
        self.ruleset: RuleSet | None = None
        self._warned: set[str] = set()

    def load(self, loader: Any) -> None:
        # A typed --set value that fails to parse would make mitmproxy silently skip this
        # script; check our raw values first so a typo stops startup with a clear message.
        check_deferred(ctx.options)
        loader.add_option(
            "affinity_rules", str, str(DEFAULT_RULES),
            "Path of the affinity rules file (YAML). Default: the shipped rules/default.yaml.",
        )
        loader.add_option(
            "affinity_log", str, "",
            "Append one JSON line per matched LLM response to this file. Empty: no log.",
        )
        loader.add_option(
            "affinity_dry_run", bool, False,
            "Compute and log every rewrite, but send requests upstream unchanged.",
        )
        loader.add_option(
            "affinity_key", str, affinity_id.DEFAULT_KEY,
            """
            Key for the hashes that turn prompt roots and long client IDs into affinity IDs.
            Proxies that share a key derive the same IDs; set one per tenant to keep tenants'
            IDs (and so their provider-side cache keys) apart.
            """,
        )

    def configure(self, updated: set[str]) -> None:
        for name in updated & OPTION_PARSERS.keys():
            try:
                OPTION_PARSERS[name](getattr(ctx.options, name))
            except ValueError as e:
                raise exceptions.OptionsError(f"Cannot parse {name} option: {e}") from None
        if "affinity_rules" in updated:
            try:
                self.ruleset = load_rules(ctx.options.affinity_rules)
            except ValueError as e:
                raise exceptions.OptionsError(f"Cannot load affinity_rules: {e}") from None
            logger.info(
                "affinity: %d rules from %s", len(self.ruleset.rules), ctx.options.affinity_rules
            )

    def running(self) -> None:
        leftovers = sorted(k for k in getattr(ctx.options, "deferred", {}) if k.startswith("affinity"))
        if leftovers:
            logger.error("affinity: unknown option(s): %s", ", ".join(leftovers))

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.ruleset is None:
            return
        try:
            result = apply_rules(
                self.ruleset, flow.request, key=ctx.options.affinity_key,
                dry_run=ctx.options.affinity_dry_run,
            )
        except Exception:  # fail open: an addon bug must never break the request
            logger.exception("affinity: rewrite failed; request sent unchanged")
            return
        if result is None:
            return
        outcome, _ = result
        if outcome.warning:
            logger.warning("affinity: rule %r: %s; sent unchanged", outcome.rules[0], outcome.warning)
        rec = outcome.record()
        rec["started"] = time.time()
        flow.metadata[META] = rec
