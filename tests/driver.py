"""The addons of `addon.py`, driven hook by hook through mitmproxy's own dispatch (tests only)."""

from mitmproxy import ctx, hooks, http
from mitmproxy.proxy.layers import http as layers
from mitmproxy.proxy.layers.websocket import WebsocketMessageHook

from affinity_addon.diagnosis.tracker import MissTracker
from affinity_addon.mitm import Affinity as Bundle
from affinity_addon.mitm import Config, State, make_addons
from affinity_addon.mitm.scope import Scope
from affinity_addon.views.aggregate import Aggregator


class Affinity:
    """Use as `with taddons.context(*a.addons) as tctx: tctx.configure(a.bundle, ...)`; every
    hook call goes to all registered addons, as in a running mitmproxy."""

    def __init__(self) -> None:
        self.state = State()
        self.addons = make_addons(self.state)
        bundle = self.addons[0]
        assert isinstance(bundle, Bundle)
        self.bundle = bundle
        self.config: Config = bundle.config
        self.scope: Scope = bundle.scope

    @staticmethod
    def _trigger(hook: hooks.Hook) -> None:
        ctx.master.addons.trigger(hook)

    def request(self, f: http.HTTPFlow) -> None:
        self._trigger(layers.HttpRequestHook(f))

    def responseheaders(self, f: http.HTTPFlow) -> None:
        self._trigger(layers.HttpResponseHeadersHook(f))

    def response(self, f: http.HTTPFlow) -> None:
        self._trigger(layers.HttpResponseHook(f))

    def error(self, f: http.HTTPFlow) -> None:
        self._trigger(layers.HttpErrorHook(f))

    def websocket_message(self, f: http.HTTPFlow) -> None:
        self._trigger(WebsocketMessageHook(f))

    def done(self) -> None:
        self._trigger(hooks.DoneHook())

    @property
    def stats(self) -> Aggregator:
        return self.state.stats

    @property
    def tracker(self) -> MissTracker:
        return self.state.tracker
