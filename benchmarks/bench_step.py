"""Whole-step benchmark: the `EPMoE` step against its floor (expert compute at the measured HBM and
matmul ceilings, plus raw DeepEP dispatch+combine for the same routing), per execution switch.

Launches one process per GPU (torch.multiprocessing, NCCL; gloo with `--device cpu`):

    python benchmarks/bench_step.py                 # all visible GPUs, DeepSeek-V3 layer, full sweep
    python benchmarks/bench_step.py --quick         # fewer points and iterations (~3 min on 2xH200)
    python benchmarks/bench_step.py --device cpu --world 2 --hidden 256 --num-experts 16 --inter 128 \
        --topk 4 --n-group 0 --decode-tokens 4 8 --prefill-tokens 32 --iters 2 --warmup 1   # CPU smoke

Shapes (default): DeepSeek-V3 routed experts, E 256 (128 local at EP 2), D 7168, I 2048, K 8, sigmoid
routing with groups; weights bf16 and fp8_block. Decode: `--decode-tokens` per rank (16, 64, 128), the
low-latency layout with C = the largest; prefill: `--prefill-tokens` per rank (1024, 4096, 8192),
`is_prefill=True`, the normal layout (`dispatch.mode: auto`).

Per (weights, phase, tokens), every rank measures:
  - floor: expert-weight bytes touched (local experts that received a row x bytes per expert) /
    measured HBM copy bandwidth, and FLOPs (6 D I per received (token, expert) pair) / measured
    matmul rate (bf16, or fp8 for fp8_block); the floor is the larger of the two;
  - raw DeepEP: `low_latency_dispatch` + `low_latency_combine` (decode) or `get_dispatch_layout` +
    `dispatch` + `combine` (prefill) on the layer's own buffer, for the layer's routing of the same
    tokens (when `deep_ep` imports);
  - the runtime step (`--backends`: deepep and/or torch, sharing one set of weights): mean time of
    `--iters` back-to-back steps after `--warmup` (CUDA events around the loop), the per-stage
    breakdown of the last step's telemetry, and the output's relative difference from the plain
    variant; for each execution variant: decode `plain`, `two_batch`, `graph`, `graph+two_batch`;
    prefill `chunks1`, `chunks2`, `chunks4`.
The ratio `step / (floor + raw DeepEP comm)` is compared with the targets (decode <= 1.10, prefill
<= 1.20). Times are the max over ranks (the step ends when the slowest rank ends).

Rank 0 writes `benchmarks/results/<date>-<device>-step.json` (`--out-dir` to redirect); then the
report (`benchmarks/report.py`) redraws the plots and `docs/performance.md` unless `--no-report`.
A failing variant is recorded and the sweep goes on; a hung rank ends the run at `--timeout` with the
points measured so far written.
"""

from __future__ import annotations

