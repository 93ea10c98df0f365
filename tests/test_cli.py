"""The `affinity proxy` and `affinity run` commands: argument handling, the agent's environment,
and (from a wheel installed into a fresh venv, run outside the checkout) a real openai-SDK script
run through `affinity run`, its request rewritten and its usage recorded.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import certifi
import pytest

from affinity_addon.__main__ import build_parser, main
from affinity_addon.cli import proxy, run
from tests.addon_errors import check_file, check_output, plant_args
from tests.harness import ROOT, map_remote_args
from tests.procs import clean_env, free_port, listening_port, stop_pid, wait_port
from tests.test_packaging import install_wheel, wheel  # noqa: F401  (wheel: module fixture)


def parse(argv: list[str]):
    parser = build_parser()
    head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args, extra = parser.parse_known_args(head)
    return args, extra, tail


def test_mitmproxy_arguments_come_after_our_defaults_and_win() -> None:
    argv = proxy.mitm_argv(8080, ["-p", "9000", "--set", "affinity_log=/x.jsonl"])
    assert argv.index("-s") < argv.index("9000")  # the user's -p comes last: mitmproxy keeps it
    assert str(proxy.ADDON_SCRIPT) in argv and Path(argv[argv.index("-s") + 1]).is_file()
    assert [a for a in argv if a.startswith("affinity_log=")] == ["affinity_log=/x.jsonl"]
    assert proxy.port_of(["-p", "9000"], 8080) == 9000
    assert proxy.log_of(["--set=affinity_log=a.jsonl"]) == "a.jsonl"


def test_web_shows_the_comment_column_unless_the_user_chose_columns() -> None:
    web = proxy.mitm_argv(8080, [], web=True)
    cols = [web[i + 1].split("=", 1)[1] for i, a in enumerate(web)
            if a == "--set" and web[i + 1].startswith("web_columns=")]
    assert cols[-1] == "comment" and "path" in cols
    own = proxy.mitm_argv(8080, ["--set", "web_columns=path"], web=True)
    assert proxy.set_value(own, "web_columns") == "path" and own.count("--set") == 3
    assert proxy.set_value(proxy.mitm_argv(8080, []), "web_columns") is None
    # mitmproxy refuses an option given twice: the user's confdir replaces ours
    argv = proxy.mitm_argv(8080, ["--set", "confdir=/c"])
    assert [a for a in argv if a.startswith("confdir=")] == ["confdir=/c"]


def test_proxy_and_run_pass_unknown_arguments_to_mitmproxy_report_does_not() -> None:
    args, extra, tail = parse(["run", "--port", "9", "--set", "a=b", "--map-remote", "#x#y",
                               "--", "python", "s.py", "--set", "q"])
    assert args.port == 9 and args.passthrough
    assert extra == ["--set", "a=b", "--map-remote", "#x#y"]
    assert tail == ["python", "s.py", "--set", "q"]
    args, extra, _ = parse(["proxy", "--web", "--mode", "reverse:http://x"])
    assert args.web and extra == ["--mode", "reverse:http://x"]
    with pytest.raises(SystemExit):
        main(["report", "--no-such-flag", "x.jsonl"])
    assert main(["run", "--port", "9"]) == 2  # no agent command


@pytest.mark.parametrize("env, added", [
    ({"ANTHROPIC_BASE_URL": "https://api.deepseek.com/anthropic"}, {run.ATTRIBUTION: "0"}),
    ({"ANTHROPIC_BASE_URL": "http://127.0.0.1:4000"}, {run.ATTRIBUTION: "0"}),  # a local gateway
    ({"ANTHROPIC_BASE_URL": "api.z.ai/api/anthropic"}, {run.ATTRIBUTION: "0"}),
    # the user's own choice, either way, stands
    ({"ANTHROPIC_BASE_URL": "https://api.deepseek.com/anthropic", run.ATTRIBUTION: "1"}, {}),
    ({"ANTHROPIC_BASE_URL": "https://api.deepseek.com/anthropic", run.ATTRIBUTION: ""}, {}),
    # Anthropic's own API reads the block; no base URL is Anthropic's
    ({"ANTHROPIC_BASE_URL": "https://api.anthropic.com"}, {}),
    ({"ANTHROPIC_BASE_URL": "https://API.ANTHROPIC.COM/"}, {}),
    ({}, {}),
    # Bedrock or Vertex selected: ANTHROPIC_BASE_URL is not where the messages go
    ({"ANTHROPIC_BASE_URL": "https://api.deepseek.com/anthropic",
      "CLAUDE_CODE_USE_VERTEX": "1"}, {}),
    ({"ANTHROPIC_BASE_URL": "https://api.deepseek.com/anthropic",
      "CLAUDE_CODE_USE_BEDROCK": "0"}, {run.ATTRIBUTION: "0"}),
])
def test_run_turns_the_billing_block_off_for_other_providers(env: dict[str, str],
                                                             added: dict[str, str]) -> None:
    assert run.attribution_env(env) == added


def test_agent_environment_and_bundle_keep_other_hosts_trusted(tmp_path: Path) -> None:
    ca = tmp_path / "mitmproxy-ca-cert.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nMITM\n-----END CERTIFICATE-----\n")
    bundle = run.ca_bundle(ca)
    data = bundle.read_bytes()
    assert data.startswith(Path(certifi.where()).read_bytes().rstrip(b"\n")) and data.endswith(ca.read_bytes())
    env = run.agent_env(8123, ca, bundle, {"NO_PROXY": "corp.example", "PATH": "/bin"})
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:8123"
    assert env["NODE_EXTRA_CA_CERTS"] == env["CODEX_CA_CERTIFICATE"] == str(ca)
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == str(bundle)
    assert env["NO_PROXY"].split(",") == ["corp.example", "localhost", "127.0.0.1"]


SDK_SCRIPT = """
import openai
client = openai.OpenAI(api_key="sk-test", max_retries=0)
system = "You are a careful assistant. " * 400  # above OpenAI's 1024-token cache minimum
for question in ("hello", "and again"):
    r = client.chat.completions.create(model="gpt-5", messages=[
        {"role": "system", "content": system}, {"role": "user", "content": question}])
    print("usage", r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens)
