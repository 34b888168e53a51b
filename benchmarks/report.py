"""Plots and `docs/performance.md` from the benchmark JSON files in `benchmarks/results/`.

    python benchmarks/report.py                          # latest results -> PNGs + docs/performance.md
    python benchmarks/report.py --results DIR [--results DIR2] --plots-dir OUT --doc OUT/performance.md

Reads every `*.json` written by `benchmarks/common.write_results` (kinds: router_gemm, router_topk,
fused_moe, masked_gemm, dispatch, layer-<backend>, step; `*-cpu-smoke` files only with
`--include-smoke`) and keeps the latest file of each kind and device (one section per device, the
H200 first). Per kind it draws (matplotlib, Agg):
  - latency vs tokens (or rows) per rank with the roofline line (the floor measured in the same run);
  - the achieved fraction of the measured HBM copy bandwidth and of the measured matmul peak;
  - stacked per-stage bars of the layer step (layer, step);
  - for the step: runtime variants vs the floor + raw DeepEP comm, and the ratio against the targets.
Every figure's title names the device, the versions (torch, triton, CUDA), the shapes and the
baselines. A kind whose file lacks a field is skipped with a note (the report never fails on one
file). The markdown gets the latest numbers as tables, the plots, and the exact reproduce commands.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

from ep_runtime.kernels.tables import normalise

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"

REPRODUCE = {
    "router_gemm": "python benchmarks/bench_router_gemm.py --tune   # or: ep-launch bench kernels (1 GPU)",
    "fused_moe": "python benchmarks/bench_fused_moe.py --tune     # or: ep-launch bench kernels (1 GPU)",
    "masked_gemm": "python benchmarks/bench_masked_gemm.py --tune   # or: ep-launch bench kernels (1 GPU)",
    "router_topk": "python benchmarks/bench_router_topk.py          # or: ep-launch bench kernels (1 GPU)",
    "dispatch": "python benchmarks/bench_dispatch.py              # or: ep-launch bench dispatch (2 GPUs)",
    "layer": "python benchmarks/bench_layer.py --backend deepep; python benchmarks/bench_layer.py --backend torch"
    "   # or: ep-launch bench layer (2 GPUs)",
    "step": "python benchmarks/bench_step.py                  # or: ep-launch bench step (all GPUs; --quick)",
    "sustained": "python benchmarks/bench_sustained.py            # (1 GPU)",
    "launch": "python benchmarks/bench_launch.py               # or: ep-launch bench kernels (1 GPU)",
    "topk_sum": "python benchmarks/bench_topk_sum.py             # (1 GPU)",
    "kernel_targets": "bash benchmarks/gpu_session.sh k1-tune           # the kernel benchmarks (1 GPU)",
    "breakdown": "python benchmarks/bench_breakdown.py            # (1 GPU)",
}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _kind(what: str) -> str:
    for k in (
        "router_gemm",
        "router_topk",
        "fused_moe",
        "masked_gemm",
        "dispatch",
        "layer",
        "step",
        "sustained",
    ):
        if what == k or what.startswith(k + "-"):
            return k
    return what


def load_results(dirs: list[Path], include_smoke: bool = False) -> dict[str, dict[str, Any]]:
    """Latest document per `what` (e.g. `layer-deepep`, `step`) and device, keyed
    `<what>@<device>`, each with `_path` set."""
    latest: dict[str, dict[str, Any]] = {}
    for d in dirs:
        for path in sorted(Path(d).glob("*.json")):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(doc, dict) or "what" not in doc:
                continue
            what = str(doc["what"])
            if "smoke" in what and not include_smoke:
                continue
            doc["_path"] = str(path)
            key = f"{what}@{device_name(doc)}"
            old = latest.get(key)
            if old is None or str(doc.get("date", "")) >= str(old.get("date", "")):
                latest[key] = doc
    return latest


def _dev(doc: dict) -> dict:
    return doc.get("device") or doc.get("device_info") or {}


def device_line(doc: dict) -> str:
    d = _dev(doc)
    parts = [str(d.get("device", "unknown device"))]
    if d.get("num_gpus"):
        parts[0] += f" x{d['num_gpus']}" if doc.get("ranks", 1) > 1 else ""
    for k in ("torch", "triton", "cuda"):
        if d.get(k):
            parts.append(f"{k} {d[k]}")
    if "ranks" in doc:
        parts.append(f"EP ranks {doc['ranks']}")
    parts.append(str(doc.get("date", ""))[:10])
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Plot helpers
# ----------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _plt().close(fig)
    return out


def _title(fig, what: str, doc: dict, extra: str) -> None:
    fig.suptitle(f"{what} - {device_line(doc)}\n{extra}", fontsize=9)


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for _, k in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


# ----------------------------------------------------------------------------------------------
# Per kind: figures + markdown section
# ----------------------------------------------------------------------------------------------


class Section:
    def __init__(self, kind: str, doc: dict):
        self.kind = kind
        self.doc = doc
        self.figures: list[Path] = []
        self.md: list[str] = []


def _latency_axes(ax, title: str, xlabel: str = "tokens", legend_size: int = 7) -> None:
    """A latency panel: log-log axes in microseconds, titled, with its legend."""
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="us", title=title)
    ax.legend(fontsize=legend_size)


def _router_gemm(doc: dict, out: Path, suffix: str = "") -> Section:
    s = Section("router_gemm", doc)
    rows = doc["rows"]
    plt = _plt()
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    for j, m in enumerate(models):
        rs = sorted((r for r in rows if r["model"] == m), key=lambda r: r["T"])
        t = [r["T"] for r in rs]
        ax = axes[0][j]
        ax.plot(t, [r.get("auto_us") for r in rs], "o-", label="runtime (auto)")
        ax.plot(t, [r.get("cublas_us") for r in rs], "s--", label="cuBLAS (baseline)")
        ax.plot(t, [r.get("roofline_us") for r in rs], "k:", label="roofline (HBM)")
        _latency_axes(ax, f"{m} D={rs[0]['D']} E={rs[0]['E']}")
        ax = axes[1][j]
        ax.plot(t, [r.get("frac_roofline_auto") for r in rs], "o-", label="fraction of HBM roofline")
        ax.set(xscale="log", xlabel="tokens", ylabel="fraction", ylim=(0, 1.1))
        ax.legend(fontsize=7)
    _title(fig, "router GEMM", doc, "latency vs tokens with the HBM roofline; baseline cuBLAS (same run)")
    s.figures.append(_save(fig, out / f"report-router_gemm{suffix}.png"))
    pick = [r for r in rows if r["model"] == "DeepSeek-V3"] or rows
    s.md.append(
        _table(
            pick,
            [
                ("model", "model"),
                ("T", "T"),
                ("runtime us", "auto_us"),
                ("cuBLAS us", "cublas_us"),
                ("graph us", "graph_auto_us"),
                ("graph cuBLAS us", "graph_cublas_us"),
                ("loop us", "loop_auto_us"),
                ("loop cuBLAS us", "loop_cublas_us"),
                ("roofline us", "roofline_us"),
                ("x cuBLAS", "speedup_auto_vs_cublas"),
                ("frac roofline", "frac_roofline_auto"),
            ],
        )
    )
    s.md.append(
        "\n`runtime`/`cuBLAS`: eager do_bench medians (an L2 flush before each call); `graph`: per call "
        "replayed from a CUDA graph (20 calls per graph); `loop`: wall time per call of back-to-back eager "
        "calls, which is the host's cost where it exceeds the GPU's.\n"
    )
    return s


def _launch(doc: dict, out: Path, suffix: str = "") -> Section:
    s = Section("launch", doc)
    s.md.append(
        _table(
            doc["rows"],
            [
                ("case", "case"),
                ("loop us, JIT path", "loop_jit_us"),
                ("loop us, direct", "loop_fast_us"),
                ("host us saved", "host_saved_us"),
                ("eager us, JIT path", "eager_jit_us"),
                ("eager us, direct", "eager_fast_us"),
                ("same output", "identical"),
                ("max diff", "max_abs_diff"),
                ("max diff, JIT path twice", "jit_rerun_max_abs_diff"),
            ],
        )
    )
    return s


def _router_topk(doc: dict, out: Path, suffix: str = "") -> Section:
    s = Section("router_topk", doc)
    rows = [r for r in doc["rows"] if "error" not in r]
    plt = _plt()
    routings = sorted({r["routing"] for r in rows})
    fig, axes = plt.subplots(1, len(routings), figsize=(4.5 * len(routings), 3.8), squeeze=False)
    for j, name in enumerate(routings):
        rs = sorted((r for r in rows if r["routing"] == name), key=lambda r: r["T"])
        t, ax = [r["T"] for r in rs], axes[0][j]
        for key, style, label in (
            ("graph_triton_us", "o-", "one kernel (graph)"),
            ("graph_torch_us", "s--", "torch path (graph, baseline)"),
            ("triton_us", "o:", "one kernel (eager)"),
            ("torch_us", "s:", "torch path (eager)"),
            ("roofline_us", "k-", "roofline (HBM)"),
        ):
            if any(r.get(key) is not None for r in rs):
                ax.plot(t, [r.get(key) for r in rs], style, label=label)
        _latency_axes(ax, f"{name} E={rs[0]['E']} K={rs[0]['K']}")
    _title(
        fig, "expert selection", doc, "one Triton kernel vs the torch path (same run), with the HBM roofline"
    )
    s.figures.append(_save(fig, out / f"report-router_topk{suffix}.png"))
    s.md.append(
        _table(
            rows,
            [
                ("routing", "routing"),
                ("T", "T"),
                ("kernel us (graph)", "graph_triton_us"),
                ("torch us (graph)", "graph_torch_us"),
                ("x torch (graph)", "graph_speedup"),
                ("kernel us (eager)", "triton_us"),
                ("torch us (eager)", "torch_us"),
                ("roofline us", "roofline_us"),
                ("same experts", "same_experts"),
            ],
        )
    )
    return s


def _down_split(row: dict) -> int | None:
    """The down GEMM's SPLIT_K of a sorted-layout row's config (None for the masked layout)."""
    cfg = row.get("config") or {}
    return None if cfg.get("MASKED") or "down" not in cfg else cfg["down"].get("SPLIT_K", 1)


FP8_TARGET = 1.5
"""fp8_block fused MoE throughput over bf16 asked for at prefill sizes (issue 3)."""


def default_path(r: dict) -> bool:
    """A fused MoE row of the path `fused_moe` takes by default at prefill: the sorted layout with
    the fused top-k sum where K > 2, the unfused one otherwise."""
    return r.get("path", "sorted") == "sorted" and r.get("topk_sum") == (
        "fused" if r.get("K", 0) > 2 else "unfused"
    )


def fp8_vs_bf16(rows: list[dict], min_t: int = 512) -> list[dict]:
    """Per (shape, T >= min_t): the bf16 row of the default path (`default_path`) against the
    fp8_block row; `same_run` says whether both came from one run (a merged results file mixes
    runs: compare ratios across runs with care)."""
    pick: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("T", 0) >= min_t and "us" in r and default_path(r):
            pick[(r["shape"], r["T"])][r.get("scheme")] = r
    out = []
    for (shape, T), by in sorted(pick.items()):
        b, f = by.get("bf16"), by.get("fp8_block")
        if not b or not f:
            continue
        ratio = b["us"] / f["us"]
        out.append(dict(shape=shape, T=T, bf16_us=b["us"], fp8_us=f["us"], ratio=ratio, met=ratio >= FP8_TARGET,
                        bf16_tflops=b.get("tflops"), fp8_tflops=f.get("tflops"), fp8_frac_mm=f.get("frac_mm"),
                        same_run=b.get("run") == f.get("run")))  # fmt: skip
    return out


def _fused_moe(doc: dict, out: Path, suffix: str = "") -> Section:
    s = Section("fused_moe", doc)
    rows = [r for r in doc["rows"] if "us" in r and "scheme" in r]
    ceil = doc.get("ceilings", {})
    plt = _plt()
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.5 * len(shapes), 7), squeeze=False)
    for j, shp in enumerate(shapes):
        rs = [r for r in rows if r["shape"] == shp]
        r0 = rs[0]
        for scheme in sorted({r["scheme"] for r in rs}):
            sub = sorted(
                (r for r in rs if r["scheme"] == scheme and r.get("topk_sum") != "unfused"),
                key=lambda r: r["T"],
            )
            if not sub:
                sub = sorted((r for r in rs if r["scheme"] == scheme), key=lambda r: r["T"])
            t = [r["T"] for r in sub]
            line = axes[0][j].plot(t, [r["us"] for r in sub], "o-", label=f"{scheme}")[0]
            roof = [r["us"] * r["frac_roofline"] if r.get("frac_roofline") else None for r in sub]
            axes[0][j].plot(t, roof, ":", color=line.get_color(), label=f"{scheme} roofline")
            if any(r.get("torch_us") for r in sub):
                axes[0][j].plot(
                    t,
                    [r.get("torch_us") for r in sub],
                    "x--",
                    color=line.get_color(),
                    alpha=0.4,
                    label=f"{scheme} torch (baseline)",
                )
            axes[1][j].plot(
                t, [r.get("frac_copy_bw") for r in sub], "o-", color=line.get_color(), label=f"{scheme} HBM"
            )
            axes[1][j].plot(
                t, [r.get("frac_mm") for r in sub], "s--", color=line.get_color(), label=f"{scheme} matmul"
            )
        _latency_axes(axes[0][j], f"{shp}: L={r0['L']} D={r0['D']} I={r0['I']} K={r0['K']}", legend_size=6)
        axes[1][j].set(xscale="log", xlabel="tokens", ylabel="fraction of peak", ylim=(0, 1.2))
        axes[1][j].legend(fontsize=6)
    bw = ceil.get("copy_bytes_per_s")
    extra = "fused MoE experts: latency vs tokens with roofline; fraction of HBM copy BW and matmul peak"
    if bw:
        extra += f" (HBM {bw / 1e12:.2f} TB/s, bf16 {ceil.get('bf16_flops', 0) / 1e12:.0f} TFLOP/s measured)"
    _title(fig, "fused MoE", doc, extra)
    s.figures.append(_save(fig, out / f"report-fused_moe{suffix}.png"))
    pick = [r for r in rows if r["shape"] == "dsv3_e128" and r.get("topk_sum") != "unfused"] or rows[:20]
    s.md.append(
        _table(
            pick,
            [
                ("shape", "shape"),
                ("scheme", "scheme"),
                ("T", "T"),
                ("us", "us"),
                ("torch us", "torch_us"),
                ("weight GB/s", "weight_GBps"),
                ("frac HBM", "frac_copy_bw"),
                ("TFLOP/s", "tflops"),
                ("frac matmul", "frac_mm"),
                ("frac roofline", "frac_roofline"),
            ],
        )
    )
    ratios = fp8_vs_bf16(rows)
    if ratios:
        s.md.append(
            f"\nPrefill, fp8_block against bf16 (target: fp8 >= {FP8_TARGET}x the bf16 throughput): `fp8 frac "
            "matmul` is the fp8 kernel's rate over the measured fp8 `torch.mm` rate; `same run` says whether "
            "the two rows were timed in one run.\n"
        )
        s.md.append(
            _table(
                ratios,
                [
                    ("shape", "shape"),
                    ("T", "T"),
                    ("bf16 us", "bf16_us"),
                    ("fp8 us", "fp8_us"),
                    ("fp8 / bf16", "ratio"),
                    ("met", "met"),
                    ("bf16 TFLOP/s", "bf16_tflops"),
                    ("fp8 TFLOP/s", "fp8_tflops"),
                    ("fp8 frac matmul", "fp8_frac_mm"),
                    ("same run", "same_run"),
                ],
            )
        )
    decode = sorted(
        (dict(r, split_k=_down_split(r)) for r in rows if r["T"] <= 32),
        key=lambda r: (r["shape"], r["scheme"], r["T"], r.get("path", "")),
    )
    if decode:
        s.md.append(
            "\nDecode (T <= 32), every shape: the sorted layout (`path` sorted, with the tuned block "
            "config) and the masked layout side by side; `frac HBM` is the weight bytes touched over the "
            "measured copy bandwidth. `us` is one call replayed from a graph of its own (each replay also "
            "pays the graph's launch); `step us` is per call of a graph of consecutive calls, each on its "
            "own copy of the weights (a layer each: cold weights, launch shared, as in a captured decode "
            "step). `vs same copy` (where measured): the time of a copy with the same HBM traffic as the "
            "weight bytes touched, from a graph the same way (one copy; per copy of a step of copies), over "
            "ours: the ceiling at this transfer size, launch, ramp and tail included.\n"
        )
        s.md.append(
            _table(
                decode,
                [
                    ("shape", "shape"),
                    ("scheme", "scheme"),
                    ("T", "T"),
                    ("path", "path"),
                    ("top-k sum", "topk_sum"),
                    ("us", "us"),
                    ("frac HBM", "frac_copy_bw"),
                    ("step us", "step_us"),
                    ("frac HBM (step)", "frac_copy_bw_step"),
                    ("vs same copy", "frac_same_copy"),
                    ("vs same copy (step)", "frac_same_copy_step"),
                    ("down SPLIT_K", "split_k"),
                ],
            )
        )
    return s


def _masked_gemm(doc: dict, out: Path, suffix: str = "") -> Section:
    s = Section("masked_gemm", doc)
    rows = doc["rows"]
    plt = _plt()
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    for j, m in enumerate(models):
        rs = [r for r in rows if r["model"] == m]
        for scheme in sorted({r["scheme"] for r in rs}):
            sub = sorted((r for r in rs if r["scheme"] == scheme), key=lambda r: r["rows_per_expert"])
            x = [r["rows_per_expert"] for r in sub]
            line = axes[0][j].plot(x, [r["us"] for r in sub], "o-", label=scheme)[0]
            axes[0][j].plot(x, [r.get("roofline_us") for r in sub], ":", color=line.get_color())
            axes[1][j].plot(x, [r.get("frac_hbm") for r in sub], "o-", color=line.get_color(), label=scheme)
        r0 = rs[0]
        _latency_axes(
            axes[0][j], f"{m}: L={r0['L']} D={r0['D']} I={r0['I']}", "rows per expert", legend_size=6
        )
        axes[1][j].set(xscale="log", xlabel="rows per expert", ylabel="fraction of HBM BW", ylim=(0, 1.2))
        axes[1][j].legend(fontsize=6)
    bw = doc.get("copy_bandwidth_Bps")
    _title(
        fig,
        "masked grouped GEMM (low-latency experts)",
        doc,
        f"latency vs rows per expert, dotted: HBM roofline ({bw / 1e12:.2f} TB/s measured)" if bw else "",
    )
    s.figures.append(_save(fig, out / f"report-masked_gemm{suffix}.png"))
    pick = [r for r in rows if r["model"] == "DeepSeek-V3"] or rows
    s.md.append(
        _table(
            pick,
            [
                ("model", "model"),
                ("scheme", "scheme"),
                ("L", "L"),
                ("rows/expert", "rows_per_expert"),
                ("us", "us"),
                ("eager us", "eager_us"),
                ("roofline us", "roofline_us"),
                ("frac HBM", "frac_hbm"),
                ("torch loop us", "torch_loop_us"),
            ],
        )
    )
    return s


def _dispatch(doc: dict, out: Path, suffix: str = "") -> Section:
    s = Section("dispatch", doc)
    by_rank = doc.get("rows_by_rank") or {}
    rows = by_rank.get("0") or by_rank.get(0) or doc.get("rows") or []
    rows = [r for r in rows if "dispatch_us" in r]
    plt = _plt()
    labels = [f"{r['mode']}\n{r['impl']}\n{r['precision']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 5))
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [r["dispatch_us"] for r in rows], width=0.4, label="dispatch")
    ax.bar([i + 0.2 for i in x], [r.get("combine_us") or 0 for r in rows], width=0.4, label="combine")
    ax.set_xticks(x, labels, fontsize=6)
    ax.set(ylabel="us", yscale="log")
    ax.legend()
    sh = doc.get("shapes", {})
    _title(
        fig,
        "dispatch / combine",
        doc,
        f"D={sh.get('hidden')} K={sh.get('top_k')}, baseline: raw DeepEP in the same run",
    )
    s.figures.append(_save(fig, out / f"report-dispatch{suffix}.png"))
    s.md.append(
        _table(
            rows,
            [
                ("mode", "mode"),
                ("impl", "impl"),
                ("precision", "precision"),
                ("dispatch us", "dispatch_us"),
                ("dispatch GB/s", "dispatch_GBps"),
                ("combine us", "combine_us"),
                ("combine GB/s", "combine_GBps"),
                ("overhead vs raw %", "loop_overhead_pct"),
            ],
        )
    )
    return s


STAGE_COLORS = {
    "mode": "#999999",
    "router": "#8c564b",
    "dispatch": "#1f77b4",
    "experts": "#2ca02c",
    "combine": "#ff7f0e",
    "checks": "#d62728",
    "graph": "#9467bd",
}


def _stacked(ax, labels: list[str], stage_rows: list[dict[str, float]], totals: list[float | None]) -> None:
    stages = [st for st in STAGE_COLORS if any(r.get(st) for r in stage_rows)]
    bottom = [0.0] * len(stage_rows)
    for st in stages:
        vals = [r.get(st, 0.0) for r in stage_rows]
        ax.bar(range(len(vals)), vals, bottom=bottom, color=STAGE_COLORS[st], label=st)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    if any(t is not None for t in totals):
        ax.plot(
            range(len(totals)),
            [t if t is not None else float("nan") for t in totals],
            "k_",
            markersize=20,
            label="step (measured)",
        )
    ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("ms")
    ax.legend(fontsize=6)


def _layer(docs: list[dict], out: Path) -> Section:
    doc = docs[0]
    s = Section("layer", doc)
    rows = [(d["what"], r) for d in docs for r in d.get("rows", []) if r.get("rank") == 0 and "stage_ms" in r]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(rows)), 5))
    labels = [f"{w.removeprefix('layer-')}\n{r['scheme']} {r['phase']}\nT={r['tokens']}" for w, r in rows]
    _stacked(ax, labels, [r["stage_ms"] for _, r in rows], [r.get("step_wall_ms") for _, r in rows])
    sh = doc.get("shape", {})
    _title(
        fig,
        "EPMoE layer step (rank 0)",
        doc,
        f"per-stage times; E={sh.get('num_experts')} (L={sh.get('local_experts')}) D={sh.get('hidden')} "
        f"I={sh.get('inter')} K={sh.get('top_k')}; baseline: stages timed in isolation",
    )
    s.figures.append(_save(fig, out / "report-layer-stages.png"))
    table = []
    for w, r in rows:
        iso = r.get("isolated_ms", {})
        table.append(
            dict(
                backend=w.removeprefix("layer-"),
                **{k: r.get(k) for k in ("scheme", "phase", "tokens", "layout")},
                wall=r.get("step_wall_ms"),
                **{k: r["stage_ms"].get(k) for k in ("router", "dispatch", "experts", "combine")},
                iso=iso.get("sum"),
                rel=r.get("verify", {}).get("rel_err"),
            )
        )
    s.md.append(
        _table(
            table,
            [
                ("backend", "backend"),
                ("weights", "scheme"),
                ("phase", "phase"),
                ("T", "tokens"),
                ("layout", "layout"),
                ("step ms", "wall"),
                ("router", "router"),
                ("dispatch", "dispatch"),
                ("experts", "experts"),
                ("combine", "combine"),
                ("isolated sum", "iso"),
                ("rel err", "rel"),
            ],
        )
    )
    return s


def _step(doc: dict, out: Path, suffix: str = "") -> Section:
    s = Section("step", doc)
    pts = [p for p in doc.get("points", []) if p.get("step_ms") is not None or p.get("comm_ms") is not None]
    sh = doc.get("shape", {})
    ceil = doc.get("ceilings", {})
    shape_txt = (
        f"E={sh.get('num_experts')} (L={sh.get('local_experts')}) D={sh.get('hidden')} I={sh.get('inter')} "
        f"K={sh.get('top_k')} C={sh.get('capacity')}, {doc.get('ranks')} ranks"
    )
    base_txt = "floor: weight bytes/HBM BW vs FLOPs/matmul rate (measured); + raw DeepEP dispatch+combine"
    plt = _plt()
    schemes = sorted({p["scheme"] for p in pts})
    phases = [ph for ph in ("decode", "prefill") if any(p["phase"] == ph for p in pts)]
    if schemes and phases:
        # 1. latency vs tokens per rank, with the floor and floor + raw comm lines
        fig, axes = plt.subplots(
            len(phases), len(schemes), figsize=(6 * len(schemes), 4.5 * len(phases)), squeeze=False
        )
        for i, ph in enumerate(phases):
            for j, sc in enumerate(schemes):
                ax = axes[i][j]
                sub = [p for p in pts if p["phase"] == ph and p["scheme"] == sc]
                tokens = sorted({p["tokens"] for p in sub})
                for impl in sorted(
                    {f"{p['backend']}/{p['variant']}" for p in sub if p["backend"] != "deepep raw"}
                ):
                    ys = []
                    for t in tokens:
                        m = [p for p in sub if p["tokens"] == t and f"{p['backend']}/{p['variant']}" == impl]
                        ys.append(m[0].get("step_ms") if m else None)
                    ys = [y if y is not None else float("nan") for y in ys]
                    ax.plot(tokens, ys, "o-" if impl.startswith("deepep") else "x--", label=impl)
                fl = {p["tokens"]: p.get("floor_ms") for p in sub if p.get("floor_ms") is not None}
                bd = {p["tokens"]: p.get("bound_ms") for p in sub if p.get("bound_ms") is not None}
                if fl:
                    ax.plot(sorted(fl), [fl[t] for t in sorted(fl)], "k:", lw=2, label="floor (experts)")
                if bd:
                    ax.plot(
                        sorted(bd), [bd[t] for t in sorted(bd)], "k-", lw=1, label="floor + raw DeepEP comm"
                    )
                    tgt = doc.get("targets", {}).get(ph)
                    if tgt:
                        ax.plot(
                            sorted(bd), [tgt * bd[t] for t in sorted(bd)], "r--", lw=1, label=f"target x{tgt}"
                        )
                ax.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="ms", title=f"{sc} {ph}")
                ax.legend(fontsize=6)
        _title(fig, "EPMoE step latency vs tokens per rank", doc, f"{shape_txt}; {base_txt}")
        s.figures.append(_save(fig, out / f"report-step-latency{suffix}.png"))

        # 2. achieved fraction of HBM bandwidth and of the matmul peak (runtime best variant)
        bw, bf16 = ceil.get("copy_bytes_per_s"), ceil.get("bf16_flops")
        if bw or bf16:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            for sc in schemes:
                for ph in phases:
                    sub = [
                        p for p in pts if p["scheme"] == sc and p["phase"] == ph and p["backend"] == "deepep"
                    ] or [
                        p for p in pts if p["scheme"] == sc and p["phase"] == ph and p["backend"] == "torch"
                    ]
                    best: dict[int, dict] = {}
                    for p in sub:
                        if p.get("step_ms") and (
                            p["tokens"] not in best or p["step_ms"] < best[p["tokens"]]["step_ms"]
                        ):
                            best[p["tokens"]] = p
                    base = {
                        p["tokens"]: p
                        for p in pts
                        if p["scheme"] == sc and p["phase"] == ph and p.get("weight_bytes")
                    }
                    t = sorted(t for t in best if t in base)
                    if not t:
                        continue
                    if bw:
                        axes[0].plot(
                            t,
                            [base[x]["weight_bytes"] / (best[x]["step_ms"] * 1e-3) / bw for x in t],
                            "o-",
                            label=f"{sc} {ph}",
                        )
                    if bf16:
                        axes[1].plot(
                            t,
                            [base[x]["flops"] / (best[x]["step_ms"] * 1e-3) / bf16 for x in t],
                            "o-",
                            label=f"{sc} {ph}",
                        )
            axes[0].set(
                xscale="log",
                xlabel="tokens per rank",
                ylabel="expert-weight bytes / step / HBM BW",
                ylim=(0, 1.1),
            )
            axes[1].set(
                xscale="log",
                xlabel="tokens per rank",
                ylabel="expert FLOPs / step / bf16 peak",
                ylim=(0, 1.1),
            )
            axes[0].legend(fontsize=7)
            axes[1].legend(fontsize=7)
            _title(
                fig,
                "EPMoE step: achieved fraction of HBM bandwidth and bf16 peak (fastest variant)",
                doc,
                f"{shape_txt}; HBM {bw / 1e12 if bw else 0:.2f} TB/s, bf16 {bf16 / 1e12 if bf16 else 0:.0f} TFLOP/s measured",
            )
            s.figures.append(_save(fig, out / f"report-step-fractions{suffix}.png"))

        # 3. stacked per-stage bars (plain variants)
        bars = [
            p for p in pts if p.get("stage_ms") and p["variant"] in ("plain", "chunks1", "graph", "two_batch")
        ]
        if bars:
            bphases = [ph for ph in phases if any(p["phase"] == ph for p in bars)]
            n_max = max(sum(1 for p in bars if p["phase"] == ph) for ph in bphases)
            fig, axes = plt.subplots(
                1, len(bphases), figsize=(max(9, 0.7 * n_max * len(bphases)), 5.5), squeeze=False
            )
            for ax, ph in zip(axes[0], bphases, strict=True):
                sub = [p for p in bars if p["phase"] == ph]
                labels = [f"{p['scheme']} T={p['tokens']}\n{p['backend']}/{p['variant']}" for p in sub]
                _stacked(ax, labels, [p["stage_ms"] for p in sub], [p.get("step_ms") for p in sub])
                ax.set_title(ph, fontsize=9)
            _title(fig, "EPMoE step: per-stage breakdown (rank 0, last step's telemetry)", doc, shape_txt)
            s.figures.append(_save(fig, out / f"report-step-stages{suffix}.png"))

    cols = [
        ("weights", "scheme"),
        ("phase", "phase"),
        ("T/rank", "tokens"),
        ("backend", "backend"),
        ("variant", "variant"),
        ("step ms", "step_ms"),
        ("floor ms", "floor_ms"),
        ("raw DeepEP comm ms", "raw_comm_ms"),
        ("ratio", "ratio"),
        ("target", "target"),
        ("met", "target_met"),
        ("x plain", "speedup_vs_plain"),
        ("rel vs plain", "rel_vs_plain"),
    ]
    rows = [p for p in pts if p["backend"] != "deepep raw"]
    raw = [p for p in pts if p["backend"] == "deepep raw"]
    summary = target_summary(rows)
    if summary:
        s.md.append(
            "Targets per point (fastest runtime variant; `gap ms` = step - target x (floor + raw comm);"
        )
        s.md.append("`largest stage` from the plain variant's telemetry):\n")
        s.md.append(
            _table(
                summary,
                [
                    ("weights", "scheme"),
                    ("phase", "phase"),
                    ("T/rank", "tokens"),
                    ("best", "best"),
                    ("step ms", "step_ms"),
                    ("floor ms", "floor_ms"),
                    ("raw comm ms", "raw_comm_ms"),
                    ("ratio", "ratio"),
                    ("target", "target"),
                    ("met", "met"),
                    ("gap ms", "gap_ms"),
                    ("largest stage", "largest"),
                ],
            )
        )
        s.md.append("")
    verdicts = switch_verdicts(rows)
    if verdicts:
        s.md.append(
            "Execution switches (geometric-mean speedup over the plain variant across the measured points;"
        )
        s.md.append("a switch is worth turning on by default where it wins everywhere it was measured):\n")
        s.md.append(
            _table(
                verdicts,
                [
                    ("backend", "backend"),
                    ("phase", "phase"),
                    ("variant", "variant"),
                    ("points", "points"),
                    ("geo-mean x plain", "geomean"),
                    ("min x plain", "min"),
                    ("max rel vs plain", "rel"),
                    ("wins everywhere", "wins"),
                ],
            )
        )
        s.md.append("")
    s.md.append(_table(rows, cols))
    if raw:
        s.md.append("\nRaw DeepEP dispatch + combine for the same routing:\n")
        s.md.append(
            _table(
                raw, [("weights", "scheme"), ("phase", "phase"), ("T/rank", "tokens"), ("comm ms", "comm_ms")]
            )
        )
    errs = [e for e in doc.get("errors", []) if e]
    if errs or any(p.get("errors") for p in doc.get("points", [])):
        s.md.append(
            f"\n{len(errs)} run-level error(s) and "
            f"{sum(1 for p in doc.get('points', []) if p.get('errors'))} failed point(s): see `{Path(doc['_path']).name}`."
        )
    return s


def target_summary(rows: list[dict]) -> list[dict]:
    """Per (weights, phase, tokens): the fastest variant of the preferred backend against the target."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in rows:
        if p.get("step_ms"):
            groups[(p["scheme"], p["phase"], p["tokens"])].append(p)
    out = []
    for (scheme, phase, tokens), ps in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "decode", kv[0][2])
    ):
        pref = [p for p in ps if p["backend"] == "deepep"] or ps
        best = min(pref, key=lambda p: p["step_ms"])
        plain = next((p for p in pref if p["variant"] in ("plain", "chunks1")), best)
        stages = {k: v for k, v in (plain.get("stage_ms") or {}).items() if k != "mode" or v > 0}
        largest = max(stages, key=stages.get) if stages else None
        row = dict(
            scheme=scheme,
            phase=phase,
            tokens=tokens,
            best=f"{best['backend']}/{best['variant']}",
            step_ms=best["step_ms"],
            floor_ms=best.get("floor_ms"),
            raw_comm_ms=best.get("raw_comm_ms"),
            ratio=best.get("ratio"),
            target=best.get("target"),
            met=best.get("target_met"),
        )
        if best.get("bound_ms") and best.get("target") and best.get("raw_comm_ms") is not None:
            row["gap_ms"] = best["step_ms"] - best["target"] * best["bound_ms"]
        if largest:
            row["largest"] = f"{largest} {stages[largest]:.3g} ms"
        out.append(row)
    return out


