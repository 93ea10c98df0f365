"""The response side as an addon: usage from JSON, SSE (streamed through a tap) and WebSocket
frames, the miss verdict, and one record per response (JSONL, flow comment, live summary).
"""

import logging
from collections.abc import Iterator

from mitmproxy import ctx, hooks, http

from affinity_addon.catalog import prices
from affinity_addon.catalog.providers import PROVIDER_FACTS
from affinity_addon.decoding import DecodeLimit, decode_body
from affinity_addon.mitm.exchange import Exchange
from affinity_addon.mitm.scheduler import drain
from affinity_addon.mitm.state import State
from affinity_addon.record import build
from affinity_addon.record.schema import META, Record
from affinity_addon.response.stream_tap import DEFAULT_MAX_EVENT, StreamTap
from affinity_addon.response.usage import UsageReader, parse_json
from affinity_addon.shapes import OPENAI_RESPONSES

logger = logging.getLogger(__name__)


def tap_problem(tap: StreamTap) -> str | None:
    """Why a stream's usage may be missing: the record says so instead of a silent `no usage`."""
    if tap.failed is not None:
        return f"stream not read: {tap.failed}"
    if tap.skipped:
        return f"{tap.skipped} oversized SSE event(s) skipped"
    return None


class Recorder:
    name = "affinity-recorder"

    def __init__(self, state: State) -> None:
        self.state = state

    def running(self) -> None:
        prices.warm_up()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = self.state.exchanges.get(flow.id)
        if ex is None or flow.response is None or not ex.request.shape:
            return
        try:
            ex.reader = UsageReader(ex.request.shape)
            ctype = flow.response.headers.get("content-type", "")
            if ctype.startswith("text/event-stream") and not flow.response.stream:
                # Stream it: mitmproxy holds a whole answer back unless `stream` is set
                # (docs/mitmproxy-notes.md#streaming).
                ex.tap = StreamTap(flow.response.headers.get("content-encoding"),
                                   ex.reader.feed_event,
                                   keep_limit=self.state.settings.keep_bodies)
                flow.response.stream = ex.tap
        except Exception:
            logger.exception("affinity: cannot watch this response; it passes unobserved")

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None:  # the upgrade: records come per completed frame
            ex = self.state.exchanges.get(flow.id)
            if ex is not None:
                ex.fingerprint = None
            return
        ex = self.state.exchanges.end(flow.id)
        if ex is None or flow.response is None:
            return
        try:
            tap = ex.tap
            if tap is not None and flow.response.raw_content is None and tap.kept is not None:
                flow.response.raw_content = tap.kept  # visible in mitmweb; already sent
            # Reading the body and judging it wait until the response is on its way.
            self.state.scheduler.defer(self._answered(flow, ex))
        except Exception:
            logger.exception("affinity: could not record this response")

    def _answered(self, flow: http.HTTPFlow, ex: Exchange) -> Iterator[None]:
        assert flow.response is not None
        tap, reader = ex.tap, ex.reader
        problem = None
        if reader is not None and tap is None and flow.response.raw_content:
            try:
                body = decode_body(flow.response.raw_content,
                                   flow.response.headers.get("content-encoding"))
                reader.feed_json(parse_json(body or b""))
            except DecodeLimit as e:  # a bomb: bounded decoding stopped it
                problem = f"response not inspected: {e}"
                logger.warning("affinity: %s %s", flow.request.pretty_host, problem)
            except (ValueError, RecursionError):
                problem = "JSON body not readable"  # an error page, or a body we don't know
        # A stream that ended without its terminal event was cut short upstream.
        complete = tap is None or (tap.ended and reader is not None and reader.terminal)
        if tap is not None:
            problem = tap_problem(tap)
        yield from self._finish(flow, ex, reader, stream=tap is not None, complete=complete,
                                error=None, usage_problem=problem)

    def error(self, flow: http.HTTPFlow) -> None:
        ex = self.state.exchanges.end(flow.id)
        if ex is None or flow.websocket is not None:
            return
        try:
            msg = flow.error.msg if flow.error else "error"
            self.state.scheduler.defer(self._finish(flow, ex, ex.reader, stream=ex.tap is not None,
                                                    complete=False, error=msg))
        except Exception:
            logger.exception("affinity: could not record this failed response")

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        # Codex in ChatGPT mode streams over a WebSocket: every terminal frame from the server
        # ends one model response, with usage like the Responses API.
        ex = self.state.exchanges.get(flow.id)
        if ex is None or flow.websocket is None or not flow.websocket.messages:
            return
        msg = flow.websocket.messages[-1]
        if msg.from_client or not msg.is_text:
            return
        try:
            content = msg.content  # inflated by mitmproxy (permessage-deflate), not by us
            if len(content) > DEFAULT_MAX_EVENT:  # like one SSE event: too big to parse
                return
            if not any(t in content for t in PROVIDER_FACTS.websocket_terminal_events):
                return
            reader = UsageReader(ex.request.shape or OPENAI_RESPONSES)
            reader.feed_event(None, content)
            if reader.terminal:
                drain(self._finish(flow, ex, reader, stream=True, complete=True, error=None,
                                   transport="websocket", judge=False))
        except Exception:
            logger.exception("affinity: could not read a WebSocket message")

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.state.exchanges.end(flow.id)

    def _finish(self, flow: http.HTTPFlow, ex: Exchange, reader: UsageReader | None, *,
                stream: bool, complete: bool, error: str | None, transport: str = "http",
                usage_problem: str | None = None, judge: bool = True) -> Iterator[None]:
        """Judge the response, then build its record once and write it out: a slice each
        (`Scheduler.defer`)."""
        state = self.state
        resp = flow.response
        usage = reader.usage() if reader else None
        extras = reader.extras if reader else {}
        response_cache = resp is not None and PROVIDER_FACTS.is_response_cache_hit(resp.headers)
        verdict, predicted = None, None
        pending = ex.fingerprint.finish() if judge and ex.fingerprint is not None else None
        if pending is not None:
            # The gap to the conversation's previous request runs from that request's start to
            # this one's (when the provider looked the prefix up), both on the flow's clock as
            # the tracker stored them: not to the wall clock at the end of this response.
            judged, predicted = state.tracker.verdict(
                pending, usage, pending.ts, response_cache=response_cache,
                provider_reason=extras.get("provider_miss_reason"),
                dry_run=ex.request.dry_run,
                load=ex.load)  # the key's rate when sent: the `overflow` check's evidence
            verdict = judged.to_log()
            yield
        record = build.build(
            request=ex.request, flow_id=flow.id, status=resp.status_code if resp else None,
            usage=usage, usage_raw=reader.raw if reader else None, stream=stream,
            transport=transport, complete=complete, error=error,
            started=flow.request.timestamp_start, response_cache=response_cache, extras=extras,
            verdict=verdict, predicted_hit_ratio=predicted, usage_problem=usage_problem,
            instance=state.settings.instance)
        yield
        self._publish(flow, ex, record)

    def _publish(self, flow: http.HTTPFlow, ex: Exchange, record: Record) -> None:
        state = self.state
        data = record.to_json()
        if state.writer:
            state.writer.write(data)
        state.stats.add(data)
        state.ttl.add(data)
        state.key_rates.add(data)
        for sink in state.sinks:  # exporters (metrics, traces): a failing one never stops a record
            try:
                sink(record, data)
            except Exception:
                state.warn_once(f"sink:{sink!r}", "affinity: exporter %r failed; records go on",
                                sink)
        flow.comment = build.comment(record)
        flow.marked = build.marker(record)
        flow.metadata[META] = {**ex.request.to_json(), "usage": data["usage"],
                               "hit_ratio": record.hit_ratio, "miss_reason": record.miss_reason,
                               "miss_detail": record.miss_detail}
        if state.scheduler.running and getattr(ctx.master, "view", None) is not None:
            # Changed after the hook returned: mitmweb's and mitmproxy console's flow list
            # must hear of it (mitmdump has no view; the dispatch would cost for nothing).
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))
