"""benchmarks/report.py on CPU: plots and the performance page from the real results files, plus a
step document built by bench_step.summarize from synthetic per-rank rows (floors, ratios, targets)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import bench_step, report

RESULTS = Path(report.RESULTS_DIR)


def _real_results() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.json") if "smoke" not in p.name)


def _step_rows() -> list[dict]:
    """Two ranks, decode 16 and prefill 1024, deepep + torch + raw comm; rank 1 is slower."""
    rows = []
    for rank in (0, 1):
        slow = 1.0 + 0.1 * rank
        for phase, t, variants in (
            ("decode", 16, ("plain", "graph")),
            ("prefill", 1024, ("chunks1", "chunks2")),
        ):
            base = dict(kind="point", scheme="bf16", phase=phase, tokens=t, rank=rank)
            for backend in ("deepep", "torch"):
                for v in variants:
                    r = dict(
                        base,
                        backend=backend,
                        variant=v,
                        layout="low_latency" if phase == "decode" else "normal",
                    )
                    r["step_ms"] = (
                        (3.0 if phase == "decode" else 9.0) * slow * (0.9 if v in ("graph", "chunks2") else 1)
                    )
                    r["step_ms"] *= 1.5 if backend == "torch" else 1.0
                    r["stage_ms"] = {"router": 0.05, "dispatch": 0.3, "experts": 2.0, "combine": 0.3}
                    if v in ("plain", "chunks1"):
                        r.update(
                            floor_ms=2.5 * slow,
                            floor_mem_ms=2.5 * slow,
                            floor_mm_ms=0.1,
                            weight_bytes=1e10,
                            flops=1e12,
                            active_experts=120,
                            pairs=256,
                        )
                    else:
                        r["rel_vs_plain"] = 0.0
                    rows.append(r)
            rows.append(dict(base, backend="deepep raw", variant="raw", comm_ms=0.2))
    rows.append(dict(base, backend="torch", variant="chunks4", error="Traceback\nRuntimeError: boom"))
    return rows


def test_summarize_floors_ratios_and_errors():
    points = bench_step.summarize(_step_rows(), 2)
    get = {(p["phase"], p["backend"], p["variant"]): p for p in points}
    plain = get[("decode", "deepep", "plain")]
    assert plain["ranks"] == 2
    assert plain["step_ms"] == pytest.approx(3.3)  # max over ranks
    assert plain["floor_ms"] == pytest.approx(2.75)
    assert plain["raw_comm_ms"] == pytest.approx(0.2)
    assert plain["ratio"] == pytest.approx(3.3 / 2.95)
    assert plain["target"] == 1.10 and plain["target_met"] is False
    graph = get[("decode", "deepep", "graph")]
    assert graph["speedup_vs_plain"] == pytest.approx(1 / 0.9)
    assert graph["floor_ms"] == pytest.approx(2.75)  # the plain variant's floor applies to every variant
    assert get[("prefill", "torch", "chunks4")]["errors"][0].endswith("RuntimeError: boom")
    assert get[("prefill", "deepep", "chunks1")]["target"] == 1.20


def test_report_from_real_results(tmp_path):
    real = _real_results()
    assert real, "benchmarks/results/ holds the committed GPU results the report is drawn from"
    res = tmp_path / "results"
    res.mkdir()
    for p in real:
        shutil.copy(p, res)
    device = json.loads(real[0].read_text())["device"]
    step = {
        "what": "step",
        "date": "2099-01-01T00:00:00+00:00",
        "device": device,
        "ranks": 2,
        "shape": {
            "hidden": 7168,
            "num_experts": 256,
            "local_experts": 128,
            "inter": 2048,
            "top_k": 8,
            "capacity": 128,
        },
        "ceilings": {"copy_bytes_per_s": 4.2e12, "bf16_flops": 8e14, "fp8_flops": 1.4e15},
        "targets": bench_step.TARGETS,
        "points": bench_step.summarize(_step_rows(), 2),
        "errors": [],
    }
    (res / "2099-01-01-h200-step.json").write_text(json.dumps(step))
    (res / "broken.json").write_text("{not json")
    plots, doc = tmp_path / "plots", tmp_path / "performance.md"
    assert report.main(["--results", str(res), "--plots-dir", str(plots), "--doc", str(doc)]) == 0

    pngs = sorted(p.name for p in plots.glob("*.png"))
    for kind in ("router_gemm", "fused_moe", "masked_gemm"):
        if any(kind in p.name for p in real):
            assert f"report-{kind}.png" in pngs
    for name in ("report-step-latency.png", "report-step-fractions.png", "report-step-stages.png"):
        assert name in pngs
    for p in plots.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    text = doc.read_text()
    assert device["device"] in text
    for name in pngs:
        assert f"../benchmarks/results/{name}" in text
    assert "python benchmarks/bench_step.py" in text and "python benchmarks/report.py" in text
    assert "| weights | phase | T/rank |" in text
    assert "Targets per point" in text and "| bf16 | decode | 16 | deepep/graph |" in text
    assert "| deepep | decode | graph | 1 |" in text  # switch verdicts
    assert "no `layer` results yet" in text or "Layer step" in text


def test_report_layer_and_dispatch_formats(tmp_path):
    """The layer (bench_layer) and dispatch (bench_dispatch) documents, in their writers' formats."""
    dev = {"device": "NVIDIA H200", "num_gpus": 2, "torch": "2.11", "triton": "3.6", "cuda": "13.0"}
    stage = {"mode": 0.01, "router": 0.05, "dispatch": 0.2, "experts": 2.5, "combine": 0.2, "checks": 0.0}
    layer = {
        "what": "layer-deepep",
        "date": "2099-01-01T00:00:00+00:00",
        "device": dev,
        "shape": {"hidden": 7168, "num_experts": 256, "local_experts": 128, "inter": 2048, "top_k": 8},
        "rows": [
            {"rank": r, "scheme": "bf16", "phase": ph, "tokens": t, "layout": lay, "step_wall_ms": 3.1,
             "stage_ms": stage, "isolated_ms": {"sum": 2.9}, "verify": {"rel_err": 0.004}}
            for r in (0, 1)
            for ph, t, lay in (("prefill", 4096, "normal"), ("decode", 128, "low_latency"))
        ],
    }  # fmt: skip
    row = {"mode": "low_latency", "impl": "deepep raw", "precision": "fp8", "dispatch_us": 52.0,
           "dispatch_GBps": 40.0, "combine_us": 53.0, "combine_GBps": 70.0, "loop_us": 105.0}  # fmt: skip
    dispatch = {
        "what": "dispatch",
        "date": "2099-01-01T00:00:00+00:00",
        "device": dev,
        "shapes": {"hidden": 7168, "top_k": 8},
        "ranks": 2,
        "rows_by_rank": {"0": [row, dict(row, impl="runtime deepep", loop_overhead_pct=2.0)], "1": [row]},
    }
    res = tmp_path / "res"
    res.mkdir()
    (res / "a-layer-deepep.json").write_text(json.dumps(layer))
    (res / "b-dispatch.json").write_text(json.dumps(dispatch))
    plots, doc = tmp_path / "plots", tmp_path / "perf.md"
    assert report.main(["--results", str(res), "--plots-dir", str(plots), "--doc", str(doc)]) == 0
    assert (plots / "report-layer-stages.png").stat().st_size > 5000
    assert (plots / "report-dispatch.png").stat().st_size > 5000
    text = doc.read_text()
    assert "NVIDIA H200" in text and "| deepep | bf16 | prefill | 4096 | normal |" in text
    assert "| low_latency | runtime deepep | fp8 |" in text
    assert "no `step` results yet" in text