def switch_verdicts(rows: list[dict]) -> list[dict]:
    """Per (backend, phase, non-plain variant): how the switch compares with the plain variant."""
    import math

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in rows:
        if p["variant"] in ("plain", "chunks1") or not p.get("speedup_vs_plain"):
            continue
        groups[(p["backend"], p["phase"], p["variant"])].append(p)
    out = []
    for (backend, phase, variant), ps in sorted(groups.items()):
        sp = [p["speedup_vs_plain"] for p in ps]
        out.append(
            dict(
                backend=backend,
                phase=phase,
                variant=variant,
                points=len(ps),
                geomean=math.exp(sum(math.log(x) for x in sp) / len(sp)),
                min=min(sp),
                rel=max((p.get("rel_vs_plain") or 0.0) for p in ps),
                wins=all(x > 1.0 for x in sp),
            )
        )
    return out


def _int(v: Any) -> int | None:
    return None if v is None else round(v)


def _sustained(doc: dict, out: Path, suffix: str = "") -> Section:
    s = Section("sustained", doc)
    s.md.append(
        f"Each row: the burst rate (do_bench median) and the rate over {doc.get('seconds')} s of "
        "back-to-back calls, with the median SM clock, board power and the clock-throttle reasons "
        "`nvidia-smi` reported meanwhile.\n"
    )
    rows = [
        dict(r, throttle=", ".join(r.get("throttle") or []) or "-", sm_clock_mhz=_int(r.get("sm_clock_mhz")),
             power_w=_int(r.get("power_w")))
        for r in doc["rows"]
    ]  # fmt: skip
    s.md.append(
        _table(
            rows,
            [
                ("work", "work"),
                ("burst TFLOP/s", "burst_tflops"),
                ("sustained TFLOP/s", "sustained_tflops"),
                ("sustained / burst", "sustained_vs_burst"),
                ("of sustained dense", "frac_sustained_dense"),
                ("SM MHz", "sm_clock_mhz"),
                ("power W", "power_w"),
                ("throttle", "throttle"),
            ],
        )
    )
    return s


