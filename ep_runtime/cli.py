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
        f"kernels: experts {plan.experts_impl}, router GEMM {plan.router_gemm}, expert selection "
        f"{plan.router_topk}, fused top-k sum "
        f"{'on' if plan.fused_topk_sum else 'off'} (kernels.fused_topk_sum={cfg.kernels.fused_topk_sum}, K={m.top_k})"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# run / worker / bench
# ---------------------------------------------------------------------------------------------

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE, EXIT_LAUNCH_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _run_config(args: argparse.Namespace):
    """The validated file with the CLI overrides applied, and the path it came from."""
    from ep_runtime.config import parse_config
    from ep_runtime.launch.defaults import EMBEDDED_LOCAL_CPU_YAML, default_config_path

    path = args.config
    if path is None:
        found = default_config_path()
        if found is not None:
            path = str(found)
            cfg = load_config(found)
        else:
            import yaml

            path = "<embedded deploy/configs/local-cpu.yaml>"
            cfg = parse_config(yaml.safe_load(EMBEDDED_LOCAL_CPU_YAML), path)
    else:
        cfg = load_config(path)
    if getattr(args, "ranks", None) is not None:
        if args.ranks < 1:
            raise ConfigError([("--ranks", f"must be >= 1 (got {args.ranks})")], path)
        data = cfg.model_dump()
        data["parallel"].update(ep_size=args.ranks, ranks_per_node=None)
        cfg = parse_config(data, f"{path} with --ranks {args.ranks}")
    if getattr(args, "steps", None) is not None and args.steps < 0:
        raise ConfigError([("--steps", f"must be >= 0 (got {args.steps})")], path)
    return cfg, path


def _job_inputs(args: argparse.Namespace):
    """`run` / `worker`: the validated config, its path and the fault spec; raises ConfigError or
    ValueError (usage errors)."""
    from ep_runtime.launch.health import FaultSpec

    cfg, path = _run_config(args)
    return cfg, path, FaultSpec.parse(args.fault) if args.fault else None


def _finish(plan, results, wall_s: float, args: argparse.Namespace, launcher: str, path: str) -> int:
    from rich.console import Console

    from ep_runtime.launch.report import print_summary, summarize, write_report

    summary = summarize(results, plan)
    console = Console(width=max(160, Console().width))
    print_summary(summary, plan, launcher=launcher, wall_s=wall_s, console=console)
    if args.report:
        write_report(
            args.report,
            plan=plan,
            summary=summary,
            results=results,
            launcher=launcher,
            wall_s=wall_s,
            config_path=path,
        )
        console.print(f"report: {args.report}")
    v = summary["verification"]
    return EXIT_VERIFY_FAILED if v is not None and not v["passed"] else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import signal
    import time

    from ep_runtime.launch.health import LaunchError

    try:
        cfg, path, fault = _job_inputs(args)
    except (ConfigError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    from ep_runtime.launch.ray import run_with_ray
    from ep_runtime.launch.report import RankProgress

    plan = resolve_plan(cfg)
    # SIGTERM (e.g. from a job scheduler) tears down like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.perf_counter()
    try:
        with RankProgress(plan.ep_size) as view:
            results = run_with_ray(
                cfg,
                address=args.address,
                fault=fault,
                steps=args.steps,
                verify=False if args.no_verify else None,
                progress=view.update,
            )
    except LaunchError as exc:
        print(f"ep-launch run: {exc}", file=sys.stderr)
        return EXIT_LAUNCH_FAILED
    except KeyboardInterrupt:
        print("ep-launch run: interrupted; actors and the embedded cluster were stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _finish(plan, results, time.perf_counter() - t0, args, "ray", path)


def cmd_worker(args: argparse.Namespace) -> int:
    from ep_runtime.launch.mpi import run_with_mpi

    try:
        cfg, path, fault = _job_inputs(args)
    except (ConfigError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    return run_with_mpi(
        cfg,
        fault=fault,
        steps=args.steps,
        verify=False if args.no_verify else None,
        on_results=lambda plan, results, wall_s: _finish(plan, results, wall_s, args, "mpi", path),
    )


BENCH_SUITES = {
    "kernels": ("kernels", "router_gemm", "router_topk", "fused_moe", "masked_gemm", "launch"),
    "dispatch": ("dispatch",),
    "layer": ("layer",),
}
"""`ep-launch bench NAME` runs `benchmarks/bench_<first>.py` if present, else each of the rest."""


def _benchmarks_dir() -> Path | None:
    for base in (Path.cwd(), repo_root()):
        if (base / "benchmarks").is_dir():
            return base / "benchmarks"
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    bench_dir = _benchmarks_dir()
    if bench_dir is None:
        print("ep-launch bench: no benchmarks/ folder (run from the ep-runtime checkout)", file=sys.stderr)
        return EXIT_USAGE
    names = BENCH_SUITES.get(args.suite, (args.suite,))
    scripts = [bench_dir / f"bench_{n}.py" for n in names]
    scripts = [s for s in scripts if s.is_file()]
    if len(scripts) > 1 and scripts[0].stem == f"bench_{names[0]}":
        scripts = scripts[:1]
    if not scripts:
        wanted = ", ".join(f"bench_{n}.py" for n in names)
        have = ", ".join(sorted(p.name for p in bench_dir.glob("bench_*.py"))) or "none"
        print(
            f"ep-launch bench {args.suite}: {wanted} not found in {bench_dir} (present: {have})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    status = 0
    for script in scripts:
        # An argument list, never a shell string: nothing from the command line reaches a shell.
        cmd = [sys.executable, str(script), *args.bench_args]
        print(f"+ {' '.join(cmd)}", file=sys.stderr)
        rc = subprocess.run(cmd, cwd=bench_dir.parent, check=False).returncode
        status = status or rc
    return status


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="dispatch-mode file (default: deploy/configs/local-cpu.yaml)"
    )
    p.add_argument("--ranks", type=int, metavar="N", help="override parallel.ep_size")
    p.add_argument("--steps", type=int, metavar="S", help="override workload.decode_steps")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the reference")
    # Test-only fault injection: RANK:STAGE[:kill|hang|raise] (see ep_runtime.launch.health).
    p.add_argument("--fault", metavar="SPEC", help=argparse.SUPPRESS)


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

    p = sub.add_parser(
        "run",
        help="run the EP MoE job on Ray (embedded local cluster by default), print a summary",
        description="Start (or join) a Ray cluster, one rank per GPU (per CPU slot on cpu), run "
        "prefill + decode steps through the EP MoE layer, verify against the reference, report.",
    )
    _add_run_args(p)
    p.add_argument(
        "--address",
        metavar="auto|HOST:PORT",
        help="join this Ray cluster (default: RAY_ADDRESS, else embedded)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "worker",
        help="one rank of the job under MPI: mpirun -n N ep-launch worker --config FILE",
    )
    _add_run_args(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("bench", help="run benchmarks/bench_*.py: kernels, dispatch, layer (or a bench name)")
    p.add_argument("suite", metavar="kernels|dispatch|layer")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    p.set_defaults(func=cmd_bench)
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
