"""`{family_key}` end to end: OpenAI agents on api.openai.com through a real mitmdump, against the
simulator's documented OpenAI routing (8 machines; machine = hash(first ~256 tokens, key),
~15 requests a minute per prefix+key pair before overflow). Token-weighted hit ratio over ALL
turns, first turns included; every run starts against an empty simulator.

- `test_solo_agent_family_key_never_below_no_key`: the openai SDK over TLS (regular proxy mode),
  four conversations one after another at ~3 requests a minute of virtual time (the clock
  addon below), so `{family_key}` uses one bucket.
- The team (24 agents at once, ~70 RPM on one ~8k-token prefix, 10 minutes) and the solo agent
  of `tests/sim/workload.py`, through mitmdump in reverse mode on virtual time: each request
  carries `x-sim-time`, the simulator serves it at that time, and `tests/sim/clock_addon.py`
  (a second `-s` before the addon) makes it the flow's `timestamp_start`, the clock the addon
  counts family rates on. Ten minutes of a team's traffic then take a few seconds. Each is run
  without the addon, with one key per conversation (the old default, `{affinity_id}`) and with
  the shipped rules (`{family_key}`); then with a client that sends its own key per
  conversation, through the shipped rules (the client's key is kept) and through a user rule
  that overwrites it with `{family_key}`.

The numbers are printed with the test results (no `-s` needed).
"""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from tests.conversations import CHAT_TOOLS, Usage, big_prompt, chat_usage
from tests.harness import ROOT, Proxy, start_proxy
from tests.sim import Simulator
from tests.sim.workload import BURST, SOLO, TEAM, HttpUpstream, Result, Workload, run

pytestmark = pytest.mark.slow  # every test starts mitmdump

CONVERSATIONS, TURNS = 4, 3


CLOCK = ROOT / "tests" / "sim" / "clock_addon.py"


@pytest.fixture
def sim8(clock):
    with Simulator(replicas=8, clock=clock, seed=3) as s:
        yield s


def solo(monkeypatch: pytest.MonkeyPatch, proxy: Proxy) -> list[list[Usage]]:
    import openai

    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca))
    client = openai.OpenAI(base_url="https://api.openai.com/v1", api_key="sk-test-0",
                           max_retries=0)
    system = big_prompt("solo openai agent", 7000)
    now, out = 0.0, []
    for c in range(CONVERSATIONS):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"Task {c}: fix the failing test in module {c}."}]
        usages = []
        for t in range(TURNS):
            r = client.chat.completions.create(model="gpt-5.5", messages=messages,
                                               tools=CHAT_TOOLS,
                                               extra_headers={"x-sim-time": str(now)})
            usages.append(chat_usage(r.usage))
            messages = messages + [{"role": "assistant", "content": r.choices[0].message.content},
                                   {"role": "user", "content": f"Tool output {t}: " + "ok " * 300}]
            now += 20.0  # ~3 requests a minute
        out.append(usages)
    return out


def ratio(convs: list[list[Usage]], first_only: bool = False) -> float:
    us = [u for c in convs for u in (c[:1] if first_only else c)]
    return sum(u["cache_read_tokens"] for u in us) / sum(u["input_tokens"] for u in us)


def test_solo_agent_family_key_never_below_no_key(monkeypatch, tmp_path, sim8, proxy_factory):
    per_conversation = tmp_path / "per-conversation.yaml"
    shipped = (ROOT / "rules" / "default.yaml").read_text()
    assert 'prompt_cache_key: "{family_key}"' in shipped
    per_conversation.write_text(shipped.replace('prompt_cache_key: "{family_key}"',
                                                'prompt_cache_key: "{affinity_id}"'))
    clock = [CLOCK]  # the addon counts the family's rate on the requests' x-sim-time
    proxies = {"without addon": proxy_factory("bare", addon=False, sim_url=sim8.url),
               "addon, shipped rules": proxy_factory("addon", sim_url=sim8.url, scripts=clock),
               "addon, key per conversation": proxy_factory(
                   "conv", sim_url=sim8.url, options={"affinity_rules": str(per_conversation)},
                   scripts=clock)}
    runs, keys = {}, {}
    for name, p in proxies.items():
        sim8.reset()
        runs[name] = solo(monkeypatch, p)
        keys[name] = {r.body.get("prompt_cache_key") for r in sim8.requests}
        print(f"\nsolo openai agent  {name:<28} all turns {ratio(runs[name]):.2f}  "
              f"first turns {ratio(runs[name], True):.2f}", end="")
    print()
    bare, shipped_run = runs["without addon"], runs["addon, shipped rules"]
    assert keys["without addon"] == {None}
    (family,) = keys["addon, shipped rules"]
    assert family.startswith("fam-") and family.endswith("-0")  # one family, one bucket
    assert len(keys["addon, key per conversation"]) == CONVERSATIONS
    assert ratio(shipped_run) >= ratio(bare) and ratio(shipped_run) >= 0.85
    assert ratio(shipped_run, True) >= ratio(bare, True) > 0.6  # turn 1 reads the shared prompt
    # the previous default sends every turn 1 to a machine chosen by its own key
    assert ratio(runs["addon, key per conversation"], True) < ratio(bare, True)
    recs = proxies["addon, shipped rules"].wait_records(CONVERSATIONS * TURNS)
    assert {r["cache_key_bucket"]["buckets"] for r in recs} == {1}