PREFILL_TFLOPS = {
    ("dsv3_e128", 2048): 350,
    ("dsv3_e128", 8192): 520,
    ("dsv3_e32", 2048): 520,
    ("dsv3_e32", 8192): 580,
}
"""Issue 3's bf16 fused MoE prefill targets (TFLOP/s) at DeepSeek-V3 shapes (E_local 128 and 32)."""
NOISE = 0.03
"""Timing tolerance of "never slower" targets: where the runtime runs the baseline itself (cuBLAS
past the router's Triton buckets) the two medians differ by timing noise only."""


def router_runtime_us(r: dict, graph: bool = False) -> float | None:
    """The runtime's time in a router row with the selection table it ships: the re-tuned table's
    (`*auto_tuned_us`) where the run re-tuned, else the table it ran with (`*auto_us`)."""
    pre = "graph_" if graph else ""
    return r.get(f"{pre}auto_tuned_us") or r.get(f"{pre}auto_us")


def _worst(items: list[tuple[float, str]]) -> tuple[float | None, str]:
    return min(items, key=lambda i: i[0]) if items else (None, "not measured")


def kernel_targets(
    fused: list[dict] | None, topk: list[dict] | None, masked: list[dict] | None, router: list[dict] | None
) -> list[dict]:
    """Issue 3's speed targets against one device's newest results (rows of each kind, None where
    that kind was not measured): per target the worst measured case, where it is, and whether it
    meets the target (None: not measured)."""
    out = []

    def add(target: str, value: float | None, where: str, minimum: float, unit: str = "") -> None:
        """One target: met where the worst case `value` reaches `minimum` (None: not measured)."""
        shown = None if value is None else f"{value:.3g}{unit}"
        out.append(
            dict(target=target, worst=shown, where=where, met=None if value is None else value >= minimum)
        )

    r_rows = [r for r in router or [] if r.get("cublas_us") and router_runtime_us(r)]
    dsv3 = [r for r in r_rows if r.get("D") == 7168 and r.get("E") == 256 and r["T"] <= 64]
    v, w = _worst([(r["cublas_us"] / router_runtime_us(r), f"T={r['T']}") for r in dsv3])
    graph = [r["graph_cublas_us"] / router_runtime_us(r, True) for r in dsv3 if r.get("graph_cublas_us")]
    if graph:
        w += f" (CUDA graph: {min(graph):.2f}-{max(graph):.2f}x)"
    add("router GEMM >= 2x cuBLAS+fp32, T <= 64, D 7168 / E 256 (eager)", v, w, 2, "x")
    v, w = _worst([(r["cublas_us"] / router_runtime_us(r), f"{r['model']} T={r['T']}") for r in r_rows])
    add(f"router GEMM never slower than cuBLAS, any T (within {NOISE:.0%})", v, w, 1 - NOISE, "x")

    f_rows = [r for r in fused or [] if "us" in r and "scheme" in r]
    best_decode: dict[tuple, float] = {}
    for r in f_rows:  # decode: the faster layout per (shape, T), as the tuned table installs it
        if r["scheme"] == "bf16" and r["T"] <= 128 and r.get("frac_copy_bw") is not None:
            key = (r["shape"], r["T"])
            best_decode[key] = max(best_decode.get(key, 0.0), r["frac_copy_bw"])
    v, w = _worst([(f, f"{shape} T={T}") for (shape, T), f in best_decode.items()])
    add("fused MoE bf16 decode (T <= 128) >= 0.90 of copy bandwidth on touched weights", v, w, 0.9)
    for (shape, T), want in PREFILL_TFLOPS.items():
        got = [
            r
            for r in f_rows
            if default_path(r) and r["scheme"] == "bf16" and r["shape"] == shape and r["T"] == T
        ]
        v = got[0].get("tflops") if got else None
        roof = got[0].get("frac_roofline") if got else None
        where = "" if roof is None else f"{roof:.2f} of its roofline (HBM or matmul rate, whichever binds)"
        add(f"fused MoE bf16 prefill {shape} T={T} >= {want} TFLOP/s", v, where, want)
    v, w = _worst([(r["speedup_vs_torch"], f"{r['shape']} {r['scheme']} T={r['T']}")
                   for r in f_rows if r.get("speedup_vs_torch")])  # fmt: skip
    add("fused MoE never slower than a torch per-expert loop", v, w, 1, "x")
    t_rows = [r for r in topk or [] if r.get("K") == 8 and r.get("T", 0) >= 512 and "speedup" in r]
    v, w = _worst(
        [(100 * r["speedup"], f"{r['shape']} T={r['T']} (bound {100 * r['bound']:.1f}%)") for r in t_rows]
    )
    reach = sum(1 for r in t_rows if r.get("target_reachable"))
    if t_rows:
        w += f"; reachable (bound >= 10%) at {reach} of {len(t_rows)}"
    add("fused top-k sum >= 10% faster than unfused, K = 8, T >= 512", v, w, 10, "%")
    pairs = fp8_vs_bf16(f_rows)
    v, w = _worst([(p["ratio"], f"{p['shape']} T={p['T']}") for p in pairs])
    if pairs:
        w += f"; met at {sum(p['met'] for p in pairs)} of {len(pairs)}"
    add(f"fp8_block >= {FP8_TARGET}x bf16 throughput at prefill (T >= 512)", v, w, FP8_TARGET, "x")
    m_rows = [r for r in masked or [] if r.get("rows_per_expert", 1 << 30) <= 32 and r.get("frac_hbm")]
    by_scheme: dict[str, float] = {}
    for r in m_rows:
        by_scheme[r["scheme"]] = min(by_scheme.get(r["scheme"], 9.0), r["frac_hbm"])
    v, w = _worst([(f, f"{sch}") for sch, f in by_scheme.items()])
    if by_scheme:
        w += " (" + ", ".join(f"{k} {x:.2f}" for k, x in sorted(by_scheme.items())) + ")"
    add("masked grouped GEMM >= 0.75 of HBM bandwidth on touched weights, <= 32 rows per expert", v, w, 0.75)
    return out


