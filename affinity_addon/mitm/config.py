"""The affinity options, their validation, the rules file (load, hot reload) and the JSONL log."""

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions

from affinity_addon.diagnosis.tracker import MissTracker
from affinity_addon.mitm import keyfile
from affinity_addon.mitm.options import OPTION_PARSERS, check_deferred
from affinity_addon.mitm.state import State
from affinity_addon.record.jsonl import JsonlWriter
from affinity_addon.request.family_key import FamilyRates
from affinity_addon.request.rules import default_rules_file, load_rules
from affinity_addon.views.keyrate import KeyRates

logger = logging.getLogger(__name__)

DEFAULT_RULES = default_rules_file()
RULES_POLL_SECONDS = 1.0


class Config:
    name = "affinity-config"

    def __init__(self, state: State) -> None:
        self.state = state
        self._rules_mtime: float | None = None
        self._watcher: asyncio.Task[None] | None = None

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
            "affinity_key", str, "",
            """
            Key for the hashes that turn prompt roots and long client IDs into affinity IDs.
            Empty: a random key generated once into the confdir (file affinity-key). Proxies
            that share a key derive the same IDs; set one per tenant to keep tenants' IDs (and
            so their provider-side cache keys) apart.
            """,
        )
        loader.add_option(
            "affinity_keep_bodies", int, 1 << 20,
            """
            Keep the raw bytes of matched streamed (SSE) responses up to this many bytes per
            flow, so mitmweb can show them; larger streams are not kept. 0 keeps none.
            """,
        )
        loader.add_option(
            "affinity_scope", str, "rules",
            """
            Which TLS connections to decrypt: "rules" intercepts only hosts that the rules name
            and passes every other connection through untouched (no certificate swap for
            unrelated apps); "all" leaves the choice to mitmproxy (allow_hosts/ignore_hosts).
            """,
            choices=["rules", "all"],
        )
        loader.add_option(
            "affinity_diagnose", bool, True,
            """
            Fingerprint every matched request to explain cache misses (miss_reason). Costs a
            few ms per MB of prompt; turn it off for the thinnest proxy (records keep usage).
            """,
        )
        loader.add_option(
            "affinity_max_conversations", int, 10_000,
            """
            How many conversations to remember for the cache-miss verdicts (least recently
            used are forgotten). Each costs about a few KB: hashes and lengths, never text.
            """,
        )
        loader.add_option(
            "affinity_instances", int, 1,
            """
            How many gateway instances share the traffic (behind a load balancer, each seeing
            about 1/N of it). The observed per-family request rate is multiplied by it to size
            the {family_key} buckets, and per-key rates (summary, overflow verdict) are scaled
            alike, so every instance picks the bucket count one proxy seeing all would pick.
            """,
        )
        loader.add_option(
            "affinity_summary", bool, True,
            "Print a cache summary (rich tables) to stderr when the proxy shuts down.",
        )

    def configure(self, updated: set[str]) -> None:
        for name in updated & OPTION_PARSERS.keys():
            try:
                OPTION_PARSERS[name](getattr(ctx.options, name))
            except ValueError as e:
                raise exceptions.OptionsError(f"Cannot parse {name} option: {e}") from None
        opts = ctx.options
        self.state.dry_run = opts.affinity_dry_run
        self.state.diagnose = opts.affinity_diagnose
        self.state.keep_bodies = opts.affinity_keep_bodies
        if "affinity_key" in updated or "confdir" in updated:
            self.state.key = keyfile.resolve(ctx.options.affinity_key, ctx.options.confdir)
        if "affinity_max_conversations" in updated:
            self.state.tracker = MissTracker(max(ctx.options.affinity_max_conversations, 1))
        if "affinity_instances" in updated:
            n = ctx.options.affinity_instances
            self.state.family_rates = FamilyRates(instances=n)
            self.state.key_load = KeyRates(instances=n)
            self.state.key_rates = KeyRates(instances=n)
        if "affinity_log" in updated:
            if self.state.writer:
                self.state.writer.close()
                self.state.writer = None
            if ctx.options.affinity_log:
                try:
                    self.state.writer = JsonlWriter(str(Path(ctx.options.affinity_log).expanduser()))
                except OSError as e:
                    raise exceptions.OptionsError(
                        f"Cannot open affinity_log {ctx.options.affinity_log}: {e.strerror or e}"
                    ) from None
        if "affinity_rules" in updated:
            try:
                mtime = self._mtime()
                self.state.ruleset = load_rules(ctx.options.affinity_rules)
            except ValueError as e:
                raise exceptions.OptionsError(f"Cannot load affinity_rules: {e}") from None
            self._rules_mtime = mtime
            logger.info("affinity: %d rules from %s", len(self.state.ruleset.rules),
                        ctx.options.affinity_rules)

    def running(self) -> None:
        leftovers = sorted(k for k in getattr(ctx.options, "deferred", {}) if k.startswith("affinity"))
        if leftovers:
            logger.error("affinity: unknown option(s): %s", ", ".join(leftovers))
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_rules())

    def _mtime(self) -> float | None:
        try:
            return os.stat(Path(ctx.options.affinity_rules).expanduser()).st_mtime_ns / 1e9
        except OSError:
            return None

    async def _watch_rules(self) -> None:
        # Hot reload: a saved edit applies within a second; a broken edit keeps the last good
        # rules and says why (file and line), once per edit.
        while True:
            await asyncio.sleep(RULES_POLL_SECONDS)
            try:
                self.check_rules_file()
            except Exception:
                logger.exception("affinity: rules watcher failed")

    def check_rules_file(self) -> bool:
        mtime = self._mtime()
        if mtime is None or mtime == self._rules_mtime:
            return False
        self._rules_mtime = mtime
        return self.reload(keep_on_error=True)

    def reload(self, *, keep_on_error: bool) -> bool:
        """Load the rules file again; a broken file keeps the current rules."""
        try:
            ruleset = load_rules(ctx.options.affinity_rules)
        except ValueError as e:
            if not keep_on_error:
                raise
            logger.error("affinity: rules not reloaded, keeping the previous ones: %s", e)
            return False
        self.state.ruleset = ruleset
        logger.info("affinity: reloaded %d rules from %s", len(ruleset.rules),
                    ctx.options.affinity_rules)
        return True

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        self.state.run_later()  # records of responses that finished just before shutdown
        if self.state.writer:
            self.state.writer.close()
            self.state.writer = None
