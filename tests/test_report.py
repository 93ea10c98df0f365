"""`affinity report`: reading logs, filters, tables, JSON, the HTML page in a real browser."""

import gzip
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from affinity_addon.__main__ import main
from affinity_addon.views.html import render_html
from affinity_addon.views.report import (
    RecordFilter,
    build_report,
    parse_since,
    render_report,
    report_document,
)
from tests import loggen

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return loggen.generate(conversations=50, seed=11)


@pytest.fixture
def log(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    return loggen.write_log(tmp_path / "a.jsonl", records, malformed=4)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["report", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def expected(records: list[dict[str, Any]]) -> dict[str, int]:
    """The totals, counted by hand from the generated records."""
    counted = [r for r in records if r["usage"] is not None and not r["response_cache"]]
    u = [r["usage"] for r in counted]
    return {
        "requests": len(records),
        "counted": len(counted),
        "response_cache": sum(r["response_cache"] for r in records),
        "no_usage": sum(r["usage"] is None for r in records),
        "input_tokens": sum(x["input_tokens"] for x in u),
        "cache_read_tokens": sum(x["cache_read_tokens"] for x in u),
        "cache_write_tokens": sum(x["cache_write_tokens"] for x in u),
        "uncached_tokens": sum(x["input_tokens"] - x["cache_read_tokens"]
                               - x["cache_write_tokens"] for x in u),
        "output_tokens": sum(x["output_tokens"] for x in u),
        "hit_requests": sum(x["cache_read_tokens"] > 0 for x in u),
        "prompt_requests": sum(x["input_tokens"] > 0 for x in u),
    }


# --- --since parsing ------------------------------------------------------------------------

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "when"), [
    ("2h", NOW - timedelta(hours=2)),
    ("30m", NOW - timedelta(minutes=30)),
    ("7d", NOW - timedelta(days=7)),
    ("1w", NOW - timedelta(weeks=1)),
    ("90s", NOW - timedelta(seconds=90)),
    ("1.5h", NOW - timedelta(minutes=90)),
    ("2026-11-23T10:00:00Z", datetime(2026, 11, 23, 10, tzinfo=UTC)),
    ("2026-11-23T11:00:00+01:00", datetime(2026, 11, 23, 10, tzinfo=UTC)),
    ("2026-11-23 10:00", datetime(2026, 11, 23, 10, tzinfo=UTC)),
    ("2026-11-23", datetime(2026, 11, 23, tzinfo=UTC)),
])
def test_parse_since(text: str, when: datetime):
    assert parse_since(text, NOW) == when


@pytest.mark.parametrize("text", ["yesterday", "2x", "-2h", "", "2026-13-40"])
def test_parse_since_rejects(text: str):
    with pytest.raises(ValueError, match="--since"):
        parse_since(text, NOW)


# --- JSON numbers ---------------------------------------------------------------------------

