"""The typed record and its documentation cannot drift apart."""

import json
import re
from pathlib import Path

from affinity_addon.record import build
from affinity_addon.record.schema import NOTHING_ADDED, RECORD_FIELDS, RequestFacts, Usage

DOC = Path(__file__).resolve().parent.parent / "docs" / "log-format.md"


def documented_fields() -> list[str]:
    names: list[str] = []
    for line in DOC.read_text().split("\n## ")[0].splitlines():  # the field table only
        m = re.match(r"^\| (`[^|]+`) \|", line)
        if m:
            names += re.findall(r"`([a-z_0-9]+)`", m.group(1))
    return names


def test_log_format_doc_lists_exactly_the_record_fields_in_order() -> None:
    assert documented_fields() == list(RECORD_FIELDS)


def test_record_json_has_the_documented_fields_and_is_plain_json() -> None:
    facts = RequestFacts(rule="r", rules=("r",), api="openai-chat", model="gpt-5",
                         affinity_id="aff-1", affinity_source="root", dry_run=False,
                         added=NOTHING_ADDED, kept=(), body_write="none", warning=None,
                         host="api.openai.com", path="/v1/chat/completions", method="POST",
                         cache_key_bucket=None)
    rec = build.build(request=facts, flow_id="f", status=200,
                      usage=Usage(input_tokens=2000, cache_read_tokens=1536),
                      usage_raw={"prompt_tokens": 2000}, stream=False, transport="http",
                      complete=True, error=None, started=99.0, response_cache=False, now=100.0)
    data = rec.to_json()
    assert list(data) == list(RECORD_FIELDS)
    assert data["usage"]["cache_read_tokens"] == 1536 and data["hit_ratio"] == 0.768
    assert data["duration_ms"] == 1000.0 and data["api"] == "openai-chat"
    assert json.loads(json.dumps(data)) == data
    assert build.comment(rec).startswith("cache 1.54k read / 0 write of 2.00k · 77%")


def test_a_stream_the_tap_cannot_read_says_why_in_the_record(tmp_path) -> None:
    from mitmproxy.http import Headers
    from mitmproxy.test import taddons, tflow, tutils

    from tests.driver import Affinity

    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n  - name: k\n    match: {host: api.example.com}\n"
                     "    set_fields: {prompt_cache_key: '{affinity_id}'}\n")
    log = tmp_path / "log.jsonl"
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(rules), affinity_log=str(log))
        body = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
        f = tflow.tflow(req=tutils.treq(
            method=b"POST", host="api.example.com", port=443, scheme=b"https", authority=b"",
            path=b"/v1/chat/completions", headers=Headers(content_type="application/json"),
            content=json.dumps(body).encode()))
        a.request(f)
        f.response = tutils.tresp(headers=Headers(content_type="text/event-stream",
                                                  content_encoding="xz"), content=None)
        a.responseheaders(f)
        f.response.stream(b"\xfd7zXZ garbage")
        f.response.stream(b"")
        a.response(f)
    (line,) = log.read_text().splitlines()
    record = json.loads(line)
    assert record["usage"] is None
    assert record["usage_problem"] == "stream not read: unsupported content-encoding 'xz'"


def test_the_api_field_is_read_under_its_old_name_too() -> None:
    # Logs written before the field was renamed call it `provider`: the report reads both. An
    # Anthropic-shaped model nobody prices is weighed by Anthropic's multipliers (reads 0.1x),
    # which needs the API; without it every prompt token counts in full.
    from affinity_addon.views.observation import observe
    from affinity_addon.views.pricing import default_table

    base = {"v": 1, "ts": "2026-12-01T10:00:00.000Z", "model": "my-finetune",
            "host": "llm.internal.test", "complete": True,
            "usage": {"input_tokens": 10_000, "cache_read_tokens": 8_000,
                      "cache_write_tokens": 1_000, "output_tokens": 100}}
    table = default_table()
    new = observe({**base, "api": "anthropic"}, table.price_for, table.priced)
    old = observe({**base, "provider": "anthropic"}, table.price_for, table.priced)
    neither = observe(base, table.price_for, table.priced)
    assert new.eq_with == old.eq_with < neither.eq_with == 10_000
