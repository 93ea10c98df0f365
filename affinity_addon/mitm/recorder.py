"""The response side as an addon: usage from JSON, SSE (streamed through a tap) and WebSocket
frames, the miss verdict, and one record per response (JSONL, flow comment, live summary).
"""

import logging
from collections.abc import Iterator
from typing import Any

from mitmproxy import ctx, hooks, http

from affinity_addon.catalog.providers import PROVIDER_FACTS
from affinity_addon.decoding import DecodeLimit, decode_body
from affinity_addon.mitm.state import Live, State, Stepped, drain
from affinity_addon.record import build
from affinity_addon.record.schema import META, Record, Usage
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

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if meta is None or flow.response is None or not meta.get("shape"):
            return
        try:
            reader = UsageReader(meta["shape"])
            tap = None
            ctype = flow.response.headers.get("content-type", "")
            if ctype.startswith("text/event-stream") and not flow.response.stream:
                # Stream it: mitmproxy would otherwise hold the whole answer back until its last
                # event (docs/mitmproxy-notes.md#streaming).
                tap = StreamTap(flow.response.headers.get("content-encoding"),
                                reader.feed_event, keep_limit=self.state.keep_bodies)
                flow.response.stream = tap
            self.state.live[flow.id] = Live(reader, tap)
        except Exception:
            logger.exception("affinity: cannot watch this response; it passes unobserved")

    def response(self, flow: http.HTTPFlow) -> None:
        live = self.state.live.pop(flow.id, None)
        meta = flow.metadata.get(META)
        if meta is None or flow.response is None:
            return
        if flow.websocket is not None:  # the upgrade: records come per completed frame
            self.state.pending.pop(flow.id, None)
            return
        try:
            tap = live.tap if live is not None else None
            if tap is not None and flow.response.raw_content is None and tap.kept is not None:
                flow.response.raw_content = tap.kept  # visible in mitmweb; already sent
            # Reading the body and judging it wait until the response is on its way.
            pending = self.state.pending.pop(flow.id, None)
            self.state.defer(self._answered(flow, meta, live, pending))
        except Exception:
            logger.exception("affinity: could not record this response")

    def _answered(self, flow: http.HTTPFlow, meta: dict[str, Any], live: Live | None,
                  pending: Stepped | None) -> Iterator[None]:
        assert flow.response is not None
        tap = live.tap if live is not None else None
        problem = None
        if live is not None and tap is None and flow.response.raw_content:
            try:
                body = decode_body(flow.response.raw_content,
                                   flow.response.headers.get("content-encoding"))
                live.reader.feed_json(parse_json(body or b""))
            except DecodeLimit as e:  # a bomb: bounded decoding stopped it
                problem = f"response not inspected: {e}"
                logger.warning("affinity: %s %s", flow.request.pretty_host, problem)
            except (ValueError, RecursionError):
                problem = "JSON body not readable"  # an error page, or a body we don't know
        # A stream that ended without its terminal event was cut short upstream.
        complete = tap is None or (tap.ended and live is not None and live.reader.terminal)
        if tap is not None:
            problem = tap_problem(tap)
        yield from self._finish(flow, meta, live, stream=tap is not None, complete=complete,
                                error=None, usage_problem=problem, pending=pending)

    def error(self, flow: http.HTTPFlow) -> None:
        live = self.state.live.pop(flow.id, None)
        meta = flow.metadata.get(META)
        if meta is None or flow.websocket is not None:
            self.state.pending.pop(flow.id, None)
            return
        try:
            stream = live is not None and live.tap is not None
            msg = flow.error.msg if flow.error else "error"
            pending = self.state.pending.pop(flow.id, None)
            self.state.defer(self._finish(flow, meta, live, stream=stream, complete=False,
                                          error=msg, pending=pending))
        except Exception:
            logger.exception("affinity: could not record this failed response")

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        # Codex in ChatGPT mode streams over a WebSocket: every terminal frame from the server
        # ends one model response, with usage like the Responses API.
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
            if not any(t in content for t in PROVIDER_FACTS.websocket_terminal_events):
                return
            reader = UsageReader(meta.get("shape") or OPENAI_RESPONSES)
            reader.feed_event(None, content)
            if reader.terminal:
                drain(self._finish(flow, meta, Live(reader, None), stream=True, complete=True,
                                   error=None, transport="websocket"))
        except Exception:
            logger.exception("affinity: could not read a WebSocket message")

    def _finish(self, flow: http.HTTPFlow, meta: dict[str, Any], live: Live | None, *,
                stream: bool, complete: bool, error: str | None, transport: str = "http",
                usage_problem: str | None = None,
                pending: Stepped | None = None) -> Iterator[None]:
        """Build the record, judge it, write it out: a slice each (`State.defer`)."""
        reader = live.reader if live else None
        resp = flow.response
        usage = reader.usage() if reader else None
        record = build.build(
            meta=meta, flow_id=flow.id, status=resp.status_code if resp else None,
            usage=usage, usage_raw=reader.raw if reader else None,
            stream=stream, transport=transport, complete=complete, error=error,
            started=flow.request.timestamp_start,
            response_cache=resp is not None and PROVIDER_FACTS.is_response_cache_hit(resp.headers),
            extras=reader.extras if reader else None,
        )
        record.usage_problem = usage_problem
        yield
        yield from self._record(flow, meta, record, usage, pending)

    def _record(self, flow: http.HTTPFlow, meta: dict[str, Any], record: Record,
                usage: Usage | None, pending: Stepped | None) -> Iterator[None]:
        state = self.state
        judged = pending.finish() if pending is not None else None
        if judged is not None:
            # The gap to the conversation's previous request runs from that request's start to
            # this one's (when the provider looked the prefix up), both on the flow's clock as
            # the tracker stored them: not to the wall clock at the end of this response.
            verdict, predicted = state.tracker.verdict(
                judged, usage, judged.ts, response_cache=record.response_cache,
                provider_reason=record.provider_miss_reason, dry_run=record.dry_run,
                load=meta.get("load"))  # the key's rate when sent: the `overflow` check's evidence
            record.miss_reason, record.miss_detail = verdict.reason, verdict.detail
            record.expected_cacheable_tokens = verdict.expected_cacheable_tokens
            record.provider_miss_reason = verdict.provider_reason
            record.predicted_hit_ratio = predicted
            meta["miss_reason"], meta["miss_detail"] = verdict.reason, verdict.detail
            yield
        record.instance = state.instance or None
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
        meta["usage"] = data["usage"]
        meta["hit_ratio"] = record.hit_ratio
        if state.running_later and getattr(ctx.master, "view", None) is not None:
            # Changed after the hook returned: mitmweb's and mitmproxy console's flow list
            # must hear of it (mitmdump has no view; the dispatch would cost for nothing).
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))
