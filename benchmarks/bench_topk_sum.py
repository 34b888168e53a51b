"""Fused top-k sum vs unfused, and the most any fusion of the sum can save (the issue's 10% target).

    python benchmarks/bench_topk_sum.py [--out-dir DIR] [--shapes a,b] [--ts 512,2048,8192] [--smoke]

Per (model shape, T), bf16 weights, K = 8, every call replayed from a CUDA graph:

- `fused_us`: `fused_moe(..., fused_topk_sum=True)`: the down GEMM adds each slot's weighted row into
  an fp32 `[T, D]` accumulator with atomic adds, then one cast to bf16.
- `unfused_us`: `fused_topk_sum=False`: the down GEMM stores one bf16 row per slot (`[T*K, D]`), then
  one sum launch (`_sum_slots`) reads the K rows of each token and writes `[T, D]`.
- `sum_us`: that sum launch alone on a random `[T*K, D]` bf16 input.
- `store_us`: writing the `[T*K, D]` bf16 intermediate once (`fill_`), the down GEMM's extra stores.
- `fused_band_us`: the fused path with its down GEMM in N bands (`N_BAND`: the width
  `bench_fused_moe.banded` picks, or `--band`), whose accumulator columns in flight fit L2; `band`
  is the N_BAND used (none where the whole accumulator fits in about 32 MB).

A fused sum can at best remove the intermediate's stores and the whole sum launch (it still writes
`[T, D]` once, which `sum_us` also counts, so the bound is generous): `bound = (sum_us + store_us) /
unfused_us` is the largest share of the unfused time a fusion can save, measured in the same run.
Where it is under 0.10 no fused top-k sum, however free its atomics, is 10% faster than this
unfused path. The JSON also holds the device-to-device copy rate and the intermediate's bytes.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_fused_moe  # noqa: E402
from benchmarks.bench_fused_moe import banded, make_bf16_weights, routing  # noqa: E402
from benchmarks.common import (  # noqa: E402
    bench_us,
    graph_us,
    measure_copy_bandwidth,
    print_table,
    rel_diff,
    write_results,
)
from ep_runtime.kernels import fused_moe as fm  # noqa: E402

SHAPES = {name: bench_fused_moe.SHAPES[name] for name in ("dsv3_e128", "dsv3_e32", "qwen3_30b")}  # K = 8
TS = (512, 2048, 8192)
SMOKE = bench_fused_moe.SMOKE
SMOKE_TS = (4, 16)
TARGET = 0.10
COLUMNS = ["shape", "T", "fused_us", "unfused_us", "speedup", "sum_us", "store_us", "bound", "target_reachable",
           "band", "fused_band_us"]  # fmt: skip


def measure(L: int, D: int, inter: int, K: int, T: int, dev: torch.device, time_fn, band: int = 0) -> dict:
    """One row; `band`: N_BAND of the banded fused call (0: `banded`'s choice for the config's down
    tile, None where it makes none; < 0: off)."""
    w13, w2 = make_bf16_weights(L, D, inter, dev)
    x = (torch.randn(T, D, device=dev) * 0.5).to(torch.bfloat16)
    ids, w = routing(T, K, L, dev)

    def call(fused: bool, config=None):
        return fm.fused_moe(x, w13, w2, ids, w, fused_topk_sum=fused, config=config)

    fused_us = time_fn(lambda: call(True))
    unfused_us = time_fn(lambda: call(False))
    # the two paths agree (one rounding each; the fused sum adds in another order)
    fused_out = call(True)
    rel = rel_diff(fused_out, call(False))
    cfg = fm.get_config(T, K, L, inter, D, "bf16", dev)
    if band == 0:
        band = (banded([cfg["down"]], T, D) or [{}])[0].get("N_BAND")
    fused_band_us = rel_band = None
    if band is not None and band > 0 and not cfg.get("MASKED"):
        cfg_band = {**cfg, "down": dict(cfg["down"], N_BAND=band)}
        fused_band_us = round(time_fn(lambda: call(True, cfg_band)), 2)
        rel_band = round(rel_diff(call(True, cfg_band), fused_out), 6)
    else:
        band = None
    slots = torch.randn(T * K, D, device=dev).to(torch.bfloat16)
    sum_us = time_fn(lambda: fm._sum_slots(slots, T, K, torch.bfloat16))
    store_us = time_fn(lambda: slots.fill_(1.0))
    bound = (sum_us + store_us) / unfused_us
    return dict(
        T=T,
        fused_us=round(fused_us, 2),
        unfused_us=round(unfused_us, 2),
        speedup=round(unfused_us / fused_us - 1.0, 4),
        sum_us=round(sum_us, 2),
        store_us=round(store_us, 2),
        bound=round(bound, 4),
        target_reachable=bound >= TARGET,
        intermediate_bytes=T * K * D * 2,
        rel_diff_fused_vs_unfused=round(rel, 5),
        band=band,
        fused_band_us=fused_band_us,
        rel_diff_band_vs_fused=rel_band,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument(
        "--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES)
    )
    ap.add_argument("--ts", default=None, help="comma-separated T values (default 512,2048,8192)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting new rows after this")
    ap.add_argument(
        "--band", type=int, default=0, help="N_BAND of the banded fused row (0: the tuner's choice, -1: off)"
    )
    ap.add_argument("--smoke", action="store_true", help="CPU + interpreter dry run of the script")
    args = ap.parse_args(argv)
    shapes, ts = SHAPES, TS
    if args.smoke:
        shapes, ts, args.shapes = SMOKE, SMOKE_TS, "tiny"
        time_fn = functools.partial(bench_us, warmup=1, rep=5)
        dev, copy_bw = torch.device("cpu"), None
    elif not torch.cuda.is_available():
        print("bench_topk_sum needs a CUDA GPU (or --smoke)")
        return 1
    else:
        time_fn = functools.partial(graph_us, tries=2)
        dev, copy_bw = torch.device("cuda"), measure_copy_bandwidth()
    if args.ts:
        ts = tuple(int(t) for t in args.ts.split(","))
    unknown = [s for s in args.shapes.split(",") if s not in shapes]
    if unknown:
        raise ValueError(f"--shapes: unknown {unknown}; allowed: {', '.join(shapes)}")
    torch.manual_seed(0)
    deadline = time.time() + args.budget_s
    rows = []
    for name in args.shapes.split(","):
        sh = shapes[name]
        for T in ts:
            if time.time() > deadline:
                rows.append(dict(shape=name, T=T, skipped="time budget"))
                continue
            r = measure(sh["L"], sh["D"], sh["I"], sh["K"], T, dev, time_fn, args.band)
            rows.append(dict(shape=name, L=sh["L"], D=sh["D"], I=sh["I"], K=sh["K"], **r))
            print({k: rows[-1][k] for k in COLUMNS}, flush=True)
    print_table("fused vs unfused top-k sum (bf16; us per call, graph replay)", rows, COLUMNS)
    write_results(
        "topk_sum",
        dict(
            timing="CUDA-graph replay medians (triton do_bench), best of 2"
            if not args.smoke
            else "CPU smoke",
            target=f"fused >= {TARGET:.0%} faster than unfused at K = 8, T >= 512",
            bound="(sum_us + store_us) / unfused_us: the most of the unfused time a fused sum can remove",
            copy_bytes_per_s=copy_bw,
            smoke=args.smoke,
            rows=rows,
        ),
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
