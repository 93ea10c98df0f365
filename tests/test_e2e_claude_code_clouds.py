"""Claude Code on Bedrock (a Bedrock API key) and on Vertex (Application Default Credentials), run
with `affinity run` against the simulator, three turns of one session (`-c`).

The agent comes from npm (@anthropic-ai/claude-code, as .ci/run installs it); the test looks for
it where tests/test_e2e_claude_code.py does, and is skipped without it. What
Claude Code 2.1.197 sent, as seen here: on Bedrock `GET bedrock.<region>/inference-profiles`
(ListInferenceProfiles), three 1-token `invoke` probes (Opus 4.6, Sonnet 4.5, Haiku 4.5: "."),
then the turn as `invoke-with-response-stream` with anthropic_version bedrock-2023-05-31,
anthropic_beta in the body, its billing block as system[0] (no `cch`), cache_control on system[1],
system[2] and the last user block, and `x-claude-code-session-id`. On Vertex the same through
:rawPredict / :streamRawPredict (anthropic_version vertex-2023-10-16, the betas as a header,
`x-goog-user-project`, a billing block with `cch=00000`), after a token refresh at
oauth2.googleapis.com.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.agents import claude_or_skip
from tests.harness import map_remote_args
from tests.procs import clean_env, free_port

pytestmark = pytest.mark.slow

BEDROCK_KEY = "ABSK" + "Q2xhdWRlQ29kZUtleQ" + "CANARY" * 3
REFRESH_TOKEN = "1//" + "REFRESHCANARY" * 3


def hosts_for(cloud: str) -> dict[str, str]:
    if cloud == "bedrock":  # the runtime, and the control plane Claude Code lists profiles on
        return {"bedrock-runtime.us-east-1.amazonaws.com": "bedrock",
                "bedrock.us-east-1.amazonaws.com": "bedrock"}
    return {"us-east5-aiplatform.googleapis.com": "vertex", "oauth2.googleapis.com": "google-oauth"}


def agent_env(cloud: str, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in clean_env().items()
           if not k.startswith(("ANTHROPIC_", "CLAUDE_", "AWS_", "GOOGLE_", "CLOUD_ML"))}
    env.update(HOME=str(tmp / "home"), DISABLE_AUTOUPDATER="1",
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    if cloud == "bedrock":
        env.update(CLAUDE_CODE_USE_BEDROCK="1", AWS_BEARER_TOKEN_BEDROCK=BEDROCK_KEY,
                   AWS_REGION="us-east-1")
    else:  # what `gcloud auth application-default login` leaves behind
        adc = tmp / "adc.json"
        adc.write_text(json.dumps({"type": "authorized_user", "client_id": "sim.apps.test",
                                   "client_secret": "sim-secret", "refresh_token": REFRESH_TOKEN,
                                   "quota_project_id": "ledger-prod"}))
        env.update(CLAUDE_CODE_USE_VERTEX="1", CLOUD_ML_REGION="us-east5",
                   ANTHROPIC_VERTEX_PROJECT_ID="ledger-prod",
                   GOOGLE_APPLICATION_CREDENTIALS=str(adc))
    return env


def totals(usage: dict[str, Any]) -> tuple[int, int, int]:
    read, write = usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]
    return usage["input_tokens"] + read + write, read, write


@pytest.fixture(scope="module")
def claude() -> Path:
    return claude_or_skip()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cloud", ["bedrock", "vertex"])
def test_claude_code_through_affinity_run(sim, tmp_path: Path, cloud: str, claude: Path) -> None:
    (tmp_path / "home").mkdir()
    port, conf, log = free_port(), tmp_path / "conf", tmp_path / "affinity.jsonl"
    # The proxy `affinity run` starts: the simulator plays the cloud's hosts. Every connection
    # is intercepted (the control plane and Google's token endpoint are no LLM hosts the rules
    # name), so nothing here ever resolves a real name.
    mitm = ["--set", f"confdir={conf}", "--set", f"affinity_log={log}",
            "--set", "connection_strategy=lazy", "--set", "affinity_scope=all",
            *map_remote_args(sim.url, hosts_for(cloud))]
    outputs = []
    for turn in range(3):
        prompt = f"Turn {turn + 1}: reply with the word ok."
        argv = [sys.executable, "-m", "affinity_addon", "run", "--port", str(port), *mitm, "--",
                str(claude), *(["-c"] if turn else []), "-p", prompt]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                           env=agent_env(cloud, tmp_path), stdin=subprocess.DEVNULL)
        outputs.append(p.stdout + p.stderr)
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.strip() == "ok"
        assert "this session" in p.stderr  # `affinity run`'s summary of the session
    served = [r for r in sim.requests if r.usage is not None]
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["usage"]["input_tokens"], r["usage"]["cache_read_tokens"],
             r["usage"]["cache_write_tokens"]) for r in recs] == [totals(r.usage) for r in served]
    turns = [(rec, req) for rec, req in zip(recs, served, strict=True) if rec["stream"]]
    assert len(turns) == 3
    for rec, req in turns:
        assert rec["rule"] == ("bedrock-claude" if cloud == "bedrock" else "vertex-claude")
        assert rec["affinity_source"] == "header:x-claude-code-session-id"
        assert rec["added"] == {"headers": {}, "fields": {}, "markers": []}  # its own markers
        assert req.body["system"][0]["text"].startswith("x-anthropic-billing-header:")
        assert "cache_control" not in req.body["system"][0]  # the billing block as sent
        assert "cache_control" not in req.body
    later = [totals(req.usage) for _, req in turns[1:]]
    ratio = sum(t[1] for t in later) / sum(t[0] for t in later)
    every = [totals(req.usage) for _, req in turns]
    print(f"\nClaude Code on {cloud}: turns 2-3 read {ratio:.4f} of their prompt tokens, all "
          f"turns {sum(t[1] for t in every) / sum(t[0] for t in every):.4f}")
    assert ratio >= 0.80
    secrets = (BEDROCK_KEY, REFRESH_TOKEN, *{r.header("authorization") or "" for r in sim.requests
                                             if r.header("authorization")})
    texts = [log.read_text(), *outputs,
             *(f.read_text(errors="replace") for f in conf.glob("affinity-run-*.log"))]
    assert not [s[:12] for s in secrets for t in texts if s in t]
