"""The response side as an addon: usage from JSON, SSE (streamed through a tap) and WebSocket
frames, the miss verdict, and one record per response (JSONL, flow comment, live summary).
"""

import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

from mitmproxy import ctx, hooks, http

from affinity_addon.apis import OPENAI_RESPONSES
from affinity_addon.catalog import prices
from affinity_addon.catalog.diagnostics import DiagnosticsSource
from affinity_addon.catalog.providers import PROVIDER_FACTS
from affinity_addon.decoding import DecodeLimit, decode_body
from affinity_addon.diagnosis import agreement
from affinity_addon.diagnosis.verdicts import Verdict
from affinity_addon.jsonpath import get_path
from affinity_addon.mitm.exchange import Exchange
from affinity_addon.mitm.scheduler import drain
from affinity_addon.mitm.state import State
from affinity_addon.record import build
from affinity_addon.record.schema import META, Record
from affinity_addon.response import eventstream
from affinity_addon.response.provider_answer import read_answer
from affinity_addon.response.stream_tap import DEFAULT_MAX_EVENT, StreamTap
from affinity_addon.response.tap import Tap
from affinity_addon.response.usage import UsageReader, parse_json

logger = logging.getLogger(__name__)

MAX_ERROR_BODY = 64 * 1024  # an error JSON is small; a bigger 400 body is not read for its message


