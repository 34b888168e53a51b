"""Router GEMM: every implementation vs cuBLAS with fp32 output, T in 1..8192.

    python benchmarks/bench_router_gemm.py [--tune] [--out-dir DIR] [--table PATH] [--quick]

Shapes: D 7168 / E 256 (DeepSeek-V3), D 2048 / E 128 (Qwen3-30B-A3B), D 4096 / E 8 (Mixtral).
Baseline: `torch.mm(x, w.t(), out_dtype=torch.float32)` measured in the same run. Roofline: the
bytes of weight + x read and logits written, over the copy bandwidth measured in the same run.
`auto` is the shipped dispatcher (the selection table); `triton` the heuristic config; with
`--tune` a small sweep of Triton configs runs per (shape, T), the best Triton config and cuBLAS
are compared, and the winners are written as the selection table for this device
(`kernels/configs/router_gemm.json`, other devices' entries kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    bench_us,
    graph_us,
    loop_us,
    measure_copy_bandwidth,
    print_table,
    write_results,
)
from ep_runtime.kernels import router_gemm as rg  # noqa: E402
from ep_runtime.kernels import tables  # noqa: E402

SHAPES = [(7168, 256, "DeepSeek-V3"), (2048, 128, "Qwen3-30B-A3B"), (4096, 8, "Mixtral-8x7B")]
T_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def candidate_configs(T: int, D: int, E: int, num_sms: int) -> list[dict[str, int]]:
    """The tuning sweep: split-K GEMV-style tiles for small T, larger tiles (split or not) above."""
    out = []
    e_blocks = [16] if E <= 16 else ([32, 64] if E >= 64 else [16, 32])
    if T <= 64 and E >= 64:
        e_blocks = [16] + e_blocks  # more programs per K split, for the one-launch reductions
    if T <= 64:
        bt = max(16, min(64, triton.next_power_of_2(T)))
        for be in e_blocks:
            for bk in (128, 256):
                k_tiles = triton.cdiv(D, bk)
                tiles = triton.cdiv(E, be) * triton.cdiv(T, bt)
                for waves in (1, 2, 4):
                    sk = max(1, min(k_tiles, waves * num_sms // tiles))
                    out.append(
                        dict(BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk, SPLIT_K=sk, num_warps=4, num_stages=3)
                    )
    else:
        for bt in (64, 128):
            for be in sorted(
                {min(128, max(16, triton.next_power_of_2(E))), min(64, max(16, triton.next_power_of_2(E)))}
            ):
                tiles = triton.cdiv(E, be) * triton.cdiv(T, bt)
                k_tiles = triton.cdiv(D, 64)
                for sk in sorted({1, max(1, min(k_tiles, 2 * num_sms // tiles))}):
                    out.append(
                        dict(BLOCK_T=bt, BLOCK_E=be, BLOCK_K=64, SPLIT_K=sk, num_warps=4, num_stages=4)
                    )
    split = [c for c in out if c["SPLIT_K"] > 1]
    # the one-launch reductions for every split config: "accumulate" (a one-tile tail) everywhere;
    # "serial" above T = 64 only (at T <= 64 it lost to the atomic reduction in every CUDA-graph
    # timing of the first H200 sweep: the last program reads every partial)
    out += [dict(c, REDUCE="accumulate") for c in split]
    if T > 64:
        out += [dict(c, REDUCE="serial") for c in split]
    if T <= 16:
        # the one-launch GEMV-style kernel: 1-4 whole weight rows per program, no split-K; its K loop
        # is not software-pipelined, so wide K tiles (few iterations) keep the loads in flight
        bt = triton.next_power_of_2(T)
        for be in (1, 2, 4):
            for bk in (1024, 2048, 4096, 8192):
                if bt * be * bk <= 16384 and bk <= max(1024, triton.next_power_of_2(D)) and E // be >= 4:
                    out.append(
                        dict(BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk, SPLIT_K=1, KERNEL="gemv", num_warps=8)
                    )
    uniq = []
    for c in out:
        if c not in uniq:
            uniq.append(c)
    return uniq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tune", action="store_true", help="sweep Triton configs and rewrite the selection table"
    )
    ap.add_argument("--out-dir", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--table", default=str(rg.CONFIG_PATH), help="selection table to write with --tune")
    ap.add_argument("--quick", action="store_true", help="fewer T values")
    ap.add_argument(
        "--max-t",
        type=int,
        default=None,
        help="only T <= this; with --tune the table's existing buckets above it are kept",
    )
    ap.add_argument(
        "--tune-max-t",
        type=int,
        default=None,
        help="with --tune: sweep only T <= this (all T are still measured); buckets above are kept",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_router_gemm needs a CUDA GPU")

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = measure_copy_bandwidth()
    print(f"{name}: copy bandwidth {bw / 1e12:.2f} TB/s")
    t_values = [1, 8, 64, 512, 4096] if args.quick else T_VALUES
    if args.max_t is not None:
        t_values = [t for t in t_values if t <= args.max_t]
    old_doc = json.loads(Path(args.table).read_text()) if Path(args.table).exists() else {}
    old_table = old_doc.get("devices", {}).get(name, {})
    rows, table = [], {}
    try:
        for D, E, model in SHAPES:
            w = (torch.randn(E, D, device=dev) * 0.02).to(torch.bfloat16)
            buckets: list[dict] = []
            try:
                for T in t_values:
                    try:
                        tune_t = args.tune and (args.tune_max_t is None or T <= args.tune_max_t)
                        row, bucket = _measure(model, D, E, T, w, bw, num_sms, tune_t, dev)
                    except Exception as exc:  # record and go on: one bad point must not lose the rest
                        print(f"{model} T={T}: FAILED {type(exc).__name__}: {exc}"[:300])
                        rows.append(
                            dict(model=model, D=D, E=E, T=T, error=f"{type(exc).__name__}: {exc}"[:300])
                        )
                        continue
                    rows.append(row)
                    if bucket is not None:
                        buckets.append(bucket)
            finally:
                if buckets:
                    key = f"{D},{E}"
                    partial = args.max_t is not None or args.tune_max_t is not None
                    if partial and old_table.get(key):
                        # partial sweep: keep the old choices above the largest T measured here
                        top = buckets[-1]["max_t"]
                        buckets += [
                            dict(b) for b in old_table[key] if b.get("max_t") is None or b["max_t"] > top
                        ]
                    buckets[-1]["max_t"] = None  # the last bucket covers everything larger
                    table[key] = _merge_buckets(buckets)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured")
    rows_ok = [r for r in rows if "error" not in r]

    cols = ["model", "T", "cublas_us", "auto_us", "loop_cublas_us", "loop_auto_us", "triton_heur_us"]
    cols += ["serial_heur_us"]
    cols += ["graph_cublas_us", "graph_auto_us", "graph_atomic_heur_us", "graph_serial_heur_us"]
    cols += ["graph_accumulate_heur_us"]
    cols += ["triton_best_us"] if args.tune else []
    cols += ["speedup_auto_vs_cublas", "roofline_us", "frac_roofline_auto"]
    print_table(f"router GEMM on {name} (copy bw {bw / 1e12:.2f} TB/s)", rows_ok, cols)
    payload = {
        "copy_bandwidth_Bps": bw,
        "rows": rows,
        "tuned": bool(args.tune),
        "timing": "*_us: eager calls, triton do_bench median (best of two); graph_*_us: per call, CUDA-graph "
        "replay of 20 back-to-back calls, do_bench median / 20; loop_*_us: wall time per call of 2000 "
        "back-to-back eager calls without a cache flush (the host's cost per call, or the GPU's time where "
        "larger), best of three",
    }
    if args.tune:
        path = Path(args.table)
        doc = json.loads(path.read_text()) if path.exists() else {}
        doc.setdefault(
            "doc", "router_gemm selection: devices -> 'D,E' -> T buckets (max_t inclusive, null = rest)"
        )
        doc.setdefault("devices", {})[name] = table
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
        payload["table"] = table
        if path.resolve() == rg.CONFIG_PATH.resolve():
            # re-measure the dispatcher with the new table (the table must never lose to cuBLAS)
            rg.load_table.cache_clear()
            tables.for_device.cache_clear()  # the launchers' per-device lookup: rows below use the new table
            rg._select.cache_clear()
            try:
                for row in rows_ok:
                    w = (torch.randn(row["E"], row["D"], device=dev) * 0.02).to(torch.bfloat16)
                    x = torch.randn(row["T"], row["D"], device=dev).to(torch.bfloat16)
                    row["auto_tuned_us"] = min(
                        bench_us(lambda x=x, w=w: rg.router_gemm(x, w, impl="auto")) for _ in range(2)
                    )
                    row["speedup_tuned_vs_cublas"] = row["cublas_us"] / row["auto_tuned_us"]
                    if row["T"] <= 64:
                        row["graph_auto_tuned_us"] = _graph_us(
                            lambda x=x, w=w: rg.router_gemm(x, w, impl="auto")
                        )
                        row["speedup_graph_tuned_vs_cublas"] = (
                            row["graph_cublas_us"] / row["graph_auto_tuned_us"]
                        )
            except KeyboardInterrupt:
                print("interrupted while re-measuring")
            rows_ok = [r for r in rows_ok if "auto_tuned_us" in r]
            cols = [
                "model",
                "T",
                "cublas_us",
                "auto_tuned_us",
                "speedup_tuned_vs_cublas",
                "graph_cublas_us",
                "graph_auto_tuned_us",
                "speedup_graph_tuned_vs_cublas",
                "frac_roofline_best",
            ]
            print_table(f"router GEMM with the tuned table on {name}", rows_ok, cols)
    write_results("router_gemm", payload, Path(args.out_dir) if args.out_dir else None)


def _measure(model, D, E, T, w, bw, num_sms, tune, dev) -> tuple[dict, dict | None]:
    """One (shape, T) point: cuBLAS, the dispatcher, the heuristic Triton config and (tune) a sweep."""
    x = torch.randn(T, D, device=dev).to(torch.bfloat16)
    ref = x.double() @ w.double().t()
    nbytes = (E * D + T * D) * 2 + T * E * 4
    roof_us = nbytes / bw * 1e6
    # best of two medians: a single median of a few-microsecond kernel is sometimes several times
    # too high (seen on H200: clock or scheduling transients)
    t_cublas = min(bench_us(lambda: rg.router_gemm(x, w, impl="cublas")) for _ in range(2))
    t_auto = min(bench_us(lambda: rg.router_gemm(x, w, impl="auto")) for _ in range(2))
    t_heur = min(bench_us(lambda: rg.router_gemm(x, w, impl="triton")) for _ in range(2))
    serial_cfg = dict(rg.heuristic_config(T, D, E, num_sms), REDUCE="serial")
    t_serial = min(bench_us(lambda: rg.router_gemm(x, w, impl="triton", config=serial_cfg)) for _ in range(2))
    err = (rg.router_gemm(x, w, impl="triton").double() - ref).abs().max().item()
    row = dict(
        model=model,
        D=D,
        E=E,
        T=T,
        cublas_us=t_cublas,
        auto_us=t_auto,
        triton_heur_us=t_heur,
        serial_heur_us=t_serial,
        loop_cublas_us=loop_us(lambda: rg.router_gemm(x, w, impl="cublas")),
        loop_auto_us=loop_us(lambda: rg.router_gemm(x, w, impl="auto")),
    )
    if T <= 64:
        # Launch overhead dominates at ~1 us of HBM time: the same calls replayed from a CUDA graph
        # (what a graph-captured decode step sees). Atomic = zero-fill + GEMM (2 launches); serial
        # and accumulate = one launch.
        atomic_cfg = dict(rg.heuristic_config(T, D, E, num_sms), REDUCE="atomic")
        row["graph_cublas_us"] = _graph_us(lambda: rg.router_gemm(x, w, impl="cublas"))
        row["graph_auto_us"] = _graph_us(lambda: rg.router_gemm(x, w, impl="auto"))
        row["graph_atomic_heur_us"] = _graph_us(
            lambda: rg.router_gemm(x, w, impl="triton", config=atomic_cfg)
        )
        row["graph_serial_heur_us"] = _graph_us(
            lambda: rg.router_gemm(x, w, impl="triton", config=serial_cfg)
        )
        s_err = (rg.router_gemm(x, w, impl="triton", config=serial_cfg).double() - ref).abs().max().item()
        row["serial_max_abs_err"] = s_err
        acc_cfg = dict(rg.heuristic_config(T, D, E, num_sms), REDUCE="accumulate")
        row["graph_accumulate_heur_us"] = _graph_us(
            lambda: rg.router_gemm(x, w, impl="triton", config=acc_cfg)
        )
        a_err = (rg.router_gemm(x, w, impl="triton", config=acc_cfg).double() - ref).abs().max().item()
        row["accumulate_max_abs_err"] = a_err
    if T == 64:  # the split-K output must be zeroed first: what that alone costs
        row["zeros_us"] = bench_us(lambda: torch.zeros((T, E), dtype=torch.float32, device=dev))
    best_cfg, best_t, bucket = None, float("inf"), None
    if tune:
        for cfg in candidate_configs(T, D, E, num_sms):
            try:
                fn = lambda cfg=cfg: rg.router_gemm(x, w, impl="triton", config=cfg)  # noqa: E731
                # T <= 64: picked by CUDA-graph replay time (eager times of a few-us kernel are the
                # launcher's; decode steps run from a graph); larger T: eager do_bench
                t = _graph_us(fn, replays=10, tries=1, rep=10) if T <= 64 else bench_us(fn, warmup=3, rep=10)
            except Exception as exc:  # a config that does not compile is skipped, not fatal
                print(f"skip {cfg}: {type(exc).__name__}: {exc}"[:200])
                continue
            if t < best_t:
                best_cfg, best_t = cfg, t
        row["best_config"] = json.dumps(best_cfg)
        t_ref = t_cublas
        if T <= 64 and best_cfg is not None:
            # best_t is a graph time here: re-measure it (two tries) and give its eager time too
            row["graph_triton_best_us"] = best_t = _graph_us(
                lambda: rg.router_gemm(x, w, impl="triton", config=best_cfg)
            )
            row["triton_best_us"] = min(
                bench_us(lambda: rg.router_gemm(x, w, impl="triton", config=best_cfg)) for _ in range(2)
            )
            t_ref = row["graph_cublas_us"]
            row["speedup_graph_best_vs_cublas"] = t_ref / best_t
        else:
            row["triton_best_us"] = best_t
        impl = "triton" if best_t < t_ref else "cublas"
        row["selected_by"] = "graph replay" if T <= 64 else "eager"
        bucket = {"max_t": T, "impl": impl, "config": best_cfg if impl == "triton" else None}
    best = min(t_cublas, t_auto, t_heur, t_serial, row.get("triton_best_us", float("inf")))
    row.update(
        speedup_auto_vs_cublas=t_cublas / t_auto,
        roofline_us=roof_us,
        frac_roofline_auto=roof_us / t_auto,
        frac_roofline_best=roof_us / best,
        triton_max_abs_err=err,
    )
    print(
        f"{model} T={T}: cublas {t_cublas:.2f} auto {t_auto:.2f} heur {t_heur:.2f}"
        + (f" tuned {best_t:.2f} {best_cfg}" if tune else "")
    )
    return row, bucket


def _graph_us(fn, replays: int = 20, tries: int = 2, rep: int = 30) -> float:
    return graph_us(fn, replays=replays, tries=tries, warmup=3, rep=rep)


def _merge_buckets(buckets: list[dict]) -> list[dict]:
    """Merge neighbouring buckets with the same choice (keeps the table short)."""
    merged: list[dict] = []
    for b in buckets:
        if merged and merged[-1]["impl"] == b["impl"] and merged[-1]["config"] == b["config"]:
            merged[-1]["max_t"] = b["max_t"]
        else:
            merged.append(dict(b))
    return merged


if __name__ == "__main__":
    main()