# --- the workloads through mitmdump on virtual time --------------------------------------------

TEAM_E2E = replace(TEAM, duration=600.0)  # 24 agents, ~70 RPM, 10 minutes: ~730 requests
BURST_56 = replace(BURST, name="burst56", model="gpt-5.6")  # and the shipped breakpoint planner
FAMILY = 'prompt_cache_key: "{family_key}"'
# Which proxy, what the client sends (workload strategy), for each row of the table.
ROWS = {
    "without addon": ("bare", "none"),
    "key per conversation": ("conversation", "none"),
    "shipped rules": ("shipped", "none"),
    "client key, kept": ("shipped", "conversation"),
    "client key, overwrite": ("overwrite", "conversation"),
}


@dataclass
class Run:
    result: Result
    wall: float  # seconds
    records: list[dict[str, Any]] = field(default_factory=list)


def rules_with(tmp: Path, name: str, value: str) -> Path:
    """The shipped rules with the openai rule's prompt_cache_key set to `value` (YAML)."""
    shipped = (ROOT / "rules" / "default.yaml").read_text()
    start = shipped.index("  - name: openai\n")  # the openai rule's key (Azure has one too)
    at = shipped.index(FAMILY, start)
    assert at < shipped.index("  - name: ", start + 1)
    path = tmp / f"{name}.yaml"
    path.write_text(shipped[:at] + f"prompt_cache_key: {value}" + shipped[at + len(FAMILY):])
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Run]]:
    """Every (workload, row) run. One mitmdump per rules file; each run through a proxy gets a
    clock of its own (a day after the previous one), so no rate window spans two runs."""
    tmp = tmp_path_factory.mktemp("family-e2e")
    rules = {"conversation": rules_with(tmp, "conversation", '"{affinity_id}"'),
             "overwrite": rules_with(tmp, "overwrite",
                                     '{value: "{family_key}", on_conflict: overwrite}')}
    out: dict[tuple[str, str], Run] = {}
    proxies: dict[str, Proxy] = {}
    with Simulator(replicas=TEAM.replicas, seed=TEAM.seed) as sim:
        try:
            def start(name: str) -> None:
                options = {"flow_detail": "0", "affinity_key": "e2e-family-key"}  # reproducible
                if name in rules:
                    options["affinity_rules"] = str(rules[name])
                proxies[name] = start_proxy(tmp / name, sim.url, addon=name != "bare",
                                            mode="reverse:https://api.openai.com",
                                            hosts=["api.openai.com"], scripts=[CLOCK],
                                            options=options)

            with ThreadPoolExecutor(4) as pool:  # mitmdump takes ~1 s to start: all at once
                list(pool.map(start, ("bare", "conversation", "shipped", "overwrite")))
            epochs: dict[str, int] = {}
            for w in (SOLO, TEAM_E2E, BURST, BURST_56):
                for row, (name, client) in ROWS.items():
                    if w.burst and client != "none":
                        continue  # a burst: no key, one per conversation, the shipped rules
                    proxy = proxies[name]
                    sim.reset()
                    epoch = epochs[name] = epochs.get(name, -1) + 1
                    before = len(proxy.records())
                    up = HttpUpstream(proxy.url, lambda: sim.engine.overflowed,
                                      epoch=86_400.0 * epoch)
                    t0 = time.perf_counter()
                    try:
                        r = run(w, client, upstream=up)
                    finally:
                        up.close()
                    wall = time.perf_counter() - t0
                    r.keys = {q.body.get("prompt_cache_key") for q in sim.requests} - {None}
                    recs = [] if name == "bare" else \
                        proxy.wait_records(before + r.requests)[before:]
                    out[(w.name, row)] = Run(replace(r, strategy=row), wall, recs)
        finally:
            for p in proxies.values():
                p.stop()
    for p in proxies.values():  # an addon error is logged, and the request goes on
        p.check()
    yield out


def table(runs: dict[tuple[str, str], Run], workload: Workload) -> list[str]:
    lines = [f"{workload.name}: {workload.agents} agent(s), ~{workload.rpm:g} RPM, "
             f"{workload.model}, through mitmdump on virtual time"]
    for row in ROWS:
        if (workload.name, row) not in runs:
            continue
        r = runs[(workload.name, row)]
        lines.append(f"  {r.result.line().replace(r.result.strategy.ljust(14), row.ljust(22))}"
                     f"   wall {r.wall:.1f} s")
    return lines


