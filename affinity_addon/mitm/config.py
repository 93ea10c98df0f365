"""The affinity options (declared from `options.OPTIONS`), the rules file (load, hot reload) and
the JSONL log."""

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions

from affinity_addon.diagnosis.tracker import MissTracker
from affinity_addon.mitm import keyfile
from affinity_addon.mitm.options import Settings, add_options, check_deferred, parse_options
from affinity_addon.mitm.state import State, new_links
from affinity_addon.record.jsonl import JsonlWriter
from affinity_addon.request.family_key import FamilyRates
from affinity_addon.request.rules import default_rules_file, load_rules
from affinity_addon.views.cache_key_rates import CacheKeyRates

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
        add_options(loader)

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        try:
            parse_options(opts, updated)
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        state = self.state
        state.settings = Settings.from_options(opts)
        if "affinity_key" in updated or "confdir" in updated:
            state.secret = keyfile.resolve(opts.affinity_key, opts.confdir)
        if "affinity_max_conversations" in updated:
            state.tracker = MissTracker(max(opts.affinity_max_conversations, 1))
            state.links = new_links(max(opts.affinity_max_conversations, 1))
        if "affinity_instances" in updated:
            n = opts.affinity_instances
            state.family_rates = FamilyRates(instances=n)
            state.cache_key_load = CacheKeyRates(instances=n)
            state.cache_key_rates = CacheKeyRates(instances=n)
        if "affinity_log" in updated:
            if state.writer:
                state.writer.close()
                state.writer = None
            if opts.affinity_log:
                try:
                    state.writer = JsonlWriter(str(Path(opts.affinity_log).expanduser()))
                except OSError as e:
                    raise exceptions.OptionsError(
                        f"Cannot open affinity_log {opts.affinity_log}: {e.strerror or e}"
                    ) from None
        if "affinity_rules" in updated:
            try:
                mtime = self._mtime()
                state.ruleset = load_rules(opts.affinity_rules)
            except ValueError as e:
                raise exceptions.OptionsError(f"Cannot load affinity_rules: {e}") from None
            self._rules_mtime = mtime
            logger.info("affinity: %d rules from %s", len(state.ruleset.rules),
                        opts.affinity_rules)

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
        self.state.scheduler.run_all()  # records of responses that finished just before shutdown
        if self.state.writer:
            self.state.writer.close()
            self.state.writer = None
