import io
import json
import logging
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy import io as mio
from mitmproxy.http import Headers
from mitmproxy.net import encoding
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.record.schema import META
from tests.driver import Affinity

RULES = """
version: 1
rules:
  - name: first
    match: {host: api.example.com, path: /v1/chat/completions}
    set_headers:
      x-conv: "{affinity_id}"
    set_fields:
      prompt_cache_key: "{affinity_id}"
  - name: second
    match: {host: api.example.com, model: "gpt-*"}
    set_headers:
      x-conv: "second-{affinity_id}"
      x-src: "{affinity_source}"
    set_fields:
      prompt_cache_key: {value: "forced-{model}", on_conflict: overwrite}
  - name: never
    match: {host: api.example.com, model: "claude-*"}
    set_headers: {x-never: "1"}
"""

CHAT = {"model": "gpt-5", "messages": [{"role": "system", "content": "Be terse."},
                                        {"role": "user", "content": "héllo"}]}


def req(body: bytes | dict | None, host="api.example.com", path="/v1/chat/completions",
        headers: dict[str, str] | None = None, method=b"POST"):
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    h = Headers(content_type="application/json")
    for k, v in (headers or {}).items():
        h[k] = v
    return tflow.tflow(req=tutils.treq(method=method, host=host, port=443, scheme=b"https",
                                       authority=b"", path=path.encode(), headers=h, content=content))


@pytest.fixture
def addon(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(p))
        yield a, tctx


def test_rules_combine_in_order_and_conflict_policies(addon):
    a, _ = addon
    f = req(CHAT)
    a.request(f)
    body = json.loads(f.request.content)
    rec = f.metadata[META]
    aff = rec["affinity_id"]
    assert rec["rules"] == ["first", "second"] and rec["rule"] == "first"
    assert f.request.headers["x-conv"] == aff  # first rule set it; second keeps it (keep)
    assert f.request.headers["x-src"] == "root"
    assert body["prompt_cache_key"] == "forced-gpt-5"  # second rule overwrote
    assert rec["added"]["headers"] == {"x-conv": aff, "x-src": "root"}
    assert rec["added"]["fields"] == {"prompt_cache_key": "forced-gpt-5"}
    assert rec["kept"] == []  # "kept" lists client values only
    assert "x-never" not in f.request.headers
    assert int(f.request.headers["content-length"]) == len(f.request.raw_content)


def test_client_values_are_kept_and_header_names_are_case_insensitive(addon):
    a, _ = addon
    f = req(dict(CHAT, prompt_cache_key="client-key", model="o3"), headers={"X-CONV": "client-conv"})
    a.request(f)
    assert f.request.headers["x-conv"] == "client-conv"
    assert f.request.headers.get_all("x-conv") == ["client-conv"]
    assert json.loads(f.request.content)["prompt_cache_key"] == "client-key"
    rec = f.metadata[META]
    assert rec["affinity_id"] == "client-key" and rec["affinity_source"] == "body:prompt_cache_key"
    assert rec["kept"] == ["header:x-conv", "field:prompt_cache_key"]


def test_affinity_is_stable_across_turns_and_distinct_across_conversations(addon):
    a, _ = addon
    turn2 = json.loads(json.dumps(CHAT))
    turn2["messages"] += [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    other = json.loads(json.dumps(CHAT).replace("terse", "verbose"))
    ids = []
    for body in (CHAT, turn2, other):
        f = req(body)
        a.request(f)
        ids.append(f.request.headers["x-conv"])
    assert ids[0] == ids[1] != ids[2]


def test_top_level_addition_splices_and_keeps_every_other_byte(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rules:\n  - name: k\n    match: {host: api.example.com}\n"
                 "    set_fields: {prompt_cache_key: '{affinity_id}'}\n")
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(p))
        raw = b'  {"model" : "gpt-5",\n "messages":[{"role":"user","content":"caf\\u00e9 1.0e5"}], "n": 1.50}'
        f = req(raw)
        a.request(f)
        out = f.request.content
        assert f.metadata[META]["body_write"] == "splice"
        aff = f.metadata[META]["affinity_id"]
        assert out == b'  {"prompt_cache_key":"' + aff.encode() + b'","model" : "gpt-5",' + raw.split(b'"gpt-5",', 1)[1]
        f = req(b"{}")
        a.request(f)
        assert f.request.content == b"{}"  # no root, no ID: nothing to add
        f = req(b'{ }', headers={"session-id": "s1"})
        a.request(f)
        assert json.loads(f.request.content) == {"prompt_cache_key": "s1"}


