"""Where a call's time goes: the GPU time of each kernel of one expert-MLP call, and the idle gaps
between them, when the call is replayed from a CUDA graph (as the runtime's decode step runs it).

    python benchmarks/bench_breakdown.py [--cases NAME,...] [--replays 20] [--out-dir DIR]

The per-row tables of `bench_fused_moe.py` and `bench_masked_gemm.py` give one time per call; where a
call misses its roofline they cannot say whether the weight-streaming GEMMs are slow or the call is
made of too many short launches (each a launch, a ramp-up and a tail, serialised by the graph). This
benchmark answers that: for each case it captures one call in a CUDA graph, replays it under the
torch profiler (CUPTI kernel records), and reports per kernel of the call its median duration, the
median idle gap before it, and per call the span (first kernel start to last kernel end), the sum of
the kernels, the sum of the gaps, and the graph-replay time of the same call from `do_bench`.
Beside them: the roofline of the call (weight bytes touched over the device-to-device copy
bandwidth measured in the same run), the call's fraction of it, and the same fraction for the
weight-streaming GEMM kernels' time alone (`GEMM_KERNELS`): where that is near 1 and the call's is
not, the gap is launches and the small kernels around the GEMMs, not the GEMMs.

Cases (`--cases`, default all): `fused-<shape>-T<T>-<scheme>` (the normal layout, `fused_moe` with
the shipped tables) and `masked-<model>-r<rows>-<scheme>` (the low-latency layout, `masked_moe`,
capacity 1024 rows per expert, `rows` valid rows in every local expert).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import capture_graph, graph_us, measure_copy_bandwidth, print_table, write_results  # noqa: E402

GPU_CATEGORIES = ("kernel", "gpu_memset", "gpu_memcpy")

CASES = (
    "fused-qwen3_30b-T1-bf16",
    "fused-qwen3_30b-T8-bf16",
    "fused-qwen3_30b-T1-fp8_block",
    "fused-dsv3_e128-T1-bf16",
    "masked-qwen3-r1-bf16",
    "masked-qwen3-r1-fp8_block",
    "masked-qwen3-r1-w4a8",
    "masked-qwen3-r8-w4a8",
    "masked-dsv3-r1-w4a8",
    "masked-dsv3-r32-w4a8",
)
CAPACITY = 1024
GEMM_KERNELS = ("_fused_moe_gemm_kernel", "_masked_gemm_kernel", "_masked_w4a8_kernel", "_masked_mlp_kernel")
"""The kernels that stream the expert weights (every other kernel of a call is overhead around them)."""


# --------------------------------------------------------------------------------------------------
# Trace parsing (plain data: unit-tested on CPU)
# --------------------------------------------------------------------------------------------------


def gpu_events(trace: dict[str, Any]) -> list[tuple[str, float, float]]:
    """`(name, start us, duration us)` of the GPU activities (kernels, memsets, copies) of a Chrome
    trace as `torch.profiler` exports it, sorted by start."""
    out = [
        (str(e.get("name", "?")), float(e["ts"]), float(e.get("dur", 0.0)))
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES
    ]
    return sorted(out, key=lambda e: e[1])


def short_name(name: str) -> str:
    """A kernel's name without template arguments, parameter lists and namespaces (Triton kernels
    keep their Python names)."""
    base = re.sub(r"<.*", "", name)
    base = re.sub(r"\(.*", "", base)
    base = base.replace("void ", "").strip()
    return base.split("::")[-1] or name[:40]


def breakdown(events: list[tuple[str, float, float]], calls: int) -> dict[str, Any]:
    """Per-kernel medians over `calls` replays of one graph whose events are `events` (sorted).

    Every replay runs the same kernels in the same order, so the events split into `calls` equal
    runs of n = len(events) / calls; a count that does not divide, or a run whose kernel names
    differ from the first run's, is an error (the trace is not what was replayed). Returns
    `{"kernels": [{"kernel", "us", "gap_before_us"}], "span_us", "kernels_us", "gaps_us"}`: medians
    over the replays (gap_before_us of the first kernel is 0: the gap between replays is the
    graph launch, not part of the call)."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    if not events or len(events) % calls:
        raise ValueError(f"{len(events)} GPU events do not split into {calls} equal replays")
    n = len(events) // calls
    runs = [events[i * n : (i + 1) * n] for i in range(calls)]
    names = [short_name(e[0]) for e in runs[0]]
    for i, run in enumerate(runs[1:], start=1):
        got = [short_name(e[0]) for e in run]
        if got != names:
            raise ValueError(f"replay {i} ran {got}, replay 0 ran {names}")
    kernels = []
    for j, name in enumerate(names):
        durs = [run[j][2] for run in runs]
        gaps = [0.0 if j == 0 else run[j][1] - (run[j - 1][1] + run[j - 1][2]) for run in runs]
        kernels.append(dict(kernel=name, us=statistics.median(durs), gap_before_us=statistics.median(gaps)))
    spans = [run[-1][1] + run[-1][2] - run[0][1] for run in runs]
    busy = [sum(e[2] for e in run) for run in runs]
    return dict(
        kernels=kernels,
        span_us=statistics.median(spans),
        kernels_us=statistics.median(busy),
        gaps_us=statistics.median(s - b for s, b in zip(spans, busy, strict=True)),
    )


