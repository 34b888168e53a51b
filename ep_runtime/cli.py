"""`ep-launch`: validate and explain dispatch-mode files, run the EP MoE job, run benchmarks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ep_runtime import __version__
from ep_runtime.config import ConfigError, RuntimePlan, human_bytes, load_config, resolve_plan


def _load_plan(path: str) -> RuntimePlan:
    return resolve_plan(load_config(path))


def cmd_check(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            plan = _load_plan(path)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            status = 1
            continue
        modes = ", ".join(f"{m.layout.value}={m.precision.value}" for m in plan.modes.values())
        print(
            f"{path}: ok (ep_size {plan.ep_size}, {plan.num_local_experts} local experts, backend {plan.config.dispatch.backend}, {modes})"
        )
    return status


_EXPERT_KERNEL = {
    ("triton", True): "triton fused MoE",
    ("triton", False): "triton masked grouped GEMM",
    ("torch", True): "torch per-expert GEMMs",
    ("torch", False): "torch batched GEMMs (masked)",
}


def explain_rows(plan: RuntimePlan) -> list[dict[str, str]]:
    """One row per dispatch mode of the plan: what runs and which rule decided the precision."""
    rows = []
    for mp in plan.modes.values():
        rows.append(
            {
                "mode": mp.layout.value,
                "backend": mp.backend,
                "precision": mp.precision.value,
                "layout": "[N_recv, D]" if mp.capacity is None else f"[L, C*R, D], C={mp.capacity}",
                "experts": _EXPERT_KERNEL[(plan.experts_impl, mp.capacity is None)],
                "nvl buffer": human_bytes(mp.num_nvl_bytes),
                "rdma buffer": human_bytes(mp.num_rdma_bytes),
                "rule": mp.precision_rule,
                "source": mp.precision_source,
            }
        )
    return rows


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        plan = _load_plan(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    from rich.console import Console
    from rich.table import Table

    cfg = plan.config
    m = cfg.model
    console = Console(width=max(150, Console().width))
    console.print(
        f"[bold]{args.file}[/bold]: model {m.name} (D {m.hidden_size}, E {m.num_experts}, K {m.top_k}, "
        f"I {m.moe_intermediate_size}, weights {m.weights}, scoring {m.scoring})"
    )
    console.print(
        f"ranks {plan.ep_size} ({cfg.parallel.nodes} node(s) x {cfg.parallel.resolved_ranks_per_node}), "
        f"{plan.num_local_experts} local experts per rank, device {plan.device}, dist backend {plan.dist_backend}, "
        f"dispatch mode {plan.mode}"
        + (
            f" (normal when a step carries prefill or > {plan.normal_above_tokens} tokens on a rank)"
            if plan.mode == "auto"
            else ""
        )
    )
    table = Table(title="Resolved plan per dispatch mode")
    rows = explain_rows(plan)
    for col in rows[0]:
        if col not in ("rule", "source"):
            table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(*(v for k, v in r.items() if k not in ("rule", "source")))
    console.print(table)
    for r in rows:
        console.print(f"precision ({r['mode']}, {r['source']}): {r['rule']}", soft_wrap=True)
    console.print(
        f"kernels: experts {plan.experts_impl}, router GEMM {plan.router_gemm}, fused top-k sum "
        f"{'on' if plan.fused_topk_sum else 'off'} (kernels.fused_topk_sum={cfg.kernels.fused_topk_sum}, K={m.top_k})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ep-launch",
        description="Expert-parallel MoE runtime: launch ranks, dispatch with DeepEP, compute experts with Triton.",
    )
    parser.add_argument("--version", action="version", version=f"ep-launch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("check", help="validate dispatch-mode files (exit 1 listing every error)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "explain", help="print the resolved plan per dispatch mode and the rule behind each precision"
    )
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


def repo_root() -> Path:
    """The checkout this package runs from (its deploy/ folder holds the example configs)."""
    return Path(__file__).resolve().parent.parent


if __name__ == "__main__":
    sys.exit(main())
