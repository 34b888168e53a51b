"""Expert selection after the router GEMM: the one-kernel sigmoid path against the torch path.

    python benchmarks/bench_router_topk.py [--out-dir DIR] [--smoke]

Routings: DeepSeek-V3 (E 256 in 8 groups, best 4 groups, K 8, correction bias, scaling 2.5) and a
plain sigmoid top-8 of 128. T in 1..8192. Baseline: the torch path (`router.select_experts`,
`impl="torch"`), measured in the same run, eager (do_bench median) and per call under CUDA-graph
replay (what a graph-captured decode step pays). Roofline: the logits read and the ids and weights
written, over the copy bandwidth measured in the same run. Every point also checks that both paths
chose the same experts (exactly) and agree on the weights. The result chose `kernels.router_topk`'s
default (`auto`: the kernel where it serves the model).

--smoke: CPU under TRITON_INTERPRET=1, small T, no graphs: checks the script, not speed (nor exact
selection: the interpreter's exp is numpy's, not torch's).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_us, graph_us, measure_copy_bandwidth, print_table, write_results  # noqa: E402
from ep_runtime.config import ModelConfig  # noqa: E402
from ep_runtime.router import select_experts  # noqa: E402

ROUTINGS = {
    "DeepSeek-V3": dict(num_experts=256, top_k=8, n_group=8, topk_group=4, use_correction_bias=True,
                        routed_scaling_factor=2.5),
    "sigmoid-E128-K8": dict(num_experts=128, top_k=8),
}  # fmt: skip
T_VALUES = [1, 16, 64, 128, 512, 4096, 8192]


def _point(name: str, m: ModelConfig, T: int, dev: torch.device, bw: float, graphs: bool, timer) -> dict:
    logits = torch.randn(T, m.num_experts, device=dev) * 2
    bias = torch.randn(m.num_experts, device=dev) * 0.1 if m.use_correction_bias else None
    ids, w = select_experts(logits, m, bias, impl="triton")
    tids, tw = select_experts(logits, m, bias, impl="torch")
    row = dict(routing=name, E=m.num_experts, K=m.top_k, T=T)
    row["rows_differing"] = int((ids != tids).any(dim=1).sum())
    row["same_experts"] = row["rows_differing"] == 0
    row["max_weight_diff"] = float((w - tw).abs().max())
    row["torch_us"] = timer(lambda: select_experts(logits, m, bias, impl="torch"))
    row["triton_us"] = timer(lambda: select_experts(logits, m, bias, impl="triton"))
    row["speedup"] = row["torch_us"] / row["triton_us"]
    if graphs:
        row["graph_torch_us"] = graph_us(lambda: select_experts(logits, m, bias, impl="torch"), replays=20)
        row["graph_triton_us"] = graph_us(lambda: select_experts(logits, m, bias, impl="triton"), replays=20)
        row["graph_speedup"] = row["graph_torch_us"] / row["graph_triton_us"]
    nbytes = T * m.num_experts * 4 + T * m.top_k * (8 + 4)
    row["roofline_us"] = nbytes / bw * 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="CPU + interpreter dry run of the script")
    args = ap.parse_args()
    graphs = not args.smoke
    if args.smoke:
        dev, bw, t_values = torch.device("cpu"), 1e11, [1, 20]
        timer = functools.partial(bench_us, warmup=1, rep=10)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_router_topk needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
        dev, t_values, timer = torch.device("cuda"), T_VALUES, bench_us
        bw = measure_copy_bandwidth()
    rows = []
    for name, kw in ROUTINGS.items():
        m = ModelConfig(hidden_size=7168, moe_intermediate_size=2048, scoring="sigmoid", **kw)
        for T in t_values:
            try:
                rows.append(_point(name, m, T, dev, bw, graphs, timer))
            except Exception as exc:  # record and go on: one bad point must not lose the rest
                print(f"{name} T={T}: FAILED {type(exc).__name__}: {exc}"[:300])
                rows.append(dict(routing=name, T=T, error=f"{type(exc).__name__}: {exc}"[:300]))
    ok = [r for r in rows if "error" not in r]
    cols = ["routing", "T", "torch_us", "triton_us", "speedup"]
    cols += ["graph_torch_us", "graph_triton_us", "graph_speedup"] if graphs else []
    cols += ["roofline_us", "same_experts", "max_weight_diff"]
    print_table(f"expert selection on {dev}", ok, cols)
    payload = {
        "copy_bandwidth_Bps": bw,
        "rows": rows,
        "smoke": args.smoke,
        "timing": "*_us: eager calls, do_bench median; graph_*_us: per call, CUDA-graph replay of 20 "
        "back-to-back calls; baseline: the torch path in the same run",
    }
    write_results("router_topk", payload, args.out_dir)
    # On the GPU both paths compute the same scores, so any difference is a bug. Under the
    # interpreter the kernel's exp is numpy's, which may split a near-tie differently.
    if not args.smoke and not all(r["same_experts"] for r in ok):
        sys.exit("the two paths chose different experts (see rows_differing)")


if __name__ == "__main__":
    main()
