"""Dollar costs: the record's `cost_usd`, the report, the summary, the metrics and the HTML page
against list prices worked out by hand, and the fast path against genai-prices itself."""

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from affinity_addon.__main__ import main
from affinity_addon.catalog import prices
from affinity_addon.catalog.prices import PriceBook, default_book, record_cost
from affinity_addon.record import build
from affinity_addon.record.schema import RequestFacts, Usage
from affinity_addon.views.aggregate import Aggregator
from affinity_addon.views.console import render_summary
from affinity_addon.views.html import render_html
from affinity_addon.views.report import build_report

# Anthropic's list prices for Claude Sonnet 4.5, $ per million tokens: base input 3, 5m cache
# write 3.75, 1h cache write 6, cache hit 0.30, output 15
# (https://platform.claude.com/docs/en/about-claude/pricing).
SONNET = {"input": 3.0, "write_5m": 3.75, "write_1h": 6.0, "read": 0.30, "output": 15.0}
T0 = 1_795_000_000.0  # 2026-11-18, a Wednesday


def list_price(u: dict[str, int], p: dict[str, float] = SONNET) -> float:
    """Dollars of one logged usage object, by hand."""
    w1h = u.get("cache_write_1h_tokens", 0)
    uncached = u["input_tokens"] - u["cache_read_tokens"] - u["cache_write_tokens"]
    return (uncached * p["input"] + u["cache_read_tokens"] * p["read"]
            + (u["cache_write_tokens"] - w1h) * p["write_5m"] + w1h * p["write_1h"]
            + u["output_tokens"] * p["output"]) / 1e6


def record(model: str, usage: Usage | None, *, host: str = "api.anthropic.com",
           api: str = "anthropic", conv: str = "conv-1", now: float = T0) -> dict[str, Any]:
    """A record as the proxy builds it (record/build.py), as the JSONL line it writes."""
    return build.build(request=facts(model, host, api, conv), flow_id=f"f{now}", status=200,
                       usage=usage, usage_raw=None, stream=False, transport="http",
                       complete=True, error=None, started=now - 2, response_cache=False,
                       now=now).to_json()


def facts(model: str, host: str = "api.anthropic.com", api: str = "anthropic",
          conv: str = "conv-1") -> RequestFacts:
    return RequestFacts(rule="r", rules=("r",), api=api, model=model, affinity_id=conv,
                        affinity_source="root", dry_run=False, added={}, kept=(),
                        body_write="none", warning=None, host=host, path="/v1/messages",
                        method="POST", cache_key_bucket=None)


