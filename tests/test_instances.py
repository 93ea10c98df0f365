"""`affinity_instances`: N gateway instances behind a load balancer, each seeing ~1/N of a
team's traffic, size `{family_key}` buckets as one proxy seeing all of it would."""

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from affinity_addon.mitm.config import DEFAULT_RULES
from affinity_addon.mitm.options import parse_positive_int
from affinity_addon.record.schema import META
from affinity_addon.request.family_key import FamilyRates
from tests.driver import Affinity

SYSTEM = "You are the team's coding agent. " * 200


def request(a: Affinity, conv: int, t: float) -> dict[str, Any]:
    body = {"model": "gpt-5.6", "messages": [{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": f"task {conv}"}]}
    f = tflow.tflow(req=tutils.treq(
        method=b"POST", host="api.openai.com", port=443, scheme=b"https", authority=b"",
        path=b"/v1/chat/completions", content=json.dumps(body).encode(),
        headers=http.Headers(content_type="application/json")))
    f.request.timestamp_start = t
    # The request hook of this proxy's own rewriter: with nested test contexts, the driver's
    # dispatch would reach only the innermost proxy's addons.
    a.bundle.rewriter.request(f)
    return {"key": json.loads(f.request.content)["prompt_cache_key"],
            **f.metadata[META]["cache_key_bucket"]}


@contextmanager
def proxies(n: int, instances: int) -> Iterator[list[Affinity]]:
    with ExitStack() as stack:
        out = []
        for _ in range(n):
            a = Affinity()
            tctx = stack.enter_context(taddons.context(*a.addons))
            tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_log="",
                           affinity_summary=False, affinity_diagnose=False,
                           affinity_key="shared-tenant-key", affinity_instances=instances)
            out.append(a)
        yield out


def team(gateways: list[Affinity]) -> list[dict[str, Any]]:
    """24 agents, 70 requests a minute for three minutes, dealt round-robin to the gateways."""
    return [request(gateways[i % len(gateways)], i % 24, 1_000_020.0 + i * 60 / 70)
            for i in range(210)]


def test_two_instances_seeing_half_each_pick_the_buckets_of_one_seeing_all():
    with proxies(1, 1) as (one,):
        balanced = team([one])
        # a lone proxy deals new conversations to the least loaded bucket; behind a load
        # balancer every instance must pick the same one without talking: the jump hash
        one.state.family_rates = FamilyRates(instances=1, balanced=False)
        alone = team([one])
    with proxies(2, 2) as pair:
        shared = team(pair)
        assert [a.state.family_rates.instances for a in pair] == [2, 2]
        assert not any(a.state.family_rates.balanced for a in pair)
    with proxies(2, 1) as pair:
        unscaled = team(pair)
    settled = slice(140, None)  # the third minute: the busiest minute is known everywhere
    assert {r["buckets"] for r in alone[settled]} == {9}  # ceil(70 / 8)
    assert [r["buckets"] for r in balanced[settled]] == [r["buckets"] for r in alone[settled]]
    assert [r["buckets"] for r in shared[settled]] == [r["buckets"] for r in alone[settled]]
    assert [r["key"] for r in shared[settled]] == [r["key"] for r in alone[settled]]
    # without the option each instance sees 35 RPM and halves the buckets: five keys of ~14 RPM
    assert {r["buckets"] for r in unscaled[settled]} == {5}


def test_the_option_is_validated():
    assert parse_positive_int(" 3 ") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError):
            parse_positive_int(bad)
    a = Affinity()
    with taddons.context(*a.addons) as tctx:
        tctx.configure(a.bundle, affinity_rules=str(DEFAULT_RULES), affinity_instances=4)
        assert a.state.family_rates.instances == a.state.cache_key_load.instances == 4
        with pytest.raises(exceptions.OptionsError, match="affinity_instances"):
            tctx.configure(a.bundle, affinity_instances=0)