def test_sustained_smi_parsing_and_report_section(tmp_path):
    """bench_sustained's nvidia-smi summary (median clock/power, decoded throttle bits, malformed
    lines skipped) and the report's table built from its document."""
    from benchmarks import bench_sustained

    lines = [
        "1470 MHz, 691.69 W, 0x0000000000000004",
        "1500 MHz, 689.07 W, 0x0000000000000004",
        "[N/A], [N/A], [N/A]",
        "1980 MHz, 120.00 W, 0x0000000000000001",
    ]
    s = bench_sustained.parse_smi(lines)
    assert s["samples"] == 3 and s["sm_clock_mhz"] == 1500.0 and s["power_w"] == 689.07
    assert s["throttle"] == ["gpu_idle", "sw_power_cap"]
    doc = {
        "what": "sustained",
        "date": "2099-01-01T00:00:00+00:00",
        "device": {"device": "NVIDIA H200", "torch": "2.11", "triton": "3.6"},
        "seconds": 3.0,
        "rows": [
            dict(
                work="cuBLAS mm bf16 8192^3",
                burst_tflops=790.0,
                sustained_tflops=643.0,
                sustained_vs_burst=0.81,
                frac_sustained_dense=1.0,
                **s,
            ),
        ],  # fmt: skip
    }
    res = tmp_path / "res"
    res.mkdir()
    (res / "a-sustained.json").write_text(json.dumps(doc))
    out = tmp_path / "perf.md"
    assert report.main(["--results", str(res), "--plots-dir", str(tmp_path), "--doc", str(out)]) == 0
    text = out.read_text()
    assert "## Sustained rates under the power cap" in text
    assert "| cuBLAS mm bf16 8192^3 | 790 | 643 | 0.81 | 1 | 1500 | 689 | gpu_idle, sw_power_cap |" in text


