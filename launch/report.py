"""The job's summary (per phase: latency, throughput, stage breakdown, load, error), the JSON report
and the live progress display, shared by the Ray and MPI launchers."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

from ep_runtime import __version__
from ep_runtime.config import RuntimePlan


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (`q` in [0, 100]) of a non-empty list."""
    s = sorted(values)
    idx = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[idx]


def summarize(results: list[dict[str, Any]], plan: RuntimePlan) -> dict[str, Any]:
    """Aggregate the ranks' results.

    Per phase: a step's latency is its slowest rank's; tokens/s is all ranks' tokens over the
    median step latency; stage times are means over ranks and steps; load imbalance is max/mean
    (token, expert) pairs received per rank, averaged over steps; errors are the worst rank's.
    """
    phases: dict[str, Any] = {}
    names = [n for n in ("prefill", "decode") if any(n in r["phases"] for r in results)]
    for name in names:
        per_rank = [r["phases"][name] for r in results]
        steps = per_rank[0]["steps"]
        step_ms = [max(p["step_ms"][i] for p in per_rank) for i in range(steps)]
        tokens = per_rank[0]["tokens_per_rank"]
        p50 = _percentile(step_ms, 50)
        stage_ms: dict[str, float] = {}
        n = 0
        imbalance = []
        layouts = set()
        rounds = 1
        for p in per_rank:
            for tel in p["telemetry"]:
                n += 1
                for k, v in (tel.get("stage_ms") or {}).items():
                    stage_ms[k] = stage_ms.get(k, 0.0) + v
                if tel.get("imbalance_ranks") is not None:
                    imbalance.append(tel["imbalance_ranks"])
                elif tel.get("imbalance_local") is not None:
                    imbalance.append(tel["imbalance_local"])
                if tel.get("layout"):
                    layouts.add(tel["layout"])
                rounds = max(rounds, int(tel.get("num_rounds") or 1))
        phase = {
            "tokens_per_rank": tokens,
            "steps": steps,
            "layout": ",".join(sorted(layouts)) or per_rank[0].get("layout", ""),
            "rounds": rounds,
            "latency_ms_p50": p50,
            "latency_ms_p99": _percentile(step_ms, 99),
            "tokens_per_s": tokens * len(results) / (p50 / 1e3) if p50 > 0 else 0.0,
            "stage_ms": {k: v / max(n, 1) for k, v in stage_ms.items()},
            "load_imbalance": sum(imbalance) / len(imbalance) if imbalance else None,
            "step_ms": step_ms,
        }
        verifs = [r["verify"]["phases"].get(name) for r in results if r.get("verify")]
        verifs = [v for v in verifs if v]
        if verifs:
            phase["max_abs_err"] = max(v["max_abs_err"] for v in verifs)
            phase["max_rel_err"] = max(v["max_rel_err"] for v in verifs)
            phase["tolerance"] = verifs[0]["tolerance"]
            phase["tokens_over_tol"] = sum(v["tokens_over_tol"] for v in verifs)
            phase["precision"] = verifs[0]["precision"]
        phases[name] = phase
    verified = [r["verify"] for r in results if r.get("verify")]
    verification = None
    if verified:
        verification = {
            "passed": all(v["passed"] for v in verified),
            "max_abs_err": max(v["max_abs_err"] for v in verified),
            "max_rel_err": max(v["max_rel_err"] for v in verified),
            "tokens_over_tol": sum(v["tokens_over_tol"] for v in verified),
            "tokens": sum(v["tokens"] for v in verified),
            "failed_ranks": [r["rank"] for r in results if r.get("verify") and not r["verify"]["passed"]],
        }
    return {
        "phases": phases,
        "verification": verification,
        "setup_s": max(r["setup_s"] for r in results),
        "nodes": sorted({r["node"] for r in results}),
    }


