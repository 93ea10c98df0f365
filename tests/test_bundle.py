"""The bundle dispatches every hook its parts define: the hook names come from mitmproxy's own
registry (`mitmproxy.hooks.all_hooks`), never from a list kept by hand."""

import pytest
from mitmproxy import hooks
from mitmproxy.test import taddons, tflow

from affinity_addon.mitm import Affinity
from affinity_addon.mitm.bundle import LIFECYCLE, hook_names


def defined_hooks(part: object) -> set[str]:
    return {h for h in hook_names() if callable(getattr(part, h, None))}


def test_every_hook_a_part_defines_is_dispatched() -> None:
    bundle = Affinity()
    assert {"request", "response", "websocket_end", "configure"} <= hook_names()
    for part in bundle.parts:
        for hook in defined_hooks(part):
            assert getattr(part, hook) in bundle.calls[hook], (part, hook)
            assert callable(getattr(bundle, hook, None)), hook
    # and nothing else: mitmproxy finds no handler for a hook no part has
    assert set(bundle.calls) == set().union(*map(defined_hooks, bundle.parts))
    assert getattr(bundle, "tcp_message", None) is None


def test_a_new_part_gets_every_hook_it_defines_through_mitmproxy() -> None:
    seen: list[str] = []

    class Part:
        def client_connected(self, client: object) -> None:
            seen.append("client_connected")

        def request(self, flow: object) -> None:
            seen.append("request")

    bundle = Affinity(None, Part())
    assert "client_connected" in bundle.calls and len(bundle.calls["request"]) == 3
    with taddons.context(bundle) as tctx:
        tctx.master.addons.trigger(hooks.all_hooks["client_connected"](tflow.tclient_conn()))
        tctx.master.addons.trigger(hooks.all_hooks["request"](tflow.tflow()))
    assert seen == ["client_connected", "request"]


@pytest.mark.expect_addon_error(r"request hook of .*broken.* failed \(RuntimeError: boom\)")
def test_lifecycle_errors_reach_mitmproxy_and_traffic_errors_do_not() -> None:
    bundle = Affinity()
    assert hook_names() >= LIFECYCLE

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    bundle.calls["configure"] = (broken,)
    try:
        bundle.configure(set())
    except RuntimeError:
        pass
    else:
        raise AssertionError("a configure error must reach mitmproxy")
    bundle.calls["request"] = (broken,)
    bundle.request(tflow.tflow())  # logged, not raised
