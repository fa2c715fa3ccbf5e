"""benchmarks/suite.py on the CPU with tiny shapes: the plumbing (pack, every regime's bench, the table,
the verdict line, suite.json) works end to end. The figures themselves mean nothing on this machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_suite_cpu_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/suite.py", "--scale", "cpu-smoke", "--workdir",
                           str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--new-tokens", "2",
                           "--prefill-tokens", "32", "--skip-peer"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("targets: ") and "decode_disk" in lines[-1] and "ttft_cold" in lines[-1]
    assert any(line.startswith("| tiny x4 | (a) DRAM decode step |") for line in lines)
    assert any(line.startswith("| tiny x4 | (d) cold start to first token |") for line in lines)
    res = json.loads((tmp_path / "o" / "suite.json").read_text())
    r = res["results"][0]
    assert all(r[k] for k in ("decode_dram", "decode_disk", "prefill", "prefill_compute", "cold_start"))
    assert r["cold_start"]["process_start_to_first_token_ms"] > r["cold_start"]["load_ms"] > 0
    assert set(r["cold_start"]["load_breakdown_ms"]) >= {"pool_start", "register_ring", "gpu_tier"}
    assert set(res["verdicts"]) == {"decode_dram", "decode_disk", "prefill", "ttft_cold", "peer_speedup"}