def print_summary(
    summary: dict[str, Any], plan: RuntimePlan, *, launcher: str, wall_s: float, console=None
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg = plan.config
    m = cfg.model
    console.print(
        f"[bold]ep-launch run[/bold] ({launcher}): model {m.name} (D {m.hidden_size}, E {m.num_experts}, "
        f"K {m.top_k}, I {m.moe_intermediate_size}, weights {m.weights}), {plan.ep_size} ranks on "
        f"{len(summary['nodes'])} node(s), device {plan.device}, backend {cfg.dispatch.backend}, "
        f"mode {plan.mode}, {cfg.workload.num_layers} layer(s)",
        soft_wrap=True,
    )
    stages = sorted({k for p in summary["phases"].values() for k in p["stage_ms"]})
    order = ["mode", "router", "dispatch", "experts", "combine"]
    stages = [s for s in order if s in stages] + [s for s in stages if s not in order]
    table = Table(
        title="Per phase: step latency = slowest rank; stage columns = mean ms per step and rank",
        caption="imbalance: max/mean (token, expert) pairs per rank; err: max |out-ref| / max |ref| (tolerance)",
    )
    for col in ("phase", "layout", "tok/rank", "steps", "p50 ms", "p99 ms", "tok/s"):
        table.add_column(col, justify="left" if col in ("phase", "layout") else "right", no_wrap=True)
    for s in stages:
        table.add_column(s, justify="right", no_wrap=True)
    table.add_column("imbalance", justify="right", no_wrap=True)
    table.add_column("err (tol)", justify="right", no_wrap=True)
    for name, p in summary["phases"].items():
        err = "-"
        if "max_rel_err" in p:
            ok = p["tokens_over_tol"] == 0
            err = f"{p['max_rel_err']:.1e} ({p['tolerance']:.0e}){'' if ok else ' FAIL'}"
        table.add_row(
            name,
            p["layout"] + (f" x{p['rounds']}" if p["rounds"] > 1 else ""),
            str(p["tokens_per_rank"]),
            str(p["steps"]),
            f"{p['latency_ms_p50']:.2f}",
            f"{p['latency_ms_p99']:.2f}",
            f"{p['tokens_per_s']:,.0f}",
            *(f"{p['stage_ms'].get(s, 0.0):.2f}" for s in stages),
            "-" if p["load_imbalance"] is None else f"{p['load_imbalance']:.2f}",
            err,
        )
    console.print(table)
    v = summary["verification"]
    if v is None:
        console.print(f"verification: off. setup {summary['setup_s']:.1f} s, wall {wall_s:.1f} s")
    else:
        verdict = "[bold green]PASSED[/bold green]" if v["passed"] else "[bold red]FAILED[/bold red]"
        console.print(
            f"verification vs float32 reference: {verdict} (max abs err {v['max_abs_err']:.3e}, max rel err "
            f"{v['max_rel_err']:.3e}, {v['tokens_over_tol']}/{v['tokens']} token-layers over tolerance"
            + (f", failed ranks {v['failed_ranks']}" if v["failed_ranks"] else "")
            + f"). setup {summary['setup_s']:.1f} s, wall {wall_s:.1f} s",
            soft_wrap=True,
        )


def write_report(
    path: str | Path,
    *,
    plan: RuntimePlan,
    summary: dict[str, Any],
    results: list[dict[str, Any]],
    launcher: str,
    wall_s: float,
    config_path: str | None,
) -> None:
    """The JSON report: the config, the summary and every rank's raw result."""
    doc = {
        "ep_runtime_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "launcher": launcher,
        "host": platform.node(),
        "config_path": config_path,
        "config": plan.config.model_dump(mode="json"),
        "wall_s": wall_s,
        "summary": summary,
        "ranks": results,
    }
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2, default=str) + "\n")


class RankProgress:
    """A `rich` progress display: one line per rank with its stage and step (context manager).
    Renders nothing when the console is not a terminal (logs stay clean)."""

    def __init__(self, world_size: int, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
            disable=not self.enabled,
        )
        self.tasks = [self.progress.add_task(f"rank {r}: start", total=1) for r in range(world_size)]

    def __enter__(self) -> RankProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, status: dict[int, dict[str, Any]]) -> None:
        for r, snap in status.items():
            if r >= len(self.tasks) or not snap:
                continue
            steps = max(int(snap.get("steps") or 0), 1)
            done = min(int(snap.get("step") or 0), steps)
            node = f" @ {snap['node']}" if snap.get("node") else ""
            self.progress.update(
                self.tasks[r],
                description=f"rank {r}{node}: {snap.get('stage', '?')}",
                total=steps,
                completed=done,
            )
