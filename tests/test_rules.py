import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from affinity_addon.request.actions import KEEP, OVERWRITE, parse_template
from affinity_addon.request.rules import api_for, load_rules, parse_glob

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "rules" / "default.yaml"
SCHEMA = json.loads((ROOT / "rules" / "schema.json").read_text())


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    return p


def test_default_rules_load_and_follow_schema():
    rs = load_rules(DEFAULT)
    names = [r.name for r in rs.rules]
    assert names[:2] == ["xai-chat", "xai-responses"]
    assert "anthropic-compatible-proxy" not in names  # shipped disabled, as an example
    assert "openai-extended-retention" not in names  # opt-in: 24h is not ZDR-eligible
    assert all(r.cache_retention is None for r in rs.rules)
    assert {"openrouter-grok", "openai", "codex-backend", "fireworks"} <= set(names)
    jsonschema.validate(yaml.safe_load(DEFAULT.read_text()), SCHEMA)


def test_every_default_rule_cites_a_source():
    # Each shipped rule is preceded by a comment block; the enabled ones cite a doc or issue.
    text = DEFAULT.read_text().split("\nrules:\n", 1)[1]
    blocks = text.split("\n  - name: ")[1:]
    comments = text.split("\n  - name: ")[0]
    for i, block in enumerate(blocks):
        before = comments if i == 0 else blocks[i - 1].split("\n\n")[-1]
        assert "#" in before, f"rule {block.split()[0]} has no comment"


GOOD = """
version: 1
rules:
  - name: grok
    match: {host: "API.X.AI", path: "*/chat/completions", method: post}
    set_headers:
      X-Grok-Conv-Id: "{affinity_id}"
  - name: key
    match: {host: "*.openai.com", model: ["gpt-5*", "o4-*"]}
    on_conflict: overwrite
    set_fields:
      prompt_cache_key: "{affinity_id}"
      metadata.tag: {value: "r-{rule}", on_conflict: keep}
      stream_options.include_usage: true
"""


def test_parse_good(tmp_path):
    rs = load_rules(write(tmp_path, GOOD))
    grok, key = rs.rules
    assert grok.set_headers[0].target == "x-grok-conv-id"  # header names compare lower-case
    assert grok.methods == frozenset({"POST"})
    assert grok.line == 4
    assert [a.on_conflict for a in key.set_fields] == [OVERWRITE, KEEP, OVERWRITE]
    assert key.set_fields[2].template.source is True  # literals stay JSON literals
    assert key.needs_body and not grok.needs_body


def test_matching(tmp_path):
    rs = load_rules(write(tmp_path, GOOD))
    assert [r.name for r in rs.candidates("api.x.ai", "/v1/chat/completions", "POST")] == ["grok"]
    assert rs.candidates("api.x.ai", "/v1/chat/completions", "GET") == ()
    assert rs.candidates("api.x.ai", "/v1/responses", "POST") == ()
    key = rs.candidates("api.openai.com", "/v1/chat/completions", "POST")[0]
    assert key.matches_model("gpt-5.6") and key.matches_model("o4-mini")
    assert not key.matches_model("gpt-4o") and not key.matches_model(None)
    assert rs.candidates("example.com", "/v1/chat/completions", "POST") == ()


@pytest.mark.parametrize(
    "text, line, pattern",
    [
        ("rules:\n  - name: a\n    match: {path: /x}\n    set_headers: {a: b}\n", 3, "match needs a 'host'"),
        ("rules:\n  - name: a\n    match: {host: x}\n    set_headers: {\"a b\": v}\n", 4, "not a valid header name"),
        ("rules:\n  - name: a\n    match: {host: x}\n    set_fields: {\"a..b\": v}\n", 4, "dotted field path"),
        ("rules:\n  - name: a\n    match: {host: x}\n    set_headers: {a: \"{nope}\"}\n", 4, "unknown template field"),
        ("rules:\n  - name: a\n    match: {host: x}\n    on_conflict: merge\n    set_headers: {a: b}\n", 4, "keep or overwrite"),
        ("rules:\n  - name: a\n    match: {host: x, api: soap}\n    set_headers: {a: b}\n", 3, "match.api"),
        ("rules:\n  - name: a\n    match: {host: x}\n    colour: red\n    set_headers: {a: b}\n", 4, "unknown key 'colour'"),
        ("rules:\n  - name: a\n    match: {host: x}\n    set_headers: {a: b}\n  - name: a\n    match: {host: y}\n    set_headers: {a: b}\n", 5, "duplicate rule name"),
        ("rules:\n  - match: {host: x}\n    set_headers: {a: b}\n", 2, "needs a non-empty 'name'"),
        ("rules:\n  - name: a\n    match: {host: x}\n    set_headers: {a: [1]}\n", 4, "string template"),
        ("rules: [\n", 2, "expected"),
        ("rules:\n  - name: a\n    match: {host: x}\n    set_headers: {a: b, a: c}\n", 4, "duplicate key"),
        ("version: 2\nrules: []\n", 1, "unsupported version"),
        ("affinity:\n  sources: [\"header:\"]\nrules: []\n", 1, "needs a name"),
        ("affinity:\n  sources: [{body: x, regex: '('}]\nrules: []\n", 1, "invalid regex"),
        ("rules:\n  - name: a\n    match: {host: x}\n    set_headers: {a: b}\n    affinity: {sources: [cookie]}\n", 5, "source 'cookie'"),
        ("rules:\n  - name: a\n    match: {host: x}\n    cache_retention: forever\n", 4, "cache_retention: bad duration"),
        ("rules:\n  - name: a\n    match: {host: x}\n    cache_retention: 1m\n", 4, "no model offers a retention of 1m"),
        ("rules:\n  - name: a\n    match: {host: x}\n    cache_retention: {value: 24h, on_conflict: merge}\n", 4, "keep or overwrite"),
    ],
)
def test_parse_errors_name_file_line_and_rule(tmp_path, text, line, pattern):
    p = write(tmp_path, text)
    with pytest.raises(ValueError, match=pattern) as e:
        load_rules(p)
    assert str(e.value).startswith(f"{p}:{line}:"), str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_rules(tmp_path / "nope.yaml")


def test_glob_and_template_parsers():
    assert parse_glob("*.x.ai", ignore_case=True).matches("API.X.AI")
    with pytest.raises(ValueError):
        parse_glob([], ignore_case=False)
    t = parse_template("conv-{affinity_id}-{model}")
    assert t.render({"affinity_id": "a1", "model": "m"}) == "conv-a1-m"
    with pytest.raises(ValueError, match="format specs"):
        parse_template("{affinity_id:>10}")


@pytest.mark.parametrize(
    "path, api",
    [
        ("/v1/messages", "anthropic"),
        ("/api/v1/chat/completions", "openai-chat"),
        ("/backend-api/codex/responses", "openai-responses"),
        ("/v1beta/models/gemini-2.5-flash:streamGenerateContent", "gemini"),
        ("/v1/models", None),
    ],
)
def test_api_for(path, api):
    assert api_for(path) == api
