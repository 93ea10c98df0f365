"""Live Claude Code (npm @anthropic-ai/claude-code, `claude -p`) through mitmdump with the shipped
rules, against the simulator playing DeepSeek's Anthropic-compatible endpoint (a prefix cache from
token 0, the billing block prompt text there) and api.anthropic.com.

Claude Code is found as tests/agents.py says ($AFFINITY_CLAUDE, the CI cache, PATH)
(`.ci/run` installs it with npm outside the repository); without it these tests skip, unless
AFFINITY_REQUIRE_AGENTS=1 (CI), where that is a failure.

Each route runs three `claude -p` calls: session A (warms the cache), session B's first request,
and B's second turn (`--resume`). The model is pinned (`--model`): a resumed session in a new
process otherwise drops the `[1m]` variant, which rewrites the system prompt (Claude Code's own
behaviour, seen with 2.1.197).
"""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.agents import claude_or_skip
from tests.harness import ROOT, Proxy
from tests.procs import clean_env
from tests.sim import Simulator

pytestmark = pytest.mark.slow

MODEL = "claude-sonnet-4-5"
CAPTURE = ROOT / "tests" / "capture_addon.py"
BILLING = b"x-anthropic-billing-header:"
# The shipped rules with every `remove_blocks` taken out: the "before" of each route.
SHIPPED = (ROOT / "rules" / "default.yaml").read_text()
WITHOUT_REMOVAL = "\n".join(line for line in SHIPPED.splitlines()
                            if not line.strip().startswith("remove_blocks:"))
assert WITHOUT_REMOVAL != SHIPPED

# (route, ANTHROPIC_BASE_URL, the shipped rule, the simulated provider's prompt order). On
# DeepSeek, Moonshot, Kimi Code and Z.ai the model's own chat template puts the system prompt,
# so the billing block, at token 0; MiniMax and DashScope build their explicit cache in
# Anthropic's order, tools first.
ROUTES = [
    ("deepseek", "https://api.deepseek.com/anthropic", "deepseek-anthropic", "system-first"),
    ("moonshot", "https://api.moonshot.ai/anthropic", "kimi-anthropic", "system-first"),
    ("kimi-code", "https://api.kimi.com/coding", "kimi-anthropic", "system-first"),
    ("zai", "https://api.z.ai/api/anthropic", "zai-anthropic", "system-first"),
    ("minimax", "https://api.minimax.io/anthropic", "minimax-anthropic", "tools-first"),
    ("dashscope", "https://dashscope-intl.aliyuncs.com/apps/anthropic", "dashscope-anthropic",
     "tools-first"),
]


@pytest.fixture(scope="module")
def claude() -> str:
    return str(claude_or_skip())