def _kernel_targets(docs: dict[str, dict]) -> Section:
    """`docs`: one device's newest document per kind (fused_moe, topk_sum, masked_gemm, router_gemm)."""
    first = next(iter(docs.values()))
    s = Section("kernel_targets", first)
    s.md.append(
        "Issue 3's speed targets (stated for the H200) against this device's newest results: the worst "
        "measured case, where it is, and whether it meets the target. Sources: "
        + ", ".join(f"`{Path(d['_path']).name}`" for d in docs.values())
        + ".\n"
    )
    rows = kernel_targets(
        *(docs.get(k, {}).get("rows") for k in ("fused_moe", "topk_sum", "masked_gemm", "router_gemm"))
    )
    for r in rows:
        r["met"] = {True: "yes", False: "no", None: "-"}[r["met"]]
    s.md.append(
        _table(rows, [("target", "target"), ("worst measured", "worst"), ("where", "where"), ("met", "met")])
    )
    return s


def _topk_sum(doc: dict, out: Path, suffix: str = "") -> Section:
    s = Section("topk_sum", doc)
    s.md.append(
        "bf16, K = 8, CUDA-graph replays. `sum us`: the unfused path's sum launch alone; `store us`: "
        "writing its `[T*K, D]` bf16 intermediate once. `bound` = (sum + store) / unfused: the most of "
        "the unfused time that fusing the sum into the down GEMM can remove, even with free atomics "
        "(target: fused >= 10% faster, reachable only where bound >= 0.10). `fused, banded`: the fused "
        "path with its down GEMM in bands of `N_BAND` N-blocks (accumulator columns in flight kept in L2).\n"
    )
    rows = [dict(r, speedup_pct=round(100 * r["speedup"], 1)) for r in doc["rows"] if "fused_us" in r]
    s.md.append(
        _table(
            rows,
            [
                ("shape", "shape"),
                ("T", "T"),
                ("fused us", "fused_us"),
                ("unfused us", "unfused_us"),
                ("fused faster %", "speedup_pct"),
                ("sum us", "sum_us"),
                ("store us", "store_us"),
                ("bound", "bound"),
                ("10% reachable", "target_reachable"),
                ("N_BAND", "band"),
                ("fused, banded us", "fused_band_us"),
            ],
        )
    )
    return s


