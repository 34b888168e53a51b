"""Whole-layer benchmark: `EPMoE` per-stage times, the step total against the sum of its stages and
against the stages timed in isolation, and verification against the float32 reference.

Launches its own ranks (torch.multiprocessing; NCCL on CUDA, gloo on CPU):

    python benchmarks/bench_layer.py --backend deepep            # 2 GPUs, DeepSeek-V3-shaped layer
    python benchmarks/bench_layer.py --backend torch --weights bf16
    python benchmarks/bench_layer.py --device cpu --backend torch --hidden 256 --num-experts 16 \
        --inter 128 --topk 4 --prefill-tokens 64 --decode-tokens 16   # CPU smoke run

Per weights scheme and phase (prefill: `--prefill-tokens` per rank with `is_prefill=True`, normal
layout; decode: `--decode-tokens` per rank, low-latency layout under `mode: auto`), every rank:
  1. runs `--warmup` steps, then `--iters` timed steps: host wall time per step (device synchronised
     before and after) and the layer's own telemetry (CUDA events per stage);
  2. times the stages in isolation with fixed iteration counts (every rank runs the same number, so
     the collectives line up): router, dispatch and combine (back to back), experts;
  3. verifies the last step's output against `reference_moe` (float32, experts rebuilt one at a
     time): with the reference's own routing and with the layer's routing (isolates near-tie flips
     of the top-k choice from dispatch/expert/combine errors).
Rank 0 prints a table and writes `benchmarks/results/<date>-<device>-layer-<backend>.json`.
"""

from __future__ import annotations

import argparse
import os
import statistics
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