def test_json_totals_equal_hand_counted_sums(capsys, log, records):
    doc = run_json(capsys, str(log), "--top", "0")
    assert doc["input"]["malformed"] == 4
    assert doc["input"]["records"] == len(records)
    assert doc["input"]["lines"] == len(records) + 4
    total = doc["total"]
    want = expected(records)
    for key, value in want.items():
        assert total[key] == value, key
    assert total["hit_ratio"] == pytest.approx(want["cache_read_tokens"] / want["input_tokens"])
    assert total["request_hit_ratio"] == pytest.approx(want["hit_requests"]
                                                       / want["prompt_requests"])
    # Per model and per rule add up to the same totals, and match a hand count per model.
    for view in ("by_model", "by_rule", "by_host", "by_conversation", "by_reason"):
        assert sum(b["input_tokens"] for b in doc[view]) == want["input_tokens"], view
        assert sum(b["requests"] for b in doc[view]) == want["requests"], view
    # Per host: each provider's own hit ratio, by hand.
    by_host = {b["key"]: b for b in doc["by_host"]}
    assert set(by_host) == {r["host"] for r in records}
    for host, b in by_host.items():
        mine = [r for r in records if r["host"] == host and r["usage"]
                and not r["response_cache"]]
        read = sum(r["usage"]["cache_read_tokens"] for r in mine)
        total_in = sum(r["usage"]["input_tokens"] for r in mine)
        assert b["hit_ratio"] == (pytest.approx(read / total_in) if total_in else None), host
    assert doc["conversations"] == len({r["affinity_id"] for r in records})
    by_model = {b["key"]: b for b in doc["by_model"]}
    for model in {r["model"] for r in records}:
        mine = [r for r in records if r["model"] == model]
        assert by_model[model]["requests"] == len(mine)
        assert by_model[model]["cache_read_tokens"] == sum(
            r["usage"]["cache_read_tokens"] for r in mine
            if r["usage"] and not r["response_cache"])
    # Miss reasons: requests and tokens lost (uncached + written) of the missed requests.
    missed: dict[str, list[int]] = {}
    for r in records:
        if r["usage"] and not r["response_cache"] and r["miss_reason"] != "hit":
            lost = r["usage"]["input_tokens"] - r["usage"]["cache_read_tokens"]
            missed.setdefault(r["miss_reason"], []).append(lost)
    got = {m["reason"]: (m["requests"], m["tokens_lost"]) for m in total["miss_reasons"]}
    assert got == {k: (len(v), sum(v)) for k, v in missed.items()}
    for m in total["miss_reasons"]:
        assert 1 <= len(m["examples"]) <= 3
        assert max(e["tokens_lost"] for e in m["examples"]) == max(missed[m["reason"]])
    # Dry run: the one dry-run rule, its predictions averaged token-weighted.
    dry = [r for r in records if r["dry_run"] and r["usage"] and r["predicted_hit_ratio"]
           is not None]
    (rule,) = doc["dry_run"]["by_rule"]
    assert rule["rule"] == "deepseek-dry" and rule["requests"] == len(dry)
    assert rule["predicted_read_tokens"] == pytest.approx(
        sum(r["predicted_hit_ratio"] * r["usage"]["input_tokens"] for r in dry))
    assert rule["saved_token_equivalents"] > 0


def test_json_costs_are_dollars_by_kind(capsys, log):
    doc = run_json(capsys, str(log))
    by_model = {b["key"]: b for b in doc["by_model"]}
    # Every generated model is in the genai-prices table: all costs are dollars.
    assert {b["cost"]["unit"] for b in by_model.values()} == {"usd"}
    assert doc["prices"]["table"].startswith("genai-prices ")
    assert doc["prices"]["unpriced"] == [] and doc["total"]["cost_usd"]["unpriced"] == []
    grok = by_model["grok-4"]
    # grok-4: $3/MTok input, cache reads $0.75, no write surcharge, output $15
    # (https://docs.x.ai/docs/models).
    out = grok["output_tokens"] * 15e-6
    assert grok["cost"]["without_cache"] == pytest.approx(grok["input_tokens"] * 3e-6 + out)
    assert grok["cost"]["with_cache"] == pytest.approx(
        (grok["uncached_tokens"] + grok["cache_write_tokens"]) * 3e-6
        + grok["cache_read_tokens"] * 0.75e-6 + out)
    assert grok["cost_usd"]["output"] == pytest.approx(out)
    assert doc["total"]["cost_usd"]["requests"] == doc["total"]["counted"]
    assert doc["total"]["cost_usd"]["with_cache"] == pytest.approx(
        sum(b["cost_usd"]["with_cache"] for b in by_model.values()))


def test_several_logs_add_up(capsys, tmp_path, records):
    half = len(records) // 2
    a = loggen.write_log(tmp_path / "proxy-1.jsonl", records[:half])
    b = tmp_path / "proxy-2.jsonl.gz"
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[half:])
    doc = run_json(capsys, str(a), str(b))
    assert doc["input"]["files"] == [str(a), str(b)]
    want = expected(records)
    assert doc["total"]["input_tokens"] == want["input_tokens"]
    assert doc["total"]["requests"] == want["requests"]


# --- filters --------------------------------------------------------------------------------

