import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.addon_errors import (
    AddonErrorLogged,
    ErrorCapture,
    check_records,
    plant_in_process,
    planted,
)
from tests.harness import Proxy, start_proxy
from tests.sim import SimClock, Simulator


@pytest.fixture(autouse=True)
def _private_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process addons default to confdir ~/.mitmproxy, where the addon writes its random key
    on first start: keep tests out of the real home directory."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.getbasetemp() / "home"))


@pytest.fixture(scope="session", autouse=True)
def _planted_error() -> Iterator[None]:
    """AFFINITY_TEST_PLANT_ERROR=1: an error after every `response` of the in-process addon
    (tests/addon_errors.py); the harness loads tests/plant_error.py into every proxy."""
    if planted():
        yield from plant_in_process()
    else:
        yield


@pytest.fixture(scope="session", autouse=True)
def _error_capture() -> Iterator[ErrorCapture]:
    """Installed before any module fixture starts an addon, so their errors are caught too."""
    capture = ErrorCapture()
    root = logging.getLogger()
    root.addHandler(capture)
    try:
        yield capture
    finally:
        root.removeHandler(capture)


@pytest.fixture(autouse=True)
def _no_addon_error(request: pytest.FixtureRequest, _error_capture: ErrorCapture) -> Iterator[None]:
    """The addon fails open, so an error it logs in process fails the test here. A test that
    provokes one says which: `@pytest.mark.expect_addon_error("regex", ...)` (each must occur)."""
    marker = request.node.get_closest_marker("expect_addon_error")
    yield
    check_records(_error_capture.take(), "the addon in process",
                  marker.args if marker is not None else ())


@pytest.fixture
def clock() -> SimClock:
    return SimClock(1_000_000.0)


@pytest.fixture
def sim(clock: SimClock) -> Iterator[Simulator]:
    s = Simulator(replicas=4, clock=clock, seed=0)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def proxy_factory(tmp_path: Path, sim: Simulator) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def make(name: str = "proxy", **kw: Any) -> Proxy:
        p = start_proxy(tmp_path / name, kw.pop("sim_url", sim.url), **kw)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()
    failures = []
    for p in started:  # every process stopped first, then each one's output checked
        try:
            p.check()
        except AddonErrorLogged as e:
            failures.append(str(e))
    if failures:
        raise AddonErrorLogged("\n\n".join(failures))
