"""The affinity commands (console `:` prompt, mitmweb) and the shutdown summary."""

import logging
import sys
from collections.abc import Sequence
from io import StringIO

from mitmproxy import command, ctx, exceptions, flow, http
from rich.console import Console
from rich.markup import escape

from affinity_addon.mitm.config import Config
from affinity_addon.mitm.state import State, new_stats, new_ttl_advisor
from affinity_addon.record.schema import META
from affinity_addon.views.cache_key_rates import CacheKeyRates
from affinity_addon.views.console import output_console, render_summary
from affinity_addon.views.ttl import summary_line

logger = logging.getLogger(__name__)


class Commands:
    name = "affinity-commands"

    def __init__(self, state: State, config: Config) -> None:
        self.state = state
        self.config = config

    @command.command("affinity.stats")
    def stats_command(self) -> str:
        """Print the cache summary so far (per model and conversation) to the event log."""
        buf = StringIO()
        self._summary(Console(file=buf, width=120, force_terminal=False))
        text = buf.getvalue()
        logger.info("affinity summary:\n%s", text)
        return text

    @command.command("affinity.why")
    def why_command(self, flows: Sequence[flow.Flow]) -> str:
        """Explain the cache outcome of flows (e.g. @focus, @marked): rule, ID, usage, verdict."""
        lines = []
        for f in flows:
            if not isinstance(f, http.HTTPFlow) or META not in f.metadata:
                continue
            meta = f.metadata[META]
            u = meta.get("usage") or {}
            lines.append(
                f"{f.request.method} {f.request.pretty_host}{f.request.path.split('?', 1)[0]}  "
                f"rule={meta.get('rule')}  aff={meta.get('affinity_id')} ({meta.get('affinity_source')})  "
                f"read={u.get('cache_read_tokens', '-')}/{u.get('input_tokens', '-')}  "
                f"verdict={meta.get('miss_reason') or '-'}"
                + (f": {meta['miss_detail']}" if meta.get("miss_detail") else "")
                + _provider_said(meta.get("provider_diagnosis")))
        text = "\n".join(lines) or "no matched LLM flows selected"
        logger.info("affinity.why:\n%s", text)
        return text

    @command.command("affinity.reset")
    def reset_command(self) -> None:
        """Forget the cache statistics collected so far."""
        self.state.stats = new_stats()
        self.state.ttl = new_ttl_advisor()
        self.state.cache_key_rates = CacheKeyRates(self.state.cache_key_rates.instances)

    @command.command("affinity.reload")
    def reload_command(self) -> None:
        """Reload the rules file now; a broken file keeps the current rules."""
        try:
            self.config.reload(keep_on_error=False)
        except ValueError as e:
            raise exceptions.CommandError(str(e)) from None

    def done(self) -> None:
        # done() also runs on every hot reload of the script: summarize only on a real shutdown.
        shutting_down = getattr(getattr(ctx.master, "should_exit", None), "is_set", lambda: False)()
        if shutting_down and ctx.options.affinity_summary and self.state.stats.total.requests:
            self._summary(output_console(sys.stderr))

    def _summary(self, console: Console) -> None:
        render_summary(self.state.stats, console)
        line = summary_line(self.state.ttl.advice())
        if line:
            console.print(escape(line))
        line = self.state.cache_key_rates.line()
        if line:
            console.print(escape(line))


def _provider_said(said: object) -> str:
    """`  provider=anthropic:tools_changed (agrees)`, when the provider diagnosed it."""
    if not isinstance(said, dict) or not said.get("result"):
        return ""
    fits = said.get("agrees")
    agrees = " (agrees)" if fits is True else " (disagrees)" if fits is False else ""
    return f"  provider={said.get('source')}:{said['result']}{agrees}"
