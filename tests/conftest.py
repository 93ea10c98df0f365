from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Proxy, start_proxy
from tests.sim import SimClock, Simulator


@pytest.fixture(autouse=True)
def _private_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process addons default to confdir ~/.mitmproxy, where the addon writes its random key
    on first start: keep tests out of the real home directory."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.getbasetemp() / "home"))


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
        out = p.stop()
        if "Traceback" in out:
            print(f"--- {p.output} ---\n{out}")
