"""Price table, cost estimate and the aggregation shared by the live summary and the report."""

import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from affinity_addon.catalog import prices as catalog_prices
from affinity_addon.catalog.prices import PriceBook, parse_override
from affinity_addon.views import pricing
from affinity_addon.views.aggregate import Aggregator, Bucket
from affinity_addon.views.console import render_summary
from affinity_addon.views.pricing import (
    TOKEN_EQUIVALENTS,
    USD,
    PriceTable,
    price_for,
)
from tests import loggen

SOURCE = "https://example.com/prices"


def book(*overrides: dict, equivalents: tuple[dict, ...] = ()) -> PriceTable:
    """A price table of only these entries (no host map: the genai-prices table still prices
    known model names)."""
    return PriceTable(PriceBook.parse({
        "overrides": [{"source": SOURCE, **o} for o in overrides],
        "token_equivalents": list(equivalents)}))


# --- multipliers (what the TTL advisor and token equivalents weigh by) ---------------------


@pytest.mark.parametrize(("model", "provider", "host", "read", "w5", "w1h"), [
    # Anthropic's list: 5m write 1.25x, 1h write 2x, read 0.1x
    # (https://platform.claude.com/docs/en/about-claude/pricing).
    ("claude-sonnet-4-5-20250929", "anthropic", "api.anthropic.com", 0.1, 1.25, 2.0),
    ("claude-haiku-4-5", "anthropic", "api.anthropic.com", 0.1, 1.25, 2.0),
    ("CLAUDE-SONNET-4-5", None, "API.ANTHROPIC.COM", 0.1, 1.25, 2.0),
    # Via OpenRouter: the table has no 1h price there; the override adds Anthropic's 2x.
    ("anthropic/claude-sonnet-4.5", "openai-chat", "openrouter.ai", 0.1, 1.25, 2.0),
    # OpenAI bills writes as input: https://platform.openai.com/docs/pricing
    ("gpt-5", "openai-chat", "api.openai.com", 0.1, 1.0, 1.0),
    ("gpt-5.1-codex", "openai-responses", "chatgpt.com", 0.1, 1.0, 1.0),
    ("gpt-4.1-mini", "openai-chat", "api.openai.com", 0.25, 1.0, 1.0),
    ("gpt-4o", "openai-chat", "api.openai.com", 0.5, 1.0, 1.0),
    ("o3-mini", "openai-chat", "api.openai.com", 0.5, 1.0, 1.0),
    ("grok-4", "openai-chat", "api.x.ai", 0.25, 1.0, 1.0),
    ("gemini-2.5-flash", "gemini", "generativelanguage.googleapis.com", 0.1, 1.0, 1.0),
    ("moonshotai/kimi-k2-instruct", "openai-chat", "api.groq.com", 0.5, 1.0, 1.0),
    # DashScope (not in the table): explicit-cache multipliers of prices_yaml's override.
    ("qwen3-coder-plus", "openai-chat", "dashscope-intl.aliyuncs.com", 0.1, 1.25, 1.25),
    # Nobody prices it: an Anthropic-shaped request is weighed the Anthropic way...
    ("my-finetune", "anthropic", "llm.internal.example", 0.1, 1.25, 2.0),
    # ... anything else claims no saving.
    ("totally-unknown", "openai-chat", "llm.example", 1.0, 1.0, 1.0),
])
def test_multipliers_follow_the_table(model, provider, host, read, w5, w1h):
    price = price_for(model, provider, host)
    assert (price.read, price.write_5m, price.write_1h) == pytest.approx((read, w5, w1h)), price


def test_unknown_models_are_unpriced_not_guessed():
    assert price_for("totally-unknown", "openai-chat", "llm.example").unit == TOKEN_EQUIVALENTS
    assert price_for(None).unit == TOKEN_EQUIVALENTS
    assert pricing.default_table().priced("my-finetune", "anthropic", "llm.example") is None
    assert price_for("claude-sonnet-4-5", "anthropic").unit == USD
    assert price_for("claude-sonnet-4-5", "anthropic").input_usd_per_mtok == pytest.approx(3.0)


