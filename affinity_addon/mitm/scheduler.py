"""Work that can wait until a request or its answer is on its way: run later, in slices, when
the proxy is quiet.

The fingerprint, the verdict and the record need nothing that must happen before the request
leaves, so they run on mitmproxy's event loop after the hook has returned, one slice per loop
callback, never on a thread (a worker thread holds the GIL just the same, and the hand-offs
cost more than the work).

"Quiet" is judged two ways, with public asyncio calls only (`get_running_loop`, `time`,
`call_soon`, `call_later`): no traffic hook ran since the last look (`touch`, called by the
bundle for every one: mitmproxy moves a request along in several loop turns right after its
hooks), and the slice's callback ran promptly once due, so the loop had no other callbacks to
run first (socket reads and writes: a 1 MB body goes upstream in many turns without a hook).
A slice in each of those turns would delay the request by the whole job. So a slice waits while
the proxy is busy, unless work piles up or waits too long (a saturated proxy is never quiet:
then the backlog catches up, so it stays bounded).
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator

logger = logging.getLogger(__name__)

# Deferred work waits for a quiet moment, unless this many jobs queue up or the oldest has
# waited this long. The wait is also what a SIGKILL can cost: the records of the responses
# answered in its last ~10 ms.
IDLE_BACKLOG = 64
IDLE_WAIT = 0.01
# How soon a slice that found the proxy busy looks again (seconds). Requeued on every loop turn
# instead, the callback would keep a busy loop from ever sleeping in its poll (measured: 10%
# less throughput under load).
IDLE_RETRY = 0.001
# A callback that runs this long after it was due had other callbacks before it in its loop
# turn: the loop is busy. An idle loop runs a ready callback ~1.5 µs after it is queued
# (measured, 2,000 call_soon round trips: p99 1.6 µs); one socket read or write callback of
# mitmproxy's takes tens of µs.
BUSY_LAG = 0.00005




class Stepped[T]:
    """A job computed one slice at a time (`Scheduler.step`), so that socket reads and writes
    interleave with it; `finish` computes the rest at once (the answer came first, or there is
    no loop)."""

    __slots__ = ("result", "steps")

    def __init__(self, steps: Generator[None, None, T]) -> None:
        self.steps: Generator[None, None, T] | None = steps
        self.result: T | None = None

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
            pass  # too deeply nested to compute: no result for this one
        except Exception:
            logger.exception("affinity: cannot fingerprint this request; no verdict for it")
        self.steps = None
        return True

    def finish(self) -> T | None:
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


class Scheduler:
    """The queue of deferred jobs (generators: one slice per `next`), oldest first."""

    def __init__(self) -> None:
        self.queue: deque[tuple[float, Iterator[None]]] = deque()  # (time queued, job)
        self.scheduled = False
        self.running = False  # True while deferred work runs (outside any hook)
        self.activity = 0  # traffic hooks so far (`touch`)
        self._seen = 0  # `activity` when a slice last looked
        self._due = 0.0  # loop time at which the scheduled slice was due
        self._timer = False  # it was scheduled on a timer (epoll wakes up to 1 ms late)

    def touch(self) -> None:
        """A traffic hook ran: mitmproxy is moving a flow along in the next few loop turns."""
        self.activity += 1

    def defer(self, work: Callable[[], None] | Iterator[None]) -> None:
        """Run `work` (a call, or a generator: one slice per `next`) once the current hook has
        returned and the proxy is quiet; at once when there is no running loop (unit tests)."""
        job = work if isinstance(work, Iterator) else _call(work)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            drain(job)
            return
        self.queue.append((time.monotonic(), job))
        if not self.scheduled:
            self._schedule(loop, 0.0)

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.scheduled = True
        self._due = loop.time() + delay
        self._timer = bool(delay)
        if delay:
            loop.call_later(delay, self._slice, loop)
        else:
            loop.call_soon(self._slice, loop)

    def step[T](self, job: Stepped[T]) -> None:
        """Run `job` one slice per quiet loop turn; at once when there is no loop."""
        self.defer(job.slices())

    def _slice(self, loop: asyncio.AbstractEventLoop) -> None:
        """One slice of the oldest job, when no hook ran since the last look; while hooks keep
        coming, look again a little later, unless the work is overdue: then slices run until
        the backlog is back under its bounds, so that it cannot grow without limit."""
        self.scheduled = False
        if not self.queue:
            return
        hooks = self.activity != self._seen
        self._seen = self.activity
        if self._timer and not hooks and not self._overdue():
            # A timer's lateness says nothing (epoll sleeps in whole milliseconds): look again
            # in the next turn, where a prompt run means nothing else was waiting.
            self._schedule(loop, 0.0)
            return
        busy = hooks or (not self._timer and loop.time() - self._due > BUSY_LAG)
        if busy and not self._overdue():
            self._schedule(loop, IDLE_RETRY)
            return
        self.running = True
        try:
            self._run_slice()
            while busy and self.queue and self._overdue():
                self._run_slice()
        finally:
            self.running = False
        if self.queue:
            self._schedule(loop, 0.0)

    def _overdue(self) -> bool:
        return (len(self.queue) >= IDLE_BACKLOG
                or time.monotonic() - self.queue[0][0] >= IDLE_WAIT)

    def _run_slice(self) -> None:
        try:
            next(self.queue[0][1])
        except StopIteration:
            self.queue.popleft()
        except Exception:  # one failing record must not stop the others
            self.queue.popleft()
            logger.exception("affinity: could not record this response")

    def run_all(self) -> None:
        """Run all deferred work now, in order (on shutdown: no record is lost)."""
        self.running = True
        try:
            while self.queue:
                _, job = self.queue.popleft()
                try:
                    drain(job)
                except Exception:  # one failing record must not stop the others
                    logger.exception("affinity: could not record this response")
        finally:
            self.running = False
