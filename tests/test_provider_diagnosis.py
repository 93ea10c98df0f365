"""Provider cache diagnostics, the response side, in-process (the addons under taddons): the
record's `provider_diagnosis`, whether our verdict agrees, a refusal turning the field off, odd
answers, a fast agent's next request, and how the report, metrics and OTel show it."""

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from rich.console import Console

from affinity_addon.diagnosis.agreement import agrees, judged_results
from affinity_addon.diagnosis.verdicts import Verdict
from affinity_addon.mitm.config import DEFAULT_RULES
from affinity_addon.record.schema import META
from affinity_addon.views.report import build_report, render_report, report_document
from tests.driver import Affinity

SYSTEM = "You are a careful agent. Follow the rules. " * 200  # ~2,000 tokens: cacheable
TOOLS = [{"name": f"tool{i}", "description": f"does thing {i} " * 10,
          "input_schema": {"type": "object"}} for i in range(3)]


def claude_flow(turn: int, *, tools: list[dict[str, Any]] = TOOLS,
                system: str = SYSTEM, first: str = "fix the bug") -> http.HTTPFlow:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": first}]
    for i in range(turn):
        msgs += [{"role": "assistant", "content": f"answer {i}"},
                 {"role": "user", "content": f"go on {i}"}]
    body = {"model": "claude-sonnet-4-6", "max_tokens": 64, "system": system, "tools": tools,
            "messages": msgs}
    return tflow.tflow(req=tutils.treq(
        method=b"POST", host="api.anthropic.com", port=443, scheme=b"https", authority=b"",
        path=b"/v1/messages", content=json.dumps(body).encode(),
        headers=http.Headers(content_type="application/json")))


def sent(f: http.HTTPFlow) -> dict[str, Any]:
    return json.loads(f.request.content or b"{}")


def answer(f: http.HTTPFlow, rid: str, diagnostics: Any = "absent", *, read: int = 0,
           write: int = 2000, status: int = 200, body: Any = None) -> None:
    msg: dict[str, Any] = {"id": rid, "type": "message", "role": "assistant",
                           "model": "claude-sonnet-4-6", "content": [{"type": "text",
                                                                      "text": "ok"}],
                           "stop_reason": "end_turn",
                           "usage": {"input_tokens": 20, "output_tokens": 2,
                                     "cache_creation_input_tokens": write,
                                     "cache_read_input_tokens": read}}
    if diagnostics != "absent":
        msg["diagnostics"] = diagnostics
    f.response = tutils.tresp(status_code=status, content=json.dumps(
        body if body is not None else msg).encode(),
        headers=http.Headers(content_type="application/json"))


def run(a: Affinity, f: http.HTTPFlow, rid: str, diagnostics: Any = "absent",
        **kw: Any) -> None:
    a.request(f)
    answer(f, rid, diagnostics, **kw)
    a.responseheaders(f)
    a.response(f)


def miss(kind: str, tokens: int = 1500) -> dict[str, Any]:
    return {"cache_miss_reason": {"type": kind, "cache_missed_input_tokens": tokens}}