def test_fp8_vs_bf16_pairs_the_default_paths():
    """Prefill pairs (T >= 512): bf16 with the default top-k sum (fused at K > 2) against fp8_block,
    sorted layout only; the ratio, the target verdict and whether both came from one run."""
    from benchmarks import report

    def row(shape, T, scheme, us, K=8, topk_sum="fused", run=None, **kw):
        return dict(
            shape=shape, T=T, scheme=scheme, us=us, K=K, topk_sum=topk_sum, path="sorted", run=run, **kw
        )

    rows = [
        row("dsv3", 2048, "bf16", 500.0, run="a"),
        row("dsv3", 2048, "bf16", 450.0, topk_sum="unfused", run="a"),  # not the default at K = 8
        row("dsv3", 2048, "fp8_block", 300.0, run="a", frac_mm=0.5),
        row("dsv3", 8192, "bf16", 1200.0, run="a"),
        row("dsv3", 8192, "fp8_block", 1000.0, run="b"),
        row("mixtral", 2048, "bf16", 240.0, K=2, topk_sum="unfused"),
        row("mixtral", 2048, "fp8_block", 200.0, K=2, topk_sum="unfused"),
        row("dsv3", 128, "bf16", 50.0),  # decode-size: left out
        row("dsv3", 128, "fp8_block", 40.0),
        row("qwen3", 2048, "bf16", 60.0),  # no fp8 row: left out
    ]
    got = {(r["shape"], r["T"]): r for r in report.fp8_vs_bf16(rows)}
    assert set(got) == {("dsv3", 2048), ("dsv3", 8192), ("mixtral", 2048)}
    assert got[("dsv3", 2048)]["ratio"] == pytest.approx(500 / 300) and got[("dsv3", 2048)]["met"] is True
    assert got[("dsv3", 2048)]["same_run"] is True and got[("dsv3", 2048)]["fp8_frac_mm"] == 0.5
    assert got[("dsv3", 8192)]["met"] is False and got[("dsv3", 8192)]["same_run"] is False
    assert got[("mixtral", 2048)]["ratio"] == pytest.approx(1.2)


