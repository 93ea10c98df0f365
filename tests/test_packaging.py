"""The wheel is a complete product: built from the repo, installed with plain `pip install` (not
editable) into a fresh venv and run from a directory that is not the checkout, it starts the
proxy with the shipped rules and rewrites a request. Nothing of the checkout is on its path.
"""

import json
import os
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.harness import ROOT, map_remote_args
from tests.procs import clean_env, free_port, listening_port, stop_pid, wait_port


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the tree, so the build leaves no build/ or egg-info behind in the checkout.
    src = out / "src"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if not (ROOT / name).is_file():
            continue  # deleted in the work tree
        dest = src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((ROOT / name).read_bytes())
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                        "--disable-pip-version-check", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("affinity_addon-*.whl")
    return whl


def site_packages(py: Path) -> str:
    return subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()


def install_wheel(wheel: Path, venv: Path) -> Path:
    """A fresh venv with the wheel installed, not editable. The dependencies come from the test
    environment (no download); the project itself only from the wheel. A .pth line adds a path
    without running that directory's own .pth files, so the checkout's editable install stays
    invisible."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    Path(site_packages(py), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q",
                    "--disable-pip-version-check", str(wheel)], check=True, timeout=300)
    return venv


def test_wheel_ships_rules_catalog_and_no_dev_tools(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("affinity_addon/addon.py", "affinity_addon/default_rules/default.yaml",
                   "affinity_addon/default_rules/schema.json",
                   "affinity_addon/catalog/usage_fields.yaml",
                   "affinity_addon/catalog/providers.yaml", "affinity_addon/catalog/prices.yaml"):
        assert needed in names
    assert not [n for n in names if n.startswith(("tests/", "scripts/"))]
    shipped = (ROOT / "rules" / "default.yaml").read_bytes()
    assert zipfile.ZipFile(wheel).read("affinity_addon/default_rules/default.yaml") == shipped


def test_installed_wheel_runs_the_proxy_with_shipped_rules(wheel: Path, tmp_path: Path) -> None:
    venv = install_wheel(wheel, tmp_path / "venv")
    py = venv / "bin" / "python"
    site = site_packages(py)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env()
    env.pop("PYTHONPATH", None)
    script = subprocess.run([str(py), "-m", "affinity_addon", "addon-path"], cwd=elsewhere,
                            env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert script.startswith(site) and Path(script).is_file()

    sim = subprocess.Popen([sys.executable, "-m", "tests.sim", "--port", "0", "--replicas", "1"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=clean_env())
    proxy = None
    try:
        sim_port = listening_port(sim)
        port = free_port()
        log = tmp_path / "affinity.jsonl"
        out = (tmp_path / "mitmdump.txt").open("wb")
        proxy = subprocess.Popen(
            [str(py), "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()",
             "--listen-host", "127.0.0.1", "-p", str(port), "--set", f"confdir={tmp_path / 'conf'}",
             "--set", "connection_strategy=lazy",
             *map_remote_args(f"http://127.0.0.1:{sim_port}", ["api.openai.com"]), "-s", script,
             "--set", f"affinity_log={log}", "--set", "affinity_summary=false"],
            cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_port(port, proxy, "mitmdump")
        body = {"model": "gpt-5", "messages": [{"role": "system", "content": "Be terse."},
                                               {"role": "user", "content": "hello"}]}
        req = urllib.request.Request(
            "http://api.openai.com/v1/chat/completions", data=json.dumps(body).encode(),
            headers={"content-type": "application/json", "authorization": "Bearer sk-test"})
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"}))
        with opener.open(req, timeout=30) as r:
            assert r.status == 200
        for _ in range(100):
            if log.exists() and log.read_text().strip():
                break
            time.sleep(0.05)
        output = (tmp_path / "mitmdump.txt").read_text(errors="replace")
        assert os.fspath(ROOT) not in output
        (rec,) = [json.loads(line) for line in log.read_text().splitlines()]
        assert rec["rule"] and rec["affinity_id"] and rec["usage"] is not None, rec
        # Priced by the genai-prices dependency and the shipped catalog/prices.yaml.
        assert rec["cost_usd"]["priced_as"] == "openai/gpt-5", rec
        assert "default_rules/default.yaml" in output  # the shipped rules, from the wheel
    finally:
        if proxy is not None:
            stop_pid(proxy)
        stop_pid(sim)
