"""Issue 11 end to end: a solo agent on api.openai.com through a real mitmdump, against the
simulator's documented OpenAI routing (8 machines; machine = hash(first ~256 tokens, key)).

Four conversations one after another share an ~8k-token agent prompt (tools + system). Three
runs, each against an empty simulator: a bare mitmdump (no key, what the agent gets today), the
addon with the shipped rules (`{family_key}`), and the addon with one key per conversation
(`{affinity_id}`, the previous default). Token-weighted hit ratio over ALL turns, first turns
included. 12 requests stay under 12 a minute, so `{family_key}` uses one bucket whatever the
wall-clock pace; the team case, whose bucket count follows the rate, runs on virtual time in
tests/test_family_key.py. Run with `-s` to see the numbers.
"""

import pytest

from tests.conversations import CHAT_TOOLS, Usage, big_prompt, chat_usage
from tests.harness import ROOT, Proxy
from tests.sim import Simulator

CONVERSATIONS, TURNS = 4, 3


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
    proxies = {"without addon": proxy_factory("bare", addon=False, sim_url=sim8.url),
               "addon, shipped rules": proxy_factory("addon", sim_url=sim8.url),
               "addon, key per conversation": proxy_factory(
                   "conv", sim_url=sim8.url, options={"affinity_rules": str(per_conversation)})}
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
    assert {r["key"]["buckets"] for r in recs} == {1}