def profile_calls(fn, replays: int, graph: bool = True) -> dict[str, Any]:
    """`breakdown` of `replays` calls of `fn` under the profiler: replays of one CUDA graph holding a
    call (graph=True), or eager calls (their gaps then include the host's launch time)."""
    from torch.profiler import ProfilerActivity, profile

    run = fn
    if graph:
        g, _ = capture_graph(fn)
        run = g.replay
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return breakdown(gpu_events(trace), replays)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def parse_case(name: str) -> dict[str, Any]:
    """`fused-<shape>-T<T>-<scheme>` / `masked-<model>-r<rows>-<scheme>` -> its fields; a clear error
    naming the allowed forms otherwise."""
    from benchmarks.bench_fused_moe import SHAPES

    m = re.fullmatch(r"(fused|masked)-(\w+)-([Tr])(\d+)-(bf16|fp8_block|w4a8)", name)
    models = {"dsv3": "DeepSeek-V3", "qwen3": "Qwen3-30B-A3B", "mixtral": "Mixtral-8x7B"}
    if m is None or (m[1] == "fused") != (m[3] == "T"):
        raise ValueError(
            f"case {name!r}: expected fused-<shape>-T<tokens>-<scheme> or masked-<model>-r<rows>-<scheme>, "
            "scheme bf16|fp8_block|w4a8"
        )
    if m[1] == "fused" and m[2] not in SHAPES:
        raise ValueError(f"case {name!r}: shape must be one of {sorted(SHAPES)}")
    if m[1] == "masked" and m[2] not in models:
        raise ValueError(f"case {name!r}: model must be one of {sorted(models)}")
    return dict(layout=m[1], shape=m[2] if m[1] == "fused" else models[m[2]], n=int(m[4]), scheme=m[5])


def fused_case(shape: str, T: int, scheme: str, dev) -> tuple[Any, int]:
    """(call, weight bytes touched) of a `fused_moe` case (fp8_block: x quantised per token group
    beforehand, as DeepEP's FP8 dispatch delivers it)."""
    from benchmarks.bench_fused_moe import (
        SHAPES,
        bytes_per_expert,
        make_bf16_weights,
        quantize_per_expert,
        routing,
    )
    from ep_runtime.kernels import fused_moe as fm
    from ep_runtime.kernels.quant import per_token_group_quant_fp8, quantize_fp8_block, quantize_w4a8

    sh = SHAPES[shape]
    L, D, inter, K = sh["L"], sh["D"], sh["I"], sh["K"]
    w13, w2 = make_bf16_weights(L, D, inter, dev)
    s13 = s2 = None
    if scheme != "bf16":
        quant = quantize_fp8_block if scheme == "fp8_block" else quantize_w4a8
        (w13, s13), (w2, s2) = quantize_per_expert(quant, w13), quantize_per_expert(quant, w2)
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    xs = None
    if scheme == "fp8_block":
        x, xs = per_token_group_quant_fp8(x)
    ids, w = routing(T, K, L, dev)
    touched_experts = int(torch.unique(ids).numel())
    touched = touched_experts * bytes_per_expert(D, inter, scheme)

    def call():
        return fm.fused_moe(x, w13, w2, ids, w, scheme=scheme, x_scale=xs, w13_scale=s13, w2_scale=s2)

    return call, touched


