"""`cache_retention`: OpenAI's retention directive per model, from the catalog."""

import json
from typing import Any

import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import tutils

from affinity_addon.catalog import catalog_file
from affinity_addon.catalog.providers import PROVIDER_FACTS, parse_provider_facts
from affinity_addon.request.rewrite import Outcome, apply_rules
from affinity_addon.request.rules import RuleSet, parse_rules

KEY = "retention-test-key-0123456789"
RULES = """
rules:
  - name: openai
    match: {host: [api.openai.com, chatgpt.com]}
    cache_retention: 24h
  - name: short
    match: {host: short.example}
    cache_retention: {value: 1h, on_conflict: overwrite}
  - name: force
    match: {host: force.example}
    cache_retention: {value: 24h, on_conflict: overwrite}
"""
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return parse_rules(yaml.safe_load(RULES))


def send(rules: RuleSet, body: dict[str, Any] | bytes, host: str = "api.openai.com",
         path: str = "/v1/chat/completions", dry_run: bool = False
         ) -> tuple[http.Request, Outcome, bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = tutils.treq(method=b"POST", host=host, port=443, scheme=b"https", authority=b"",
                          path=path.encode(), content=raw,
                          headers=http.Headers(content_type="application/json"))
    result = apply_rules(rules, request, secret=KEY, dry_run=dry_run)
    assert result is not None
    return request, result[0], raw


def sent(request: http.Request) -> dict[str, Any]:
    return json.loads(request.content or b"{}")


@pytest.mark.parametrize("model, field, value", [
    ("gpt-5.1", "prompt_cache_retention", "24h"),
    ("gpt-4.1-2025-04-14", "prompt_cache_retention", "24h"),  # dated snapshot of a listed model
    ("gpt-5.5-pro", "prompt_cache_retention", "24h"),
    ("gpt-5.6", "prompt_cache_options", {"ttl": "30m"}),  # the GPT-5.6+ form, never the other
])
def test_added_in_the_form_the_model_takes(rules: RuleSet, model: str, field: str,
                                           value: Any) -> None:
    request, out, raw = send(rules, {"model": model, "messages": MESSAGES})
    body = sent(request)
    assert body[field] == value
    assert sum(f in body for f in ("prompt_cache_retention", "prompt_cache_options")) == 1
    assert out.fields == {("prompt_cache_options.ttl" if field == "prompt_cache_options"
                           else field): "30m" if field == "prompt_cache_options" else value}
    if field == "prompt_cache_retention":  # a new top-level key: every client byte stays
        assert out.body_write == "splice" and request.content.endswith(raw[1:])


def test_up_to_the_rules_duration(rules: RuleSet) -> None:
    request, out, raw = send(rules, {"model": "gpt-5.1", "messages": MESSAGES},
                             host="short.example")
    assert request.content == raw and out.fields == {}  # 24h is longer than the rule's 1h
    request, out, _ = send(rules, {"model": "gpt-5.6-mini", "messages": MESSAGES},
                           host="short.example")
    assert out.fields == {"prompt_cache_options.ttl": "30m"}


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4.1-mini", "o3", "claude-sonnet-4-5", None])
def test_unsupported_models_are_sent_byte_for_byte(rules: RuleSet, model: str | None) -> None:
    raw = b'{"model" : %s,\n "messages":[{"role":"user","content":"caf\\u00e9"}], "n": 1.50}' % (
        json.dumps(model).encode())
    request, out, _ = send(rules, raw)
    assert request.content == raw and request.raw_content == raw
    assert out.fields == {} and out.body_write == "none"


@pytest.mark.parametrize("model, client, kept", [
    # The client's own directive in the other form: adding ours would make two (a 400).
    ("gpt-5.6", {"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
    ("gpt-5.1", {"prompt_cache_options": {"ttl": "30m"}}, "prompt_cache_options.ttl"),
    ("gpt-5.6", {"prompt_cache_retention": None}, "prompt_cache_retention"),  # null is sent too
])
@pytest.mark.parametrize("host", ["api.openai.com", "force.example"])  # keep, then overwrite
def test_never_both_directives(rules: RuleSet, model: str, client: dict[str, Any], kept: str,
                               host: str) -> None:
    raw = json.dumps({"model": model, **client, "messages": MESSAGES}).encode()
    request, out, _ = send(rules, raw, host=host)
    assert request.content == raw
    assert out.fields == {} and out.kept == [f"field:{kept}"]


def test_the_clients_own_directive_is_kept_or_overwritten_as_on_conflict_says(
        rules: RuleSet) -> None:
    raw = json.dumps({"model": "gpt-5.1", "prompt_cache_retention": "in_memory",
                      "messages": MESSAGES}).encode()
    request, out, _ = send(rules, raw)  # keep (the default)
    assert request.content == raw and out.kept == ["field:prompt_cache_retention"]
    request, out, _ = send(rules, raw, host="force.example")  # overwrite: same field only
    assert sent(request)["prompt_cache_retention"] == "24h" and out.kept == []
    # Other prompt_cache_options (the mode) are the client's: ours goes beside them.
    request, out, _ = send(rules, {"model": "gpt-5.6", "messages": MESSAGES,
                                   "prompt_cache_options": {"mode": "explicit"}})
    assert sent(request)["prompt_cache_options"] == {"mode": "explicit", "ttl": "30m"}


@pytest.mark.parametrize("path", ["/backend-api/codex/responses", "/backend-api/codex/v2/x"])
def test_codex_backend_is_never_given_a_directive(rules: RuleSet, path: str) -> None:
    raw = json.dumps({"model": "gpt-5.1-codex", "instructions": "x", "input": [],
                      "store": False, "stream": True}).encode()
    request, out, _ = send(rules, raw, host="chatgpt.com", path=path)
    assert request.raw_content == raw and out.fields == {} and out.kept == []


def test_dry_run_records_without_sending(rules: RuleSet) -> None:
    request, out, raw = send(rules, {"model": "gpt-5.1", "messages": MESSAGES}, dry_run=True)
    assert request.content == raw and out.fields == {"prompt_cache_retention": "24h"}


def test_catalog_entries_are_checked(tmp_path) -> None:
    assert PROVIDER_FACTS.retention_fields == ("prompt_cache_options.ttl",
                                               "prompt_cache_retention")
    base = yaml.safe_load(catalog_file("providers.yaml").read_text())
    for bad, reason in (
            ({"field": "a..b", "value": "x", "retention": "1h", "models": ["m"]}, "dotted"),
            ({"field": "a", "value": "x", "retention": "long", "models": ["m"]}, "bad duration"),
            ({"field": "a", "value": "x", "retention": "1h"}, "exactly field")):
        p = tmp_path / "providers.yaml"
        p.write_text(yaml.safe_dump({**base, "cache_retention": [bad]}))
        with pytest.raises(ValueError, match=reason) as e:
            parse_provider_facts(p)
        assert str(e.value).startswith(f"{p}:")

