"""`scripts/bench --ceiling`: the throughput of the addon's variants, the evidence for what bounds
the addon under load. A short run: every variant serves every request, and the
worker-process prototype really does the deferred work (its records carry verdicts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.addon_errors import check_file

pytestmark = pytest.mark.slow  # runs scripts/bench --ceiling: a simulator and five mitmdump processes

ROOT = Path(__file__).resolve().parent.parent


def test_ceiling_run_measures_every_variant_and_the_worker_records_with_verdicts(
        tmp_path: Path) -> None:
    out = tmp_path / "ceiling.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--ceiling", "--concurrency", "4",
         "--tp-requests", "40", "--tp-rounds", "1", "--out", str(out),
         "--workdir", str(tmp_path / "bench")],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Every proxy the bench started logged no addon error (its variants run the addon's code).
    outputs = sorted((tmp_path / "bench").glob("*/output.txt"))
    assert len(outputs) == 6
    for output in outputs:
        check_file(output, f"the bench's {output.parent.name} proxy")
    res = json.loads(out.read_text())
    th = res["throughput"]
    assert list(th["summary"]) == ["bare", "bare (A/A)", "addon", "diagnosis off",
                                   "rewrite only", "worker process"]
    assert th["errors"] == th["non_200"] == 0
    for name, runs in th["runs"].items():
        assert len(runs) == 1 and runs[0]["rps"] > 0 and runs[0]["cpu_ms"] > 0, name
    assert th["summary"]["bare"]["ratio_median"] == 1.0
    # Only the worker variant has a worker process; its CPU is counted apart.
    assert th["runs"]["worker process"][0]["worker_cpu_ms"] > 0
    assert th["runs"]["addon"][0]["worker_cpu_ms"] == 0
    log = res["worker_log"]
    assert log["records"] == 4 * 4 + 40  # the warm-up and the measured run, every one recorded
    assert log["with_verdict"] == log["records"]
    assert log["prompt_cache_key_added"] == log["records"]  # the rewrite ran on the loop