import argparse
import os
import queue as queue_mod
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = {"decode": 1.10, "prefill": 1.20}
DECODE_VARIANTS = {
    "plain": dict(cuda_graph_decode=False, decode_two_batch=False),
    "two_batch": dict(cuda_graph_decode=False, decode_two_batch=True),
    "graph": dict(cuda_graph_decode=True, decode_two_batch=False),
    "graph+two_batch": dict(cuda_graph_decode=True, decode_two_batch=True),
}
PREFILL_VARIANTS = {
    "chunks1": dict(prefill_chunks=1),
    "chunks2": dict(prefill_chunks=2),
    "chunks4": dict(prefill_chunks=4),
}
OFF = dict(cuda_graph_decode=False, decode_two_batch=False, prefill_chunks=1)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--world", type=int, default=None, help="EP ranks (default: every visible GPU; cpu: 2)")
    p.add_argument(
        "--weights", nargs="+", default=["bf16", "fp8_block"], choices=["bf16", "fp8_block", "w4a8"]
    )
    p.add_argument("--backends", nargs="+", default=["deepep", "torch"], choices=["deepep", "torch"])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--n-group", type=int, default=8, help="0: no group-limited routing")
    p.add_argument("--topk-group", type=int, default=4)
    p.add_argument("--decode-tokens", type=int, nargs="*", default=None, help="default 16 64 128")
    p.add_argument("--prefill-tokens", type=int, nargs="*", default=None, help="default 1024 4096 8192")
    p.add_argument("--capacity", type=int, default=None, help="C (default: the largest decode count)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="decode 16 128, prefill 4096, fewer iterations")
    p.add_argument("--out-dir", default=None, help="where the JSON and plots go (default benchmarks/results)")
    p.add_argument("--no-report", action="store_true", help="do not redraw plots / docs/performance.md")
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds for the whole run (default 450; quick 200)"
    )
    args = p.parse_args(argv)
    if args.decode_tokens is None:
        args.decode_tokens = [16, 128] if args.quick else [16, 64, 128]
    if args.prefill_tokens is None:
        args.prefill_tokens = [4096] if args.quick else [1024, 4096, 8192]
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.iters is None:
        args.iters = 5 if args.quick else 10
    if args.timeout is None:
        args.timeout = 200.0 if args.quick else 450.0
    if args.world is None:
        args.world = max(2, torch.cuda.device_count()) if args.device == "cuda" else 2
    if args.capacity is None:
        args.capacity = max(args.decode_tokens) if args.decode_tokens else 128
    return args


