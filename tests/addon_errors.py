"""A test fails when the addon erred, even though traffic went on.

The addon fails open: an exception in a hook is logged (by mitmproxy's dispatch as "Addon
error" with a traceback, or by the addon's own bundle as `affinity: <hook> hook of ... failed`)
and the flow goes through, so a regression would otherwise pass every test that only looks at
the traffic. Two checks:

- processes (mitmdump, mitmweb, `affinity proxy`, `affinity run`): `check_output` reads what the
  process printed once it has stopped and fails on an addon error, a traceback, or a line the
  addon logs at ERROR level (the messages are read from the package's source, so a new one is
  covered without a list to keep up to date);
- in process: `ErrorCapture` collects ERROR records of `affinity_addon.*` and of mitmproxy's
  addon dispatch (`mitmproxy.addonmanager`); conftest's autouse fixture fails the test on one.

A test that provokes an error on purpose says so (`expect=` here, `@pytest.mark.expect_addon_error`
in process) and the check then requires that error, so the expectation cannot go stale either.

AFFINITY_TEST_PLANT_ERROR=1 plants an error after every `response` of the addon: in every
mitmproxy process the tests start (tests/plant_error.py, loaded after the addon) and in process
(`plant_in_process`); AFFINITY_TEST_PLANT_ERROR=all after each of its traffic hooks. A suite run
planted shows which tests would miss a failing addon.
"""

import ast
import functools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLANT_SCRIPT = Path(__file__).resolve().with_name("plant_error.py")
PLANT_ENV = "AFFINITY_TEST_PLANT_ERROR"
PLANTED = "planted test error"  # in the planted exception's message, in process and out

# mitmproxy's termlog prefixes each record with its time ("[12:34:56.789] "); the lines after
# it (a traceback) belong to the same record.
_RECORD_START = re.compile(r"^\[\d\d:\d\d:\d\d\.\d{3}\]")
_ERROR_CALLS = {"error", "exception", "critical"}


# The addon's traffic hooks; "1" plants after `response` only (where a record is made), "all"
# after each of them (a test that never gets a response still notices a failing `request`).
TRAFFIC_HOOKS = ("request", "responseheaders", "response", "error", "websocket_message")


def planted_hooks() -> tuple[str, ...]:
    value = os.environ.get(PLANT_ENV, "")
    return {"1": ("response",), "all": TRAFFIC_HOOKS}.get(value, ())


def planted() -> bool:
    return bool(planted_hooks())


def plant_args() -> list[str]:
    """mitmproxy arguments that load the planted error after the addon (when planting)."""
    return ["-s", str(PLANT_SCRIPT)] if planted() else []


class AddonErrorLogged(AssertionError):
    """The addon logged an error (or an expected one is missing); the message has the lines."""


def _format_regex(fmt: str) -> str:
    """A %-format string as a regex: literal text escaped, every conversion any text."""
    parts = re.split(r"%(?:\([^)]*\))?[-#0 +]*\d*(?:\.\d+)?[sdrifgexXo]", fmt)
    return ".*".join(re.escape(p) for p in parts)


