"""The smaller findings of an adversarial review of the addon, one test each (each failed before)."""

import io
import json
import logging
import os
import tracemalloc

import pytest
from mitmproxy.test import taddons
from rich.console import Console

from affinity_addon.__main__ import main
from affinity_addon.record import jsonl
from affinity_addon.record.jsonl import JsonlWriter
from affinity_addon.record.schema import META
from affinity_addon.request.rules import parse_rules
from affinity_addon.views.aggregate import Aggregator
from affinity_addon.views.console import render_summary
from affinity_addon.views.report import ReadStats, iter_records
from affinity_addon.views.safe import MAX_KEYS, MAX_LABEL, OTHER_KEY
from tests import loggen
from tests.driver import Affinity
from tests.test_request_rewrite import req

HEADER_RULES = """
version: 1
rules:
  - name: r
    match: {host: api.example.com}
    set_headers:
      x-conv: "{affinity_id}"
      x-model: "m-{model}"
"""


def test_a_header_that_cannot_be_encoded_is_skipped_not_half_applied(tmp_path, caplog):
    p = tmp_path / "rules.yaml"
    p.write_text(HEADER_RULES)
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(p), confdir=str(tmp_path / "conf"))
        # A lone surrogate in the model: valid JSON, but no header can carry it.
        f = req(b'{"model": "gpt-\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
        with caplog.at_level(logging.WARNING):
            a.request(f)
    text = caplog.text
    assert "rewrite failed" not in text and "sent unchanged" not in text
    assert "x-model value cannot be encoded; not set" in text
    rec = f.metadata[META]
    # What the record says was added is exactly what the request carries.
    assert rec["added"]["headers"] == {"x-conv": f.request.headers["x-conv"]}
    assert "x-model" not in f.request.headers


@pytest.mark.parametrize("name", ["content-length", "Transfer-Encoding", "host", "connection",
                                  "upgrade", "content-encoding"])
def test_rules_may_not_set_framing_or_routing_headers(name):
    text = (f"version: 1\nrules:\n  - name: bad\n    match: {{host: x}}\n"
            f"    set_headers:\n      {name}: '1'\n")
    import yaml

    from affinity_addon.catalog.yamlsource import load_yaml

    assert yaml.safe_load(text)  # well-formed: the rule itself is what is refused
    with pytest.raises(ValueError, match=rf"rules\.yaml:6: rule 'bad': set_headers: '{name}'"):
        parse_rules(load_yaml_text(text, load_yaml), "rules.yaml")


def load_yaml_text(text, load_yaml):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_text(text)
        return load_yaml(p)


def test_a_short_jsonl_write_costs_one_line_not_the_next_record(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    w = JsonlWriter(str(path))
    real_write = os.write
    calls = {"n": 0}

    def flaky(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[:10]))  # short write...
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")  # ...and the rest fails
        return real_write(fd, data)

    monkeypatch.setattr(jsonl.os, "write", flaky)
    assert not w.write({"n": 1, "pad": "x" * 100})
    assert w.write({"n": 2})
    assert w.write({"n": 3})
    w.close()
    stats = ReadStats()
    assert [r["n"] for r in iter_records([path], stats)] == [2, 3]
    assert stats.malformed == 1


def test_short_writes_are_finished(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    w = JsonlWriter(str(path))
    real_write = os.write
    monkeypatch.setattr(jsonl.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    assert w.write({"n": 1, "text": "a longer record"})
    w.close()
    assert json.loads(path.read_bytes()) == {"n": 1, "text": "a longer record"}


def test_the_reader_resyncs_inside_a_torn_line(tmp_path):
    path = tmp_path / "log.jsonl"
    # A line torn by an older writer, glued to the whole record that followed it.
    path.write_bytes(b'{"n": 1, "usage": {"inp' + b'{"n": 2, "usage": {"input_tokens": 5}}\n'
                     + b'{"n": 3}\n')
    stats = ReadStats()
    assert [r["n"] for r in iter_records([path], stats)] == [2, 3]
    assert stats.malformed == 1


def test_report_survives_huge_numbers_and_deep_nesting(tmp_path, capsys):
    rec = loggen.generate(conversations=1, seed=1)[1]
    huge = dict(rec, usage={"input_tokens": 10**400, "cache_read_tokens": 10**400,
                           "output_tokens": 10**400, "cost": 10**400})
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(huge) + "\n"
                    + '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert main(["report", str(path)]) == 0
    assert main(["report", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 malformed line" in captured.err
    assert "Traceback" not in captured.err


ESCAPES = ("gpt\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\"  # OSC 8 link
           "\x1b]52;c;ZXZpbA==\x07"  # OSC 52 clipboard write
           "\x1b[2J\x9b31m\u202eevil")  # CSI clear screen, C1 CSI, bidi override


def _escaped_record():
    rec = loggen.generate(conversations=1, seed=1)[1]
    rec.update(model=ESCAPES, rule="r\x1b[31m", affinity_id="aff\x07",
               miss_reason="prefix-changed", miss_detail="d\x1b]52;c;eA==\x07",
               usage={"input_tokens": 2000, "cache_read_tokens": 0})
    return rec


def test_terminal_escapes_never_reach_the_summary():
    agg = Aggregator()
    agg.add(_escaped_record())
    buf = io.StringIO()
    render_summary(agg, Console(file=buf, width=200, force_terminal=True, color_system=None))
    out = buf.getvalue()
    # rich's own styling would use ESC too: no color system, so any ESC came from the record.
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out and "\u202e" not in out
    assert "\\x1b]52" in out or "\\x1b]8" in out  # shown, escaped


def test_terminal_escapes_never_reach_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    path = loggen.write_log(tmp_path / "e.jsonl", [_escaped_record()])
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in ("\x1b", "\x07", "\x9b", "\u202e"))
    assert "gpt\\x1b]8" in out


def test_live_stats_are_bounded_by_count_not_size():
    agg = Aggregator(keep_series=False, max_conversations=100)
    tracemalloc.start()
    for i in range(3 * MAX_KEYS):
        agg.add({"model": f"m{i}-" + "x" * 100_000, "rule": f"r{i}" + "y" * 10_000,
                 "affinity_id": "a" * 50_000 + str(i), "miss_reason": f"why-{i}" + "z" * 5000,
                 "miss_detail": "d" * 100_000,
                 "usage": {"input_tokens": 10, "cache_read_tokens": 0}})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(agg.by_model) <= MAX_KEYS + 1 and OTHER_KEY in agg.by_model
    assert len(agg.by_rule) <= MAX_KEYS + 1
    assert len(agg.by_reason) <= MAX_KEYS + 1
    assert all(len(k) <= MAX_LABEL for k in agg.by_model)
    # ~400 MB of client strings went in; what is kept is bounded by the counts.
    assert peak < 40 << 20, f"{peak >> 20} MiB"


def test_a_huge_model_name_is_kept_at_a_real_name_length(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text(HEADER_RULES.replace('      x-model: "m-{model}"\n', ""))
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(p), confdir=str(tmp_path / "conf"))
        f = req({"model": "m" * 1_000_000, "messages": [{"role": "user", "content": "hi"}]})
        a.request(f)
    assert len(f.metadata[META]["model"]) == 256
    job = a.state.exchanges.get(f.id).fingerprint
    fp = getattr(job.result if job else None, "fingerprint", None)  # what the tracker will keep
    assert fp is None or len(fp.model) <= 256