def show(capsys: pytest.CaptureFixture[str], lines: list[str]) -> None:
    with capsys.disabled():  # the numbers are the point: print them even without -s
        print("\n" + "\n".join(lines))


def test_team_through_mitmdump_family_key_above_90_percent(runs, capsys):
    show(capsys, table(runs, TEAM_E2E))
    bare, conv = runs[("team", "without addon")].result, runs[("team", "key per conversation")]
    shipped = runs[("team", "shipped rules")]
    got = shipped.result
    assert got.requests == bare.requests == conv.result.requests > 600
    assert bare.overflowed > bare.requests / 2  # one prefix at ~70 RPM: most requests overflow
    # The bar the shipped default must clear. The bucket a conversation lands in depends on the addon's key: over eight
    # keys this workload measured 0.906-0.921 with TARGET_RPM=8 (0.894-0.906 with 12).
    assert got.ratio >= 0.90 and got.ratio >= bare.ratio + 0.1, got.line()
    assert got.overflowed < bare.overflowed / 5
    assert conv.result.overflowed == 0 and len(conv.result.keys) > 60  # one per conversation
    # The addon counted the family's rate on the workload's clock: ~70 RPM calls for 9-10
    # buckets. On the wall clock ~730 requests in seconds would have asked for the maximum, 64.
    assert len(shipped.records) == got.requests
    assert all(rec["rule"] == "openai" and rec["cache_key_bucket"]["strategy"] == "family"
               for rec in shipped.records)
    buckets = [rec["cache_key_bucket"]["buckets"] for rec in shipped.records]
    assert buckets[0] == 1 and 7 <= max(buckets) <= 12 and len(got.keys) == max(buckets)
    assert not any(rec["miss_reason"] == "ttl-expired" for rec in shipped.records)


def test_solo_through_mitmdump_family_key_never_below_no_key(runs, capsys):
    show(capsys, table(runs, SOLO))
    bare, got, conv = (runs[("solo", row)].result
                       for row in ("without addon", "shipped rules", "key per conversation"))
    assert got.ratio >= bare.ratio and got.ratio >= 0.90, got.line()
    assert len(got.keys) == 1 and len(conv.keys) == SOLO.conversations
    assert conv.first_ratio < bare.first_ratio - 0.3  # each turn 1 on a machine of its own


def test_client_key_per_conversation_kept_or_overwritten(runs):
    # A client's own key per conversation (Codex, opencode, pi) is kept by the shipped rules:
    # it does what the old default did. Overwriting it with {family_key} (opt-in) gives the
    # solo agent its first turns back; a team loses a little to the buckets' uneven load.
    for w in ("solo", "team"):
        kept, conv = runs[(w, "client key, kept")].result, runs[(w, "key per conversation")]
        assert kept.requests == conv.result.requests and len(kept.keys) == len(conv.result.keys)
        assert all(rec["cache_key_bucket"] is None and "prompt_cache_key" not in rec["added"]["fields"]
                   for rec in runs[(w, "client key, kept")].records)
    solo_kept, solo_over = (runs[("solo", f"client key, {x}")].result
                            for x in ("kept", "overwrite"))
    assert solo_over.ratio > solo_kept.ratio + 0.03 and len(solo_over.keys) == 1
    team_over = runs[("team", "client key, overwrite")].result
    assert team_over.ratio >= 0.88 and 7 <= len(team_over.keys) <= 12


def test_burst_through_mitmdump_sharded_from_its_first_minute(runs, capsys):
    # The team's first 100 seconds: a count learned from the busiest minute alone came a minute
    # late (gpt-5.5: 0.853 of prompt tokens on average over six keys, up to 25 of 121 requests
    # overflowed; gpt-5.6 before the breakpoint planner: 0.52). Now 0.885-0.91 by the addon's
    # key (which machines the buckets land on), where an oracle that splits the team evenly
    # from its first request reads 0.898 (gpt-5.5) and 0.905 (gpt-5.6; test_family_key).
    show(capsys, table(runs, BURST) + table(runs, BURST_56))
    for w, bar in ((BURST, 0.88), (BURST_56, 0.88)):
        bare, conv, got = (runs[(w.name, row)] for row in
                           ("without addon", "key per conversation", "shipped rules"))
        assert got.result.requests == bare.result.requests > 110
        assert got.result.overflowed == 0 and bare.result.overflowed > bare.result.requests / 2
        assert got.result.ratio >= bar and got.result.ratio > conv.result.ratio, got.result.line()
        buckets = [rec["cache_key_bucket"]["buckets"] for rec in got.records]
        assert buckets[0] == 1 and max(buckets) >= 8 and buckets.index(max(buckets)) < 30