def conversation() -> list[dict[str, Any]]:
    """A Claude Sonnet 4.5 conversation: a 1h write, reads, 5m writes, a pause, output; and one
    request to a model nobody prices."""
    turns = [  # (prompt, read, write 5m, write 1h, output)
        (12_000, 0, 0, 11_500, 800),
        (13_500, 11_500, 1_800, 0, 1_200),
        (15_600, 13_300, 2_100, 0, 650),
        (18_000, 15_400, 0, 2_400, 2_000),
        (18_500, 0, 18_200, 0, 300),  # a miss: written again
    ]
    out = []
    for i, (prompt, read, w5, w1, o) in enumerate(turns):
        usage = Usage(input_tokens=prompt, cache_read_tokens=read, cache_write_tokens=w5 + w1,
                      output_tokens=o, cache_write_5m_tokens=w5, cache_write_1h_tokens=w1)
        out.append(record("claude-sonnet-4-5-20250929", usage, now=T0 + 60 * i))
    out.append(record("my-finetune", Usage(input_tokens=5_000, output_tokens=100),
                      host="llm.internal.example", conv="conv-2", now=T0 + 400))
    return out


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def report_json(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    assert main(["report", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- the done criterion: a Sonnet 4.5 conversation against Anthropic's list prices ----------


@pytest.mark.parametrize("old_log", [False, True], ids=["with-cost_usd", "old-log"])
def test_report_usd_equals_anthropic_list_prices(capsys, tmp_path, old_log):
    records = conversation()
    if old_log:  # logs written before `cost_usd` existed are priced from their usage
        for r in records:
            del r["cost_usd"]
    doc = report_json(capsys, write(tmp_path / "log.jsonl", records))
    sonnet = [r["usage"] for r in records if r["model"].startswith("claude")]
    want = sum(map(list_price, sonnet))
    usd = doc["total"]["cost_usd"]
    assert usd["with_cache"] == pytest.approx(want, rel=0.01)
    assert usd["requests"] == 5 and usd["unpriced_requests"] == 1
    assert usd["unpriced"] == ["my-finetune"]
    assert doc["prices"]["unpriced"] == [{"model": "my-finetune", "requests": 1}]
    assert doc["prices"]["table"].startswith("genai-prices 0.")
    by_model = {b["key"]: b for b in doc["by_model"]}
    assert by_model["my-finetune"]["cost_usd"]["requests"] == 0
    # Without the cache: every prompt token at $3, the same output at $15.
    prompt = sum(u["input_tokens"] for u in sonnet)
    out = sum(u["output_tokens"] for u in sonnet)
    assert usd["without_cache"] == pytest.approx((prompt * 3 + out * 15) / 1e6)
    assert usd["cache_write_1h"] == pytest.approx((11_500 + 2_400) * 6 / 1e6)
    assert usd["output"] == pytest.approx(out * 15 / 1e6)


# --- the record field -------------------------------------------------------------------------


def test_the_record_carries_cost_usd_by_kind():
    usage = Usage(input_tokens=100_000, cache_read_tokens=80_000, cache_write_tokens=10_000,
                  output_tokens=1_000, cache_write_5m_tokens=6_000, cache_write_1h_tokens=4_000)
    cost = record("claude-sonnet-4-5", usage)["cost_usd"]
    assert cost == {
        "input": pytest.approx(10_000 * 3 / 1e6),
        "cache_write_5m": pytest.approx(6_000 * 3.75 / 1e6),
        "cache_write_1h": pytest.approx(4_000 * 6 / 1e6),
        "cache_read": pytest.approx(80_000 * 0.3 / 1e6),
        "output": pytest.approx(1_000 * 15 / 1e6),
        "with_cache": pytest.approx(list_price(usage.to_dict())),
        "without_cache": pytest.approx((100_000 * 3 + 1_000 * 15) / 1e6),
        "priced_as": "anthropic/claude-sonnet-4-5",
    }
    # genai-prices' own worked example: 100k input (80k read, 10k 5m write) + 1k output.
    plain = Usage(input_tokens=100_000, cache_read_tokens=80_000, cache_write_tokens=10_000,
                  output_tokens=1_000)
    assert record("claude-sonnet-4-5", plain)["cost_usd"]["with_cache"] == pytest.approx(0.1065)


def test_unpriced_or_usage_less_records_have_no_cost():
    assert record("my-finetune", Usage(input_tokens=10), host="llm.internal.example")[
        "cost_usd"] is None
    assert record("claude-sonnet-4-5", None)["cost_usd"] is None
    assert record_cost("api.anthropic.com", "anthropic", None, Usage(input_tokens=10)) is None


def test_prices_follow_the_request_time():
    # DeepSeek bills V4 Flash at peak rates 01:00-04:00 and 06:00-10:00 UTC on weekdays, half
    # of it otherwise (https://api-docs.deepseek.com/quick_start/pricing).
    day = 1_792_022_400.0  # 2026-10-15 00:00 UTC, a Thursday
    usage = Usage(input_tokens=1_000_000)
    peak = record_cost("api.deepseek.com", "openai-chat", "deepseek-v4-flash", usage, day + 2 * 3600)
    off = record_cost("api.deepseek.com", "openai-chat", "deepseek-v4-flash", usage, day + 12 * 3600)
    assert peak is not None and off is not None
    assert peak["with_cache"] == pytest.approx(2 * off["with_cache"])


# --- the fast path is genai-prices' own arithmetic --------------------------------------------


def test_fast_path_equals_calc_price_for_every_model_of_the_main_providers():
    from genai_prices import Usage as GUsage
    from genai_prices import calc_price
    from genai_prices.data_snapshot import get_snapshot

    rng = random.Random(5)
    checked = 0
    for provider in get_snapshot().providers:
        if provider.id not in {"anthropic", "openai", "google", "x-ai", "deepseek",
                               "moonshotai", "openrouter", "aws", "mistral", "groq", "zai"}:
            continue
        table = PriceBook([(("h",), provider.id)])
        for info in provider.models:
            prompt = rng.choice([2_000, 150_000, 250_000, 300_000])
            read = rng.randrange(prompt // 2)
            w1h = rng.randrange(prompt // 8)
            w5 = rng.randrange(prompt // 8)
            out = rng.randrange(5_000)
            when = T0 - rng.randrange(400) * 86_400 + rng.randrange(86_400)
            priced = table.priced("h", "any", info.id, when)
            try:
                lib = calc_price(GUsage(input_tokens=prompt, cache_read_tokens=read,
                                        cache_write_tokens=w5 + w1h, cache_write_5m_tokens=w5,
                                        cache_write_1h_tokens=w1h, output_tokens=out),
                                 info.id, provider_id=provider.id,
                                 genai_request_timestamp=prices._when(when))
            except (LookupError, ValueError):
                continue
            mp = lib.model_price
            if priced is None:  # no input price: genai-prices charges what is left
                assert mp.input_mtok is None, info.id
                continue
            if mp.requests_kcount is not None:  # a per-request fee: no token kind of ours
                continue
            mine = priced.cost(prompt, read, w5 + w1h, w1h, out).with_cache
            assert mine == pytest.approx(float(lib.total_price), rel=1e-9, abs=1e-12), info.id
            checked += 1
    assert checked > 300


def test_per_record_cost_is_a_fraction_of_calc_price(capsys):
    from genai_prices import Usage as GUsage
    from genai_prices import calc_price

    usage = Usage(input_tokens=100_000, cache_read_tokens=80_000, cache_write_tokens=10_000,
                  output_tokens=1_000)
    record_cost("api.anthropic.com", "anthropic", "claude-sonnet-4-5", usage, T0)  # resolve
    n = 2000
    t0 = time.perf_counter()
    for i in range(n):
        record_cost("api.anthropic.com", "anthropic", "claude-sonnet-4-5", usage, T0 + i)
    ours = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n // 10):
        calc_price(GUsage(input_tokens=100_000, cache_read_tokens=80_000,
                          cache_write_tokens=10_000, output_tokens=1_000),
                   "claude-sonnet-4-5", provider_id="anthropic")
    theirs = (time.perf_counter() - t0) / (n // 10)
    with capsys.disabled():
        print(f"\nper record: record_cost {ours * 1e6:.1f} µs, calc_price {theirs * 1e6:.1f} µs")
    assert ours * 4 < theirs


# --- the overrides, each with why the table alone is not enough ------------------------------


def table_only() -> PriceBook:
    """The shipped host map without the overrides: what genai-prices prices by itself."""
    return PriceBook(default_book().routes)


def test_openrouter_claude_1h_writes_cost_2x():
    # The table's OpenRouter entries have no 1h cache-write price: 1h writes would cost 1.25x.
    args = ("openrouter.ai", "openai-chat", "anthropic/claude-sonnet-4.5", T0)
    alone = table_only().priced(*args)
    assert alone is not None and alone.at(0)[3] == pytest.approx(3.75e-6)
    priced = default_book().priced(*args)
    assert priced is not None and priced.at(0)[3] == pytest.approx(6e-6)
    assert priced.at(0)[:3] == alone.at(0)[:3]


def test_deepseek_anthropic_endpoint_bills_claude_names_as_deepseek_models():
    # api.deepseek.com/anthropic takes Claude model names; the table knows no such model there.
    assert table_only().priced("api.deepseek.com", "anthropic", "claude-opus-4-5", T0) is None
    opus = default_book().priced("api.deepseek.com", "anthropic", "claude-opus-4-5", T0)
    flash = default_book().priced("api.deepseek.com", "anthropic", "claude-haiku-4-5", T0)
    assert opus is not None and "deepseek-v4-pro" in opus.rates.name
    assert flash is not None and "deepseek-v4-flash" in flash.rates.name


def test_dashscope_is_priced_from_the_alibaba_route_with_its_cache_multipliers():
    # No DashScope provider in the table.
    host = "dashscope-intl.aliyuncs.com"
    assert table_only().priced(host, "openai-chat", "qwen3-coder-plus", T0) is None
    priced = default_book().priced(host, "openai-chat", "qwen3-coder-plus", T0)
    assert priced is not None
    i, r, w5, w1, _ = priced.at(0)
    assert (r / i, w5 / i, w1 / i) == pytest.approx((0.1, 1.25, 1.25))


def test_glm_latest_is_priced_as_the_model_it_names():
    assert table_only().priced("openrouter.ai", "openai-chat", "z-ai/glm-latest", T0) is None
    priced = default_book().priced("openrouter.ai", "openai-chat", "z-ai/glm-latest", T0)
    assert priced is not None and priced.at(0)[:2] == pytest.approx((1.40e-6, 0.26e-6))


# --- where the cost appears -------------------------------------------------------------------


def test_exit_summary_shows_dollars_and_names_unpriced_models():
    agg = Aggregator()
    agg.add_all(conversation())
    console = Console(record=True, width=200, color_system=None)
    render_summary(agg, console)
    out = console.export_text()
    want = sum(list_price(r["usage"]) for r in conversation() if r["cost_usd"])
    assert f"cost ${want:.4f}" in out
    assert "unpriced: 1 request of my-finetune" in out


def test_report_table_and_html_name_the_table_and_the_unpriced(tmp_path, capsys):
    path = write(tmp_path / "log.jsonl", conversation())
    assert main(["report", str(path), "--plain", "--width", "220"]) == 0
    out = capsys.readouterr().out
    assert prices.table_version() in out and "unpriced: 1 request of my-finetune" in out
    page = render_html(build_report([path]))
    assert prices.table_version() in page and "my-finetune" in page
    want = sum(list_price(r["usage"]) for r in conversation() if r["cost_usd"])
    assert f"${want:.4f}" in page


def test_metrics_count_dollars_by_kind_and_unpriced_records():
    pytest.importorskip("prometheus_client")
    from affinity_addon.mitm.metrics import Metrics, PromMetrics
    from affinity_addon.mitm.state import State

    m = Metrics(State())
    m.prom = PromMetrics()
    records = conversation()
    for r in records:
        rec = build.build(
            request=facts(r["model"], r["host"]),
            flow_id="f", status=200, usage=Usage(**r["usage"]), usage_raw=None, stream=False,
            transport="http", complete=True, error=None, started=None, response_cache=False,
            now=T0)
        m._sink(rec, rec.to_json())
    reg = m.prom.registry
    for kind in prices.KINDS:
        got = reg.get_sample_value("affinity_cost_usd_total", {
            "api": "anthropic", "model_family": "claude-sonnet-4-5", "rule": "r",
            "kind": kind}) or 0.0
        assert got == pytest.approx(sum(r["cost_usd"][kind] for r in records if r["cost_usd"]))
    assert reg.get_sample_value("affinity_unpriced_records_total", {
        "api": "anthropic", "model_family": "my-finetune"}) == 1.0


def test_prices_come_from_the_bundled_table_never_the_network():
    import threading

    from genai_prices import data_snapshot

    before = {t.name for t in threading.enumerate()}
    assert record_cost("api.openai.com", "openai-chat", "gpt-5", Usage(input_tokens=10)) is not None
    assert data_snapshot.get_snapshot().from_auto_update is False  # no UpdatePrices ran
    assert {t.name for t in threading.enumerate()} <= before