@pytest.mark.parametrize("enc", ["gzip", "br", "zstd", "deflate"])
def test_compressed_bodies_stay_compressed(addon, enc):
    a, _ = addon
    f = req(encoding.encode(json.dumps(CHAT).encode(), enc), headers={"content-encoding": enc})
    a.request(f)
    assert f.request.headers["content-encoding"] == enc
    assert int(f.request.headers["content-length"]) == len(f.request.raw_content)
    decoded = json.loads(encoding.decode(f.request.raw_content, enc))
    assert decoded["prompt_cache_key"] == "forced-gpt-5"
    assert decoded["messages"] == CHAT["messages"]


@pytest.mark.parametrize(
    "body, headers, why",
    [
        (b"not json at all", {}, "not a JSON object"),
        (b"[1, 2, 3]", {}, "not a JSON object"),
        (b'{"model": "gpt-5", "messages": [', {}, "not valid JSON"),
        (b'{"model": "gpt-5", "x": "\xff\xfe"}', {}, "not valid JSON"),
        (b"\x1f\x8b garbage", {"content-encoding": "gzip"}, "could not be decoded"),
        (encoding.encode(b'{"model":"gpt-5"}', "gzip"), {"content-encoding": "gzip, br"}, "could not be decoded"),
        # A JSON body under a non-JSON type is not ours to rewrite (a form or text the server
        # parses its own way).
        (json.dumps(CHAT).encode(), {"content-type": "text/plain"}, "not JSON"),
        (json.dumps(CHAT).encode(), {"content-type": "application/x-www-form-urlencoded"}, "not JSON"),
    ],
)
def test_bodies_we_do_not_understand_go_upstream_unchanged(addon, caplog, body, headers, why):
    a, _ = addon
    f = req(body, headers=headers)
    before = f.request.raw_content
    with caplog.at_level(logging.WARNING):
        a.request(f)
    assert f.request.raw_content == before
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0].getMessage()
    # Header rules that need no body still apply (with the affinity from headers, if any).
    rec = f.metadata.get(META)
    assert rec is None or rec["added"]["fields"] == {}


def test_empty_body_and_unmatched_traffic(addon):
    a, _ = addon
    f = req(b"", headers={"x-session-id": "s-1"})
    a.request(f)
    assert f.request.headers["x-conv"] == "s-1" and f.request.content == b""
    f = req(CHAT, host="example.org")
    before = f.request.raw_content
    a.request(f)
    assert META not in f.metadata and f.request.raw_content == before
    assert "x-conv" not in f.request.headers


def test_guard_skips_answered_dead_and_replayed_flows(addon):
    a, _ = addon
    for prep in (lambda f: setattr(f, "response", tutils.tresp()), lambda f: f.kill(),
                 lambda f: setattr(f, "live", False)):
        f = req(CHAT)
        prep(f)
        a.request(f)
        assert "x-conv" not in f.request.headers


def test_dry_run_changes_nothing_but_records_everything(addon):
    a, tctx = addon
    tctx.configure(a.bundle, affinity_dry_run=True)
    f = req(CHAT)
    before_raw, before_headers = f.request.raw_content, f.request.headers.copy()
    a.request(f)
    assert f.request.raw_content == before_raw and f.request.headers == before_headers
    rec = f.metadata[META]
    assert rec["dry_run"] is True
    assert set(rec["added"]["headers"]) == {"x-conv", "x-src"}
    assert rec["added"]["fields"] == {"prompt_cache_key": "forced-gpt-5"}


def test_metadata_is_plain_data_and_flows_still_save(addon):
    a, _ = addon
    f = req(CHAT)
    a.request(f)
    buf = io.BytesIO()
    mio.FlowWriter(buf).add(f)
    buf.seek(0)
    (loaded,) = list(mio.FlowReader(buf).stream())  # what mitmproxy -w / mitmweb save
    assert loaded.metadata[META] == f.metadata[META]
    assert loaded.request.content == f.request.content
    assert f.copy().metadata[META] == f.metadata[META]
    assert json.loads(json.dumps(f.metadata[META])) == f.metadata[META]


def test_bad_rules_and_options_are_options_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: a\n    match: {host: x}\n    set_headers: {'a b': c}\n")
    a = Affinity()
    with taddons.context(*a.addons) as tctx, \
            pytest.raises(exceptions.OptionsError, match=rf"{bad}:4: rule 'a'"):
        tctx.configure(a.bundle, affinity_rules=str(bad))


DEFAULT = Path(__file__).resolve().parent.parent / "rules" / "default.yaml"


@pytest.fixture
def default_addon():
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT))
        yield a