def _plan(args: argparse.Namespace, scheme: str, backend: str):
    from benchmarks.common import deepseek_style_model
    from ep_runtime.config import parse_config, resolve_plan

    model = deepseek_style_model(args, scheme)
    cfg = parse_config(
        dict(
            model=model,
            parallel=dict(ep_size=args.world, device=args.device),
            dispatch=dict(
                backend=backend,
                # DeepEP's normal kernels need 2, 4 or 8 ranks: on one GPU it runs low-latency only.
                mode="low_latency" if backend == "deepep" and args.world == 1 else "auto",
                num_max_dispatch_tokens_per_rank=args.capacity,
            ),
        )
    )
    return resolve_plan(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loop_ms(fn, iters: int, device: torch.device) -> float:
    """Mean milliseconds of `iters` back-to-back calls (CUDA events around the loop)."""
    _sync(device)
    dist.barrier()
    _sync(device)
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        return float(a.elapsed_time(b)) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def _ceilings(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"copy_bytes_per_s": None, "bf16_flops": None, "fp8_flops": None}
    from benchmarks.common import measure_copy_bandwidth, measure_matmul_flops

    out: dict[str, float | None] = {"copy_bytes_per_s": measure_copy_bandwidth()}
    out["bf16_flops"] = measure_matmul_flops(torch.bfloat16)
    try:
        out["fp8_flops"] = measure_matmul_flops(torch.float8_e4m3fn)
    except Exception:  # noqa: BLE001 - no fp8 matmul on this device
        out["fp8_flops"] = None
    torch.cuda.empty_cache()
    return out


def _floor(layer, tel, ceilings: dict, scheme: str, bytes_per_expert: float) -> dict[str, Any]:
    """Expert-compute floor of this rank for the routing the step actually had."""
    counts = tel.tokens_per_local_expert
    active = sum(1 for c in counts if c > 0)
    pairs = sum(counts)
    m = layer.model_cfg
    flops = 6.0 * m.hidden_size * m.moe_intermediate_size * pairs
    weight_bytes = active * bytes_per_expert
    bw = ceilings.get("copy_bytes_per_s")
    rate = ceilings.get("fp8_flops" if scheme == "fp8_block" else "bf16_flops") or ceilings.get("bf16_flops")
    mem_ms = weight_bytes / bw * 1e3 if bw else None
    mm_ms = flops / rate * 1e3 if rate else None
    floor = max(v for v in (mem_ms, mm_ms) if v is not None) if (mem_ms or mm_ms) else None
    return {
        "active_experts": active,
        "pairs": pairs,
        "weight_bytes": weight_bytes,
        "flops": flops,
        "floor_mem_ms": mem_ms,
        "floor_mm_ms": mm_ms,
        "floor_ms": floor,
    }


def _raw_deepep_ms(layer, h: torch.Tensor, is_prefill: bool, iters: int, device: torch.device) -> float:
    """Raw DeepEP dispatch + combine (its kernels only, no runtime wrapper) for this layer's routing."""
    from benchmarks.common import deepep_normal_dispatch
    from ep_runtime.types import Layout

    layout = Layout.NORMAL if is_prefill else Layout.LOW_LATENCY
    disp = layer.dispatchers[layout]
    owner = disp.owner
    routing = layer._route(h)
    ids = routing.topk_ids.to(getattr(disp.deep_ep, "topk_idx_t", torch.int64)).contiguous()
    weights = routing.topk_weights.contiguous()
    E, D = layer.model_cfg.num_experts, layer.model_cfg.hidden_size
    if layout == Layout.LOW_LATENCY:
        buf = owner.enter(Layout.LOW_LATENCY)
        C, L, R = disp.capacity, layer.num_local_experts, layer.num_ranks
        expert_out = torch.randn(L, C * R, D, device=device).to(torch.bfloat16)

        def step():
            b = owner.enter(Layout.LOW_LATENCY)
            _, _, handle, _, _ = b.low_latency_dispatch(h, ids, C, E, use_fp8=disp.is_fp8)
            b.low_latency_combine(expert_out, ids, weights, handle)  # two calls: parity unchanged

        del buf
    else:
        x_in = disp._normal_input(h)  # the payload the runtime sends (fp8 quantised by policy)
        buf = owner.enter(Layout.NORMAL)

        def dispatch():
            b = owner.enter(Layout.NORMAL)
            recv, _, _, _, handle, _ = deepep_normal_dispatch(b, x_in, ids, weights, E, owner.dispatch_config)
            return recv, handle

        recv, _ = dispatch()
        n_recv = (recv[0] if isinstance(recv, tuple) else recv).shape[0]
        expert_out = torch.randn(n_recv, D, device=device).to(torch.bfloat16)

        def step():
            _, handle = dispatch()
            owner.enter(Layout.NORMAL).combine(expert_out, handle, config=owner.combine_config)

        del buf
    for _ in range(2):
        step()
    return _loop_ms(step, iters, device)


def _bench_scheme(rank: int, args, scheme: str, device: torch.device, ceilings: dict, emit) -> None:
    from benchmarks.common import rel_diff
    from ep_runtime.comm.deepep import import_deep_ep
    from ep_runtime.layer import EPMoE

    backends = list(args.backends)
    if "deepep" in backends and (device.type != "cuda" or import_deep_ep()[0] is None):
        backends.remove("deepep")
        emit({"kind": "note", "scheme": scheme, "note": "deepep unavailable: " + import_deep_ep()[1][:200]})
    if not backends:
        return
    layers: dict[str, Any] = {}
    t0 = time.perf_counter()
    weights = None
    try:
        for backend in backends:
            layers[backend] = EPMoE(_plan(args, scheme, backend), rank=rank, device=device, weights=weights)
            weights = layers[backend].weights
        _sync(device)
        ex = weights.experts
        weight_bytes = sum(
            t.numel() * t.element_size() for t in (ex.w13, ex.w2, ex.w13_scale, ex.w2_scale) if t is not None
        )
        bytes_per_expert = weight_bytes / ex.num_local_experts
        emit(
            {
                "kind": "build",
                "scheme": scheme,
                "build_s": time.perf_counter() - t0,
                "weight_bytes": weight_bytes,
            }
        )
        # Graph variants run last: a failed capture can leave the device unusable for what follows.
        eager_decode = {k: v for k, v in DECODE_VARIANTS.items() if not v.get("cuda_graph_decode")}
        graph_decode = {k: v for k, v in DECODE_VARIANTS.items() if v.get("cuda_graph_decode")}
        passes = [("decode", t, False, eager_decode, True) for t in args.decode_tokens]
        passes += [("prefill", t, True, PREFILL_VARIANTS, True) for t in args.prefill_tokens]
        if device.type == "cuda":
            passes += [("decode", t, False, graph_decode, False) for t in args.decode_tokens]
        base_out: dict[tuple, torch.Tensor] = {}
        for phase, num_tokens, is_prefill, variants, with_raw in passes:
            g = torch.Generator(device=device).manual_seed(4321 + 13 * rank + num_tokens)
            h = torch.randn(num_tokens, args.hidden, generator=g, device=device).to(torch.bfloat16)
            point = {"kind": "point", "scheme": scheme, "phase": phase, "tokens": num_tokens, "rank": rank}
            key = "plain" if phase == "decode" else "chunks1"
            for backend, layer in layers.items():
                if is_prefill and layer.plan.mode == "low_latency":
                    continue  # one-GPU DeepEP: no normal layout to measure prefill with
                for vname, switches in variants.items():
                    row = dict(point, backend=backend, variant=vname)
                    try:
                        layer.set_execution(
                            **{**OFF, **switches},
                            graph_buckets=args.decode_tokens if switches.get("cuda_graph_decode") else None,
                        )
                        for _ in range(args.warmup):
                            y = layer(h, is_prefill=is_prefill)
                        step_ms = _loop_ms(
                            lambda f=layer, x=h, p=is_prefill: f(x, is_prefill=p), args.iters, device
                        )
                        y = layer(h, is_prefill=is_prefill)
                        tel = layer.last_telemetry
                        row.update(
                            step_ms=step_ms,
                            layout=tel.layout,
                            rounds=tel.num_rounds,
                            stage_ms=tel.stage_ms,
                            imbalance_local=tel.imbalance_local,
                            imbalance_ranks=tel.imbalance_ranks,
                            dispatch_precision=layer.dispatch_precision(tel.layout),
                            experts_impl=layer.plan.experts_impl,
                        )
                        base_key = (backend, phase, num_tokens)
                        if vname == key:
                            base_out[base_key] = y.detach().clone()
                            row.update(_floor(layer, tel, ceilings, scheme, bytes_per_expert))
                            first = (backends[0], phase, num_tokens)
                            if backend != backends[0] and first in base_out:
                                row["rel_vs_" + backends[0]] = rel_diff(y, base_out[first])
                        elif base_key in base_out:
                            row["rel_vs_plain"] = rel_diff(y, base_out[base_key])
                    except Exception:  # noqa: BLE001 - recorded; symmetric failures keep ranks in step
                        row["error"] = traceback.format_exc()[-2000:]
                    emit(row)
                layer.set_execution(**OFF)
            if not with_raw:
                dist.barrier()
                continue
            if "deepep" in layers and not (is_prefill and layers["deepep"].plan.mode == "low_latency"):
                row = dict(point, backend="deepep raw", variant="raw")
                try:
                    row["comm_ms"] = _raw_deepep_ms(layers["deepep"], h, is_prefill, args.iters, device)
                except Exception:  # noqa: BLE001
                    row["error"] = traceback.format_exc()[-2000:]
                emit(row)
            dist.barrier()
    finally:
        for layer in layers.values():
            layer.close()
        layers.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _worker(rank: int, args: argparse.Namespace, init_file: str, q) -> None:
    def emit(row: dict) -> None:
        q.put(("row", rank, row))

    try:
        from benchmarks.common import init_rank

        device = init_rank(rank, args.world, args.device, init_file, args.timeout)
        ceilings = _ceilings(device)
        emit({"kind": "ceilings", **ceilings})
        for scheme in args.weights:
            try:
                _bench_scheme(rank, args, scheme, device, ceilings, emit)
            except Exception:  # noqa: BLE001 - record and stop (peers may be inside a collective)
                emit({"kind": "error", "scheme": scheme, "error": traceback.format_exc()[-3000:]})
                break
        q.put(("done", rank, None))
    except BaseException:  # noqa: BLE001
        q.put(("row", rank, {"kind": "error", "error": traceback.format_exc()[-3000:]}))
        q.put(("done", rank, None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def summarize(rows: list[dict], world: int) -> list[dict]:
    """Merge the ranks' rows per (scheme, phase, tokens, backend, variant): times and floors are the
    max over ranks, stage times rank 0's; add the floor, the raw DeepEP comm and the target ratio."""
    merged: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") != "point":
            continue
        key = (r["scheme"], r["phase"], r["tokens"], r["backend"], r["variant"])
        m = merged.setdefault(key, {k: r[k] for k in ("scheme", "phase", "tokens", "backend", "variant")})
        m.setdefault("ranks", 0)
        m["ranks"] += 1
        if "error" in r:
            m.setdefault("errors", []).append(f"rank {r['rank']}: {r['error'].strip().splitlines()[-1]}")
            continue
        for k in ("step_ms", "comm_ms", "floor_ms", "floor_mem_ms", "floor_mm_ms", "weight_bytes", "flops"):
            if r.get(k) is not None:
                m[k] = max(m.get(k, 0.0), r[k])
        for k in ("rel_vs_plain", "rel_vs_deepep"):
            if k in r:
                m[k] = max(m.get(k, 0.0), r[k])
        for k in ("layout", "rounds", "dispatch_precision", "experts_impl", "active_experts", "pairs"):
            if k in r and (r["rank"] == 0 or k not in m):
                m[k] = r[k]
        if r["rank"] == 0 and "stage_ms" in r:
            m["stage_ms"] = r["stage_ms"]
    points = list(merged.values())
    by_point: dict[tuple, dict[str, dict]] = {}
    for p in points:
        by_point.setdefault((p["scheme"], p["phase"], p["tokens"]), {})[f"{p['backend']}/{p['variant']}"] = p
    for (_, phase, _), group in by_point.items():
        base_key = "plain" if phase == "decode" else "chunks1"
        floor = None
        for b in ("deepep", "torch"):
            f = group.get(f"{b}/{base_key}", {}).get("floor_ms")
            floor = f if f is not None else floor
        raw = group.get("deepep raw/raw", {}).get("comm_ms")
        for p in group.values():
            if p["backend"] == "deepep raw":
                continue
            p["floor_ms"] = floor
            p["raw_comm_ms"] = raw
            p["target"] = TARGETS[phase]
            if floor is not None and p.get("step_ms") is not None:
                bound = floor + (raw or 0.0)
                p["bound_ms"] = bound
                p["ratio"] = p["step_ms"] / bound if raw is not None else None
                p["ratio_vs_floor_only"] = p["step_ms"] / floor if floor else None
                p["target_met"] = None if p["ratio"] is None else p["ratio"] <= TARGETS[phase]
            base = group.get(f"{p['backend']}/{base_key}", {}).get("step_ms")
            if base and p.get("step_ms"):
                p["speedup_vs_plain"] = base / p["step_ms"]
    order = {"decode": 0, "prefill": 1}
    points.sort(key=lambda p: (p["scheme"], order[p["phase"]], p["tokens"], p["backend"], p["variant"]))
    return points


def _progress(row: dict, elapsed: float) -> None:
    if "step_ms" in row:
        what = f"{row['step_ms']:.3f} ms"
    elif "comm_ms" in row:
        what = f"{row['comm_ms']:.3f} ms (comm)"
    else:
        what = "ERROR " + (row.get("error", "").strip().splitlines() or [""])[-1]
    head = f"{row['scheme']} {row['phase']} T={row['tokens']} {row['backend']}/{row['variant']}"
    print(f"[{elapsed:6.1f}s] {head}: {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    from benchmarks.common import RESULTS_DIR, device_info, print_table, write_results

    t_start = time.perf_counter()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rows: list[dict] = []
    done: set[int] = set()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, args, init_file, q)) for r in range(args.world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout
        try:
            while len(done) < args.world:
                left = deadline - time.monotonic()
                if left <= 0:
                    print(
                        f"ranks {sorted(set(range(args.world)) - done)} did not finish in {args.timeout} s",
                        file=sys.stderr,
                    )
                    rows.append({"kind": "error", "error": f"timeout after {args.timeout} s"})
                    break
                try:
                    kind, rank, row = q.get(timeout=min(left, 5.0))
                except queue_mod.Empty:
                    if not any(p.is_alive() for p in procs):
                        rows.append({"kind": "error", "error": "all ranks exited without finishing"})
                        break
                    continue
                if kind == "done":
                    done.add(rank)
                    continue
                row["rank"] = rank
                rows.append(row)
                if row.get("kind") == "point" and rank == 0:
                    _progress(row, time.perf_counter() - t_start)
        finally:
            for p in procs:
                p.join(timeout=20)
                if p.is_alive():
                    p.kill()
    points = summarize(rows, args.world)
    ceilings = next((r for r in rows if r.get("kind") == "ceilings" and r["rank"] == 0), {})
    ceilings = {k: v for k, v in ceilings.items() if k not in ("kind", "rank")}
    table = []
    for p in points:
        table.append(
            {
                "w": p["scheme"],
                "phase": p["phase"],
                "T": p["tokens"],
                "impl": f"{p['backend']}/{p['variant']}",
                "step ms": p.get("step_ms", p.get("comm_ms", float("nan"))),
                "floor ms": p.get("floor_ms") or float("nan"),
                "raw comm": p.get("raw_comm_ms") or float("nan"),
                "ratio": p.get("ratio") or float("nan"),
                "target": p.get("target", ""),
                "x plain": p.get("speedup_vs_plain") or float("nan"),
                "rel": p.get("rel_vs_plain", p.get("rel_vs_deepep", float("nan"))),
                "err": "yes" if p.get("errors") else "",
            }
        )
    print_table(
        f"EPMoE step, {args.world} ranks, D={args.hidden} E={args.num_experts} I={args.inter} K={args.topk}",
        table,
    )
    errors = [r for r in rows if r.get("kind") == "error"] + [p for p in points if p.get("errors")]
    payload = {
        "args": vars(args),
        "ranks": args.world,
        "shape": {
            "hidden": args.hidden,
            "num_experts": args.num_experts,
            "local_experts": args.num_experts // args.world,
            "inter": args.inter,
            "top_k": args.topk,
            "capacity": args.capacity,
        },
        "ceilings": ceilings,
        "targets": TARGETS,
        "timing": (
            f"step_ms: mean of {args.iters} back-to-back steps after {args.warmup} warm-up (CUDA events around "
            "the loop), max over ranks; stage_ms: the last step's telemetry on rank 0; comm_ms: raw DeepEP "
            "dispatch+combine loop for the same routing"
        ),
        "points": points,
        "notes": [r for r in rows if r.get("kind") in ("note", "build")],
        "errors": [r.get("error") if "error" in r else r.get("errors") for r in errors],
        "device_info": device_info(),
        "elapsed_s": time.perf_counter() - t_start,
    }
    out_dir = Path(args.out_dir) if args.out_dir else None
    what = "step" if args.device == "cuda" else "step-cpu-smoke"
    path = write_results(what, payload, out_dir)
    if not args.no_report:
        try:
            from benchmarks import report

            dirs = [RESULTS_DIR] + (
                [out_dir] if out_dir and out_dir.resolve() != RESULTS_DIR.resolve() else []
            )
            plots = out_dir or RESULTS_DIR
            doc = (out_dir / "performance.md") if out_dir else None
            report.main(
                [*sum((["--results", str(d)] for d in dirs), []), "--plots-dir", str(plots)]
                + (["--doc", str(doc)] if doc else [])
            )
        except Exception:  # noqa: BLE001 - the JSON is written; the report can be rerun
            print(f"report failed:\n{traceback.format_exc()}", file=sys.stderr)
    print(f"done in {time.perf_counter() - t_start:.0f} s: {path}")
    return 0 if not errors and len(done) == args.world else 1


if __name__ == "__main__":
    raise SystemExit(main())