def _breakdown(doc: dict, out: Path, suffix: str = "") -> Section:
    s = Section("breakdown", doc)
    s.md.append(
        "One expert-MLP call per case, captured in a CUDA graph and replayed under the profiler "
        f"({doc.get('replays', '?')} replays, medians). `span`: first kernel start to last kernel end; "
        "`kernels`: the sum of its kernels' times; `gaps`: span minus kernels (idle between launches); "
        "`graph`: do_bench of one replay (the graph launch included). `frac copy`: the roofline (weight "
        "bytes over the copy bandwidth) over `graph`; `GEMMs frac copy`: the same over the weight-streaming "
        "GEMM kernels' time alone.\n"
    )
    s.md.append(
        _table(
            doc["calls"],
            [
                ("case", "case"),
                ("graph us", "graph_us"),
                ("span us", "span_us"),
                ("kernels us", "kernels_us"),
                ("gaps us", "gaps_us"),
                ("launches", "launches"),
                ("GEMMs us", "gemms_us"),
                ("roofline us", "roofline_us"),
                ("frac copy", "frac_copy_bw"),
                ("GEMMs frac copy", "gemms_frac_copy_bw"),
                ("profiled", "profiled"),
            ],
        )
    )
    s.md.append("\nPer kernel, in launch order:\n")
    s.md.append(
        _table(
            doc["kernels"],
            [
                ("case", "case"),
                ("#", "i"),
                ("kernel", "kernel"),
                ("us", "us"),
                ("gap before us", "gap_before_us"),
                ("share of span", "share"),
            ],
        )  # fmt: skip
    )
    if doc.get("errors"):
        s.md.append(
            "\nCases that failed: " + "; ".join(f"`{k}`: {v}" for k, v in doc["errors"].items()) + "\n"
        )
    return s