def tap_problem(tap: Tap) -> str | None:
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

    def _source(self, ex: Exchange) -> DiagnosticsSource | None:
        """The provider diagnostics the request asked for, if it asked."""
        asked = ex.request.diagnostics
        return self.state.links.table.by_name(asked.get("source")) if asked else None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = self.state.exchanges.get(flow.id)
        if ex is None or flow.response is None or not ex.request.api:
            return
        try:
            source = self._source(ex)
            ex.reader = UsageReader(ex.request.api, source.answer.at if source else ())
            if ex.link is not None:  # the next request of its conversation names this response
                ex.resolver = partial(self._response_id, flow, ex)
                self.state.links.answering(ex.link, ex.resolver)
            if flow.response.stream:
                return
            ctype = flow.response.headers.get("content-type", "")
            encoding = flow.response.headers.get("content-encoding")
            keep = self.state.settings.keep_bodies
            # Stream it: mitmproxy holds a whole answer back unless `stream` is set
            # (docs/mitmproxy-notes.md#streaming).
            if ctype.startswith("text/event-stream"):
                ex.tap = StreamTap(encoding, ex.reader.feed_event, keep_limit=keep)
            elif ctype.startswith(eventstream.CONTENT_TYPE):  # Bedrock's streaming answers
                ex.tap = eventstream.EventStreamTap(
                    encoding, eventstream.bedrock_frames(ex.reader), keep_limit=keep)
            if ex.tap is not None:
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

    def _read_body(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        """Feed a whole (non-streamed) JSON body to the reader, once: the record's deferred job
        or, sooner, the next request of the conversation that needs its response id."""
        resp, reader = flow.response, ex.reader
        if ex.body_read or resp is None or reader is None or ex.tap is not None\
                or resp.raw_content is None:
            return
        ex.body_read = True
        if not resp.raw_content:
            return
        try:
            body = decode_body(resp.raw_content, resp.headers.get("content-encoding"))
            reader.feed_json(parse_json(body or b""))
        except DecodeLimit as e:  # a bomb: bounded decoding stopped it
            ex.body_problem = f"response not inspected: {e}"
            logger.warning("affinity: %s %s", flow.request.pretty_host, ex.body_problem)
        except (ValueError, RecursionError):
            ex.body_problem = "JSON body not readable"  # an error page, or a body we don't know

    def _response_id(self, flow: http.HTTPFlow, ex: Exchange) -> tuple[str | None, bool]:
        """(the provider's id of this response, settled): for the conversation's next request,
        which may come before this response's record."""
        resp = flow.response
        if resp is None:
            return None, flow.error is not None
        if not 200 <= resp.status_code < 300:
            return None, True
        reader = ex.reader
        rid = reader.extras.get("response_id") if reader is not None else None
        if rid is not None or ex.tap is not None:  # a stream has it from its first events
            return rid, rid is not None or ex.tap is None or ex.tap.ended
        if resp.raw_content is None:
            return None, False  # the body is still on its way
        self._read_body(flow, ex)
        return (reader.extras.get("response_id") if reader is not None else None), True

    def _answered(self, flow: http.HTTPFlow, ex: Exchange) -> Iterator[None]:
        assert flow.response is not None
        tap, reader = ex.tap, ex.reader
        self._read_body(flow, ex)
        problem = ex.body_problem
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
            reader = UsageReader(ex.request.api or OPENAI_RESPONSES)
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
        ok = resp is not None and 200 <= resp.status_code < 300
        response_id = extras.get("response_id") if ok else None
        if ex.link is not None:
            ex.link.answered(ex.resolver, response_id)
            ex.resolver = None
        verdict, predicted, judged = None, None, None
        pending = ex.fingerprint.finish() if judge and ex.fingerprint is not None else None
        if pending is not None:
            # The gap to the conversation's previous request runs from that request's start to
            # this one's (when the provider looked the prefix up), both on the flow's clock as
            # the tracker stored them: not to the wall clock at the end of this response.
            judged, predicted = state.tracker.verdict(
                pending, usage, pending.ts, response_cache=response_cache,
                # a signed request's plan was undone: nothing to predict from
                dry_run=ex.request.dry_run and not ex.request.rewrite_skipped,
                load=ex.load,  # the key's rate when sent: the `overflow` check's evidence
                response_id=response_id if isinstance(response_id, str) else None)
            verdict = judged.to_log()
            yield
        said = self._provider_said(flow, ex, reader, judged)
        record = build.build(
            request=ex.request, flow_id=flow.id, status=resp.status_code if resp else None,
            usage=usage, usage_raw=reader.raw if reader else None, stream=stream,
            transport=transport, complete=complete, error=error,
            started=flow.request.timestamp_start, response_cache=response_cache, extras=extras,
            verdict=verdict, predicted_hit_ratio=predicted, provider_diagnosis=said,
            usage_problem=usage_problem, instance=state.settings.instance)
        yield
        self._publish(flow, ex, record)

    def _provider_said(self, flow: http.HTTPFlow, ex: Exchange, reader: UsageReader | None,
                       judged: Verdict | None) -> dict[str, Any] | None:
        """The provider's own diagnosis, when the request asked for one; a 400 about the field
        we added stops adding it to that host."""
        asked, source = ex.request.diagnostics, self._source(ex)
        if asked is None or source is None:
            return None
        resp = flow.response
        if resp is not None and resp.status_code == 400 and asked.get("by") == "proxy":
            message = self._error_message(flow, source)
            if message is not None and source.names_field(message)\
                    and self.state.links.refuse(ex.request.host, message):
                logger.warning("affinity: %s refused the cache diagnostics field we add (%s); "
                               "not adding it there again until restart. The provider said: %s",
                               ex.request.host, source.request.link, message[:300])
        compared_to = asked.get("compared_to")
        answer = read_answer(source.answer, reader is not None and reader.answer_seen,
                             reader.answer if reader is not None else None,
                             compared=compared_to is not None)
        if answer.malformed:
            self.state.warn_once(f"malformed-diagnosis:{source.name}",
                                 "affinity: a %s cache diagnostics answer had an API we do not "
                                 "know; recorded without a result", source.name)
        return agreement.diagnosis(source.name, compared_to, answer.result,
                                   answer.missed_tokens, judged)

    @staticmethod
    def _error_message(flow: http.HTTPFlow, source: DiagnosticsSource) -> str | None:
        """A 400's error message (never recorded: it may quote the request)."""
        resp = flow.response
        if resp is None or not resp.raw_content or len(resp.raw_content) > MAX_ERROR_BODY:
            return None
        try:
            body = parse_json(decode_body(resp.raw_content,
                                          resp.headers.get("content-encoding")) or b"")
        except (DecodeLimit, ValueError, RecursionError):
            return None
        return next((m for p in source.error_at if isinstance(m := get_path(body, p), str)),
                    None)

    def _publish(self, flow: http.HTTPFlow, ex: Exchange, record: Record) -> None:
        state = self.state
        data = record.to_json()
        if state.writer:
            state.writer.write(data)
        state.stats.add(data)
        state.ttl.add(data)
        state.cache_key_rates.add(data)
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
                               "miss_detail": record.miss_detail,
                               "provider_diagnosis": record.provider_diagnosis}
        if state.scheduler.running and getattr(ctx.master, "view", None) is not None:
            # Changed after the hook returned: mitmweb's and mitmproxy console's flow list
            # must hear of it (mitmdump has no view; the dispatch would cost for nothing).
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))