def test_kernel_targets_worst_case_and_verdicts():
    """Issue 3's targets from synthetic rows: the worst case per target, its place, the verdict;
    the router uses the re-tuned table's time where the run re-tuned; a kind not measured gives
    no verdict."""
    from benchmarks import report

    router = [
        dict(model="DSV3", D=7168, E=256, T=1, cublas_us=10.0, auto_us=9.0, auto_tuned_us=4.0,
             graph_cublas_us=6.0, graph_auto_us=3.0),
        dict(model="DSV3", D=7168, E=256, T=64, cublas_us=10.0, auto_us=5.0, graph_cublas_us=6.0,
             graph_auto_us=4.0),
        dict(model="DSV3", D=7168, E=256, T=512, cublas_us=14.0, auto_us=14.2),  # cuBLAS itself: noise
    ]  # fmt: skip
    fused = [
        dict(shape="qwen3_30b", scheme="bf16", T=1, K=8, us=50.0, frac_copy_bw=0.5, path="sorted",
             topk_sum="fused", speedup_vs_torch=20.0),
        dict(shape="qwen3_30b", scheme="bf16", T=1, K=8, us=45.0, frac_copy_bw=0.6, path="masked",
             topk_sum="unfused", speedup_vs_torch=22.0),
        dict(shape="dsv3_e32", scheme="bf16", T=2048, K=8, us=1000.0, tflops=530.0, path="sorted",
             topk_sum="fused", speedup_vs_torch=3.0),
        dict(shape="dsv3_e32", scheme="fp8_block", T=2048, K=8, us=600.0, path="sorted", topk_sum="fused",
             speedup_vs_torch=0.9),
    ]  # fmt: skip
    masked = [dict(scheme="bf16", rows_per_expert=8, frac_hbm=0.8), dict(scheme="w4a8", rows_per_expert=1, frac_hbm=0.3),
              dict(scheme="w4a8", rows_per_expert=128, frac_hbm=0.1)]  # fmt: skip
    rows = report.kernel_targets(fused, None, masked, router)

    def pick(text):
        (row,) = [r for r in rows if text in r["target"]]
        return row["worst"], row["met"], row["where"]

    worst, met, where = pick("2x cuBLAS")  # 10/4 (re-tuned table) at T=1, 10/5 at T=64
    assert (worst, met) == ("2x", True) and where.startswith("T=64")
    assert pick("never slower than cuBLAS")[:2] == ("0.986x", True)
    assert pick("decode (T <= 128)") == ("0.6", False, "qwen3_30b T=1")  # the faster layout per (shape, T)
    assert pick("dsv3_e32 T=2048")[:2] == ("530", True)
    assert pick("dsv3_e128 T=8192")[:2] == (None, None)
    worst, met, where = pick("torch per-expert")
    assert (worst, met) == ("0.9x", False) and "fp8_block" in where
    assert pick("fp8_block >=")[:2] == ("1.67x", True)
    assert pick("top-k sum")[1:] == (None, "not measured")
    worst, met, where = pick("masked")  # the 128-row case is left out
    assert (worst, met) == ("0.3", False) and "bf16 0.80" in where


def test_breakdown_section(tmp_path):
    """bench_breakdown's document (its writer's keys) becomes a per-call and a per-kernel table; a
    failed case is named."""
    dev = {"device": "NVIDIA H100 80GB HBM3", "num_gpus": 1, "torch": "2.11", "triton": "3.6", "cuda": "13.0"}
    call = {"case": "masked-qwen3-r1-w4a8", "profiled": "graph", "graph_us": 53.3, "span_us": 49.0,
            "kernels_us": 38.5, "gaps_us": 10.5, "launches": 7, "roofline_us": 13.3, "frac_copy_bw": 0.25,
            "gemms_us": 30.1, "gemms_frac_copy_bw": 0.442}  # fmt: skip
    kernels = [
        {"case": call["case"], "i": 0, "kernel": "Memset", "us": 1.1, "gap_before_us": 0.0, "share": 0.022},
        {"case": call["case"], "i": 1, "kernel": "_masked_amax_kernel", "us": 2.4, "gap_before_us": 1.5, "share": 0.049},
    ]  # fmt: skip
    doc = {"what": "breakdown", "date": "2099-01-01T00:00:00+00:00", "device": dev, "replays": 20,
           "calls": [call], "kernels": kernels, "errors": {"fused-qwen3_30b-T1-fp8_block": "RuntimeError: x"}}  # fmt: skip
    res = tmp_path / "res"
    res.mkdir()
    (res / "2099-01-01-h100-breakdown.json").write_text(json.dumps(doc))
    out = tmp_path / "perf.md"
    assert report.main(["--results", str(res), "--plots-dir", str(tmp_path / "p"), "--doc", str(out)]) == 0
    text = out.read_text()
    assert "## Where a decode call's time goes (per kernel)" in text
    assert (
        "| masked-qwen3-r1-w4a8 | 53.3 | 49 | 38.5 | 10.5 | 7 | 30.1 | 13.3 | 0.25 | 0.442 | graph |" in text
    )
    assert "| masked-qwen3-r1-w4a8 | 1 | _masked_amax_kernel | 2.4 | 1.5 | 0.049 |" in text
    assert "`fused-qwen3_30b-T1-fp8_block`: RuntimeError: x" in text
    assert "python benchmarks/bench_breakdown.py" in text