def _message_of(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _format_regex(node.value)
    if isinstance(node, ast.JoinedStr):  # an f-string: its constant parts, anything between
        return ".*".join(re.escape(v.value) if isinstance(v, ast.Constant) else ""
                         for v in node.values)
    return None


@functools.cache
def error_messages() -> tuple[re.Pattern[str], ...]:
    """Every message the package logs at ERROR level or above, as a regex."""
    found: set[str] = set()
    for path in sorted((ROOT / "affinity_addon").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _ERROR_CALLS and node.args
                    and (msg := _message_of(node.args[0])) and msg.strip(".*")):
                found.add(msg)
    return tuple(re.compile(m) for m in sorted(found))


OFFENDING = (re.compile(r"Addon error"), re.compile(r"Traceback \(most recent call last\)"))


def records(output: str) -> list[list[str]]:
    """The output as log records: a timestamped line and the lines that continue it."""
    out: list[list[str]] = []
    for line in output.splitlines():
        if _RECORD_START.match(line) or not out:
            out.append([line])
        else:
            out[-1].append(line)
    return out


def _offends(record: Sequence[str]) -> bool:
    first = record[0]
    return (any(p.search(line) for p in OFFENDING for line in record)
            or any(p.search(first) for p in error_messages()))


def offending_records(output: str, expect: Iterable[str] = (), tolerate: Iterable[str] = ()
                      ) -> tuple[list[list[str]], list[str]]:
    """(the error records no `expect` or `tolerate` pattern matches, the `expect` patterns no
    record matched). A matched record is excused with its traceback (the lines continuing it)."""
    patterns = [re.compile(p) for p in expect]
    tolerated = [re.compile(p) for p in tolerate]
    seen: set[int] = set()
    bad = []
    for rec in records(output):
        text = "\n".join(rec)
        hits = {i for i, p in enumerate(patterns) if p.search(text)}
        seen |= hits
        if not hits and _offends(rec) and not any(p.search(text) for p in tolerated):
            bad.append(rec)
    return bad, [p.pattern for i, p in enumerate(patterns) if i not in seen]


def check_output(output: str, what: str, expect: Iterable[str] = (),
                 tolerate: Iterable[str] = ()) -> None:
    """Raise AddonErrorLogged when `output` (a stopped process's) has an unexpected addon
    error, traceback or affinity error line, or lacks an expected one. `tolerate`: errors of a
    known product bug that may or may not occur in a run (name the bug where it is used)."""
    bad, missing = offending_records(output, expect, tolerate)
    problems = []
    if bad:
        shown = "\n".join("\n".join(r[:40]) for r in bad[:5])
        problems.append(f"{what} logged {len(bad)} addon error(s):\n{shown}")
    if missing:
        problems.append(f"{what} never logged the expected error(s): {missing}")
    if problems:
        raise AddonErrorLogged("\n".join(problems))


def check_file(path: Path, what: str, expect: Iterable[str] = (),
               tolerate: Iterable[str] = ()) -> None:
    check_output(path.read_text(errors="replace") if path.exists() else "", what, expect,
                 tolerate)


# -- in process ---------------------------------------------------------------------------------

# Loggers whose ERROR records mean the addon failed: the package's own, and mitmproxy's addon
# dispatch ("Addon error" when a hook raised).
LOGGERS = ("affinity_addon", "mitmproxy.addonmanager")


class ErrorCapture(logging.Handler):
    """ERROR records of the addon's loggers, on the root logger (so caplog, other handlers and
    the loggers' own levels are left as they are)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        return any(record.name == n or record.name.startswith(n + ".") for n in LOGGERS)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        out, self.records = self.records, []
        return out


def describe(record: logging.LogRecord) -> str:
    text = f"{record.levelname} {record.name}: {record.getMessage()}"
    if record.exc_info and record.exc_info[1] is not None:
        text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
    return text


def check_records(recs: Sequence[logging.LogRecord], what: str,
                  expect: Iterable[str] = ()) -> None:
    """Like check_output, for log records captured in process."""
    patterns = [re.compile(p) for p in expect]
    seen: set[int] = set()
    bad = []
    for r in recs:
        text = describe(r)
        hits = [i for i, p in enumerate(patterns) if p.search(text)]
        if hits:
            seen.update(hits)
        else:
            bad.append(text)
    problems = []
    if bad:
        problems.append(f"{what} logged {len(bad)} addon error(s):\n" + "\n".join(bad[:10]))
    missing = [p.pattern for i, p in enumerate(patterns) if i not in seen]
    if missing:
        problems.append(f"{what} never logged the expected error(s): {missing}")
    if problems:
        raise AddonErrorLogged("\n".join(problems))


class PlantedError(RuntimeError):
    pass


def plant_in_process() -> Iterator[None]:
    """While active, each planted hook of the in-process addon (the bundle, and the Rewriter and
    Recorder parts that tests also drive on their own) is followed by an error logged as
    mitmproxy logs a later addon's exception."""
    import pytest
    from mitmproxy.addonmanager import safecall

    from affinity_addon.mitm.bundle import Affinity
    from affinity_addon.mitm.recorder import Recorder
    from affinity_addon.mitm.rewriter import Rewriter

    def wrap(hook: str, original: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        def planted_hook(self: Any, arg: Any) -> None:
            original(self, arg)
            with safecall():  # logs "Addon error: ..." with the traceback, as mitmproxy does
                raise PlantedError(f"{PLANTED} after {type(self).__name__}.{hook}")
        return planted_hook

    hooks = planted_hooks() or ("response",)
    make_dispatcher = Affinity._dispatcher

    def planted_dispatcher(self: Any, hook: str) -> Callable[..., None]:
        # The bundle's hooks are dispatchers it makes per instance, from mitmproxy's registry.
        dispatch = make_dispatcher(self, hook)
        if hook not in hooks:
            return dispatch

        def planted_hook(*args: Any) -> None:
            dispatch(*args)
            with safecall():
                raise PlantedError(f"{PLANTED} after {type(self).__name__}.{hook}")
        return planted_hook

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Affinity, "_dispatcher", planted_dispatcher)
        for hook in hooks:
            for cls in (Rewriter, Recorder):
                if callable(getattr(cls, hook, None)):
                    mp.setattr(cls, hook, wrap(hook, getattr(cls, hook)))
        yield