def test_default_codex_rule_fills_only_missing_headers(default_addon):
    a = default_addon
    body = {"model": "gpt-5-codex", "instructions": "x", "input": [{"role": "user", "content": "hi"}],
            "prompt_cache_key": "019a9544-7ab1-73c1-837e-1fa681f4462b", "store": False, "stream": True}
    raw = encoding.encode(json.dumps(body).encode(), "zstd")
    f = req(raw, host="chatgpt.com", path="/backend-api/codex/responses",
            headers={"content-encoding": "zstd", "x-codex-turn-state": "opaque-1", "thread-id": "th-9"})
    a.request(f)
    h = f.request.headers
    assert h["session-id"] == body["prompt_cache_key"]  # kept equal to the body's key
    assert h["thread-id"] == "th-9"  # client value kept
    assert h["x-client-request-id"] == body["prompt_cache_key"]
    assert h["x-codex-turn-state"] == "opaque-1"
    assert f.request.raw_content == raw  # never add cache parameters to this body


@pytest.mark.parametrize(
    "host, path, model, header, field",
    [
        ("api.x.ai", "/v1/chat/completions", "grok-4", "x-grok-conv-id", None),
        ("api.x.ai", "/v1/responses", "grok-4", None, "prompt_cache_key"),
        ("openrouter.ai", "/api/v1/chat/completions", "x-ai/grok-4.1-fast", "x-grok-conv-id", "session_id"),
        ("openrouter.ai", "/api/v1/chat/completions", "anthropic/claude-sonnet-4.5", None, "session_id"),
        ("api.openai.com", "/v1/chat/completions", "gpt-5.6", None, "prompt_cache_key"),
        ("api.openai.com", "/v1/responses", "gpt-5.6", None, "prompt_cache_key"),
        ("api.fireworks.ai", "/inference/v1/chat/completions", "accounts/fireworks/models/kimi-k2", "x-session-affinity", None),
    ],
)
def test_default_rules(default_addon, host, path, model, header, field):
    a = default_addon
    body = dict(CHAT, model=model)
    if path.endswith("/responses"):
        body = {"model": model, "instructions": "Be terse.", "input": "héllo"}
    f = req(body, host=host, path=path)
    a.request(f)
    rec = f.metadata[META]
    aff = rec["affinity_id"]
    assert aff and rec["affinity_source"] == "root"
    if header:
        assert f.request.headers[header] == aff
    sent = json.loads(f.request.content)
    if host == "api.openai.com":  # {family_key}: the family's key, one bucket at this rate
        assert sent[field].startswith("fam-") and sent[field].endswith("-0")
        assert rec["cache_key_bucket"] == {"strategy": "family", "bucket": 0, "buckets": 1}
    elif field:
        assert sent[field] == aff
    else:
        assert set(sent) == set(body)
    if host != "openrouter.ai" or "grok" not in model:
        assert "x-grok-conv-id" not in f.request.headers or host == "api.x.ai"