@pytest.fixture
def lab(tmp_path: Path):
    a = Affinity()
    log = tmp_path / "a.jsonl"
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(log))
        yield a, log, tctx


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_the_record_keeps_the_providers_answer_next_to_ours(lab) -> None:
    a, log, _ = lab
    f1 = claude_flow(0)
    run(a, f1, "msg_1", None)  # opted in: nothing compared, null back
    f2 = claude_flow(1)
    run(a, f2, "msg_2", None, read=2000, write=30)  # appended: nothing diverged, a hit
    f3 = claude_flow(2, tools=TOOLS[::-1])
    run(a, f3, "msg_3", miss("tools_changed"))
    f4 = claude_flow(3, tools=TOOLS[::-1])
    run(a, f4, "msg_4", miss("system_changed"), read=0)  # the provider names what we did not see
    assert [sent(f)["diagnostics"] for f in (f1, f2, f3, f4)] == [
        {"previous_message_id": p} for p in (None, "msg_1", "msg_2", "msg_3")]
    r1, r2, r3, r4 = records(log)
    assert r1["provider_diagnosis"] == {"source": "anthropic", "compared_to": None,
                                        "result": None, "missed_tokens": None, "agrees": None}
    assert r2["provider_diagnosis"]["result"] == "no-divergence"
    assert r2["provider_diagnosis"]["agrees"] is True and r2["miss_reason"] == "hit"
    assert r3["provider_diagnosis"] == {"source": "anthropic", "compared_to": "msg_2",
                                        "result": "tools_changed", "missed_tokens": 1500,
                                        "agrees": True}
    assert r3["miss_reason"] == "prefix-changed"  # ours stays ours
    assert r4["provider_diagnosis"]["agrees"] is False
    assert "anthropic says system_changed (DISAGREES)" in f4.comment
    assert f3.metadata[META]["provider_diagnosis"]["result"] == "tools_changed"
    assert f3.metadata[META]["diagnostics"] == {"source": "anthropic", "compared_to": "msg_2",
                                                "by": "proxy"}
    assert "provider=anthropic:tools_changed (agrees)" in a.bundle.commands.why_command([f3])
    from affinity_addon.mitm.contentview import _summary
    assert "provider:  anthropic says system_changed (compared to msg_3; ours disagrees)" in \
        _summary(f4.metadata[META])


def test_off_adds_nothing_and_records_nothing(lab) -> None:
    a, log, tctx = lab
    tctx.configure(a.bundle, affinity_provider_diagnostics=False)
    for turn in range(2):
        f = claude_flow(turn)
        run(a, f, f"msg_{turn}", None)
        assert "diagnostics" not in sent(f)
    assert all(r["provider_diagnosis"] is None for r in records(log))


@pytest.mark.parametrize("diagnostics, result", [
    ({"cache_miss_reason": None}, "pending"),
    (miss("previous_message_not_found"), "previous_message_not_found"),
    ({"cache_miss_reason": {"type": "speed_changed", "cache_missed_input_tokens": 9}},
     "speed_changed"),  # a type we do not know: as given
    ("garbage", None), ([1], None), ({"cache_miss_reason": {"type": None}}, None),
])
def test_odd_answers_never_break_the_record(lab, diagnostics: Any, result: str | None) -> None:
    a, log, _ = lab
    run(a, claude_flow(0), "msg_1", None)
    run(a, claude_flow(1), "msg_2", diagnostics)
    r = records(log)[-1]
    assert r["complete"] is True and r["usage"] is not None
    assert r["provider_diagnosis"]["result"] == result
    assert r["provider_diagnosis"]["agrees"] is None


def test_unknown_verdict_gets_the_providers_reason_in_its_detail(lab) -> None:
    a, log, _ = lab
    run(a, claude_flow(0), "msg_1", None)
    run(a, claude_flow(1), "msg_2", miss("messages_changed", 700), status=200, body={
        "id": "msg_2", "type": "message", "role": "assistant", "content": [],
        "diagnostics": miss("messages_changed", 700)})  # no usage: our verdict is unknown
    r = records(log)[-1]
    assert r["miss_reason"] == "unknown"
    assert r["miss_detail"].endswith("the provider says messages_changed (~700 tokens missed)")


def test_a_400_naming_our_field_turns_it_off_for_the_host(lab, caplog) -> None:
    a, log, _ = lab
    refusal = {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "diagnostics: Extra inputs are not permitted"}, "request_id": "req_1"}
    caplog.set_level(logging.WARNING)
    f1 = claude_flow(0)
    run(a, f1, "", status=400, body=refusal)
    assert "diagnostics" in sent(f1)
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and "Extra inputs are not permitted" in warnings[0]
    f2 = claude_flow(0, first="another task")
    run(a, f2, "msg_2", None)
    assert "diagnostics" not in sent(f2)
    # A 400 about something else leaves it on (other host state untouched).
    assert set(a.state.links.refused) == {"api.anthropic.com"}


