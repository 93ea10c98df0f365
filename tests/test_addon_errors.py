"""The error checks of tests/addon_errors.py catch an addon that errs while traffic goes on.

A planted error (tests/plant_error.py, raised in `response` after the addon did its work) must
fail the check of a real mitmdump's output, and its in-process equivalent must fail the check of
the captured log records; both show the offending lines. The patterns themselves are checked on
hand-written output.
"""

import logging
import re
from pathlib import Path

import httpx2
import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.mitm.config import DEFAULT_RULES
from tests.addon_errors import (
    PLANT_SCRIPT,
    PLANTED,
    AddonErrorLogged,
    ErrorCapture,
    check_output,
    check_records,
    error_messages,
    plant_in_process,
    planted,
)
from tests.driver import Affinity
from tests.harness import start_proxy
from tests.sim import Simulator

CLEAN = """\
[10:00:00.001] Loading script affinity_addon/addon.py
[10:00:00.002] affinity: 11 rules from rules/default.yaml
[10:00:00.003] HTTP(S) proxy listening at 127.0.0.1:8080.
[10:00:01.000] 127.0.0.1:5555: POST https://api.openai.com/v1/chat/completions
              << 200 OK 512b
[10:00:01.100] affinity: cannot write /dev/full: No space left on device; proxying continues
"""
ADDON_ERROR = """\
[10:00:02.000] Addon error: boom
Traceback (most recent call last):
  File "affinity_addon/mitm/recorder.py", line 60, in response
RuntimeError: boom
"""
BUNDLE_ERROR = """\
[10:00:03.000] affinity: response hook of <bound method Recorder.response of <...>> failed
Traceback (most recent call last):
  File "affinity_addon/mitm/bundle.py", line 69, in _traffic
KeyError: 'usage'
"""
AFFINITY_ERROR_LINE = "[10:00:04.000] affinity: could not record this response\n"
BARE_TRACEBACK = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: x\n"


def test_clean_output_passes() -> None:
    check_output(CLEAN, "mitmdump")


@pytest.mark.parametrize("bad, line", [
    (ADDON_ERROR, "Addon error: boom"),
    (BUNDLE_ERROR, "response hook of"),
    (AFFINITY_ERROR_LINE, "could not record this response"),
    (BARE_TRACEBACK, "ValueError: x"),
], ids=["addon-error", "bundle-hook", "affinity-error-line", "traceback"])
def test_each_kind_of_error_fails_with_its_lines(bad: str, line: str) -> None:
    with pytest.raises(AddonErrorLogged) as e:
        check_output(CLEAN + bad + CLEAN, "mitmdump")
    assert line in str(e.value) and "mitmdump logged 1 addon error(s)" in str(e.value)
    assert "proxy listening" not in str(e.value)  # only the offending records are shown


def test_an_expected_error_is_excused_with_its_traceback_and_must_occur() -> None:
    check_output(CLEAN + BUNDLE_ERROR, "mitmdump", expect=[r"KeyError: 'usage'"])
    with pytest.raises(AddonErrorLogged, match="never logged the expected error"):
        check_output(CLEAN, "mitmdump", expect=[r"KeyError: 'usage'"])
    with pytest.raises(AddonErrorLogged, match="Addon error: boom"):  # the other one still counts
        check_output(CLEAN + BUNDLE_ERROR + ADDON_ERROR, "mitmdump", expect=[r"KeyError"])


def test_every_error_message_of_the_package_is_an_affinity_error_line() -> None:
    # Read from the source: the bundle's hook failure and the recorder's are among them.
    patterns = error_messages()
    for text in ("affinity: response hook of <bound method X> failed",
                 "affinity: could not record this response",
                 "affinity: rules not reloaded, keeping the previous ones: bad.yaml:3: x"):
        assert any(p.search(text) for p in patterns), text
    assert not any(p.search("affinity: 11 rules from rules/default.yaml") for p in patterns)


def _anthropic_flow() -> http.HTTPFlow:
    return tflow.tflow(req=tutils.treq(
        method=b"POST", host="api.anthropic.com", port=443, scheme=b"https", authority=b"",
        path=b"/v1/messages", headers=http.Headers(content_type="application/json"),
        content=b'{"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}'))


@pytest.mark.expect_addon_error(re.escape(PLANTED))  # this test's own plant, on purpose
def test_in_process_the_planted_error_fails_the_check(tmp_path: Path) -> None:
    capture = ErrorCapture()
    logging.getLogger().addHandler(capture)
    log = tmp_path / "a.jsonl"
    try:
        plant = plant_in_process()
        next(plant)
        try:
            a = Affinity()
            with taddons.context(*a.addons) as tctx:
                tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log=str(log))
                f = _anthropic_flow()
                a.request(f)
                f.response = tutils.tresp(headers=http.Headers(content_type="application/json"),
                                          content=b'{"usage": {"input_tokens": 5}}')
                a.responseheaders(f)
                a.response(f)  # the addon records, then the planted error is logged
        finally:
            plant.close()
    finally:
        logging.getLogger().removeHandler(capture)
    assert log.read_text().count("\n") == 1  # the addon did its work, and traffic went on
    records = capture.take()
    with pytest.raises(AddonErrorLogged) as e:
        check_records(records, "the addon in process")
    assert "Addon error" in str(e.value) and PLANTED in str(e.value)
    assert all(r.name == "mitmproxy.addonmanager" for r in records)  # as mitmproxy logs it
    check_records(records, "the addon in process", expect=[re.escape(PLANTED)])


@pytest.mark.expect_addon_error("affinity: broken")  # logged below on purpose
def test_in_process_capture_keeps_only_the_addons_errors() -> None:
    capture = ErrorCapture()
    root = logging.getLogger()
    root.addHandler(capture)
    try:
        logging.getLogger("affinity_addon.mitm.recorder").warning("a warning is no error")
        logging.getLogger("somebody.else").error("not the addon's")
        logging.getLogger("affinity_addonx").error("a name that only starts the same")
        records = capture.take()
        assert records == []
        logging.getLogger("affinity_addon.mitm.recorder").error("affinity: broken")
        (rec,) = capture.take()
    finally:
        root.removeHandler(capture)
    with pytest.raises(AddonErrorLogged, match="affinity: broken"):
        check_records([rec], "x")


@pytest.mark.slow  # starts mitmdump
def test_a_real_mitmdump_with_the_planted_error_fails_the_check(tmp_path: Path) -> None:
    with Simulator(replicas=1, seed=0) as sim:
        # After the addon, as a bug in its response hook would act: logged, traffic goes on.
        # (A planted run loads it into every proxy already; mitmdump refuses it twice.)
        plant = [] if planted() else ["-s", str(PLANT_SCRIPT)]
        proxy = start_proxy(tmp_path, sim.url, extra_args=plant)
        try:
            with httpx2.Client(proxy=proxy.url, timeout=30) as client:
                r = client.post("http://api.openai.com/v1/chat/completions",
                                json={"model": "gpt-5", "messages": [
                                    {"role": "user", "content": "hi"}]})
            assert r.status_code == 200  # the client never noticed
            assert len(proxy.wait_records(1)) == 1  # the addon did its work
        finally:
            output = proxy.stop()
    with pytest.raises(AddonErrorLogged) as e:
        proxy.check()
    message = str(e.value)
    assert "Addon error" in message and PLANTED in message and "Traceback" in message
    assert "plant_error.py" in message  # the traceback, not only the line
    # and nothing else went wrong in that process: the planted error is the only one
    check_output(output, "mitmdump", expect=[re.escape(PLANTED)])
