"""Prometheus metrics and health checks as an addon: `--set affinity_metrics=127.0.0.1:9464`.

Serves `/metrics` (requests, records, tokens and dollars by kind, errors, latency), `/healthz` (the process
answers) and `/readyz` (rules loaded, log writable) from a small HTTP server on its own thread,
so a scrape never runs on the proxy's event loop. The hooks only bump counters (microseconds).

Labels are bounded: API, model family, rule, verdict, token kind and the provider's own
diagnosis (source, result, whether ours agrees), each capped at
`MAX_LABEL_VALUES` distinct values (then "other"); never an affinity ID, a path or a key.
"""

import json
import logging
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mitmproxy import ctx, exceptions, http

from affinity_addon.catalog.prices import KINDS as COST_KINDS
from affinity_addon.mitm.options import parse_address
from affinity_addon.mitm.state import State
from affinity_addon.models import model_family
from affinity_addon.record.schema import META, Record

logger = logging.getLogger(__name__)

MAX_LABEL_VALUES = 50
OTHER = "other"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


class LabelCap:
    """At most `limit` distinct values per label; later newcomers become "other"."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: dict[str, set[str]] = {}

    def __call__(self, label: str, value: Any) -> str:
        v = str(value)[:80] if value not in (None, "") else "none"
        seen = self.seen.setdefault(label, set())
        if v in seen:
            return v
        if len(seen) >= self.limit:
            return OTHER
        seen.add(v)
        return v


class PromMetrics:
    """The metric families, in their own registry (nothing global, one per addon)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("affinity_requests", "Matched LLM requests seen",
                                ["api", "rule"], registry=r)
        self.records = Counter("affinity_records", "Finished LLM responses recorded",
                               ["api", "model_family", "rule", "verdict", "outcome"],
                               registry=r)
        self.tokens = Counter("affinity_tokens", "Tokens by kind (input counts every prompt token)",
                              ["api", "model_family", "rule", "kind"], registry=r)
        # Dollars by kind of token (the record's `cost_usd`): input, cache_write_5m,
        # cache_write_1h, cache_read, output; responses nobody prices count in `unpriced`.
        self.cost = Counter("affinity_cost_usd", "Dollars of priced responses by kind of token",
                            ["api", "model_family", "rule", "kind"], registry=r)
        self.unpriced = Counter("affinity_unpriced_records",
                                "Responses with usage whose model nobody prices",
                                ["api", "model_family"], registry=r)
        self.errors = Counter("affinity_errors", "Failed LLM responses by kind",
                              ["api", "kind"], registry=r)
        self.diagnoses = Counter(
            "affinity_provider_diagnoses",
            "The provider's own cache diagnosis (result) and whether our verdict fits it",
            ["source", "result", "agrees"], registry=r)
        self.first_byte = Histogram(
            "affinity_first_byte_seconds", "Request sent to response headers (streams: first byte)",
            ["api", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("affinity_response_seconds", "Whole response, request to end",
                                  ["api"], buckets=LATENCY_BUCKETS, registry=r)
        self.rules = Gauge("affinity_rules_loaded", "Rules in the loaded rules file", registry=r)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        try:
            prom = self.server.owner.prom
            if path == "/metrics" and prom is not None:
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                self._send(200, generate_latest(prom.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                checks = self.server.owner.readiness()
                body = json.dumps(checks).encode() + b"\n"
                self._send(200 if all(checks.values()) else 503, body, "application/json")
            else:
                self._send(404, b"not found: /metrics, /healthz, /readyz\n", "text/plain")
        except ConnectionError:
            # The client hung up (HAProxy's health check closes with a reset once it has its
            # status line): nobody to answer, and nothing wrong with the endpoint.
            self.close_connection = True
        except Exception:
            logger.exception("affinity: metrics endpoint failed")
            try:
                self._send(500, b"error\n", "text/plain")
            except ConnectionError:
                self.close_connection = True

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # scrapes every few seconds would flood the event log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "Metrics"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints any error to stderr; a client that hung up (a health check's
        # reset) is none of ours, anything else is logged like the handler's own errors.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            logger.exception("affinity: metrics endpoint failed")


class Metrics:
    name = "affinity-metrics"

    def __init__(self, state: State) -> None:
        self.state = state
        self.prom: PromMetrics | None = None
        self.cap = LabelCap()
        self.server: _Server | None = None
        self.address: tuple[str, int] | None = None

    def configure(self, updated: set[str]) -> None:
        if "affinity_metrics" not in updated:
            return
        address = parse_address(ctx.options.affinity_metrics)  # checked by Config already
        if address == self.address and self.server is not None:
            return
        self._stop()
        if address is None:
            return
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise exceptions.OptionsError(
                "affinity_metrics needs the prometheus_client package (pip install "
                "prometheus_client)") from None
        if self.prom is None:
            self.prom = PromMetrics()
        try:
            server = _Server(address, _Handler)
        except OSError as e:
            raise exceptions.OptionsError(
                f"Cannot serve affinity_metrics on {address[0]}:{address[1]}: "
                f"{e.strerror or e}") from None
        server.owner = self
        threading.Thread(target=server.serve_forever, name="affinity-metrics",
                         daemon=True).start()
        self.server, self.address = server, address
        if self._sink not in self.state.sinks:
            self.state.sinks.append(self._sink)
        logger.info("affinity: metrics on http://%s:%d/metrics", *server.server_address[:2])

    def _stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server, self.address = None, None
        if self._sink in self.state.sinks:
            self.state.sinks.remove(self._sink)

    def done(self) -> None:
        self._stop()

    # --- health -------------------------------------------------------------------------------

    def readiness(self) -> dict[str, bool]:
        rs = self.state.ruleset
        writer = self.state.writer
        if not getattr(ctx.options, "affinity_log", ""):
            log_ok = True  # no log asked for: nothing to write
        elif writer is None:
            log_ok = False
        else:
            path = writer.path
            target = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
            log_ok = os.access(target, os.W_OK) and not writer.failing
        return {"rules_loaded": rs is not None and bool(rs.rules), "log_writable": log_ok}

    # --- hooks (only counter bumps: the request path pays microseconds) -----------------------

    def request(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if self.prom is None or meta is None:
            return
        try:
            self.prom.requests.labels(self.cap("api", meta.get("api")),
                                      self.cap("rule", meta.get("rule"))).inc()
            if self.state.ruleset is not None:
                self.prom.rules.set(len(self.state.ruleset.rules))
        except Exception:
            logger.debug("affinity: metrics request hook failed", exc_info=True)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if self.prom is None or meta is None or flow.response is None:
            return
        try:
            sent = flow.request.timestamp_end or flow.request.timestamp_start
            first = flow.response.timestamp_start
            if sent and first and first >= sent:
                stream = flow.response.headers.get("content-type", "").startswith(
                    "text/event-stream")
                self.prom.first_byte.labels(self.cap("api", meta.get("api")),
                                            "true" if stream else "false").observe(first - sent)
        except Exception:
            logger.debug("affinity: metrics responseheaders hook failed", exc_info=True)

    def _sink(self, record: Record, data: dict[str, Any]) -> None:
        prom = self.prom
        if prom is None:
            return
        api = self.cap("api", record.api)
        family = self.cap("model_family", model_family(record.model) or "none")
        rule = self.cap("rule", record.rule)
        verdict = self.cap("verdict", record.miss_reason or "none")
        if record.error:
            outcome = "error"
        elif record.status is not None and record.status >= 400:
            outcome = "http_error"
        elif not record.complete:
            outcome = "incomplete"
        else:
            outcome = "ok"
        prom.records.labels(api, family, rule, verdict, outcome).inc()
        if outcome != "ok":
            prom.errors.labels(api, outcome).inc()
        if record.duration_ms is not None:
            prom.duration.labels(api).observe(record.duration_ms / 1000)
        said = record.provider_diagnosis
        if said and said.get("result"):
            fits = said.get("agrees")
            agrees = "true" if fits is True else "false" if fits is False else "unknown"
            prom.diagnoses.labels(self.cap("diagnosis_source", said.get("source")),
                                  self.cap("diagnosis_result", said.get("result")), agrees).inc()
        u = record.usage
        if u is None:
            return
        w5, w1 = u.cache_write_5m_tokens or 0, u.cache_write_1h_tokens or 0
        kinds = {"input": u.input_tokens, "cache_read": u.cache_read_tokens,
                 "cache_write_5m": w5, "cache_write_1h": w1,
                 # providers that do not split writes by TTL
                 "cache_write": max(u.cache_write_tokens - w5 - w1, 0),
                 "output": u.output_tokens}
        for kind, n in kinds.items():
            if n:
                prom.tokens.labels(api, family, rule, kind).inc(n)
        cost = record.cost_usd
        if cost is None:
            prom.unpriced.labels(api, family).inc()
            return
        for kind in COST_KINDS:
            usd = cost.get(kind)
            if usd:
                prom.cost.labels(api, family, rule, kind).inc(usd)