def test_a_400_about_something_else_keeps_it(lab) -> None:
    a, _, _ = lab
    other = {"type": "error", "error": {"type": "invalid_request_error",
                                        "message": "max_tokens: must be positive"}}
    run(a, claude_flow(0), "", status=400, body=other)
    f = claude_flow(0, first="again")
    run(a, f, "msg_2", None)
    assert "diagnostics" in sent(f) and not a.state.links.refused


async def test_a_fast_agents_next_request_names_the_response_before_its_record(
        tmp_path: Path) -> None:
    a = Affinity()
    log = tmp_path / "a.jsonl"
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(log))
        f1 = claude_flow(0)
        run(a, f1, "msg_fast")
        assert a.state.scheduler.queue and not log.read_text()  # its record waits
        f2 = claude_flow(1)
        a.request(f2)  # the agent is quicker than the record
        assert sent(f2)["diagnostics"] == {"previous_message_id": "msg_fast"}
        await asyncio.sleep(0.05)
        answer(f2, "msg_next", None)
        a.responseheaders(f2)
        a.response(f2)
        await asyncio.sleep(0.05)
    r1, r2 = records(log)
    assert r2["provider_diagnosis"]["compared_to"] == "msg_fast"
    assert r2["provider_diagnosis"]["agrees"] is True


@pytest.mark.parametrize("result", judged_results())
def test_agreement_needs_the_same_previous_response(result: str) -> None:
    v = Verdict("prefix-changed", changed=frozenset({"model", "tools", "system", "messages",
                                                     "settings"}), key_changed=True,
                previous_id="msg_1")
    assert agrees(result, v, "msg_2") is None  # compared with another response than we did
    assert agrees(result, v, None) is None
    assert agrees(result, Verdict("hit", changed=None), "msg_1") is None  # we had no previous


def test_agreement_table() -> None:
    def v(reason: str = "prefix-changed", *changed: str, key: bool = False) -> Verdict:
        return Verdict(reason, changed=frozenset(changed), key_changed=key, previous_id="m")

    cases = [
        ("no-divergence", v("ttl-expired"), True),
        ("no-divergence", v("hit", "messages"), False),
        ("cache_hit", v("hit"), True), ("cache_hit", v("routed-away"), False),
        ("tools_changed", v("prefix-changed", "tools", "system"), True),
        ("tools_changed", v("prefix-changed", "system"), False),
        ("system_changed", v("prefix-changed", "system"), True),
        ("model_changed", v("prefix-changed", "model"), True),
        ("messages_changed", v("partial", "messages"), True),
        ("input_changed", v("prefix-changed", "system"), True),
        ("context_compacted", v("prefix-changed", "messages"), True),
        ("reasoning_effort_changed", v("prefix-changed", "settings"), True),
        ("reasoning_effort_changed", v("routed-away"), False),
        ("prompt_cache_key_changed", v("routed-away", key=True), True),
        ("unavailable", v("hit"), None), ("pending", v("hit"), None),
        ("previous_message_not_found", v("hit"), None),
        ("comparison_response_not_found", v("hit"), None), ("speed_changed", v("hit"), None),
    ]
    for result, verdict, expected in cases:
        assert agrees(result, verdict, "m") is expected, (result, verdict)


def line(i: int, result: str | None, agree: bool | None, ours: str = "prefix-changed",
         **extra: Any) -> dict[str, Any]:
    return {"v": 1, "ts": f"2026-12-01T10:00:{i:02d}.000Z", "flow_id": f"f{i}",
            "rule": "anthropic-breakpoints", "provider": "anthropic", "host": "api.anthropic.com",
            "model": "claude-sonnet-4-6", "affinity_id": f"aff-{i % 3}",
            "usage": {"input_tokens": 5000, "cache_read_tokens": 0, "cache_write_tokens": 5000,
                      "output_tokens": 3}, "complete": True, "miss_reason": ours,
            "miss_detail": f"detail {i}",
            "provider_diagnosis": None if result is None else {
                "source": "anthropic", "compared_to": f"msg_{i - 1}", "result": result,
                "missed_tokens": 4000, "agrees": agree}, **extra}