def test_the_price_file_cites_public_sources_only():
    text = catalog_prices.PRICES_FILE.read_text(encoding="utf-8")
    assert "providers.md" not in text and "reference/" not in text
    table = catalog_prices.default_book()
    assert table.overrides and all(o.source.startswith("https://") for o in table.overrides)


def test_every_provider_id_of_the_host_map_is_in_the_table():
    from genai_prices.data_snapshot import get_snapshot

    known = {p.id for p in get_snapshot().providers}
    ids = {pid for _, pid in catalog_prices.default_book().routes}
    assert ids and ids <= known, ids - known


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "x", "read": 0.1}, "`source` must be"),
    ({"name": "x", "read": 0.1, "source": "providers.md"}, "`source` must be"),
    ({"name": "x", "source": SOURCE}, "changes nothing"),
    ({"name": "x", "read": -0.1, "source": SOURCE}, "must not be negative"),
    ({"name": "x", "read": "cheap", "source": SOURCE}, "must be a number"),
    ({"name": "x", "read": True, "source": SOURCE}, "must be a number"),
    ({"name": "x", "read": 0.1, "write": 1.25, "write_5m": 1.25, "source": SOURCE}, "not both"),
    ({"name": "x", "read": 0.1, "model": 3, "source": SOURCE}, "glob"),
    ({"name": "x", "read": 0.1, "modle": "gpt-*", "source": SOURCE}, "unknown keys"),
    ({"name": "x", "price_as": "gpt-5", "source": SOURCE}, "price_as"),
    ({"name": "x", "price_as": {"model": "m"}, "input_usd_per_mtok": 1, "source": SOURCE},
     "not both"),
    ("gpt-*", "expected a mapping"),
])
def test_parse_override_rejects_bad_entries(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_override(entry, 3)


def test_parse_price_file_rejects_bad_sections():
    with pytest.raises(ValueError, match="unknown keys"):
        PriceBook.parse({"prices": []})
    with pytest.raises(ValueError, match="expected {host"):
        PriceBook.parse({"providers": [{"host": "x"}]})
    with pytest.raises(ValueError, match="`read` is required"):
        PriceBook.parse({"token_equivalents": [{"name": "x"}]})


def test_overrides_first_match_wins_and_own_prices():
    table = book({"name": "special", "host": "*.example", "model": ["a-*", "b-*"],
                  "input_usd_per_mtok": 2, "output_usd_per_mtok": 8, "read": 0.5},
                 {"name": "any", "input_usd_per_mtok": 1})
    special = table.priced("a-1", "anthropic", "api.example")
    assert special is not None and special.rates.name == "override special"
    assert special.at(0) == pytest.approx((2e-6, 1e-6, 2e-6, 2e-6, 8e-6))
    other = table.priced("z", "anthropic", "api.example")
    # No cache prices given: reads and writes cost input, output is not charged.
    assert other is not None and other.at(0) == pytest.approx((1e-6, 1e-6, 1e-6, 1e-6, 0.0))


def test_load_price_file(tmp_path: Path):
    path = tmp_path / "p.yaml"
    path.write_text("token_equivalents:\n  - name: flat\n    read: 0.2\n    write: 1.5\n",
                    encoding="utf-8")
    table = PriceTable.load(path)
    price = table.price_for("anything")
    assert (price.read, price.write_5m, price.write_1h) == (0.2, 1.5, 1.5)
    assert table.version.startswith("genai-prices ") and str(path) in table.version


# --- cost estimate --------------------------------------------------------------------------

ANTHROPIC_USD = {"name": "t", "model": "*", "input_usd_per_mtok": 3.0, "output_usd_per_mtok": 15.0,
                 "read": 0.1, "write_5m": 1.25, "write_1h": 2.0}
PLAIN = {"name": "p", "read": 0.25}


def cost_of(usage, table: PriceTable):
    """The cost the aggregator computes for one record with `usage`, under one table."""
    agg = Aggregator(table)
    agg.add({"model": "m", "usage": usage, "ts": "2026-11-23T10:00:00.000Z"})
    return agg.total.cost()


def test_cost_in_usd_by_kind_with_ttl_split_and_output():
    usage = {"input_tokens": 10_000, "cache_read_tokens": 6_000, "cache_write_tokens": 3_000,
             "cache_write_1h_tokens": 1_000, "output_tokens": 500}
    agg = Aggregator(book(ANTHROPIC_USD))
    agg.add({"model": "m", "usage": usage, "ts": "2026-11-23T10:00:00.000Z"})
    cost = agg.total.cost()
    # 1000 uncached at $3, 6000 reads at $0.30, 2000 5m writes at $3.75, 1000 1h writes at $6,
    # 500 output at $15 (per million).
    assert cost.unit == USD
    assert cost.with_cache == pytest.approx((3000 + 1800 + 7500 + 6000 + 7500) / 1e6)
    assert cost.without_cache == pytest.approx((30_000 + 7500) / 1e6)
    assert cost.saved == pytest.approx(cost.without_cache - cost.with_cache)
    by_kind = agg.total.to_dict()["cost_usd"]
    assert by_kind["cache_write_1h"] == pytest.approx(0.006)
    assert by_kind["output"] == pytest.approx(0.0075)


def test_cost_token_equivalents_and_negative_saving_on_a_first_write():
    table = book(equivalents=({"name": "t", "read": 0.1, "write_5m": 1.25, "write_1h": 2.0},))
    cost = cost_of({"input_tokens": 4000, "cache_read_tokens": 0,
                    "cache_write_tokens": 4000}, table)
    assert cost.unit == TOKEN_EQUIVALENTS
    assert (cost.with_cache, cost.without_cache) == (5000.0, 4000.0)
    assert cost.saved == -1000.0


@pytest.mark.parametrize("usage", [None, {}, {"input_tokens": "12"}, {"input_tokens": -5},
                                   {"cache_read_tokens": 100}, "usage"])
def test_cost_tolerates_junk(usage):
    cost = cost_of(usage, book(equivalents=(PLAIN,)))
    assert (cost.with_cache, cost.without_cache, cost.saved) == (0.0, 0.0, 0.0)


def test_cost_clamps_counters_to_the_prompt():
    cost = cost_of({"input_tokens": 100, "cache_read_tokens": 150}, book(equivalents=(PLAIN,)))
    assert cost.with_cache == pytest.approx(25.0)
    assert cost.without_cache == 100.0


# --- aggregation ----------------------------------------------------------------------------

def rec(**kw):
    base = {"v": 1, "ts": "2026-11-23T10:00:00.000Z", "rule": "r1", "provider": "openai-chat",
            "host": "api.example", "model": "m1", "affinity_id": "conv-a", "complete": True,
            "response_cache": False, "dry_run": False, "miss_reason": None}
    base.update(kw)
    return base


def usage(i, r=0, w=0, o=10):
    return {"input_tokens": i, "cache_read_tokens": r, "cache_write_tokens": w, "output_tokens": o}


def test_hit_ratios_exclude_response_cache_and_missing_usage():
    agg = Aggregator(book(equivalents=({"name": "flat", "read": 0.1},)))
    agg.add(rec(usage=usage(1000, 0, 0), miss_reason="first-write", miss_detail="new",
                ts="2026-11-23T10:00:00.000Z"))
    agg.add(rec(usage=usage(2000, 1000), miss_reason="hit", ts="2026-11-23T10:01:00.000Z"))
    agg.add(rec(usage=usage(3000, 2000), miss_reason="hit", ts="2026-11-23T10:02:00.000Z"))
    agg.add(rec(usage=usage(0, 0), response_cache=True, miss_reason="response-cache"))
    agg.add(rec(usage=None, complete=False, error="disconnect"))
    t = agg.total
    assert (t.requests, t.counted, t.response_cache, t.no_usage, t.incomplete) == (5, 3, 1, 1, 1)
    assert (t.input_tokens, t.read_tokens, t.write_tokens, t.uncached_tokens) == (6000, 3000, 0,
                                                                                  3000)
    assert t.hit_ratio == pytest.approx(0.5)
    assert (t.prompt_requests, t.hit_requests) == (3, 2)
    assert t.request_hit_ratio == pytest.approx(2 / 3)
    assert dict(t.miss_reasons) == {"first-write": 1}
    assert dict(t.tokens_lost) == {"first-write": 1000}
    assert t.examples["first-write"][0].miss_detail == "new"
    assert (t.first_ts, t.last_ts) == ("2026-11-23T10:00:00.000Z", "2026-11-23T10:02:00.000Z")
    # Token equivalents: 1000 + (1000 + 100) + (1000 + 200) against 6000 uncached.
    cost = t.cost()
    assert (cost.unit, cost.with_cache, cost.without_cache) == (TOKEN_EQUIVALENTS, 3300.0, 6000.0)
    assert set(agg.by_reason) == {"first-write", "hit", "response-cache", "no-usage"}
    assert agg.by_reason["hit"].requests == 2


def test_buckets_by_model_rule_conversation():
    agg = Aggregator()
    agg.add(rec(model="a", rule="r1", affinity_id="c1", usage=usage(100, 50),
                miss_reason="prefix-changed", miss_detail="system[0] changed"))
    agg.add(rec(model="a", rule="r2", affinity_id="c2", usage=usage(200, 200), miss_reason="hit"))
    agg.add(rec(model="b", rule="r2", affinity_id="c2", usage=usage(400, 0),
                miss_reason="ttl-expired"))
    agg.add(rec(model=None, rule=None, affinity_id=None, usage=usage(10, 0)))
    assert {k: b.requests for k, b in agg.by_model.items()} == {"a": 2, "b": 1, "(none)": 1}
    assert {k: b.input_tokens for k, b in agg.by_rule.items()} == {"r1": 100, "r2": 600,
                                                                  "(none)": 10}
    c2 = agg.by_conversation["c2"]
    assert (c2.requests, c2.read_tokens, dict(c2.miss_reasons)) == (2, 200, {"ttl-expired": 1})
    # No miss verdict recorded and nothing read: counted as an unknown miss.
    assert agg.by_reason["unknown"].input_tokens == 10
    assert dict(agg.total.tokens_lost) == {"prefix-changed": 50, "ttl-expired": 400,
                                           "unknown": 10}
    assert [r for r, _, _ in agg.total.top_reasons()] == ["ttl-expired", "prefix-changed",
                                                          "unknown"]
    assert agg.conversation_model["c2"] == "b"


def test_views_refresh_after_more_records():
    agg = Aggregator()
    agg.add(rec(usage=usage(100, 0)))
    assert agg.total.requests == 1
    agg.add(rec(usage=usage(100, 100), miss_reason="hit"))
    assert agg.total.requests == 2 and agg.by_model["m1"].read_tokens == 100


def test_examples_keep_the_costliest_misses():
    agg = Aggregator(max_examples=2)
    for lost in (100, 900, 300, 700):
        agg.add(rec(usage=usage(lost, 0), miss_reason="prefix-changed", flow_id=f"f{lost}"))
    kept = sorted(e.tokens_lost for e in agg.total.examples["prefix-changed"])
    assert kept == [700, 900]
    assert {e.flow_id for e in agg.by_reason["prefix-changed"].examples["prefix-changed"]} == {
        "f700", "f900"}


def test_usd_over_the_priced_requests_and_the_rest_named_unpriced():
    agg = Aggregator()
    agg.add(rec(model="claude-sonnet-4-5", api="anthropic", host="api.anthropic.com",
                usage=usage(100_000, 80_000, 10_000, o=10), miss_reason="hit"))
    model = agg.by_model["claude-sonnet-4-5"]
    cost = model.cost()
    # 10k uncached at $3, 80k reads at $0.30, 10k 5m writes at $3.75, 10 output at $15 (/MTok).
    assert cost.unit == USD
    assert cost.with_cache == pytest.approx(0.03 + 0.024 + 0.0375 + 0.00015)
    assert cost.without_cache == pytest.approx(0.3 + 0.00015)
    agg.add(rec(model="unpriced-x", usage=usage(1000, 0)))
    total = agg.total
    assert total.cost().unit == USD and total.cost().with_cache == pytest.approx(cost.with_cache)
    assert (total.usd_requests, total.unpriced_requests) == (1, 1)
    assert total.to_dict()["cost_usd"]["unpriced"] == ["unpriced-x"]


def test_long_prompts_cost_the_long_context_tier():
    # Sonnet 4.5 above 200k prompt tokens: $6 input, $22.50 output for the whole request
    # (https://platform.claude.com/docs/en/about-claude/pricing#long-context-pricing).
    agg = Aggregator()
    agg.add(rec(model="claude-sonnet-4-5", api="anthropic", host="api.anthropic.com",
                usage=usage(300_000, 0, 0, o=1000)))
    assert agg.total.cost().with_cache == pytest.approx(300_000 * 6e-6 + 1000 * 22.5e-6)


def test_dry_run_prediction_and_savings():
    agg = Aggregator(book({"name": "flat", "read": 0.1, "input_usd_per_mtok": 1.0}))
    agg.add(rec(rule="dry", dry_run=True, predicted_hit_ratio=0.8, usage=usage(1000, 500),
                miss_reason="prefix-changed"))
    agg.add(rec(rule="dry", dry_run=True, predicted_hit_ratio=0.5, usage=usage(1000, 500),
                miss_reason="hit"))
    agg.add(rec(rule="dry", dry_run=True, predicted_hit_ratio=None, usage=usage(1000, 0)))
    agg.add(rec(rule="live", usage=usage(1000, 1000), miss_reason="hit", predicted_hit_ratio=0.9))
    b = agg.by_rule["dry"]
    assert (b.dry_run, b.dry_requests, b.dry_input_tokens) == (3, 2, 2000)
    assert b.dry_observed_ratio() == pytest.approx(0.5)
    assert b.dry_predicted_ratio() == pytest.approx(0.65)
    # 300 more tokens read, each saving 0.9 of its price.
    assert b.dry_saved_eq == pytest.approx(270.0)
    assert b.dry_saved_usd == pytest.approx(270e-6)
    assert agg.by_rule["live"].dry_requests == 0
    assert agg.total.to_dict()["dry_run"]["requests"] == 2


def test_tolerates_missing_and_wrong_typed_fields():
    agg = Aggregator()
    for junk in [{}, {"usage": "lots"}, {"usage": {"input_tokens": "9"}}, {"ts": 5, "model": 7},
                 {"usage": {"input_tokens": 10.0, "cache_read_tokens": True}},
                 {"usage": {}, "miss_reason": 3, "predicted_hit_ratio": "x", "dry_run": True},
                 {"response_cache": "yes", "usage": None}, [], "line", None]:
        agg.add(junk)
    t = agg.total
    assert t.requests == 7  # the three non-mappings are ignored
    assert t.input_tokens == 10  # only the float 10.0 was a usable count
    assert t.read_tokens == 0


def test_merge_equals_adding_everything():
    records = loggen.generate(conversations=12, seed=5)
    whole = Aggregator()
    whole.add_all(records)
    merged = Bucket("merged")
    for bucket in whole.by_model.values():
        merged.merge(bucket)
    t = whole.total
    for name in ("requests", "counted", "no_usage", "response_cache", "input_tokens",
                 "read_tokens", "write_tokens", "output_tokens", "hit_requests",
                 "prompt_requests", "dry_requests"):
        assert getattr(merged, name) == getattr(t, name), name
    assert merged.miss_reasons == t.miss_reasons
    assert merged.eq_with == pytest.approx(t.eq_with)


def test_generated_log_totals_match_a_hand_count():
    records = loggen.generate(conversations=30, seed=3)
    agg = Aggregator()
    agg.add_all(records)
    counted = [r for r in records if r["usage"] is not None and not r["response_cache"]]
    t = agg.total
    assert t.requests == len(records)
    assert t.counted == len(counted)
    assert t.response_cache == sum(r["response_cache"] for r in records) > 0
    assert t.no_usage == sum(r["usage"] is None for r in records) > 0
    assert t.input_tokens == sum(r["usage"]["input_tokens"] for r in counted)
    assert t.read_tokens == sum(r["usage"]["cache_read_tokens"] for r in counted)
    assert t.write_tokens == sum(r["usage"]["cache_write_tokens"] for r in counted)
    hits = sum(r["usage"]["cache_read_tokens"] > 0 for r in counted)
    assert t.request_hit_ratio == pytest.approx(hits / len(counted))
    missed = [r for r in counted if r["miss_reason"] not in ("hit", None)]
    assert t.missed_requests == len(missed)
    assert sum(t.tokens_lost.values()) == sum(
        r["usage"]["input_tokens"] - r["usage"]["cache_read_tokens"] for r in missed)
    assert set(t.miss_reasons) >= {"first-write", "prefix-changed", "ttl-expired",
                                   "routed-away", "lookback-exceeded", "unknown"}


counts = st.one_of(st.none(), st.integers(-5, 10**7), st.floats(allow_nan=True),
                   st.text(max_size=3), st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.fixed_dictionaries({}, optional={
    "usage": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "input_tokens": counts, "cache_read_tokens": counts, "cache_write_tokens": counts,
        "cache_write_1h_tokens": counts, "output_tokens": counts, "cost": counts})),
    "model": st.one_of(st.none(), st.sampled_from(["claude-sonnet-4-5", "gpt-5", "x"]),
                       st.integers()),
    "miss_reason": st.one_of(st.none(), st.sampled_from(["hit", "prefix-changed"]),
                             st.integers()),
    "response_cache": st.one_of(st.booleans(), st.none()),
    "dry_run": st.booleans(),
    "predicted_hit_ratio": counts,
    "ts": st.one_of(st.none(), st.text(max_size=5)),
}), max_size=20))
def test_aggregation_invariants_hold_for_any_records(records):
    agg = Aggregator()
    agg.add_all(records)
    t = agg.total
    assert t.requests == len(records) == t.counted + t.no_usage + t.response_cache
    assert t.read_tokens + t.write_tokens + t.uncached_tokens == t.input_tokens
    assert t.uncached_tokens >= 0
    for ratio in (t.hit_ratio, t.request_hit_ratio, t.dry_predicted_ratio()):
        assert ratio is None or 0.0 <= ratio <= 1.0
    cost = t.cost()
    assert math.isfinite(cost.with_cache) and cost.with_cache <= cost.without_cache * 2.0 + 1e-9
    assert sum(b.requests for b in agg.by_model.values()) == t.requests
    assert sum(b.requests for b in agg.by_reason.values()) == t.requests


