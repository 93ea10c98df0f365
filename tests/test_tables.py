"""Tables that fit: no model name or miss reason is cut when the output is a file, a pipe or a
narrow terminal; `affinity report --width/--plain`."""

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from affinity_addon.__main__ import main
from affinity_addon.views.aggregate import Aggregator
from affinity_addon.views.console import output_console, render_summary

MODEL = "x-ai/grok-code-fast-1-extended-context-preview-2026"


def record(i: int, reason: str, read: int) -> dict[str, Any]:
    return {"v": 1, "ts": f"2026-12-01T01:0{i}:00.000Z", "flow_id": str(i), "rule": "openrouter-grok",
            "rules": ["openrouter-grok"], "provider": "openai-chat", "host": "openrouter.ai",
            "path": "/api/v1/chat/completions", "method": "POST", "model": MODEL,
            "affinity_id": "aff-0123456789abcdef0123456789abcdef", "affinity_source": "root",
            "stream": True, "transport": "http", "status": 200, "complete": True,
            "usage": {"input_tokens": 20000, "cache_read_tokens": read,
                      "cache_write_tokens": 0, "output_tokens": 100},
            "hit_ratio": read / 20000, "response_cache": False, "dry_run": False,
            "added": {"headers": {}, "fields": {}, "markers": []},
            "miss_reason": reason, "miss_detail": None}


RECORDS = [record(1, "first-write", 0), record(2, "hit", 19000), record(3, "first-write", 0)]


def test_summary_to_a_file_keeps_names_whole() -> None:
    agg = Aggregator()
    for r in RECORDS:
        agg.add(r)
    buf = io.StringIO()  # not a terminal: as wide as the tables need
    render_summary(agg, output_console(buf))
    out = buf.getvalue()
    assert MODEL in out and "first-write" in out and "…" not in out


@pytest.mark.parametrize("width", [60, 80])
def test_narrow_tables_wrap_rather_than_cut(width: int) -> None:
    agg = Aggregator()
    for r in RECORDS:
        agg.add(r)
    buf = io.StringIO()
    render_summary(agg, output_console(buf, width=width, plain=True))
    out = buf.getvalue()
    assert "…" not in out
    assert max(map(len, out.splitlines())) <= width
    # The model name is all there, folded over lines of its column.
    joined = "".join(line.strip() for line in out.splitlines())
    assert all(part in joined for part in ("x-ai/grok", "extended", "2026"))


def test_report_width_and_plain(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    monkeypatch.setattr(sys, "argv", ["affinity"])
    assert main(["report", str(log), "--plain"]) == 0
    out = capsys.readouterr().out
    assert MODEL in out and "first-write ×2" in out and "\x1b[" not in out
    assert main(["report", str(log), "--width", "70", "--plain"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 70
    assert "x-ai/grok…" not in out and "first-writ…" not in out
