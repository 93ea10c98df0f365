"""What the affinity addons share: the rules, the log, the tracker, the live summary, in-flight work.

mitmproxy's addons are single-concern classes (config, scope, rewrite, record, commands); they
see one `State` instead of reaching into each other.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from affinity_addon.diagnosis.tracker import MissTracker, Pending
from affinity_addon.record.jsonl import JsonlWriter
from affinity_addon.request.family_key import FamilyRates
from affinity_addon.request.rules import RuleSet
from affinity_addon.response.stream_tap import StreamTap
from affinity_addon.response.usage import UsageReader
from affinity_addon.views.aggregate import Aggregator
from affinity_addon.views.keyrate import KeyRates
from affinity_addon.views.ttl import TtlAdvisor

logger = logging.getLogger(__name__)

# Deferred work waits for an idle loop turn, unless this many jobs queue up or the oldest has
# waited this long (a saturated proxy is never idle: then it catches up). The wait is also what
# a SIGKILL can cost: the records of the responses answered in its last ~10 ms.
IDLE_BACKLOG = 64
IDLE_WAIT = 0.01
IDLE_RETRY = 0.001  # how soon a slice that found the loop busy looks again (seconds)
STATS_CONVERSATIONS = 2000  # live summary: conversations tracked one by one (memory bound)


def new_stats() -> Aggregator:
    return Aggregator(keep_series=False, max_conversations=STATS_CONVERSATIONS)


def new_ttl_advisor() -> TtlAdvisor:
    return TtlAdvisor(max_conversations=STATS_CONVERSATIONS)


class Stepped:
    """A request's fingerprint, computed one slice per event-loop turn (`State.step`) so that
    socket reads and writes interleave with it; `finish` computes the rest at once (the
    response came first, or there is no loop)."""

    __slots__ = ("result", "steps")

    def __init__(self, steps: Generator[None, None, Pending]) -> None:
        self.steps: Generator[None, None, Pending] | None = steps
        self.result: Pending | None = None

    def step(self) -> bool:
        """One slice; True when there is nothing left to do."""
        if self.steps is None:
            return True
        try:
            next(self.steps)
            return False
        except StopIteration as done:
            self.result = done.value
        except RecursionError:
            pass  # too deeply nested to fingerprint: no verdict for this one
        except Exception:
            logger.exception("affinity: cannot fingerprint this request; no verdict for it")
        self.steps = None
        return True

    def finish(self) -> Pending | None:
        while not self.step():
            pass
        return self.result

    def slices(self) -> Iterator[None]:
        while not self.step():
            yield


def _call(work: Callable[[], None]) -> Iterator[None]:
    work()
    yield from ()


def drain(job: Iterator[None]) -> None:
    for _ in job:
        pass


class Live:
    """Per-flow response state; lives here, never in flow.metadata (which must pickle)."""

    __slots__ = ("reader", "tap")

    def __init__(self, reader: UsageReader, tap: StreamTap | None) -> None:
        self.reader = reader
        self.tap = tap


@dataclass
class State:
    ruleset: RuleSet | None = None
    key: str = ""  # affinity_key, or this installation's key file (keyfile.resolve)
    writer: JsonlWriter | None = None
    stats: Aggregator = field(default_factory=new_stats)
    # What the cache TTL cost so far (all-5m / all-1h / auto), for the summary: a few numbers
    # per conversation.
    ttl: TtlAdvisor = field(default_factory=lambda: new_ttl_advisor())
    tracker: MissTracker = field(default_factory=MissTracker)
    live: dict[str, Live] = field(default_factory=dict)
    # Per flow, the fingerprint still to compute (or computed, in unit tests): it needs only the
    # request body, so it waits until the response has gone back to the client.
    pending: dict[str, Stepped] = field(default_factory=dict)
    # Work that can wait until the request or the response is on its way (fingerprint, verdict,
    # record), with the time it was queued: run on the event loop in slices, when the loop has
    # nothing else to do (`_slice`), never on a thread (a worker holding the GIL stalls the loop
    # just the same, and the hand-offs cost more than the work).
    later: deque[tuple[float, Iterator[None]]] = field(default_factory=deque)
    later_scheduled: bool = False
    running_later: bool = False  # True while deferred work runs (outside any hook)
    warned: set[str] = field(default_factory=set)
    # This proxy's request rate per prompt family: how many `{family_key}` buckets to use.
    family_rates: FamilyRates = field(default_factory=FamilyRates)
    # Requests a minute per prompt_cache_key: `key_load` counts at send time (the `overflow`
    # verdict's evidence), `key_rates` counts records (the summary line), like `ttl`.
    key_load: KeyRates = field(default_factory=KeyRates)
    key_rates: KeyRates = field(default_factory=KeyRates)
    # Called with (record, its JSON dict) for every finished record: metrics, OpenTelemetry.
    # A sink must be quick and must not raise (the recorder logs and skips a failing one).
    sinks: list[Callable[[Any, dict[str, Any]], None]] = field(default_factory=list)
    instance: str = ""  # affinity_instance: added to every record (gateways, merged logs)
    # The options the hooks read per flow, copied at configure: `ctx.options.x` deep-copies
    # the value on every read (a few µs each, several times a request).
    dry_run: bool = False
    diagnose: bool = True
    keep_bodies: int = 1 << 20

    def in_scope(self, host: str) -> bool:
        rs = self.ruleset
        return rs is not None and any(r.host.matches(host) for r in rs.rules)

    def defer(self, work: Callable[[], None] | Iterator[None]) -> None:
        """Run `work` (a call, or a generator: one slice per `next`) once the current hook has
        returned and the event loop has nothing else to do; at once when there is no running
        loop (unit tests)."""
        job = work if isinstance(work, Iterator) else _call(work)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            drain(job)
            return
        self.later.append((time.monotonic(), job))
        if not self.later_scheduled:
            self.later_scheduled = True
            loop.call_soon(self._slice, loop)

    def step(self, job: Stepped) -> None:
        """Run `job` one slice per idle event-loop turn; at once when there is no loop."""
        self.defer(job.slices())

    def _slice(self, loop: asyncio.AbstractEventLoop) -> None:
        """One slice of the oldest deferred job, when nothing else waits on the loop.

        mitmproxy moves a request along in several loop turns (read, hooks, write): a slice
        that ran in each of them would add up to the whole job again. So while other callbacks
        are ready (a request to forward, a response to send), the slice waits for the next turn,
        unless work piles up (a saturated proxy is never idle): then slices run until the
        backlog is back under its bounds, so that it cannot grow without limit."""
        self.later_scheduled = False
        if not self.later:
            return
        ready = getattr(loop, "_ready", None)  # asyncio's queue of callbacks to run this turn
        if ready and not self._overdue():
            # Look again a little later, not next turn: requeued every turn, this callback
            # would keep a busy loop from ever sleeping in its poll (measured: 10% less
            # throughput under load).
            self.later_scheduled = True
            loop.call_later(IDLE_RETRY, self._slice, loop)
            return
        self.running_later = True
        try:
            self._run_slice()
            while ready and self.later and self._overdue():
                self._run_slice()
        finally:
            self.running_later = False
        if self.later:
            self.later_scheduled = True
            loop.call_soon(self._slice, loop)

    def _overdue(self) -> bool:
        return (len(self.later) >= IDLE_BACKLOG
                or time.monotonic() - self.later[0][0] >= IDLE_WAIT)

    def _run_slice(self) -> None:
        try:
            next(self.later[0][1])
        except StopIteration:
            self.later.popleft()
        except Exception:  # one failing record must not stop the others
            self.later.popleft()
            logger.exception("affinity: could not record this response")

    def run_later(self) -> None:
        """Run all deferred work now, in order (on shutdown: no record is lost)."""
        self.running_later = True
        try:
            while self.later:
                _, job = self.later.popleft()
                try:
                    drain(job)
                except Exception:  # one failing record must not stop the others
                    logger.exception("affinity: could not record this response")
        finally:
            self.running_later = False

    def warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            logger.warning(msg, *args)