"""


@pytest.fixture
def installed(wheel: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A fresh venv with the wheel (deps from the test venv via a .pth, no download)."""
    return install_wheel(wheel, tmp_path / "venv")


@pytest.fixture
def sim_url():
    sim = subprocess.Popen([sys.executable, "-m", "tests.sim", "--port", "0", "--replicas", "1"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=clean_env())
    try:
        yield f"http://127.0.0.1:{listening_port(sim)}"
    finally:
        stop_pid(sim)


def _env(tmp_path: Path) -> dict[str, str]:
    env = clean_env()
    env.pop("PYTHONPATH", None)
    env["MITMPROXY_CONFDIR"] = str(tmp_path / "conf")
    return env


@pytest.mark.slow  # a fresh venv, the simulator and `affinity run`
def test_installed_affinity_run_drives_an_sdk_script(installed: Path, sim_url: str,
                                                     tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "agent.py").write_text(SDK_SCRIPT)
    port = free_port()
    r = subprocess.run(
        [str(installed / "bin" / "affinity"), "run", "--port", str(port),
         "--set", "connection_strategy=lazy", *map_remote_args(sim_url, ["api.openai.com"]),
         *plant_args(), "--", str(installed / "bin" / "python"), "agent.py"],
        cwd=elsewhere, env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    usages = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("usage")]
    assert len(usages) == 2 and int(usages[1][1]) > 0, r.stdout  # the second call hit the cache
    recs = [json.loads(line) for line in (elsewhere / "affinity.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for rec in recs:
        assert rec["rule"] == "openai" and rec["affinity_id"]
        # The shipped OpenAI rule sends the prompt family's key ({family_key}), not the ID.
        assert rec["added"]["fields"]["prompt_cache_key"].startswith("fam-")
        assert rec["cache_key_bucket"]["strategy"] == "family"
        assert rec["usage"]["input_tokens"] > 1024
    assert recs[1]["usage"]["cache_read_tokens"] > 0
    assert "this session, 2 LLM responses" in r.stderr and "gpt-5" in r.stderr
    proxy_log = tmp_path / "conf" / f"affinity-run-{port}.log"
    assert os.fspath(ROOT) not in proxy_log.read_text()
    check_file(proxy_log, "the proxy of `affinity run`")
    with pytest.raises(OSError):  # the proxy it started is gone
        __import__("socket").create_connection(("127.0.0.1", port), timeout=0.5)


@pytest.mark.slow  # a fresh venv, the simulator and `affinity proxy`
def test_installed_affinity_proxy_serves_and_run_reuses_it(installed: Path, sim_url: str,
                                                           tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "agent.py").write_text(SDK_SCRIPT)
    port = free_port()
    env = _env(tmp_path) | {"AFFINITY_PORT": str(port)}
    out = (tmp_path / "proxy.txt").open("wb")
    proc = subprocess.Popen(
        [str(installed / "bin" / "affinity"), "proxy", "--set", "connection_strategy=lazy",
         *map_remote_args(sim_url, ["api.openai.com"]), "--set", "affinity_summary=false",
         *plant_args()],
        cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "affinity proxy")
        r = subprocess.run([str(installed / "bin" / "affinity"), "run", "--",
                            str(installed / "bin" / "python"), "agent.py"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "using the proxy already listening" in r.stderr
        assert "this session, 2 LLM responses" in r.stderr
        assert proc.poll() is None  # not ours to stop
    finally:
        stop_pid(proc)
    banner = (tmp_path / "proxy.txt").read_text(errors="replace")
    check_output(banner, "affinity proxy")
    assert f"HTTPS_PROXY=http://127.0.0.1:{port}" in banner and "default_rules/default.yaml" in banner
    recs = [json.loads(line) for line in (elsewhere / "affinity.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["usage"] for r in recs)


@pytest.mark.slow  # starts mitmweb
def test_affinity_proxy_web_shows_the_comment_column(tmp_path: Path) -> None:
    port, web = free_port(), free_port()
    env = clean_env() | {"AFFINITY_PORT": str(port), "MITMPROXY_CONFDIR": str(tmp_path / "conf")}
    out = (tmp_path / "web.txt").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "affinity_addon", "proxy", "--web", "--set", "web_open_browser=false",
         "--set", f"web_port={web}", "--set", "web_host=127.0.0.1",
         "--set", "web_password=test-token", "--set", f"affinity_log={tmp_path / 'a.jsonl'}",
         *plant_args()],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "affinity proxy --web")
        wait_port(web, proc, "mitmweb")
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{web}/options.json",
                                     headers={"Authorization": "Bearer test-token"})
        with urllib.request.urlopen(req, timeout=10) as r:
            options = json.loads(r.read())
        columns = options["web_columns"]["value"]
        assert columns[-1] == "comment" and "path" in columns
        assert options["affinity_log"]["value"] == str(tmp_path / "a.jsonl")
    finally:
        stop_pid(proc)
    check_file(tmp_path / "web.txt", "affinity proxy --web")


@pytest.mark.slow  # starts `affinity run` and its proxy
def test_run_passes_sigterm_to_the_agent_and_stops_its_proxy(tmp_path: Path) -> None:
    import signal
    import socket
    import time

    port = free_port()
    marker = tmp_path / "agent-started"
    agent = (f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)")
    env = clean_env() | {"MITMPROXY_CONFDIR": str(tmp_path / "conf")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "affinity_addon", "run", "--port", str(port),
         "--set", f"affinity_log={tmp_path / 'a.jsonl'}", *plant_args(),
         "--", sys.executable, "-c", agent],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=10)
        bundle = tmp_path / "conf" / run.BUNDLE_NAME
        assert bundle.read_bytes().endswith((tmp_path / "conf" / "mitmproxy-ca-cert.pem").read_bytes())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        stop_pid(proc)
    assert proc.returncode == 128 + signal.SIGTERM  # the agent's status, as a shell gives it
    assert "no LLM responses recorded in this session" in err.decode()
    check_file(tmp_path / "conf" / f"affinity-run-{port}.log", "the proxy of `affinity run`")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5)
