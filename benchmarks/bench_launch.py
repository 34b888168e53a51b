"""Host cost of launching the project's kernels: `kernels.launch.FastLaunch` against Triton's JIT path.

    python benchmarks/bench_launch.py [--out-dir DIR]

Each case runs twice in one process: with every launcher's direct path (the default) and with all
of them forced onto `kernel[grid](...)` (Triton's JIT path: binding, specialisation, cache key per
call). Per case: `loop_*_us`, the wall time per call of 2000 back-to-back eager calls (the host's
cost per call where it exceeds the GPU's time, as in an eager decode step), and `eager_*_us`, the
do_bench median (an L2 flush before each call, which hides host time up to its own length).
Baseline in the same run: cuBLAS `torch.mm(x, w.t(), out_dtype=torch.float32)` at the router's
shapes, whose launch goes through torch's C++ dispatcher. Every case also compares the two paths'
outputs: bit-identical, except where the kernel reduces with fp32 atomics (the router GEMM's
split-K), whose sum order varies from run to run; there the same path run twice is the yardstick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_us, loop_us, print_table, write_results  # noqa: E402
from ep_runtime.kernels import fused_moe, launch, masked_grouped_gemm, quant, router_gemm, select_experts  # noqa: E402

MODULES = (router_gemm, select_experts, quant, masked_grouped_gemm, fused_moe)


def _launchers() -> list[launch.FastLaunch]:
    return [v for m in MODULES for v in vars(m).values() if isinstance(v, launch.FastLaunch)]


_DEFAULT = {id(fl): fl.enabled for fl in _launchers()}


def _set_direct(on: bool) -> None:
    """Direct launches where the launcher allows them (`on`), or Triton's JIT path everywhere."""
    for fl in _launchers():
        fl.enabled = on and _DEFAULT[id(fl)]


def _cases(dev: torch.device) -> dict[str, object]:
    cases = {}
    w = (torch.randn(256, 7168, device=dev) * 0.02).to(torch.bfloat16)
    for T in (1, 8, 64):
        x = torch.randn(T, 7168, device=dev).to(torch.bfloat16)
        cases[f"router_gemm D7168 E256 T={T}"] = lambda x=x: router_gemm.router_gemm(x, w)
        cases[f"cuBLAS mm D7168 E256 T={T}"] = lambda x=x: router_gemm.router_gemm(x, w, impl="cublas")
        logits = torch.randn(T, 256, device=dev)
        bias = torch.randn(256, device=dev) * 0.1
        cases[f"select_experts DeepSeek-V3 T={T}"] = lambda lg=logits, b=bias: (
            select_experts.select_experts_sigmoid(
                lg, top_k=8, correction_bias=b, n_group=8, topk_group=4, routed_scaling_factor=2.5
            )
        )
    xg = torch.randn(64, 7168, device=dev).to(torch.bfloat16)
    cases["per_token_group_quant_fp8 T=64 D7168"] = lambda: quant.per_token_group_quant_fp8(xg, 128)
    return cases


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        (x.double() - y.double()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b, strict=True)
    )


def _flat(out) -> list[torch.Tensor]:
    return [t.clone() for t in (out if isinstance(out, tuple) else (out,))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_launch needs a CUDA GPU")
    dev = torch.device("cuda")
    rows = []
    try:
        for name, fn in _cases(dev).items():
            row = {"case": name}
            outs = {}
            # the two paths alternate, three rounds, best of each: the GPU machine's host is noisy
            for _ in range(3):
                for direct in (False, True):
                    _set_direct(direct)
                    tag = "fast" if direct else "jit"
                    outs.setdefault(tag, []).append(_flat(fn()))
                    row[f"loop_{tag}_us"] = min(row.get(f"loop_{tag}_us", float("inf")), loop_us(fn, tries=2))
                    row[f"eager_{tag}_us"] = min(row.get(f"eager_{tag}_us", float("inf")), bench_us(fn))
            row["identical"] = all(
                torch.equal(a, b) for a, b in zip(outs["jit"][0], outs["fast"][0], strict=True)
            )
            row["max_abs_diff"] = _diff(outs["jit"][0], outs["fast"][0])
            # kernels that reduce with fp32 atomics (the router's split-K) sum in arrival order:
            # the same path run twice differs by as much
            row["jit_rerun_max_abs_diff"] = _diff(outs["jit"][0], outs["jit"][1])
            row["host_saved_us"] = row["loop_jit_us"] - row["loop_fast_us"]
            rows.append(row)
            print(row, flush=True)
    finally:
        _set_direct(True)
    cols = [
        "case",
        "loop_jit_us",
        "loop_fast_us",
        "host_saved_us",
        "eager_jit_us",
        "eager_fast_us",
        "identical",
    ]
    print_table(f"kernel launch cost on {torch.cuda.get_device_name(0)}", rows, cols)
    write_results(
        "launch",
        {
            "rows": rows,
            "timing": "loop_*_us: wall time per call of 2000 back-to-back eager calls (no flush), best of 3; "
            "eager_*_us: triton do_bench median (L2 flush before each call); jit = kernel[grid](...) for every "
            "project kernel, fast = kernels.launch.FastLaunch's direct path",
        },
        Path(args.out_dir) if args.out_dir else None,
    )


if __name__ == "__main__":
    main()
