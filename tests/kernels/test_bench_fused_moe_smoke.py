"""`benchmarks/bench_fused_moe.py --smoke` on the CPU interpreter: the script runs end to end (every
scheme, both top-k sums, the torch per-expert baseline) and writes its JSON with device and date."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_fused_moe_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_fused_moe.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*-cpu-fused_moe.json")
    doc = json.loads(path.read_text())
    assert doc["device"] and doc["date"]
    rows = [r for r in doc["rows"] if "scheme" in r]
    assert {(r["scheme"], r["topk_sum"]) for r in rows} >= {
        ("bf16", "fused"),
        ("bf16", "unfused"),
        ("fp8_block", "fused"),
        ("w4a8", "fused"),
    }
    # Against the bf16 torch loop on the unquantised weights: bf16 rounding only; fp8 e4m3 weights
    # and activations (~6% normwise); int4 weights with a scale per 128 channels (~21%).
    bound = {"bf16": 2e-2, "fp8_block": 0.1, "w4a8": 0.3}
    for r in rows:
        assert r["us"] > 0 and r["torch_us"] > 0
        assert r["rel_err_vs_torch"] < bound[r["scheme"]], r