BUILDERS = {
    "breakdown": _breakdown,
    "topk_sum": _topk_sum,
    "router_gemm": _router_gemm,
    "router_topk": _router_topk,
    "fused_moe": _fused_moe,
    "masked_gemm": _masked_gemm,
    "dispatch": _dispatch,
    "step": _step,
    "sustained": _sustained,
    "launch": _launch,
}


def build(dirs: list[Path], plots_dir: Path, include_smoke: bool = False) -> tuple[list[Section], list[str]]:
    docs = load_results(dirs, include_smoke)
    sections: list[Section] = []
    notes: list[str] = []
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for _, doc in sorted(docs.items()):
        by_kind[_kind(str(doc["what"]))].append(doc)
    for kind in (
        "step",
        "layer",
        "dispatch",
        "fused_moe",
        "topk_sum",
        "sustained",
        "masked_gemm",
        "breakdown",
        "router_gemm",
        "router_topk",
        "launch",
    ):
        if kind == "fused_moe":
            try:
                sections.extend(_targets_per_device(by_kind))
            except Exception:  # noqa: BLE001 - as below: a malformed file must not stop the report
                notes.append(
                    f"kernel targets: not computed ({traceback.format_exc().strip().splitlines()[-1]})"
                )
        if kind not in by_kind:
            notes.append(f"no `{kind}` results yet")
            continue
        try:
            if kind == "layer":
                sections.append(_layer(_by_device(by_kind[kind])[0][1], plots_dir))
            else:
                sections.extend(_per_device(kind, by_kind[kind], plots_dir))
        except Exception:  # noqa: BLE001 - one malformed file must not stop the report
            notes.append(
                f"`{kind}`: could not be plotted ({traceback.format_exc().strip().splitlines()[-1]})"
            )
    return sections, notes


