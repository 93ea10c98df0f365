"""The mitmproxy addon: rules -> affinity ID -> rewrite -> upstream -> usage record."""

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from mitmproxy import command, ctx, exceptions, flow, hooks, http, tls

from affinity_addon.decoding import DecodeLimit, decode_body
from affinity_addon.diagnosis.tracker import MissTracker, Pending
from affinity_addon.mitm import keyfile
from affinity_addon.mitm.options import OPTION_PARSERS, check_deferred
from affinity_addon.record import build as logrecord
from affinity_addon.record.jsonl import JsonlWriter
from affinity_addon.request import affinity_id
from affinity_addon.request.rewrite import apply_rules
from affinity_addon.request.rules import RuleSet, default_rules_file, load_rules
from affinity_addon.response.stream_tap import DEFAULT_MAX_EVENT, StreamTap
from affinity_addon.response.usage import UsageReader
from affinity_addon.views import contentview
from affinity_addon.views.aggregate import Aggregator, render_summary

logger = logging.getLogger(__name__)

DEFAULT_RULES = default_rules_file()
META = contentview.META  # flow.metadata key: plain data only (mitmproxy must save flows)
RULES_POLL_SECONDS = 1.0
STATS_CONVERSATIONS = 2000  # live summary: conversations tracked one by one (memory bound)

# What to tell a client that rejected our certificate, by the runtime it probably is.
CA_HINT = (
    "set NODE_EXTRA_CA_CERTS={ca} (Node: Claude Code, opencode, pi), SSL_CERT_FILE={ca} "
    "(Python httpx, Codex), REQUESTS_CA_BUNDLE={ca} (Python requests), "
    "CODEX_CA_CERTIFICATE={ca} (Codex), or use reverse mode with a base URL"
)


# Terminal events of a Responses stream that carry the final usage (SSE and WebSocket alike).
WS_TERMINAL_TYPES = ("response.completed", "response.incomplete", "response.failed")


class _Live:
    """Per-flow response state; lives in the addon, never in flow.metadata (it must pickle)."""

    __slots__ = ("reader", "tap")

    def __init__(self, reader: UsageReader, tap: StreamTap | None) -> None:
        self.reader = reader
        self.tap = tap