def test_commands_why_stats_reset_reload(addon):
    a, tctx = addon
    f = req(CHAT)
    a.request(f)
    a.responseheaders(f)  # no response yet: nothing happens
    f.response = tutils.tresp(content=json.dumps({"usage": {
        "prompt_tokens": 2000, "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1536}}}).encode(),
        headers=Headers(content_type="application/json"))
    a.responseheaders(f)
    a.response(f)
    assert f.comment.startswith("cache 1.54k read / 0 write of 2.00k · 77%")
    why = tctx.master.commands.call("affinity.why", [f])
    assert "rule=first" in why and "read=1536/2000" in why and "verdict=" in why
    assert "1 requests" in tctx.master.commands.call("affinity.stats")
    tctx.master.commands.call("affinity.reset")
    assert a.stats.total.requests == 0
    # reload reads the file now: an edit applies to the next request...
    rules = Path(tctx.options.affinity_rules)
    rules.write_text(RULES + "  - name: added\n    match: {host: api.example.com}\n"
                             "    set_headers: {x-added: \"yes\"}\n")
    tctx.master.commands.call("affinity.reload")
    f = req(CHAT)
    a.request(f)
    assert f.request.headers["x-added"] == "yes"
    # ...and a broken file is the command's error, the rules in force stay.
    rules.write_text("rules: [")
    with pytest.raises(exceptions.CommandError):
        tctx.master.commands.call("affinity.reload")
    f = req(CHAT)
    a.request(f)
    assert f.request.headers["x-added"] == "yes"


def test_codex_websocket_frames_become_records(tmp_path):
    from mitmproxy import websocket
    from wsproto.frame_protocol import Opcode

    log = tmp_path / "ws.jsonl"
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT), affinity_log=str(log))
        f = tflow.twebsocketflow(messages=False)
        f.request.host, f.request.port, f.request.scheme = "chatgpt.com", 443, "https"
        f.request.path = "/backend-api/codex/responses"
        f.request.headers["session-id"] = "019a9544-7ab1-73c1-837e-1fa681f4462b"
        resp = f.response
        f.response = None
        a.request(f)  # the upgrade request: headers filled, no body
        assert f.request.headers["thread-id"] == "019a9544-7ab1-73c1-837e-1fa681f4462b"
        f.response = resp
        a.responseheaders(f)
        a.response(f)  # the 101: no usage, but a record is only written per completed frame
        frames = (Path(__file__).parent / "fixtures" / "usage" / "codex_ws.jsonl").read_bytes()
        for line in frames.splitlines():
            f.websocket.messages.append(websocket.WebSocketMessage(Opcode.TEXT, False, line))
            a.websocket_message(f)
        f.websocket.messages.append(websocket.WebSocketMessage(Opcode.TEXT, True, b'{"type":"response.completed"}'))
        a.websocket_message(f)  # client frames are not responses
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    ws = [r for r in recs if r["transport"] == "websocket"]
    assert len(ws) == len(recs)  # no record for the 101 upgrade itself
    assert [r["usage"]["cache_read_tokens"] for r in ws] == [0, 41088]
    assert all(r["affinity_id"] == "019a9544-7ab1-73c1-837e-1fa681f4462b" for r in ws)
    assert all(r["api"] == "openai-responses" and r["stream"] for r in ws)


def test_summary_prints_on_shutdown_only_not_on_script_reload(addon, capsys):
    a, tctx = addon
    f = req(CHAT)
    a.request(f)
    f.response = tutils.tresp(content=json.dumps({"usage": {"prompt_tokens": 10}}).encode(),
                              headers=Headers(content_type="application/json"))
    a.response(f)
    a.done()  # what a hot reload of the script does
    assert "requests" not in capsys.readouterr().err
    tctx.master.should_exit.set()
    a.done()
    assert "1 requests" in capsys.readouterr().err


def test_diagnosis_can_be_turned_off(addon, tmp_path):
    a, tctx = addon
    log = tmp_path / "d.jsonl"
    tctx.configure(a.bundle, affinity_diagnose=False, affinity_log=str(log))
    f = req(CHAT)
    a.request(f)
    # not fingerprinted, still rewritten
    assert a.state.exchanges.get(f.id).fingerprint is None and "x-conv" in f.request.headers
    f.response = tutils.tresp(content=json.dumps({"usage": {"prompt_tokens": 10}}).encode(),
                              headers=Headers(content_type="application/json"))
    a.responseheaders(f)
    a.response(f)
    (rec,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert rec["usage"]["input_tokens"] == 10 and rec["miss_reason"] is None


BIG = 2**70 + 1  # read as a float by orjson: a re-encode must not turn it into 1.1805916207174113e21


@pytest.mark.parametrize("model", ["o3", "gpt-5"])
def test_integers_beyond_64_bits_survive_splice_and_re_encode(addon, model):
    """The parse skips the scan for long integers (it costs half a parse); a splice never needs
    it (o3: one rule adds a key), and a re-encode (gpt-5: the second rule overwrites the key the
    first one added) re-reads the body exactly and carries the added key over."""
    a, _ = addon
    body = {**CHAT, "model": model, "seed": BIG, "metadata": {"n": [BIG, -BIG]}}
    f = req(body)
    raw = json.dumps(body).encode()
    a.request(f)
    sent = f.request.content
    assert sent is not None
    out = json.loads(sent)
    assert out["seed"] == BIG and out["metadata"] == {"n": [BIG, -BIG]}
    rec = f.metadata[META]
    if model == "o3":
        assert rec["body_write"] == "splice" and out["prompt_cache_key"] == rec["affinity_id"]
        assert sent.endswith(raw[1:])  # the original bytes, untouched, after the new key
    else:
        assert rec["body_write"] == "reserialize" and out["prompt_cache_key"] == "forced-gpt-5"


def test_family_key_reads_the_root_as_the_rules_left_it(tmp_path):
    # The ID and the family share one walk of the prompt's root; a rule that rewrites part of
    # the root (here the Responses `instructions`) before `{family_key}` is rendered makes it
    # walk again: the key is that of the body as sent.
    from affinity_addon.request.family_key import family_hash

    p = tmp_path / "r.yaml"
    p.write_text("rules:\n  - name: k\n    match: {host: api.example.com}\n"
                 "    on_conflict: overwrite\n"
                 "    set_fields:\n      instructions: 'house style'\n"
                 "      prompt_cache_key: '{family_key}'\n")
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(p), affinity_key="k" * 32)
        body = {"model": "gpt-5", "instructions": "client style",
                "input": [{"role": "user", "content": "hi"}]}
        f = req(body, path="/v1/responses")
        a.request(f)
        sent = json.loads(f.request.content)
        assert sent["instructions"] == "house style"
        family = family_hash({k: v for k, v in sent.items() if k != "prompt_cache_key"},
                             "openai-responses", a.state.secret)
        assert sent["prompt_cache_key"].startswith(f"fam-{family}-")
        assert family != family_hash(body, "openai-responses", a.state.secret)