def _targets_per_device(by_kind: dict[str, list[dict]]) -> list[Section]:
    """A kernel-targets section per device that has kernel results (`load_results` keeps each
    device's newest document of each kind)."""
    kinds = ("fused_moe", "topk_sum", "masked_gemm", "router_gemm")
    docs = [d for k in kinds for d in by_kind.get(k, []) if d["what"] == k]
    return [_kernel_targets({d["what"]: d for d in mine}) for _, mine in _by_device(docs)]


def device_name(doc: dict) -> str:
    return str(_dev(doc).get("device", "unknown"))


def _by_device(docs: list[dict]) -> list[tuple[str, list[dict]]]:
    """`docs` grouped by device: H200 first (the issues state their targets on it), then the device
    with the newest document first."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in docs:
        groups[device_name(d)].append(d)
    newest = {name: max(str(d.get("date", "")) for d in g) for name, g in groups.items()}
    order = sorted(sorted(groups, key=newest.__getitem__, reverse=True), key=lambda n: "H200" not in n)
    return [(name, groups[name]) for name in order]


def _per_device(kind: str, docs: list[dict], plots_dir: Path) -> list[Section]:
    """One section per device from its newest document named exactly `kind` (others of the kind,
    e.g. `*-cpu-smoke` under `--include-smoke`, only when there is none). The first device's
    figures keep the plain names (`report-<kind>.png`); the others' get the device as a suffix."""
    plain = [d for d in docs if d["what"] == kind] or docs
    return [
        BUILDERS[kind](
            max(mine, key=lambda d: str(d.get("date", ""))), plots_dir, "" if i == 0 else f"-{normalise(dev)}"
        )
        for i, (dev, mine) in enumerate(_by_device(plain))
    ]