def run_claude(claude: str, proxy: Proxy, home: Path, prompt: str, *args: str,
               base_url: str | None = None, extra_env: dict[str, str] | None = None
               ) -> dict[str, Any]:
    """`claude -p` through the proxy with a dummy key; its JSON result."""
    env = {k: v for k, v in clean_env().items()
           if not k.startswith(("ANTHROPIC_", "CLAUDE_CODE_", "CLAUDE_"))}
    env.update({"HOME": str(home), "HTTPS_PROXY": proxy.url, "NODE_EXTRA_CA_CERTS": str(proxy.ca),
                "NO_PROXY": "localhost,127.0.0.1", "ANTHROPIC_API_KEY": "sk-ant-dummy-000",
                # no telemetry, update checks or other calls that would leave the machine
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"})
    if base_url:
        env["ANTHROPIC_BASE_URL"] = base_url
    env.update(extra_env or {})
    home.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([claude, "-p", "--model", MODEL, "--output-format", "json", *args, prompt],
                       cwd=home, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(r.stdout)


def main_records(proxy: Proxy, n: int) -> list[dict[str, Any]]:
    """The records of the main model's requests (side requests, if any, use other models)."""
    deadline = time.monotonic() + 15
    while True:
        recs = [r for r in proxy.records() if r.get("model") == MODEL]
        if len(recs) >= n or time.monotonic() > deadline:
            return recs
        time.sleep(0.1)


def three_calls(claude: str, proxy: Proxy, tmp: Path, base_url: str | None
                ) -> list[dict[str, Any]]:
    home = tmp / "home"
    run_claude(claude, proxy, home, "Name a prime number between ten and twenty.",
               base_url=base_url)
    b = run_claude(claude, proxy, home, "What does a Python list comprehension do?",
                   base_url=base_url)
    run_claude(claude, proxy, home, "And a dict comprehension?", "--resume", b["session_id"],
               base_url=base_url)
    recs = main_records(proxy, 3)
    assert len(recs) == 3, [r.get("model") for r in proxy.records()]
    return recs


def overall(recs: list[dict[str, Any]]) -> float:
    """Token-weighted over every request, the first of each session included."""
    return (sum(r["usage"]["cache_read_tokens"] for r in recs)
            / sum(r["usage"]["input_tokens"] for r in recs))


def ratios(recs: list[dict[str, Any]]) -> list[float]:
    return [r["usage"]["cache_read_tokens"] / r["usage"]["input_tokens"] for r in recs]


@pytest.mark.parametrize("route, base_url, rule, order", ROUTES, ids=[r[0] for r in ROUTES])
def test_claude_code_reads_its_prompt_once_the_block_is_removed(
        claude: str, tmp_path: Path, proxy_factory: Any, sim: Simulator, route: str,
        base_url: str, rule: str, order: str) -> None:
    host = base_url.split("/")[2]
    # After: the shipped rules take the billing block out.
    proxy = proxy_factory("after", hosts=[host])
    a, b1, b2 = three_calls(claude, proxy, tmp_path / "after", base_url)
    after = ratios([a, b1, b2])
    for r in (a, b1, b2):
        assert r["rule"] == rule and r["status"] == 200
        assert r["added"]["removed"] == [{"path": "system[0]", "block": "claude-code-billing",
                                          "tokens": r["added"]["removed"][0]["tokens"]}]
        assert r["added"]["markers"] == []  # Claude Code's own markers, where markers count
    if route != "zai":
        # A new session's first request reads the prompt the last session cached. (On Z.ai each
        # conversation has its own X-Session-Id, which pins it to a node of its own: whether
        # that node holds the shared prompt is the load balancer's luck.)
        assert after[1] >= 0.70, after
        assert b1["miss_reason"] == "hit", b1
    assert after[2] >= 0.90, after  # and its second turn nearly all of it
    assert b2["miss_reason"] == "hit", b2
    bodies = [r.raw_body for r in sim.requests if r.path.endswith("/messages")]
    assert bodies and not any(BILLING in body for body in bodies)
    text = proxy.log.read_text()
    assert "sk-ant-dummy" not in text and "x-anthropic-billing-header" not in text

    # Before: the same three calls with the block left in (a fresh simulator: a cold cache).
    sim.reset()
    rules = tmp_path / "without-removal.yaml"
    rules.write_text(WITHOUT_REMOVAL)
    before_proxy = proxy_factory("before", hosts=[host], options={"affinity_rules": str(rules)})
    before_recs = three_calls(claude, before_proxy, tmp_path / "before", base_url)
    before = ratios(before_recs)
    assert all("removed" not in r["added"] for r in before_recs)
    if order == "system-first":
        assert before[1] < 0.10, before  # a different block at token 0: nothing read
    elif route != "zai":
        assert before[1] < after[1] - 0.05, (before, after)  # the tools only
    print(f"\nClaude Code -> {base_url} (hit ratio of session A, session B turn 1, B turn 2; "
          f"all three): before {_fmt(before)}; {overall(before_recs):.1%}, after {_fmt(after)}; "
          f"{overall([a, b1, b2]):.1%}")


def test_claude_code_on_anthropic_sends_the_block_as_it_was_sent(
        claude: str, tmp_path: Path, proxy_factory: Any, sim: Simulator) -> None:
    captured = tmp_path / "captured"
    proxy = proxy_factory(hosts=["api.anthropic.com"], scripts=[CAPTURE],
                          options={"capture_dir": str(captured)})
    run_claude(claude, proxy, tmp_path / "home", "Name a prime number between ten and twenty.")
    recs = main_records(proxy, 1)
    assert recs and recs[0]["rule"] == "anthropic-breakpoints"
    assert "removed" not in recs[0]["added"]
    sent = sorted(p.read_bytes() for p in captured.glob("*-api.anthropic.com.body"))
    got = [r.raw_body for r in sim.requests if r.path.endswith("/messages")]
    # Byte for byte, billing block included, but for the provider's cache diagnostics field
    # spliced in first (README, "Provider-verified verdicts"; Claude Code sends none itself).
    assert got and all(body.startswith(DIAGNOSTICS) for body in got)
    assert sent == sorted(map(unspliced, got))
    assert all(BILLING in body for body in got)


def test_claude_code_on_anthropic_names_its_sessions_previous_response(
        claude: str, tmp_path: Path, proxy_factory: Any, sim: Simulator) -> None:
    """Provider-verified verdicts with the real agent: each session opts in on its first
    request; the resumed one names its previous response (in a new process: the proxy links
    it), and the provider's answer agrees with ours. Only the billing block's per-request
    `cch=` differs between the two, which Anthropic's API removes."""
    proxy = proxy_factory(hosts=["api.anthropic.com"])
    a, b1, b2 = three_calls(claude, proxy, tmp_path, None)
    asked = [r.body["diagnostics"] for r in sim.requests if r.path.endswith("/messages")]
    assert asked[:2] == [{"previous_message_id": None}] * 2
    previous = asked[2]["previous_message_id"]
    assert isinstance(previous, str) and previous.startswith("msg_")
    assert [r["provider_diagnosis"]["compared_to"] for r in (a, b1, b2)] == [None, None, previous]
    assert b2["provider_diagnosis"]["result"] == "no-divergence"
    assert b2["provider_diagnosis"]["agrees"] is True and b2["miss_reason"] == "hit"


DIAGNOSTICS = b'{"diagnostics":'


def unspliced(body: bytes) -> bytes:
    """The body without the `diagnostics` key the proxy spliced in after its opening brace."""
    value = json.dumps(json.loads(body)["diagnostics"], separators=(",", ":")).encode()
    assert body.startswith(DIAGNOSTICS + value + b",")
    return b"{" + body[len(DIAGNOSTICS + value) + 1:]


def test_affinity_run_turns_the_block_off_for_claude_code(claude: str, tmp_path: Path,
                                                         sim: Simulator) -> None:
    """`affinity run -- claude` with a DeepSeek base URL: Claude Code sends no billing block
    (CLAUDE_CODE_ATTRIBUTION_HEADER=0), so there is nothing for the rules to remove."""
    from tests.harness import map_remote_args
    from tests.procs import free_port

    home, conf = tmp_path / "home", tmp_path / "conf"
    home.mkdir()
    env = {k: v for k, v in clean_env().items()
           if not k.startswith(("ANTHROPIC_", "CLAUDE_CODE_", "CLAUDE_"))}
    env.update({"HOME": str(home), "MITMPROXY_CONFDIR": str(conf),
                "ANTHROPIC_BASE_URL": "https://api.deepseek.com/anthropic",
                "ANTHROPIC_API_KEY": "sk-ant-dummy-000",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"})
    log = tmp_path / "affinity.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "affinity_addon", "run", "--port", str(free_port()),
         "--set", "connection_strategy=lazy", "--set", f"affinity_log={log}",
         *map_remote_args(sim.url, ["api.deepseek.com"]),
         "--", claude, "-p", "--model", MODEL, "Name a prime number between ten and twenty."],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "CLAUDE_CODE_ATTRIBUTION_HEADER=0 for the agent" in r.stderr
    bodies = [q.raw_body for q in sim.requests if q.path.endswith("/messages")]
    assert bodies and not any(BILLING in body for body in bodies)
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert recs and all("removed" not in rec["added"] for rec in recs)


def _fmt(values: list[float]) -> str:
    return " / ".join(f"{v:.1%}" for v in values)