class CacheAffinity:
    def __init__(self) -> None:
        self.ruleset: RuleSet | None = None
        self.writer: JsonlWriter | None = None
        self.stats = Aggregator(keep_series=False, max_conversations=STATS_CONVERSATIONS)
        self._live: dict[str, _Live] = {}
        # Fingerprints are computed in a worker thread while the request travels upstream
        # (scripts/bench: faster than inline, though the thread shares the GIL); the verdict
        # waits for them at response time.
        self._pending: dict[str, Pending | asyncio.Future[Pending]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.tracker = MissTracker()
        self._warned: set[str] = set()
        self._rules_mtime: float | None = None
        self._watcher: asyncio.Task | None = None
        self.key = ""  # affinity_key, or this installation's key file (keyfile.resolve)

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
            "affinity_summary", bool, True,
            "Print a cache summary (rich tables) to stderr when the proxy shuts down.",
        )

    def configure(self, updated: set[str]) -> None:
        for name in updated & OPTION_PARSERS.keys():
            try:
                OPTION_PARSERS[name](getattr(ctx.options, name))
            except ValueError as e:
                raise exceptions.OptionsError(f"Cannot parse {name} option: {e}") from None
        if "affinity_key" in updated or "confdir" in updated:
            self.key = keyfile.resolve(ctx.options.affinity_key, ctx.options.confdir)
        if "affinity_max_conversations" in updated:
            self.tracker = MissTracker(max(ctx.options.affinity_max_conversations, 1))
        if "affinity_log" in updated:
            if self.writer:
                self.writer.close()
                self.writer = None
            if ctx.options.affinity_log:
                try:
                    self.writer = JsonlWriter(str(Path(ctx.options.affinity_log).expanduser()))
                except OSError as e:
                    raise exceptions.OptionsError(
                        f"Cannot open affinity_log {ctx.options.affinity_log}: {e.strerror or e}"
                    ) from None
        if "affinity_rules" in updated:
            try:
                mtime = self._mtime()
                self.ruleset = load_rules(ctx.options.affinity_rules)
            except ValueError as e:
                raise exceptions.OptionsError(f"Cannot load affinity_rules: {e}") from None
            self._rules_mtime = mtime
            logger.info(
                "affinity: %d rules from %s", len(self.ruleset.rules), ctx.options.affinity_rules
            )

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
        try:
            self.ruleset = load_rules(ctx.options.affinity_rules)
        except ValueError as e:
            logger.error("affinity: rules not reloaded, keeping the previous ones: %s", e)
            return False
        logger.info("affinity: reloaded %d rules from %s", len(self.ruleset.rules),
                    ctx.options.affinity_rules)
        return True

    def in_scope(self, host: str) -> bool:
        rs = self.ruleset
        return rs is not None and any(r.host.matches(host) for r in rs.rules)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if ctx.options.affinity_scope != "rules" or data.ignore_connection:
            return
        # The SNI names the host in regular mode; in reverse mode the client may send any SNI
        # (or none) and the upstream address is what the rules are about.
        hosts = [data.client_hello.sni or ""]
        if data.context.server.address:
            hosts.append(str(data.context.server.address[0]))
        if not any(self.in_scope(h) for h in hosts if h):
            data.ignore_connection = True  # not an LLM host we know: pass TLS through untouched

    def tls_failed_client(self, data: tls.TlsData) -> None:
        host = data.conn.sni or "?"
        if not self.in_scope(host):
            return
        ca = Path(ctx.options.confdir).expanduser() / "mitmproxy-ca-cert.pem"
        self._warn_once(
            f"ca:{data.context.client.peername[0] if data.context.client.peername else ''}",
            "affinity: a client refused the proxy's certificate for %s: it does not trust the "
            "mitmproxy CA. %s", host, CA_HINT.format(ca=ca),
        )

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.ruleset is None:
            return
        try:
            result = apply_rules(
                self.ruleset, flow.request, key=self.key,
                dry_run=ctx.options.affinity_dry_run,
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
            logger.warning("affinity: %s %s: %s", flow.request.method, flow.request.pretty_host,
                           "; ".join(outcome.problems))
        rec = outcome.record()
        # As the client sent them: map-remote and other addons may rewrite the URL later.
        rec["host"] = flow.request.pretty_host
        rec["path"] = flow.request.path.split("?", 1)[0]
        rec["method"] = flow.request.method
        flow.metadata[META] = rec
        if outcome.shape and parsed.obj is not None and ctx.options.affinity_diagnose:
            try:
                self._observe(flow, outcome, parsed.obj)
            except RecursionError:
                pass  # too deeply nested to fingerprint: no verdict for this one
            except Exception:
                logger.exception("affinity: cannot fingerprint this request; no verdict for it")

    def _observe(self, flow: http.HTTPFlow, outcome: Any, body: dict[str, Any]) -> None:
        assert self.ruleset is not None
        if outcome.affinity_source == "root":  # derived already
            root, client = outcome.affinity_id, None
        else:
            root = affinity_id.root_id(body, outcome.shape, self.ruleset.affinity, self.key)
            client = outcome.affinity_id
        keys = tuple(k for k in (client, root) if k)
        if not keys:
            return
        if len(self._pending) > 50_000:  # flows that never finished; should not happen
            self._pending.clear()
        # The tracker keeps the model per conversation: a real name's length, not the client's.
        model = outcome.model[:affinity_id.MAX_MODEL_CHARS] if outcome.model else None
        work = partial(self.tracker.observe, body, shape=outcome.shape, model=model,
                       host=flow.request.pretty_host, keys=keys, signal=outcome.signal,
                       ts=flow.request.timestamp_start or time.time())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside mitmproxy's loop (unit tests): compute inline
            self._pending[flow.id] = work()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="affinity-fp")
        self._pending[flow.id] = loop.run_in_executor(self._pool, work)

    # -- response side ---------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if meta is None or flow.response is None or not meta.get("shape"):
            return
        try:
            reader = UsageReader(meta["shape"])
            tap = None
            ctype = flow.response.headers.get("content-type", "")
            if ctype.startswith("text/event-stream") and not flow.response.stream:
                # Stream it: mitmproxy would otherwise hold the whole answer back (G2).
                tap = StreamTap(flow.response.headers.get("content-encoding"),
                                reader.feed_event, keep_limit=ctx.options.affinity_keep_bodies)
                flow.response.stream = tap
            self._live[flow.id] = _Live(reader, tap)
        except Exception:
            logger.exception("affinity: cannot watch this response; it passes unobserved")

    def response(self, flow: http.HTTPFlow) -> None:
        live = self._live.pop(flow.id, None)
        meta = flow.metadata.get(META)
        if meta is None or flow.response is None:
            return
        if flow.websocket is not None:  # the upgrade: records come per completed frame
            self._pending.pop(flow.id, None)
            return
        try:
            stream = live is not None and live.tap is not None
            if live is not None and not stream and flow.response.raw_content:
                try:
                    body = decode_body(flow.response.raw_content,
                                       flow.response.headers.get("content-encoding"))
                    live.reader.feed_json(json.loads(body or b""))
                except DecodeLimit as e:  # a bomb: bounded decoding stopped it
                    logger.warning("affinity: %s response not inspected: %s",
                                   flow.request.pretty_host, e)
                except (ValueError, RecursionError):
                    pass  # an error page or a body we do not understand: no usage
            if stream and flow.response.raw_content is None:
                kept = live.tap.kept
                if kept is not None:
                    flow.response.raw_content = kept  # visible in mitmweb; already sent
            # A stream that ended without its terminal event was cut short upstream.
            complete = not stream or (live.tap.ended and live.reader.terminal)
            self._finish(flow, meta, live, stream=stream, complete=complete, error=None)
        except Exception:
            logger.exception("affinity: could not record this response")

    def error(self, flow: http.HTTPFlow) -> None:
        live = self._live.pop(flow.id, None)
        meta = flow.metadata.get(META)
        if meta is None or flow.websocket is not None:
            self._pending.pop(flow.id, None)
            return
        try:
            stream = live is not None and live.tap is not None
            msg = flow.error.msg if flow.error else "error"
            self._finish(flow, meta, live, stream=stream, complete=False, error=msg)
        except Exception:
            logger.exception("affinity: could not record this failed response")

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        # Codex in ChatGPT mode streams over a WebSocket: every `response.completed` frame from
        # the server ends one model response, with usage like the Responses API.
        meta = flow.metadata.get(META)
        if meta is None or flow.websocket is None or not flow.websocket.messages:
            return
        msg = flow.websocket.messages[-1]
        if msg.from_client or not msg.is_text:
            return
        try:
            content = msg.content  # inflated by mitmproxy (permessage-deflate), not by us
            if len(content) > DEFAULT_MAX_EVENT:  # like one SSE event: too big to parse
                return
            if not any(t.encode() in content for t in WS_TERMINAL_TYPES):
                return
            reader = UsageReader(meta.get("shape") or "openai-responses")
            reader.feed_event(None, content)
            if reader.terminal:
                self._finish(flow, meta, _Live(reader, None), stream=True, complete=True,
                             error=None, transport="websocket")
        except Exception:
            logger.exception("affinity: could not read a WebSocket message")

    def _finish(self, flow: http.HTTPFlow, meta: dict[str, Any], live: _Live | None, *,
                stream: bool, complete: bool, error: str | None, transport: str = "http") -> None:
        reader = live.reader if live else None
        resp = flow.response
        response_cache = bool(resp and resp.headers.get("x-openrouter-cache-status", "").upper() == "HIT")
        usage = reader.usage() if reader else None
        record = logrecord.build(
            meta=meta, flow_id=flow.id, host=meta.get("host") or flow.request.pretty_host,
            path=meta.get("path") or flow.request.path.split("?", 1)[0],
            method=meta.get("method") or flow.request.method,
            status=resp.status_code if resp else None,
            usage=usage, usage_raw=reader.raw if reader else None,
            stream=stream, transport=transport, complete=complete, error=error,
            started=flow.request.timestamp_start, response_cache=response_cache,
            extras=reader.extras if reader else None,
        )
        pending = self._pending.pop(flow.id, None) if transport == "http" else None
        if isinstance(pending, asyncio.Future | Future):
            if not pending.done():
                pending.add_done_callback(
                    lambda f: self._completed(flow, meta, record, usage, f, live_update=True))
                return
            pending = pending.result() if not pending.exception() else None
        self._record(flow, meta, record, usage, pending)

    def _completed(self, flow: http.HTTPFlow, meta: dict[str, Any], record: dict[str, Any],
                   usage: Any, fut: Any, live_update: bool) -> None:
        try:
            pending = fut.result() if not fut.cancelled() and not fut.exception() else None
            self._record(flow, meta, record, usage, pending)
            if live_update:  # changed outside a hook: tell mitmweb
                ctx.master.addons.trigger(hooks.UpdateHook([flow]))
        except Exception:
            logger.exception("affinity: could not record this response")

    def _record(self, flow: http.HTTPFlow, meta: dict[str, Any], record: dict[str, Any],
                usage: Any, pending: Pending | None) -> None:
        if pending is not None:
            verdict, predicted = self.tracker.verdict(
                pending, usage, time.time(), response_cache=record["response_cache"],
                provider_reason=record["provider_miss_reason"], dry_run=record["dry_run"])
            record.update(verdict.to_log())
            record["predicted_hit_ratio"] = predicted
            meta["miss_reason"], meta["miss_detail"] = verdict.reason, verdict.detail
        if self.writer:
            self.writer.write(record)
        self.stats.add(record)
        flow.comment = logrecord.comment(record)
        flow.marked = logrecord.marker(record)
        meta["usage"] = record["usage"]
        meta["hit_ratio"] = record["hit_ratio"]

    # -- commands and shutdown ---------------------------------------------------------------

    @command.command("affinity.stats")
    def stats_command(self) -> str:
        """Print the cache summary so far (per model and conversation) to the event log."""
        from io import StringIO

        from rich.console import Console

        buf = StringIO()
        render_summary(self.stats, Console(file=buf, width=120, force_terminal=False))
        text = buf.getvalue()
        logger.info("affinity summary:\n%s", text)
        return text

    @command.command("affinity.why")
    def why_command(self, flows: Sequence[flow.Flow]) -> str:
        """Explain the cache outcome of flows (e.g. @focus, @marked): rule, ID, usage, verdict."""
        lines = []
        for f in flows:
            meta = f.metadata.get(META) if isinstance(f, http.HTTPFlow) else None
            if meta is None:
                continue
            u = meta.get("usage") or {}
            lines.append(
                f"{f.request.method} {f.request.pretty_host}{f.request.path.split('?', 1)[0]}  "
                f"rule={meta.get('rule')}  aff={meta.get('affinity_id')} ({meta.get('affinity_source')})  "
                f"read={u.get('cache_read_tokens', '-')}/{u.get('input_tokens', '-')}  "
                f"verdict={meta.get('miss_reason') or '-'}"
                + (f": {meta['miss_detail']}" if meta.get("miss_detail") else ""))
        text = "\n".join(lines) or "no matched LLM flows selected"
        logger.info("affinity.why:\n%s", text)
        return text

    @command.command("affinity.reset")
    def reset_command(self) -> None:
        """Forget the cache statistics collected so far."""
        self.stats = Aggregator(keep_series=False, max_conversations=STATS_CONVERSATIONS)

    @command.command("affinity.reload")
    def reload_command(self) -> None:
        """Reload the rules file now; a broken file keeps the current rules."""
        try:
            self.ruleset = load_rules(ctx.options.affinity_rules)
        except ValueError as e:
            raise exceptions.CommandError(str(e)) from None
        logger.info("affinity: reloaded %d rules", len(self.ruleset.rules))

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        # done() also runs on every hot reload of the script: summarize only on a real shutdown.
        shutting_down = getattr(getattr(ctx.master, "should_exit", None), "is_set", lambda: False)()
        if shutting_down and ctx.options.affinity_summary and self.stats.total.requests:
            from rich.console import Console

            render_summary(self.stats, Console(file=sys.stderr))
        if self.writer:
            self.writer.close()
            self.writer = None