def masked_case(model: str, rows: int, scheme: str, dev) -> tuple[Any, int]:
    """(call, weight bytes touched) of a `masked_moe` case: `rows` valid rows in every local expert
    (fp8_block: fp8 x with column-major group scales, as DeepEP's low-latency FP8 dispatch)."""
    from benchmarks.bench_masked_gemm import MODELS, make_input, make_weights, run_moe, weight_bytes

    L, D, inter = next((m[1], m[2], m[3]) for m in MODELS if m[0] == model)
    w = make_weights(L, D, inter, scheme, dev)
    x, xs = make_input(L, CAPACITY, D, scheme, dev)
    counts = torch.full((L,), rows, dtype=torch.int32, device=dev)
    return (lambda: run_moe(x, xs, counts, w)), weight_bytes(w)


def run_case(name: str, replays: int, copy_bw: float, dev) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    spec = parse_case(name)
    make = fused_case if spec["layout"] == "fused" else masked_case
    call, touched = make(spec["shape"], spec["n"], spec["scheme"], dev)
    t_graph = graph_us(call, tries=3)
    mode = "graph"
    try:
        b = profile_calls(call, replays)
    except ValueError as exc:  # a profiler that records no kernels inside graphs: eager calls instead
        print(f"{name}: graph replays gave no usable kernel records ({exc}); profiling eager calls")
        b, mode = profile_calls(call, replays, graph=False), "eager"
    roofline = touched / copy_bw * 1e6
    summary = dict(
        case=name,
        profiled=mode,
        graph_us=round(t_graph, 2),
        span_us=round(b["span_us"], 2),
        kernels_us=round(b["kernels_us"], 2),
        gaps_us=round(b["gaps_us"], 2),
        launches=len(b["kernels"]),
        roofline_us=round(roofline, 2),
        frac_copy_bw=round(roofline / t_graph, 3),
    )
    gemms_us = sum(k["us"] for k in b["kernels"] if k["kernel"] in GEMM_KERNELS)
    summary["gemms_us"] = round(gemms_us, 2)
    summary["gemms_frac_copy_bw"] = round(roofline / gemms_us, 3) if gemms_us > 0 else None
    kernel_rows = [
        dict(case=name, i=i, kernel=k["kernel"], us=round(k["us"], 2), gap_before_us=round(k["gap_before_us"], 2),
             share=round(k["us"] / b["span_us"], 3) if b["span_us"] else None)
        for i, k in enumerate(b["kernels"])
    ]  # fmt: skip
    return summary, kernel_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (see the module doc)")
    ap.add_argument("--replays", type=int, default=20, help="graph replays profiled per case")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        try:
            parse_case(c)  # bad names fail before any GPU work
        except ValueError as exc:
            ap.error(f"--cases: {exc}")
    if args.replays < 1:
        ap.error(f"--replays must be >= 1, got {args.replays}")
    if not torch.cuda.is_available():
        print(
            "bench_breakdown needs a CUDA GPU (the trace parsing is tested on CPU: tests/unit/test_breakdown.py)"
        )
        return 1
    torch.manual_seed(0)
    dev = torch.device("cuda")
    copy_bw = measure_copy_bandwidth()
    print(f"copy {copy_bw / 1e12:.2f} TB/s")
    summaries, kernel_rows, errors = [], [], {}
    for name in cases:
        try:
            s, k = run_case(name, args.replays, copy_bw, dev)
        except Exception as exc:  # one failing case does not lose the others' rows
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: {errors[name]}")
            continue
        summaries.append(s)
        kernel_rows.extend(k)
        torch.cuda.empty_cache()
    print_table("Per call (us; graph = do_bench of one graph replay)", summaries)
    print_table("Per kernel (us, medians over the replays)", kernel_rows)
    write_results(
        "breakdown",
        dict(
            copy_bytes_per_s=copy_bw,
            replays=args.replays,
            capacity=CAPACITY,
            timing="kernel durations and gaps: CUPTI records of graph replays (torch.profiler); graph_us: "
            "do_bench median of one replay",
            calls=summaries,
            kernels=kernel_rows,
            errors=errors,
        ),
        args.out_dir,
    )
    return 1 if errors and not summaries else 0


if __name__ == "__main__":
    raise SystemExit(main())
