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


@pytest.mark.parametrize("how", ["sigterm", "timeout"])
def test_sh_stops_its_command_as_ctrl_c_would(tmp_path, how):
    """A benchmark killed by timeout(1) (SIGTERM), or whose command overruns sh's timeout, stops the command
    with SIGINT, so a run stops its pool and cleans up (here: the command records that it was interrupted)."""
    import signal
    import time

    marker, log = tmp_path / "marker", tmp_path / "cmd.log"
    child = ("import pathlib, time\ntry:\n    print('started', flush=True); time.sleep(60)\n"
             f"except KeyboardInterrupt:\n    pathlib.Path({str(marker)!r}).write_text('interrupted')\n")
    limit = 2 if how == "timeout" else 120
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path\n"
              f"from benchmarks.suite import sh\nsh([sys.executable, '-c', {child!r}], Path({str(log)!r}), {limit})")
    p = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (log.exists() and "started" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if how == "sigterm":
        p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert marker.read_text() == "interrupted"
    assert p.returncode != 0
    assert ("TimeoutExpired" in err) == (how == "timeout")
