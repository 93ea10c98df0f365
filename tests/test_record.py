"""The typed record and its documentation cannot drift apart."""

import json
import re
from pathlib import Path

from affinity_addon.record import build
from affinity_addon.record.schema import RECORD_FIELDS, Usage

DOC = Path(__file__).resolve().parent.parent / "docs" / "log-format.md"


def documented_fields() -> list[str]:
    names: list[str] = []
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| (`[^|]+`) \|", line)
        if m:
            names += re.findall(r"`([a-z_0-9]+)`", m.group(1))
    return names


def test_log_format_doc_lists_exactly_the_record_fields_in_order() -> None:
    assert documented_fields() == list(RECORD_FIELDS)


def test_record_json_has_the_documented_fields_and_is_plain_json() -> None:
    meta = {"rule": "r", "rules": ["r"], "shape": "openai-chat", "model": "gpt-5",
            "affinity_id": "aff-1", "affinity_source": "root", "dry_run": False,
            "host": "api.openai.com", "path": "/v1/chat/completions", "method": "POST"}
    rec = build.build(meta=meta, flow_id="f", status=200,
                      usage=Usage(input_tokens=2000, cache_read_tokens=1536),
                      usage_raw={"prompt_tokens": 2000}, stream=False, transport="http",
                      complete=True, error=None, started=99.0, response_cache=False, now=100.0)
    data = rec.to_json()
    assert list(data) == list(RECORD_FIELDS)
    assert data["usage"]["cache_read_tokens"] == 1536 and data["hit_ratio"] == 0.768
    assert data["duration_ms"] == 1000.0 and data["provider"] == "openai-chat"
    assert json.loads(json.dumps(data)) == data
    assert build.comment(rec).startswith("cache 1.54k read / 0 write of 2.00k · 77%")
