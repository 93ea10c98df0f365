"""The one addon mitmproxy sees: the single-concern parts, dispatched by hook name.

mitmproxy walks every registered addon for every event (a flow's request, response and the
update after each: about eight a request), looking each hook up by name: eight addons cost
~8 µs an event, ~60 µs a request, on a 2 KB request as much as the rewrite itself (measured with
cProfile on the bench's matched 2 KB workload: 10.1 -> 2.3 µs an event). Registered as one
addon, each event costs one lookup, and only the parts that implement a hook are called for it,
in the order they are listed.

Which names are hooks comes from mitmproxy's own registry (`mitmproxy.hooks.all_hooks`, filled
as mitmproxy's modules define their hook classes), so every hook a part defines is dispatched:
nothing is listed by hand.
"""

import logging
from collections.abc import Callable
from typing import Any

import mitmproxy.addonmanager  # noqa: F401  (defines the `load` hook)
import mitmproxy.proxy.layers  # noqa: F401  (defines the traffic hooks: http, tls, websocket...)
from mitmproxy import hooks

from affinity_addon.mitm.commands import Commands
from affinity_addon.mitm.config import Config
from affinity_addon.mitm.metrics import Metrics
from affinity_addon.mitm.otel import OTel
from affinity_addon.mitm.recorder import Recorder
from affinity_addon.mitm.rewriter import Rewriter
from affinity_addon.mitm.scope import Scope
from affinity_addon.mitm.state import State

logger = logging.getLogger(__name__)

# Lifecycle hooks: an error must reach mitmproxy (an OptionsError names the bad option). Every
# other hook carries traffic: one part failing must not keep the others from seeing it.
LIFECYCLE = frozenset({"load", "configure", "running", "done"})


def hook_names() -> frozenset[str]:
    """Every hook mitmproxy can call on an addon."""
    return frozenset(hooks.all_hooks)


class Affinity:
    name = "affinity"

    def __init__(self, state: State | None = None, *extra: object) -> None:
        """`extra`: more parts, after the shipped ones (their hooks are found the same way)."""
        self.state = state = state or State()
        self.config = Config(state)  # options and rules first: the others read them
        self.scope = Scope(state)
        self.rewriter = Rewriter(state)
        self.recorder = Recorder(state)
        self.metrics = Metrics(state)
        self.otel = OTel(state)
        self.commands = Commands(state, self.config)
        self.parts: tuple[object, ...] = (
            self.config, self.scope, self.rewriter, self.recorder, self.metrics, self.otel,
            self.commands, *extra)
        self.calls: dict[str, tuple[Callable[..., Any], ...]] = {}
        self.dispatchers: dict[str, Callable[..., None]] = {}
        for hook in sorted(hook_names()):
            fns = tuple(f for p in self.parts if callable(f := getattr(p, hook, None)))
            if fns:
                self.calls[hook] = fns
                self.dispatchers[hook] = self._dispatcher(hook)
                # mitmproxy looks hooks up with getattr on the instance; a subclass's own
                # method of that name wins (it calls `self.dispatchers[hook]` itself).
                if not hasattr(type(self), hook):
                    setattr(self, hook, self.dispatchers[hook])
        # mitmproxy collects commands from the registered addon's attributes.
        for part in self.parts:
            for attr in dir(part):
                fn = getattr(part, attr)
                if isinstance(getattr(fn, "command_name", None), str):
                    setattr(self, attr, fn)

    def _dispatcher(self, hook: str) -> Callable[..., None]:
        # `self.calls[hook]` is read at call time, so a test can swap a hook's parts.
        calls = self.calls
        if hook in LIFECYCLE:
            def lifecycle(*args: Any) -> None:
                for fn in calls[hook]:
                    fn(*args)
            return lifecycle
        touch = self.state.scheduler.touch

        def traffic(*args: Any) -> None:
            touch()  # deferred work waits while mitmproxy moves flows along
            for fn in calls[hook]:
                try:
                    fn(*args)
                except Exception:  # as mitmproxy's own dispatch would: log it, go on
                    logger.exception("affinity: %s hook of %r failed", hook, fn)
        return traffic