def test_report_lists_disagreements_first_and_reads_old_logs(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    lines = [line(0, None, None, "first-write"),
             *(line(i, "tools_changed", True) for i in range(1, 6)),
             line(6, "system_changed", False, "routed-away"),
             line(7, "pending", None, "hit"),
             line(8, None, None, "prefix-changed", provider_diagnosis=None,
                  provider_miss_reason="messages_changed")]  # a line from before the field
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = build_report([log])
    doc = report_document(report)["provider_agreement"]
    assert (doc["compared"], doc["agree"], doc["disagree"], doc["unjudged"]) == (8, 5, 1, 2)
    first = doc["pairs"][0]
    assert (first["provider"], first["ours"], first["agrees"], first["requests"]) == (
        "system_changed", "routed-away", False, 1)
    assert first["examples"][0]["flow_id"] == "f6"
    assert first["examples"][0]["miss_detail"] == "detail 6"
    assert doc["pairs"][-1]["agrees"] is True and doc["pairs"][-1]["requests"] == 5
    assert {"provider": "messages_changed", "agrees": None} .items() <= next(
        p for p in doc["pairs"] if p["provider"] == "messages_changed").items()
    console = Console(width=200, record=True, color_system=None)
    render_report(report, console)
    text = console.export_text()
    table = text[text.index("Provider diagnosis vs ours"):]
    assert table.index("system_changed") < table.index("tools_changed")
    assert "1 disagree" in table

    from affinity_addon.views.console import render_summary
    summary = Console(width=200, record=True, color_system=None)
    render_summary(report.agg, summary)  # the proxy's shutdown summary
    assert "provider diagnosis: 8 request(s) the provider diagnosed itself: 5 agree" in \
        summary.export_text()

    from affinity_addon.views.html import render_html
    page = render_html(report)
    assert "Provider diagnosis vs ours" in page
    assert page.index("system_changed") < page.index("tools_changed")


def test_metrics_and_the_span_carry_the_providers_result(lab) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tests.procs import free_port
    from tests.test_metrics import scrape, total

    a, _, tctx = lab
    port = free_port()
    tctx.configure(a.bundle, affinity_metrics=f"127.0.0.1:{port}")
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    a.bundle.otel.tracer = provider.get_tracer("test")  # what affinity_otel=true sets up
    a.state.sinks.append(a.bundle.otel._sink)
    run(a, claude_flow(0), "msg_1", None)
    run(a, claude_flow(1, tools=TOOLS[::-1]), "msg_2", miss("tools_changed", 321))
    run(a, claude_flow(2, tools=TOOLS[::-1]), "msg_3", miss("system_changed"))
    samples = scrape(port)
    name = "affinity_provider_diagnoses_total"
    assert total(samples, name, source="anthropic", result="tools_changed", agrees="true") == 1
    assert total(samples, name, source="anthropic", result="system_changed",
                 agrees="false") == 1
    assert total(samples, name) == 2  # the opt-in compared nothing: not counted
    attrs = [dict(s.attributes or {}) for s in spans.get_finished_spans()]
    assert "affinity.provider_diagnosis.result" not in attrs[0]
    assert attrs[1]["affinity.provider_diagnosis.result"] == "tools_changed"
    assert attrs[1]["affinity.provider_diagnosis.agrees"] is True
    assert attrs[1]["affinity.provider_diagnosis.missed_tokens"] == 321
    assert attrs[2]["affinity.provider_diagnosis.agrees"] is False
    tctx.configure(a.bundle, affinity_metrics="")