def test_filter_model_glob(capsys, log, records):
    doc = run_json(capsys, str(log), "--model", "CLAUDE-*")
    mine = [r for r in records if fnmatchcase(r["model"], "claude-*")]
    assert mine and doc["total"]["requests"] == len(mine)
    assert {b["key"] for b in doc["by_model"]} == {r["model"] for r in mine}
    assert doc["input"]["filtered_out"] == len(records) - len(mine)
    assert doc["filters"]["model"] == "CLAUDE-*"


def test_filter_session_prefix(capsys, log, records):
    conv = records[len(records) // 2]["affinity_id"]
    doc = run_json(capsys, str(log), "--session", conv[:6])
    mine = [r for r in records if r["affinity_id"].startswith(conv[:6])]
    assert doc["total"]["requests"] == len(mine)
    assert {b["key"] for b in doc["by_conversation"]} == {r["affinity_id"] for r in mine}
    assert conv in {b["key"] for b in doc["by_conversation"]}


def test_filter_since_iso(capsys, log, records):
    cut = records[len(records) // 3]["ts"]
    doc = run_json(capsys, str(log), "--since", cut)
    mine = [r for r in records if r["ts"] >= cut]
    assert doc["total"]["requests"] == len(mine)
    assert doc["total"]["first_ts"] == cut
    assert doc["total"]["input_tokens"] == expected(mine)["input_tokens"]


def test_filter_since_relative(capsys, tmp_path):
    start = datetime.now(UTC) - timedelta(hours=12)
    records = loggen.generate(conversations=20, seed=4, start=start, span=timedelta(hours=10))
    log = loggen.write_log(tmp_path / "recent.jsonl", records)
    cut = datetime.now(UTC) - timedelta(hours=3)
    doc = run_json(capsys, str(log), "--since", "3h")
    mine = [r for r in records if datetime.fromisoformat(r["ts"]) >= cut]
    # A record may cross the boundary between computing `cut` and running the report.
    assert abs(doc["total"]["requests"] - len(mine)) <= 1
    assert 0 < len(mine) < len(records)


def test_filters_combine(log, records):
    conv = next(r["affinity_id"] for r in records if r["model"] == "grok-4")
    flt = RecordFilter(model="grok-*", session=conv[:8],
                       since=datetime(2000, 1, 1, tzinfo=UTC))
    report = build_report([log], flt)
    mine = [r for r in records if r["model"] == "grok-4" and r["affinity_id"].startswith(conv[:8])]
    assert report.agg.total.requests == len(mine) > 0


# --- robustness -----------------------------------------------------------------------------

def test_malformed_lines_are_counted_not_fatal(capsys, tmp_path, records):
    path = tmp_path / "bad.jsonl"
    good = [json.dumps(r) for r in records[:5]]
    body = "\n".join([good[0], "{broken", "", "   ", good[1], "[]", "42", "null", good[2],
                      good[3], good[4]]).encode()
    path.write_bytes(body + b"\n\xff\xfe not utf8\n" + b'{"v": 1, "usage": {"input_tok')
    assert main(["report", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["input"]["records"] == 5
    assert doc["input"]["blank"] == 2
    assert doc["input"]["malformed"] == 6  # {broken, [], 42, null, bad bytes, torn last line
    assert doc["input"]["malformed_at"][0] == f"{path}:2"
    assert doc["total"]["requests"] == 5
    assert f"skipped 6 malformed line(s), first at {path}:2" in captured.err


def test_truncated_gzip_keeps_what_was_read(capsys, tmp_path, records):
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    path.write_bytes(data[: len(data) // 2])
    assert main(["report", str(path), "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert 0 < doc["total"]["requests"] < len(records)
    assert doc["input"]["errors"] and "cut.jsonl.gz" in captured.err


def test_missing_file_and_bad_arguments(capsys, tmp_path, log):
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["report", str(log), "--since", "last tuesday"]) == 2
    assert "--since" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report"])
    with pytest.raises(SystemExit):
        main([])


def test_empty_log(capsys, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert main(["report", str(path)]) == 0
    assert "no matching records" in capsys.readouterr().out
    doc = run_json(capsys, str(path))
    assert doc["total"]["requests"] == 0 and doc["total"]["hit_ratio"] is None


def test_markup_in_log_values_is_printed_literally(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "200")
    rec = loggen.generate(conversations=1, seed=1)[1]
    rec.update(model="[/bold]evil[red]", miss_reason="prefix-changed", miss_detail="[/]x")
    path = loggen.write_log(tmp_path / "m.jsonl", [rec])
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[/bold]evil[red]" in out and "[/]x" in out


# --- tables ---------------------------------------------------------------------------------

def test_tables_are_printed(capsys, monkeypatch, log, records):
    monkeypatch.setenv("COLUMNS", "220")
    assert main(["report", str(log), "--top", "5"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    for title in ("Per model", "Per rule", "Per host", "Top 5 of 50 conversations",
                  "Miss reasons", "Dry run: what the rules would have saved"):
        assert title in out, title
    for name in ({r["model"] for r in records} | {r["rule"] for r in records}
                 | {r["host"] for r in records}):
        assert name in out, name
    report = build_report([log])
    total = report.agg.total
    assert f"{total.hit_ratio * 100:.1f}%" in out
    assert f"{total.request_hit_ratio * 100:.1f}%" in out
    assert "4 malformed line(s) skipped" in out
    assert "skipped 4 malformed" in captured.err
    # The five largest conversations by prompt tokens are listed, by ID prefix.
    top = sorted(report.agg.by_conversation.values(), key=lambda b: -b.input_tokens)[:5]
    for b in top:
        assert b.key[:12] in out
    # Each miss reason row shows example requests: timestamp, conversation prefix, detail.
    worst = max(total.examples["prefix-changed"], key=lambda e: e.tokens_lost)
    assert worst.ts in out and worst.affinity_id[:12] in out
    assert re.search(r"prefix-changed\s+\d+\s+[\d.]+[kM]", out)


# --- HTML -----------------------------------------------------------------------------------

def test_html_is_self_contained_and_escaped(tmp_path, records):
    # The costliest miss of all, so its detail is among the examples shown.
    evil = dict(records[3], model="</script><script>alert(1)</script>", miss_reason="unknown",
                miss_detail="<img src=x onerror=alert(2)>", response_cache=False,
                usage={"input_tokens": 10**8, "cache_read_tokens": 0, "cache_write_tokens": 0,
                       "output_tokens": 1})
    log = loggen.write_log(tmp_path / "x.jsonl", [*records, evil])
    page = render_html(build_report([log]))
    assert page.count("<script") == 2  # the data blob and the page script, nothing injected
    assert "<h2>Per host</h2>" in page and f"<code>{records[0]['host']}</code>" in page
    assert "<img src=x" not in page and "&lt;img src=x" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page
    blob = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page,
                     re.S)
    assert blob is not None
    data = json.loads(blob.group(1))
    assert {m["key"] for m in data["models"]} >= {"grok-4", evil["model"]}
    assert data["series"] and all(len(s["points"]) >= 1 for s in data["series"])


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed (apt-get install chromium); set "
                "AFFINITY_SKIP_BROWSER=1 to skip the browser test")


def _run_browser(args: list[str], profile: Path, timeout: float = 120) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        # The browser's helper processes share its new process group: end them all.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


@pytest.mark.skipif(os.environ.get("AFFINITY_SKIP_BROWSER") == "1",
                    reason="AFFINITY_SKIP_BROWSER=1")
def test_html_charts_render_in_headless_chromium(tmp_path, log, capsys):
    page = tmp_path / "report.html"
    assert main(["report", str(log), "--html", str(page), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    dom = _run_browser(["--dump-dom", page.as_uri()], tmp_path / "profile")
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None, dom[:500]
    attrs = body.group(1)
    assert "data-render-error" not in attrs, attrs
    rendered = re.search(r'data-rendered="(\d+)"', attrs)
    assert rendered is not None, "the page script did not finish"
    assert rendered.group(1) == re.search(r'data-expected="(\d+)"', attrs).group(1) == "4"
    # Script-built SVG: one line per drawn conversation plus the all-conversations line.
    lines = re.findall(r'<path [^>]*class="series-line[^"]*"', dom)
    assert len(lines) == min(8, doc["conversations"]) + 1
    segments = re.findall(r'<rect [^>]*class="bar-seg"', dom)
    nonzero = sum((b["cache_read_tokens"] > 0) + (b["cache_write_tokens"] > 0)
                  + (b["uncached_tokens"] > 0) for b in doc["by_model"])
    assert len(segments) == nonzero
    reason_bars = re.findall(r'<rect [^>]*class="bar"', dom)
    assert len(reason_bars) == len(doc["total"]["miss_reasons"]) + 2  # + dry run bars
    assert len(re.findall(r"<svg ", dom)) == 4
    assert dom.count('data-tip="') > 50

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    _run_browser([f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                 tmp_path / "profile2")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    shutil.copy(page, ARTIFACTS / "report.html")


# --- performance ----------------------------------------------------------------------------

def test_100mb_log_report_timing(tmp_path, capsys):
    path = tmp_path / "big.jsonl"
    t0 = time.perf_counter()
    n = loggen.write_big_log(path, 100 * 1024 * 1024)
    t1 = time.perf_counter()
    assert main(["report", str(path), "--json", "--top", "20"]) == 0
    t2 = time.perf_counter()
    doc = json.loads(capsys.readouterr().out)
    size = path.stat().st_size
    path.unlink()  # pytest keeps the last runs' tmp dirs: don't leave 100 MB behind
    assert doc["input"]["records"] == n and doc["total"]["requests"] == n
    assert doc["conversations"] > 5000
    with capsys.disabled():
        print(f"\n100 MB log: {size / 2**20:.0f} MiB, {n} records; generated in {t1 - t0:.1f} s, "
              f"report in {t2 - t1:.1f} s ({size / 2**20 / (t2 - t1):.0f} MiB/s)")
    assert t2 - t1 < 120  # a sanity bound only: shared CI machines vary


def test_custom_price_table(capsys, tmp_path, log, records):
    table = tmp_path / "prices.yaml"
    table.write_text("overrides:\n  - name: flat\n    read: 0.5\n    input_usd_per_mtok: 2\n"
                     "    output_usd_per_mtok: 4\n    source: https://example.com/flat\n",
                     encoding="utf-8")
    doc = run_json(capsys, str(log), "--prices", str(table))
    want = expected(records)
    cost = doc["total"]["cost"]
    assert cost["unit"] == "usd"
    out = doc["total"]["output_tokens"] * 4e-6
    assert cost["without_cache"] == pytest.approx(want["input_tokens"] * 2e-6 + out)
    assert cost["with_cache"] == pytest.approx(
        (want["uncached_tokens"] + want["cache_write_tokens"]
         + 0.5 * want["cache_read_tokens"]) * 2e-6 + out)
    assert str(table) in doc["prices"]["table"]
    table.write_text("overrides:\n  - name: broken\n    read: 1\n", encoding="utf-8")
    assert main(["report", str(log), "--prices", str(table)]) == 2
    assert "`source` must be" in capsys.readouterr().err


def test_junk_records_never_break_any_output(tmp_path):
    rng = random.Random(0)
    values = [None, 0, -1, 1.5, float("inf"), "x", "2026-11-23T10:00:00Z", "[bold]", [], {},
              True, 10**20, "</script>"]
    keys = ["ts", "model", "rule", "affinity_id", "usage", "miss_reason", "miss_detail",
            "response_cache", "dry_run", "predicted_hit_ratio", "provider", "host", "complete"]
    counters = ["input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens",
                "cost", "cache_write_1h_tokens"]
    lines = []
    for _ in range(1500):
        record = {k: rng.choice(values) for k in keys if rng.random() < 0.7}
        if rng.random() < 0.6:
            record["usage"] = {k: rng.choice(values) for k in counters if rng.random() < 0.8}
        lines.append(json.dumps(record))
    path = tmp_path / "junk.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    report = build_report([path])
    assert report.agg.total.requests == 1500
    console = Console(file=io.StringIO(), width=150)
    render_report(report, console)
    json.dumps(report_document(report), allow_nan=False)
    page = render_html(report)
    assert page.count("<script") == 2
