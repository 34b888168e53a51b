"""The kernel benchmarks' `--smoke` runs on the CPU interpreter: each script runs end to end and
writes its JSON with device, date and the baseline measured beside the kernel (the numbers are not
speeds: the interpreter only checks the scripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import report

REPO = Path(__file__).resolve().parents[2]


def _smoke(script: str, out_flag: str, out_dir: Path, what: str, *extra: str) -> dict:
    """Run `benchmarks/<script> --smoke` under the interpreter; return the JSON it wrote."""
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--smoke", out_flag, str(out_dir), *extra],
        cwd=REPO,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out_dir.glob(f"*-cpu-{what}.json")
    return json.loads(path.read_text())


def test_bench_fused_moe_smoke(tmp_path):
    """Every scheme, both top-k sums, the torch per-expert baseline, and decode through the masked
    layout (bf16, fp8_block) beside the sorted one."""
    doc = _smoke("bench_fused_moe.py", "--out", tmp_path, "fused_moe", "--masked-decode")
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
    assert {r["scheme"] for r in rows if r.get("path") == "masked"} == {"bf16", "fp8_block"}
    assert all("vs_sorted" in r for r in rows if r.get("path") == "masked")
    bound = {"bf16": 2e-2, "fp8_block": 0.1, "w4a8": 0.3}
    for r in rows:
        assert r["us"] > 0 and r["torch_us"] > 0
        assert r["rel_err_vs_torch"] < bound[r["scheme"]], r


def test_bench_router_topk_smoke(tmp_path):
    """Both routings, the torch path beside the kernel, and the report's section from this JSON."""
    doc = _smoke("bench_router_topk.py", "--out-dir", tmp_path, "router_topk")
    assert doc["device"] and doc["date"] and doc["smoke"] is True
    rows = doc["rows"]
    assert not [r for r in rows if "error" in r], rows
    assert {r["routing"] for r in rows} == {"DeepSeek-V3", "sigmoid-E128-K8"}
    for r in rows:
        assert r["torch_us"] > 0 and r["triton_us"] > 0 and r["roofline_us"] > 0
        assert r["max_weight_diff"] < 1e-5, r

    # The report builds its section from the writer's own format.
    plots, md = tmp_path / "plots", tmp_path / "performance.md"
    assert report.main(["--results", str(tmp_path), "--plots-dir", str(plots), "--doc", str(md)]) == 0
    assert (plots / "report-router_topk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "## Expert selection (router top-k)" in text and "python benchmarks/bench_router_topk.py" in text


def test_bench_topk_sum_smoke(tmp_path):
    """Fused and unfused top-k sum, the sum launch and the intermediate's stores timed per row, the
    bound computed from them, both paths agreeing within bf16 rounding, and the banded fused row."""
    doc = _smoke("bench_topk_sum.py", "--out-dir", tmp_path, "topk_sum", "--band", "1")
    assert doc["device"] and doc["date"] and doc["smoke"] is True
    rows = doc["rows"]
    assert [r["T"] for r in rows] == [4, 16]
    for r in rows:
        assert min(r["fused_us"], r["unfused_us"], r["sum_us"], r["store_us"]) > 0
        assert abs(r["bound"] - (r["sum_us"] + r["store_us"]) / r["unfused_us"]) < 1e-3
        assert r["target_reachable"] == (r["bound"] >= 0.10)
        assert r["intermediate_bytes"] == r["T"] * 8 * 256 * 2
        assert r["rel_diff_fused_vs_unfused"] < 2e-2, r
        # the banded down GEMM (N_BAND 1): the same sums in another program order
        assert r["band"] == 1 and r["fused_band_us"] > 0 and r["rel_diff_band_vs_fused"] < 1e-5, r

    # The report builds its section from the writer's own format.
    plots, md = tmp_path / "plots", tmp_path / "performance.md"
    assert report.main(["--results", str(tmp_path), "--plots-dir", str(plots), "--doc", str(md)]) == 0
    text = md.read_text()
    assert "## Fused vs unfused top-k sum" in text and "python benchmarks/bench_topk_sum.py" in text
