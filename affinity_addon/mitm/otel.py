"""OpenTelemetry traces as an addon: `--set affinity_otel=true` sends one span per LLM response
over OTLP/HTTP, with the GenAI semantic-convention attributes and the cache verdict.

Endpoint, headers and timeout come from the standard OTEL_EXPORTER_OTLP_* variables (the
exporter reads them itself); the service name from OTEL_SERVICE_NAME (default "affinity").
Spans are exported by the SDK's batch processor on its own thread: the proxy only queues them,
and a full queue drops spans rather than wait. An unreachable collector is a warning; a
malformed endpoint stops startup. Needs the `otel` extra: pip install 'affinity-addon[otel]'.
"""

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions

from affinity_addon.mitm.state import State
from affinity_addon.record.schema import Record

logger = logging.getLogger(__name__)

SHUTDOWN_WAIT = 3.0  # seconds a shutdown waits for the last spans (the collector may be gone)
# Well-known gen_ai.provider.name values by API host; other hosts are named as they are.
PROVIDER_NAMES = {
    "api.openai.com": "openai", "chatgpt.com": "openai", "api.anthropic.com": "anthropic",
    "api.x.ai": "x_ai", "api.deepseek.com": "deepseek", "api.mistral.ai": "mistral_ai",
    "generativelanguage.googleapis.com": "gcp.gemini", "api.groq.com": "groq",
    "api.perplexity.ai": "perplexity", "openrouter.ai": "openrouter",
    "api.fireworks.ai": "fireworks",
}


def provider_name(host: str) -> str:
    host = host.lower()
    if host in PROVIDER_NAMES:
        return PROVIDER_NAMES[host]
    if host.startswith("bedrock-runtime."):
        return "aws.bedrock"
    if host.endswith("aiplatform.googleapis.com"):
        return "gcp.vertex_ai"
    if host.endswith(".openai.azure.com"):
        return "azure.ai.openai"
    return host


def traces_endpoint(env: Mapping[str, str] = os.environ) -> str:
    """The URL the OTLP/HTTP exporter will post to, checked: ValueError says what is wrong."""
    name = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    given = url = env.get(name, "").strip()
    if not url:
        name = "OTEL_EXPORTER_OTLP_ENDPOINT"
        given = env.get(name, "").strip() or "http://localhost:4318"
        url = given.rstrip("/") + "/v1/traces"
    parts = urlsplit(given)
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError(f"{name}={given!r}: the port is not a number from 0 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name}={given!r}: expected an http:// or https:// URL with a host")
    return url


def _reachable(url: str, timeout: float = 2.0) -> str | None:
    """None if something accepts TCP connections at the URL's host and port, else why not."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e)


class OTel:
    name = "affinity-otel"

    def __init__(self, state: State) -> None:
        self.state = state
        self.provider: Any = None
        self.tracer: Any = None
        self.endpoint = ""

    def configure(self, updated: set[str]) -> None:
        if "affinity_otel" not in updated:
            return
        if not ctx.options.affinity_otel:
            self._stop()
            return
        if self.provider is not None:
            return
        try:
            endpoint = traces_endpoint()
        except ValueError as e:
            raise exceptions.OptionsError(f"Cannot export affinity_otel traces: {e}") from None
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise exceptions.OptionsError(
                "affinity_otel needs OpenTelemetry: pip install 'affinity-addon[otel]'") from None
        attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "affinity"}
        provider = TracerProvider(resource=Resource.create(attrs))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.provider, self.endpoint = provider, endpoint
        self.tracer = provider.get_tracer("affinity_addon")
        self.state.sinks.append(self._sink)
        logger.info("affinity: OpenTelemetry spans to %s", endpoint)
        threading.Thread(target=self._probe, name="affinity-otel-probe", daemon=True).start()

    def _probe(self) -> None:
        why = _reachable(self.endpoint)
        if why is not None:
            logger.warning("affinity: OpenTelemetry collector %s unreachable (%s); spans are "
                           "dropped until it answers, proxying goes on", self.endpoint, why)

    def _stop(self) -> None:
        if self._sink in self.state.sinks:
            self.state.sinks.remove(self._sink)
        provider, self.provider, self.tracer = self.provider, None, None
        if provider is not None:
            # Flush what is queued, but never hold the shutdown for a collector that is gone.
            t = threading.Thread(target=provider.shutdown, name="affinity-otel-stop", daemon=True)
            t.start()
            t.join(SHUTDOWN_WAIT)

    def done(self) -> None:
        self._stop()

    def _sink(self, record: Record, data: dict[str, Any]) -> None:
        tracer = self.tracer
        if tracer is None:
            return
        from opentelemetry.trace import SpanKind, Status, StatusCode

        end = time.time_ns()
        start = end - int((record.duration_ms or 0) * 1e6)
        operation = "generate_content" if record.api == "gemini" else "chat"
        attrs: dict[str, Any] = {
            "gen_ai.provider.name": provider_name(record.host),
            "gen_ai.operation.name": operation,
            "server.address": record.host,
            "affinity.rule": record.rule or "",
            "affinity.stream": record.stream,
            "affinity.complete": record.complete,
        }
        optional = {
            "gen_ai.request.model": record.model,
            "gen_ai.conversation.id": record.affinity_id,
            "affinity.verdict": record.miss_reason,
            "affinity.hit_ratio": record.hit_ratio,
            "http.response.status_code": record.status,
            "error.type": record.error and "upstream",
        }
        said = record.provider_diagnosis
        if said and said.get("result"):
            optional.update({
                "affinity.provider_diagnosis.source": said.get("source"),
                "affinity.provider_diagnosis.result": said.get("result"),
                "affinity.provider_diagnosis.agrees": said.get("agrees"),
                "affinity.provider_diagnosis.missed_tokens": said.get("missed_tokens"),
            })
        u = record.usage
        if u is not None:
            optional.update({
                "gen_ai.usage.input_tokens": u.input_tokens,
                "gen_ai.usage.output_tokens": u.output_tokens,
                "gen_ai.usage.cache_read.input_tokens": u.cache_read_tokens,
                "gen_ai.usage.cache_creation.input_tokens": u.cache_write_tokens,
            })
        attrs.update({k: v for k, v in optional.items() if v is not None})
        span = tracer.start_span(f"{operation} {record.model or ''}".strip(), kind=SpanKind.CLIENT,
                                 start_time=start, attributes=attrs)
        if record.error or (record.status or 0) >= 400:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end)