# --- live summary ---------------------------------------------------------------------------

def test_render_summary_prints_models_and_reasons():
    agg = Aggregator()
    agg.add_all(loggen.generate(conversations=15, seed=2))
    console = Console(record=True, width=220, color_system=None)
    render_summary(agg, console, top=3)
    out = console.export_text()
    assert "Per model" in out and "Miss reasons" in out
    ratio = f"{agg.total.hit_ratio * 100:.1f}%"
    assert ratio in out
    top3 = sorted(agg.by_model.values(), key=lambda b: -b.input_tokens)[:3]
    for bucket in top3:
        assert bucket.key in out
    rows = [m for m in agg.by_model if re.search(rf"^\s+{re.escape(m)}\s", out, re.M)]
    assert len(rows) == 3


def test_render_summary_with_nothing_recorded():
    console = Console(record=True, width=100)
    render_summary(Aggregator(), console)
    assert "no LLM requests" in console.export_text()


def test_live_aggregator_memory_is_bounded():
    from affinity_addon.views.aggregate import OLDER_KEY, Aggregator

    agg = Aggregator(keep_series=False, max_conversations=100)
    for i in range(5000):
        agg.add({"model": "m", "rule": "r", "affinity_id": f"conv-{i}", "complete": True,
                 "usage": {"input_tokens": 10, "cache_read_tokens": 5, "cache_write_tokens": 0,
                           "output_tokens": 1}, "miss_reason": "hit"})
    assert len(agg._cells) <= 101
    assert agg.total.requests == 5000 and agg.total.read_tokens == 25000
    assert agg.by_conversation[OLDER_KEY].requests >= 4900
