"""Sustained vs burst rates under the GPU's power cap: a dense cuBLAS bf16 GEMM and the prefill fused MoE.

    python benchmarks/bench_sustained.py [--seconds S] [--out-dir DIR]

The kernel benchmarks time short bursts (a few to a few tens of milliseconds) after an idle gap, and
their matmul ceiling is such a burst. A prefill step keeps the tensor cores busy for much longer;
then the board's power limit lowers the SM clock. This script measures both for the same work:
the burst rate (`triton.testing.do_bench` median) and the rate over `--seconds` of back-to-back
calls, while `nvidia-smi` samples the SM clock, the board power and the active clock-throttle
reasons every 200 ms. Rows: cuBLAS `torch.mm` bf16 8192^3 (the dense ceiling), and `fused_moe`
bf16 at DeepSeek-V3 shapes (E_local 32 and 128, T 8192, K 8, the tuned table's configs).
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_fused_moe import make_bf16_weights, routing  # noqa: E402
from benchmarks.common import bench_us, print_table, write_results  # noqa: E402
from ep_runtime.kernels import fused_moe as fm  # noqa: E402

SMI_QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"
THROTTLE_BITS = {
    0x1: "gpu_idle",
    0x2: "app_clock_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
}


def parse_smi(lines: list[str]) -> dict:
    """`nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv,noheader`
    samples -> median SM clock (MHz), median power (W), and every throttle reason seen."""
    clocks, watts, reasons = [], [], set()
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            clocks.append(float(parts[0].split()[0]))
            watts.append(float(parts[1].split()[0]))
            bits = int(parts[2], 16)
        except ValueError:
            continue
        reasons.update(name for bit, name in THROTTLE_BITS.items() if bits & bit)
    med = lambda v: sorted(v)[len(v) // 2] if v else None  # noqa: E731
    return dict(samples=len(clocks), sm_clock_mhz=med(clocks), power_w=med(watts), throttle=sorted(reasons))


def sustained(fn, seconds: float) -> tuple[float, dict]:
    """Mean ms per call over `seconds` of back-to-back calls, and the nvidia-smi summary meanwhile."""
    smi = subprocess.Popen(
        ["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader", "-lms", "200"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0, calls = time.time(), 0
        while time.time() - t0 < seconds:
            fn()
            calls += 1
            if calls % 16 == 0:  # keep the host at most 16 calls ahead
                torch.cuda.synchronize()
        end.record()
        torch.cuda.synchronize()
    finally:
        smi.terminate()
        out = smi.communicate()[0]
    return start.elapsed_time(end) / calls, parse_smi(out.strip().splitlines())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each sustained run")
    ap.add_argument("--out-dir", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sustained needs a CUDA GPU")
        return 1
    dev = "cuda"
    rows = []

    def row(name, flops, fn):
        fn()
        burst_ms = bench_us(fn, warmup=5, rep=50) / 1e3
        ms, smi = sustained(fn, args.seconds)
        rows.append(
            dict(
                work=name,
                burst_tflops=round(flops / burst_ms / 1e9, 1),
                sustained_tflops=round(flops / ms / 1e9, 1),
                sustained_vs_burst=round(burst_ms / ms, 3),
                sustained_ms=round(ms, 3),
                **smi,
            )
        )
        print(rows[-1], flush=True)

    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    row("cuBLAS mm bf16 8192^3", 2.0 * n**3, functools.partial(torch.mm, a, b))
    del a, b
    T, K, D, inter = 8192, 8, 7168, 2048
    for L in (32, 128):
        w13, w2 = make_bf16_weights(L, D, inter, dev)
        ids, w = routing(T, K, L, dev)
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
        flops = 2.0 * T * K * 3 * D * inter
        row(
            f"fused_moe bf16 DeepSeek-V3 E{L} T{T}",
            flops,
            functools.partial(fm.fused_moe, x, w13, w2, ids, w),
        )
        del w13, w2
        torch.cuda.empty_cache()
    dense = rows[0]["sustained_tflops"]
    for r in rows:
        r["frac_sustained_dense"] = round(r["sustained_tflops"] / dense, 3)
    write_results("sustained", dict(seconds=args.seconds, rows=rows), args.out_dir)
    print_table("sustained vs burst", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
