"""`benchmarks/bench_router_topk.py --smoke` on the CPU interpreter: the script runs end to end for
both routings and writes its JSON with device, date and the torch baseline beside the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_router_topk_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_router_topk.py", "--smoke", "--out-dir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*-cpu-router_topk.json")
    doc = json.loads(path.read_text())
    assert doc["device"] and doc["date"] and doc["smoke"] is True
    rows = doc["rows"]
    assert not [r for r in rows if "error" in r], rows
    assert {r["routing"] for r in rows} == {"DeepSeek-V3", "sigmoid-E128-K8"}
    for r in rows:
        assert r["torch_us"] > 0 and r["triton_us"] > 0 and r["roofline_us"] > 0
        assert r["max_weight_diff"] < 1e-5, r

    # The report builds its section from the writer's own format.
    sys.path.insert(0, str(REPO))
    from benchmarks import report

    plots, md = tmp_path / "plots", tmp_path / "performance.md"
    assert report.main(["--results", str(tmp_path), "--plots-dir", str(plots), "--doc", str(md)]) == 0
    assert (plots / "report-router_topk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "## Expert selection (router top-k)" in text and "python benchmarks/bench_router_topk.py" in text