# Relative Frobenius error bounds per weights scheme (bf16 expert GEMMs and bf16 combine on GPU).
TOLERANCE = {"bf16": 2e-2, "fp8_block": 4e-2, "w4a8": 0.15}
# Tokens whose top-k set differs between the runtime router (bf16 GEMM, fp32 out) and the float32
# reference may differ by a near tie; more than this fraction points at a router bug.
MAX_ROUTING_MISMATCH = 5e-3


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["deepep", "torch"], default="deepep")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--world", type=int, default=2, help="EP ranks (one GPU each)")
    p.add_argument(
        "--weights", nargs="+", default=["bf16", "fp8_block"], choices=["bf16", "fp8_block", "w4a8"]
    )
    p.add_argument("--experts", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--n-group", type=int, default=8)
    p.add_argument("--topk-group", type=int, default=4)
    p.add_argument("--prefill-tokens", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--capacity", type=int, default=None, help="C (default: --decode-tokens)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=540.0, help="seconds to wait for the ranks")
    return p.parse_args(argv)


def _plan(args: argparse.Namespace, scheme: str):
    from benchmarks.common import deepseek_style_model
    from ep_runtime.config import parse_config, resolve_plan

    model = deepseek_style_model(args, scheme)
    cfg = parse_config(
        dict(
            model=model,
            parallel=dict(ep_size=args.world, device=args.device),
            dispatch=dict(
                backend=args.backend,
                mode="auto",
                num_max_dispatch_tokens_per_rank=args.capacity or args.decode_tokens,
            ),
            kernels=dict(experts=args.experts),
        )
    )
    return resolve_plan(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Median milliseconds of timed regions (CUDA events on GPU, perf_counter on CPU)."""

    def __init__(self, device: torch.device):
        self.is_cuda = device.type == "cuda"
        self.marks: list[list[Any]] = []

    def mark(self) -> Any:
        if self.is_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed(self, a: Any, b: Any) -> float:
        if self.is_cuda:
            b.synchronize()
            return float(a.elapsed_time(b))
        return (b - a) * 1e3


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _isolated_stages(layer, h: torch.Tensor, layout, iters: int) -> dict[str, float]:
    """Router, dispatch, experts and combine each timed on its own (fixed counts on every rank)."""
    from ep_runtime.types import Routing

    device = h.device
    t = _Timer(device)
    router_ms, dispatch_ms, combine_ms, experts_ms = [], [], [], []
    for _ in range(iters):
        a = t.mark()
        routing, _ = layer.router(h)
        b = t.mark()
        router_ms.append(t.elapsed(a, b))
    dispatcher = layer.dispatchers[layout]
    dispatched, handle = dispatcher.dispatch(h, routing)
    expert_out = layer.experts.forward(dispatched, layer.weights.experts)
    for _ in range(iters):
        a = t.mark()
        layer.experts.forward(dispatched, layer.weights.experts)
        b = t.mark()
        experts_ms.append(t.elapsed(a, b))
    dispatcher.combine(expert_out, handle)
    _sync(device)
    for _ in range(iters):
        dist.barrier()
        # A fresh Routing object each time, as in a real step (DeepEP's dispatcher would otherwise
        # reuse the cached layout of an identical routing object).
        fresh = Routing(topk_ids=routing.topk_ids, topk_weights=routing.topk_weights)
        a = t.mark()
        d2, h2 = dispatcher.dispatch(h, fresh)
        b = t.mark()
        dispatcher.combine(expert_out, h2)  # same routing: same receive shape as expert_out
        c = t.mark()
        dispatch_ms.append(t.elapsed(a, b))
        combine_ms.append(t.elapsed(b, c))
    parts = {
        "router": _median(router_ms),
        "dispatch": _median(dispatch_ms),
        "experts": _median(experts_ms),
        "combine": _median(combine_ms),
    }
    parts["sum"] = sum(parts.values())
    return parts


def _verify(layer, h: torch.Tensor, y: torch.Tensor, layout) -> dict[str, Any]:
    from ep_runtime.reference import reference_router_logits, reference_routing

    scheme = layer.model_cfg.weights
    tol = TOLERANCE[scheme]
    ids, weights = layer.last_routing.topk_ids, layer.last_routing.topk_weights
    router = layer.weights.router
    ref_ids, _ = reference_routing(
        reference_router_logits(h, router.weight), layer.model_cfg, router.correction_bias
    )
    is_same = (ids.sort(-1).values == ref_ids.sort(-1).values).all(-1)
    mismatch = int((~is_same).sum())
    yf = y.float()
    ref_lr = layer.reference_forward(h, layout=layout, routing=(ids, weights))
    ref_own = layer.reference_forward(h, layout=layout)
    rel_lr = float((yf - ref_lr).norm() / ref_lr.norm().clamp_min(1e-12))
    rel_own = float((yf - ref_own).norm() / ref_own.norm().clamp_min(1e-12))
    err_t = (yf - ref_lr).abs().amax(1)
    scale = ref_lr.abs().max().clamp_min(1e-6)
    num_tokens = max(1, h.shape[0])
    return {
        "tolerance": tol,
        "rel_err": rel_lr,
        "rel_err_reference_routing": rel_own,
        "max_abs_err": float(err_t.max()) if err_t.numel() else 0.0,
        "max_err_over_ref_max": float(err_t.max() / scale) if err_t.numel() else 0.0,
        "routing_mismatch_tokens": mismatch,
        "passed": rel_lr < tol and mismatch / num_tokens <= MAX_ROUTING_MISMATCH,
    }


def _bench_scheme(
    rank: int, args: argparse.Namespace, scheme: str, device: torch.device
) -> list[dict[str, Any]]:
    from ep_runtime.layer import EPMoE
    from ep_runtime.weights import LocalExperts

    plan = _plan(args, scheme)
    t_build = time.perf_counter()
    layer = EPMoE(plan, rank=rank, device=device)
    _sync(device)
    build_s = time.perf_counter() - t_build
    ex: LocalExperts = layer.weights.experts
    weight_bytes = sum(
        t.numel() * t.element_size() for t in (ex.w13, ex.w2, ex.w13_scale, ex.w2_scale) if t is not None
    )
    rows = []
    phases = [("prefill", args.prefill_tokens, True), ("decode", args.decode_tokens, False)]
    try:
        for phase, num_tokens, is_prefill in phases:
            if num_tokens == 0:
                continue
            g = torch.Generator(device=device).manual_seed(1234 + 17 * rank + (0 if is_prefill else 1))
            h = torch.randn(num_tokens, args.hidden, generator=g, device=device).to(torch.bfloat16)
            for _ in range(args.warmup):
                layer(h, is_prefill=is_prefill)
            wall, totals = [], []
            stages: dict[str, list[float]] = {}
            tel = None
            for _ in range(args.iters):
                dist.barrier()
                _sync(device)
                t0 = time.perf_counter()
                y = layer(h, is_prefill=is_prefill)
                _sync(device)
                wall.append((time.perf_counter() - t0) * 1e3)
                tel = layer.last_telemetry
                totals.append(tel.total_ms)
                for k, v in tel.stage_ms.items():
                    stages.setdefault(k, []).append(v)
            stage_ms = {k: _median(v) for k, v in stages.items()}
            row: dict[str, Any] = {
                "rank": rank,
                "scheme": scheme,
                "phase": phase,
                "tokens": num_tokens,
                "layout": tel.layout,
                "rounds": tel.num_rounds,
                "dispatch_precision": layer.dispatch_precision(tel.layout),
                "experts_impl": plan.experts_impl,
                "step_wall_ms": _median(wall),
                "step_events_ms": _median(totals),
                "stage_ms": stage_ms,
                "stages_sum_ms": sum(stage_ms.values()),
                "tokens_per_local_expert_max": max(tel.tokens_per_local_expert),
                "imbalance_local": tel.imbalance_local,
                "imbalance_ranks": tel.imbalance_ranks,
                "build_s": build_s,
                "weight_bytes": weight_bytes,
            }
            from ep_runtime.types import Layout

            layout = Layout(tel.layout)
            if tel.num_rounds == 1:
                row["isolated_ms"] = _isolated_stages(layer, h, layout, args.iters)
            if not args.no_verify:
                row["verify"] = _verify(layer, h, y, layout)
            rows.append(row)
            dist.barrier()
    finally:
        layer.close()
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _worker(rank: int, args: argparse.Namespace, init_file: str, queue) -> None:
    try:
        from benchmarks.common import init_rank

        device = init_rank(rank, args.world, args.device, init_file, args.timeout)
        rows = []
        for scheme in args.weights:
            try:
                rows += _bench_scheme(rank, args, scheme, device)
            except Exception:  # noqa: BLE001 - record and go on with the next scheme
                rows.append({"rank": rank, "scheme": scheme, "error": traceback.format_exc()})
                break  # the peers may be stuck in a collective of this scheme; do not start another
        queue.put((rank, "ok", rows))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    from benchmarks.common import device_info, print_table, write_results

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    results: dict[int, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, args, init_file, queue)) for r in range(args.world)]
        for p in procs:
            p.start()
        try:
            for _ in range(args.world):
                rank, status, payload = queue.get(timeout=args.timeout)
                results[rank] = payload if status == "ok" else [{"rank": rank, "error": payload}]
        except Exception as exc:  # noqa: BLE001 - queue.Empty: a rank hung
            print(f"ranks did not all report within {args.timeout} s: {exc!r}", file=sys.stderr)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    rows = [r for rank in sorted(results) for r in results[rank]]
    errors = [r for r in rows if "error" in r]
    for e in errors:
        print(f"rank {e['rank']} {e.get('scheme', '')} failed:\n{e['error']}", file=sys.stderr)
    table = []
    for r in rows:
        if "error" in r:
            continue
        iso = r.get("isolated_ms", {})
        v = r.get("verify", {})
        table.append(
            {
                "rank": r["rank"],
                "scheme": r["scheme"],
                "phase": r["phase"],
                "T": r["tokens"],
                "layout": r["layout"],
                "disp": r["dispatch_precision"],
                "wall ms": r["step_wall_ms"],
                "events ms": r["step_events_ms"],
                "mode": r["stage_ms"].get("mode", 0.0),
                "router": r["stage_ms"].get("router", 0.0),
                "dispatch": r["stage_ms"].get("dispatch", 0.0),
                "experts": r["stage_ms"].get("experts", 0.0),
                "combine": r["stage_ms"].get("combine", 0.0),
                "iso sum": iso.get("sum", float("nan")),
                "rel err": v.get("rel_err", float("nan")),
                "flips": v.get("routing_mismatch_tokens", ""),
                "ok": v.get("passed", ""),
            }
        )
    print_table(f"EPMoE layer, backend={args.backend}, world={args.world}", table)
    payload = {
        "args": vars(args),
        "shape": {
            "hidden": args.hidden,
            "num_experts": args.num_experts,
            "local_experts": args.num_experts // args.world,
            "inter": args.inter,
            "top_k": args.topk,
        },
        "rows": rows,
        "device_info": device_info(),
        "passed": not errors
        and len(results) == args.world
        and all(r.get("verify", {}).get("passed", True) for r in rows),
    }
    write_results(f"layer-{args.backend}", payload, Path(args.out_dir) if args.out_dir else None)
    return 0 if payload["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
