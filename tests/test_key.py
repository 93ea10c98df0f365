"""The affinity key is random per installation, kept in the confdir, and never logged."""

import logging
import stat
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from affinity_addon.mitm import keyfile
from affinity_addon.request import affinity_id
from affinity_addon.request.affinity_id import AffinityConfig, derive, keyed_hash
from tests.driver import Affinity
from tests.test_request_rewrite import CHAT, req


@pytest.fixture
def addon():
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        yield a, tctx


def test_first_start_generates_a_private_key_and_later_starts_reuse_it(tmp_path, caplog, addon):
    a, tctx = addon
    caplog.set_level(logging.INFO)
    tctx.configure(a.bundle, confdir=str(tmp_path / "conf"))
    path = tmp_path / "conf" / keyfile.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert a.state.secret == key and len(key) == 64
    generated = [r for r in caplog.records if "generated" in r.getMessage()]
    assert len(generated) == 1
    assert key not in caplog.text  # the key itself is never logged
    caplog.clear()
    tctx.configure(a.bundle, confdir=str(tmp_path / "conf2"))
    tctx.configure(a.bundle, confdir=str(tmp_path / "conf"))  # a restart on the first confdir
    assert a.state.secret == key
    assert keyfile.resolve("", str(tmp_path / "conf")) == key
    assert keyfile.resolve("", str(tmp_path / "conf2")) != key  # another installation


def test_option_overrides_the_file_and_public_or_short_keys_warn(tmp_path, caplog, addon):
    a, tctx = addon
    tctx.configure(a.bundle, confdir=str(tmp_path / "conf"), affinity_key="a-long-enough-shared-gateway-key")
    assert a.state.secret == "a-long-enough-shared-gateway-key"
    assert not (tmp_path / "conf" / keyfile.KEY_FILE).exists()
    assert "affinity_key" not in caplog.text
    for public in (*affinity_id.PUBLIC_KEYS, "k3y"):
        caplog.clear()
        tctx.configure(a.bundle, affinity_key=public)
        assert a.state.secret == public
        assert "affinity_key is" in caplog.text and public not in caplog.text.replace("affinity_key", "")


def test_ids_differ_between_installations(tmp_path, addon):
    a, tctx = addon
    p = tmp_path / "rules.yaml"
    p.write_text("version: 1\nrules:\n  - name: r\n    match: {host: api.example.com}\n"
                 "    set_headers: {x-conv: '{affinity_id}'}\n")
    tctx.configure(a.bundle, affinity_rules=str(p))
    ids = []
    for name in ("one", "two", "one"):
        tctx.configure(a.bundle, confdir=str(tmp_path / name))
        f = req(CHAT)
        a.request(f)
        ids.append(f.request.headers["x-conv"])
    assert ids[0] != ids[1] and ids[0] == ids[2]


def test_unwritable_confdir_falls_back_to_a_run_key(tmp_path, caplog, addon):
    a, tctx = addon
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    tctx.configure(a.bundle, confdir=str(blocker / "conf"))
    assert len(a.state.secret) == 64 and "random key for this run only" in caplog.text


def test_long_keys_are_hashed_not_truncated():
    base = "k" * 64
    assert keyed_hash(b"x", base + "a") != keyed_hash(b"x", base + "b")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    ids = {derive(AffinityConfig(), {}, body, "openai-chat", base + s)[0] for s in "ab"}
    assert len(ids) == 2


_ROOT = Path(__file__).resolve().parent.parent
# The bench and the demo are split into packages next to their entry points: every module counts.
_SCRIPTS = sorted(p.relative_to(_ROOT).as_posix() for p in (_ROOT / "scripts").rglob("*.py"))


@pytest.mark.parametrize("path", [*_SCRIPTS, "tests/harness.py"])
def test_nothing_depends_on_the_old_fixed_key(path):
    text = (_ROOT / path).read_text()
    assert "DEFAULT_KEY" not in text and "affinity-default-key" not in text
