"""Provider cache diagnostics, the request side: each request of a conversation names the
conversation's previous response, so the provider can say why the cache missed
(catalog/provider_diagnostics.yaml; the answer is read into the record's `provider_diagnosis`).

The agent does not track its previous response id for this; the proxy sees every turn. The link
follows a conversation the way the miss tracker does, without waiting for the request's
fingerprint (the field must be in the body before it leaves):
- by its affinity ID, and within it by thread: its root (system prompt, first user message,
  model family) picks the thread, so a memory or title request under the same session ID is a
  thread of its own, and a tool reorder or an edited later message keeps the thread;
- when the root changed (a new system prompt, another model) the first user message alone
  finds the thread again, under the same affinity ID or, for an ID derived from the root, among
  recent conversations (a later turn only: a conversation's first request continues nothing).

`ResponseLinks` is bounded like the conversation store and holds hashes and response ids, never
prompt text. A response id is taken as soon as the response has one (an SSE stream's first
event, a JSON body once read): the next request of a fast agent may come before the record.
"""

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from affinity_addon.catalog.diagnostics import DiagnosticsSource, DiagnosticsTable

logger = logging.getLogger(__name__)

THREADS = 8  # threads kept per conversation (main, memory, title, compaction, subagents)
OPENINGS = 4096  # recent threads indexed by their first user message alone
MAX_ID_CHARS = 128  # a provider's response id; longer is not one
MAX_MESSAGE_CHARS = 300  # a provider's rejection, as logged

# The id of the response to a request, once known: (id or None, settled). Settled with no id:
# the request failed and the thread keeps its earlier link; not settled: still in flight.
Resolver = Callable[[], tuple[str | None, bool]]


@dataclass(frozen=True, slots=True)
class LinkKeys:
    """How a request is placed in its conversation: keyed hashes only."""

    conversation: str  # the affinity ID
    root: str | None  # system prompt + first user message + model family
    opening: str | None  # the first user message alone
    later_turn: bool  # more than one message: it can continue a conversation


class Thread:
    """One thread of a conversation: its latest request's keys and its latest response id."""

    __slots__ = ("opening", "pending", "response_id", "root")

    def __init__(self, root: str | None, opening: str | None) -> None:
        self.root, self.opening = root, opening
        self.response_id: str | None = None
        self.pending: Resolver | None = None

    def previous(self) -> str | None:
        """The latest response id, settling a response that has come in since."""
        pending = self.pending
        if pending is not None:
            try:
                rid, settled = pending()
            except Exception:  # fail open: an id we cannot read is no id
                logger.debug("affinity: could not read a response id", exc_info=True)
                rid, settled = None, True
            if settled:
                self.settle(rid)
        return self.response_id

    def settle(self, response_id: str | None) -> None:
        self.pending = None
        if isinstance(response_id, str) and 0 < len(response_id) <= MAX_ID_CHARS:
            self.response_id = response_id

    def answered(self, resolver: Resolver | None, response_id: str | None) -> None:
        """The response read through `resolver` is done: its id is the thread's latest, unless
        a later request of the thread has taken its place already."""
        if self.pending is resolver:
            self.settle(response_id)


@dataclass(frozen=True, slots=True)
class Ask:
    """What a request asked the provider: the record's `provider_diagnosis` starts here."""

    source: str  # the catalog source ("anthropic", "openai")
    compared_to: str | None  # the response id it names (None: opting in, nothing compared)
    by: str  # "proxy" (we added it) or "client" (its own, kept)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "compared_to": self.compared_to, "by": self.by}


class ResponseLinks:
    """Conversation -> its threads' latest response ids, least recently used forgotten first;
    and the hosts that refused the field we add (for the rest of the process)."""

    def __init__(self, table: DiagnosticsTable, capacity: int = 10_000) -> None:
        self.table = table
        self.capacity = max(capacity, 1)
        self._threads: OrderedDict[str, list[Thread]] = OrderedDict()
        self._openings: OrderedDict[str, Thread] = OrderedDict()
        self.refused: dict[str, str] = {}  # host -> the provider's message

    def __len__(self) -> int:
        return len(self._threads)

    def source_for(self, host: str, path: str) -> DiagnosticsSource | None:
        return self.table.for_target(host, path)

    def _find(self, keys: LinkKeys) -> Thread | None:
        threads = self._threads.get(keys.conversation)
        if threads:
            same = next((t for t in threads if keys.root and t.root == keys.root), None)
            if same is not None:
                return same
            # The root changed (system prompt, model): the thread whose first message it keeps.
            # Neither matches: a side request, a thread of its own.
            return next((t for t in threads if keys.opening and t.opening == keys.opening), None)
        if keys.later_turn and keys.opening:
            return self._openings.get(keys.opening)  # an ID derived from a root that changed
        return None

    def link(self, keys: LinkKeys) -> tuple[Thread, str | None]:
        """The thread this request continues (made if new) and its previous response id; the
        thread now stands for this request, whose response id `Thread.settle` or a resolver
        set with `answering` will give."""
        thread = self._find(keys)
        previous = thread.previous() if thread is not None else None
        if thread is None:
            thread = Thread(keys.root, keys.opening)
        else:
            thread.root, thread.opening = keys.root, keys.opening
        threads = self._threads.pop(keys.conversation, [])
        self._threads[keys.conversation] = [thread, *(t for t in threads if t is not thread)][
            :THREADS]
        while len(self._threads) > self.capacity:
            self._threads.popitem(last=False)
        if keys.opening:
            self._openings.pop(keys.opening, None)
            self._openings[keys.opening] = thread
            while len(self._openings) > min(self.capacity, OPENINGS):
                self._openings.popitem(last=False)
        return thread, previous

    @staticmethod
    def answering(thread: Thread, resolver: Resolver) -> None:
        """The request's response has begun: its id can be read from `resolver`."""
        thread.pending = resolver

    def refuse(self, host: str, message: str) -> bool:
        """The provider at `host` refused the field we add: stop adding it there. True the
        first time (the caller logs it once)."""
        host = host.lower()
        if host in self.refused:
            return False
        self.refused[host] = message[:MAX_MESSAGE_CHARS]
        return True

    def refused_by(self, host: str) -> bool:
        return bool(self.refused) and host.lower() in self.refused