INTRO = """# Performance

Generated by `python benchmarks/report.py` from the newest JSON of each kind in `benchmarks/results/`
(do not edit by hand; rerun the report after a benchmark). Every benchmark measures its own ceilings
(HBM copy bandwidth, bf16/fp8 matmul rate) and baselines on the same device in the same run; every
figure names the device, versions and shapes.

Targets (issue 7, DeepSeek-V3 layer on 2xH200): step time <= 1.10 x (expert-compute floor + raw DeepEP
dispatch+combine) for decode (16/64/128 tokens per rank, low-latency), <= 1.20 x for prefill
(1024/4096/8192 tokens per rank, normal). The floor is the larger of expert-weight bytes touched / HBM
bandwidth and expert FLOPs / matmul rate, for the routing the step actually had.

Execution switches (`execution` section, defaults chosen by these measurements): `cuda_graph_decode`
(the whole low-latency step replayed from a CUDA graph, no host sync, no mode all-reduce; default
`auto`, on with the DeepEP backend on cuda, where it wins in every decode case below), `decode_two_batch`
(two micro-batches, DeepEP `return_recv_hook` / async all-to-all), `prefill_chunks` (chunked normal
step, communication of one chunk overlapping the experts of another). `bench_step.py` measures each
on and off (the last two stay off: see below). Stage times of overlapped variants are CUDA-event
intervals in issue order on the compute stream (communication running under another stage's compute
is not shown separately); a graph step reports one `graph` stage.

What the overlap switches cost: decode and small prefill are bound by expert-weight reads, and an
expert hit in both micro-batches (or in several chunks) has its weights read once per micro-batch
or chunk. Splitting a step therefore adds up to one more pass over the touched weights, which only
pays where the hidden communication is larger than that (across nodes over RDMA, say). In the
one-GPU measurements below, raw DeepEP dispatch + combine takes 40-75 us against 1-5 ms of expert
time, so the switches lose there and stay off by default; the 2-GPU (NVLink) measurement is to come.

Eager columns (`*_us` without `graph`) on these machines measure the host as much as the GPU: on the
H100 machine's host, enqueueing one `torch.mm` took 22-30 us, one Triton launch through its Python
launcher 27-31 us (8-9 us through the compiled kernel's own `run`), and one `torch.empty` 7 us, so any
kernel shorter than that is host-bound when launched eagerly. Since then every kernel of the runtime
launches through `kernels.launch.FastLaunch`, which goes straight to the compiled kernel after the
first call of each specialisation (section "Kernel launch cost on the host"). The CUDA-graph columns
are the kernels' own times, and with DeepEP the runtime's decode step is replayed from a graph by
default.
"""


def write_doc(sections: list[Section], notes: list[str], doc_path: Path, link_base: str | None) -> Path:
    lines = [INTRO]
    titles = {
        "step": "Whole MoE step (EPMoE)",
        "layer": "Layer step, per stage (bench_layer)",
        "dispatch": "Dispatch / combine",
        "fused_moe": "Fused MoE experts (normal layout)",
        "topk_sum": "Fused vs unfused top-k sum",
        "kernel_targets": "Kernel targets (issue 3)",
        "masked_gemm": "Masked grouped GEMM (low-latency layout)",
        "router_gemm": "Router GEMM",
        "router_topk": "Expert selection (router top-k)",
        "sustained": "Sustained rates under the power cap",
        "launch": "Kernel launch cost on the host",
        "breakdown": "Where a decode call's time goes (per kernel)",
    }
    for s in sections:
        lines.append(f"## {titles.get(s.kind, s.kind)}\n")
        lines.append(f"Device: {device_line(s.doc)}. Source: `{Path(s.doc['_path']).name}`.\n")
        for f in s.figures:
            link = f"{link_base.rstrip('/')}/{f.name}" if link_base else f.name
            lines.append(f"![{f.stem}]({link})\n")
        lines.extend(s.md)
        lines.append(f"\nReproduce:\n\n```bash\n{REPRODUCE[s.kind]}\npython benchmarks/report.py\n```\n")
    if notes:
        lines.append("## Not yet measured\n")
        lines.extend(f"- {n}" for n in notes)
        lines.append("")
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text("\n".join(lines) + "\n")
    return doc_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", action="append", default=None, help="results folder (repeatable)")
    p.add_argument("--plots-dir", default=str(RESULTS_DIR))
    p.add_argument("--doc", default=str(DOC))
    p.add_argument(
        "--link-base",
        default="../benchmarks/results",
        help="how the markdown links the PNGs (default: relative to docs/)",
    )
    p.add_argument("--include-smoke", action="store_true", help="also plot *-cpu-smoke results")
    args = p.parse_args(argv)
    dirs = [Path(d) for d in (args.results or [str(RESULTS_DIR)])]
    sections, notes = build(dirs, Path(args.plots_dir), args.include_smoke)
    path = write_doc(sections, notes, Path(args.doc), args.link_base)
    for s in sections:
        for f in s.figures:
            print(f"wrote {f}")
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
