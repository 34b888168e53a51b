"""Dispatch/combine: raw DeepEP calls vs the runtime's `deepep` backend vs the `torch` backend.

    python benchmarks/bench_dispatch.py [--normal-tokens 4096] [--ll-tokens 128] [--ll-experts 32]

Runs one process per visible GPU (NCCL), DeepSeek-V3 shapes (D 7168, K 8, E 256; low-latency with
`--ll-experts` experts). Normal mode: 4096 tokens per rank, BF16 and FP8 dispatch, BF16 combine;
low-latency: 128 tokens per rank (= C). Every variant sees the same inputs and the same routing.

Timing: every rank runs the same fixed number of iterations (collectives must match, so no
adaptive repetition); each iteration flushes L2, then records CUDA events around dispatch and
around combine; medians are reported. A second number, `loop_us`, runs dispatch+combine pairs back
to back without flushing (it exposes host overhead when the GPU waits on Python).
Bandwidth is DeepEP's: bytes of the dispatched rows this rank receives (normal: `N_recv * D * 2`,
FP8 `N_recv * (D + D/128 * 4)`; combine: `N_recv * D * 2`) or, in low-latency mode, of the
(token, expert) selections it sends (FP8 `D + D/128 * 4 + 16`, BF16 `2 D + 16` per selection;
combine `2 D`). The runtime's FP8 dispatch quantises inside, so the raw FP8 variant quantises with
the same kernel inside its timed region (equal work); one more cached row, "deepep raw,
pre-quantised", times DeepEP alone as its own test does (the row to hold against its published
GB/s). Low-latency timings are CUDA events around each call after one barrier per variant, so
rank skew counts; DeepEP's test times its kernels alone, after a barrier per iteration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import deepep_normal_dispatch, print_table, write_results  # noqa: E402

HIDDEN, TOP_K, NUM_EXPERTS = 7168, 8, 256


def _plan(mode: str, precision: str, num_experts: int, world: int, capacity: int, device: str):
    from ep_runtime.config import parse_config, resolve_plan

    cfg = parse_config(
        {
            "model": {
                "name": "deepseek-v3-shapes",
                "hidden_size": HIDDEN,
                "num_experts": num_experts,
                "top_k": TOP_K,
                "moe_intermediate_size": 2048,
            },
            "parallel": {"ep_size": world, "device": device},
            "dispatch": {
                "backend": "deepep" if device == "cuda" else "torch",
                "mode": mode,
                "precision": {mode: precision},
                "num_max_dispatch_tokens_per_rank": capacity,
            },
        }
    )
    return resolve_plan(cfg)


class _Timer:
    """Fixed-count timing of (dispatch, combine) pairs, identical on every rank."""

    def __init__(self, device: str, iters: int, warmup: int):
        self.cuda = device == "cuda"
        self.iters, self.warmup = iters, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if self.cuda else None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def pairs(self, dispatch: Callable[[], Any], combine: Callable[[Any], Any]) -> dict[str, float]:
        for _ in range(self.warmup):
            combine(dispatch())
        self._sync()
        dist.barrier()
        t_d, t_c = [], []
        for _ in range(self.iters):
            if self.cuda:
                self.flush.zero_()
                e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                e0.record()
                state = dispatch()
                e1.record()
                combine(state)
                e2.record()
                t_d.append((e0, e1))
                t_c.append((e1, e2))
            else:
                t0 = time.perf_counter()
                state = dispatch()
                t1 = time.perf_counter()
                combine(state)
                t_d.append(t1 - t0)
                t_c.append(time.perf_counter() - t1)
        self._sync()
        if self.cuda:
            t_d = [a.elapsed_time(b) * 1e3 for a, b in t_d]
            t_c = [a.elapsed_time(b) * 1e3 for a, b in t_c]
        else:
            t_d, t_c = [t * 1e6 for t in t_d], [t * 1e6 for t in t_c]
        dist.barrier()
        # Back-to-back pairs, no flush: includes any host overhead the GPU waits on.
        n = max(self.iters, 5)
        self._sync()
        t0 = time.perf_counter()
        for _ in range(n):
            combine(dispatch())
        self._sync()
        loop_us = (time.perf_counter() - t0) * 1e6 / n
        dist.barrier()
        return {
            "dispatch_us": statistics.median(t_d),
            "combine_us": statistics.median(t_c),
            "loop_us": loop_us,
        }

    def single(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        self._sync()
        dist.barrier()
        ts = []
        for _ in range(self.iters):
            if self.cuda:
                self.flush.zero_()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn()
                e1.record()
                ts.append((e0, e1))
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        self._sync()
        dist.barrier()
        return statistics.median(
            [a.elapsed_time(b) * 1e3 for a, b in ts] if self.cuda else [t * 1e6 for t in ts]
        )


def _routing(num_tokens: int, num_experts: int, device: str, seed: int):
    """DeepEP's test routing: top-k of |randn| + 1 scores (distinct experts), 10 slots set to -1."""
    from ep_runtime.types import Routing

    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.randn(num_tokens, num_experts, generator=g, device=device).abs() + 1
    ids = torch.topk(scores, TOP_K, dim=-1).indices
    flat = torch.randint(0, num_tokens * TOP_K, (10,), generator=g, device=device)
    ids.view(-1)[flat] = -1
    w = torch.rand(num_tokens, TOP_K, generator=g, device=device) + 0.1
    return Routing(ids.to(torch.int64).contiguous(), w)


def _row(section, impl, precision, res, d_bytes, c_bytes, raw=None) -> dict[str, Any]:
    row = {
        "mode": section,
        "impl": impl,
        "precision": precision,
        "dispatch_us": res["dispatch_us"],
        "dispatch_GBps": d_bytes / res["dispatch_us"] / 1e3,
        "combine_us": res["combine_us"],
        "combine_GBps": c_bytes / res["combine_us"] / 1e3,
        "loop_us": res["loop_us"],
    }
    if raw is not None:
        row["dispatch_overhead_pct"] = 100 * (res["dispatch_us"] / raw["dispatch_us"] - 1)
        row["combine_overhead_pct"] = 100 * (res["combine_us"] / raw["combine_us"] - 1)
        row["loop_overhead_pct"] = 100 * (res["loop_us"] / raw["loop_us"] - 1)
    return row


def _bench_normal(rank: int, world: int, args, timer: _Timer, device: str, have_deepep: bool) -> list[dict]:
    from ep_runtime.comm.deepep import DeepEPBufferOwner, DeepEPDispatcher
    from ep_runtime.comm.torch_backend import TorchDispatcher
    from ep_runtime.kernels.quant import per_token_group_quant_fp8
    from ep_runtime.types import Layout, Routing

    T, E = args.normal_tokens, NUM_EXPERTS
    x = torch.randn(T, HIDDEN, device=device).to(torch.bfloat16)
    routing = _routing(T, E, device, seed=rank)
    ids, weights = routing.topk_ids, routing.topk_weights
    rows: list[dict] = []
    owners: list[Any] = []

    def one_precision(precision: str) -> None:
        fp8 = precision == "fp8"
        plan = _plan("normal", precision, E, world, args.ll_tokens, device)
        mode_plan = plan.for_layout(Layout.NORMAL)
        tdisp = TorchDispatcher(plan, mode_plan, None)
        n_recv = tdisp.dispatch(x, routing)[0].x.shape[0]
        expert_out = torch.randn(n_recv, HIDDEN, device=device).to(torch.bfloat16)
        d_bytes = n_recv * (HIDDEN + HIDDEN // 128 * 4 if fp8 else HIDDEN * 2)
        c_bytes = n_recv * HIDDEN * 2

        def x_in():
            return per_token_group_quant_fp8(x, group_size=128) if fp8 else x

        raw_res = None
        if have_deepep:
            if not owners:
                owners.append(DeepEPBufferOwner(plan, None).acquire())  # held until the section ends
            owner = owners[0]
            ddisp = DeepEPDispatcher(plan, mode_plan, None, owner=owner)
            buf = owner.buffer
            raw_ids = ids.to(getattr(owner.deep_ep, "topk_idx_t", torch.int64))  # DeepEP's index type

            def raw_dispatch():
                return deepep_normal_dispatch(buf, x_in(), raw_ids, weights, E, owner.dispatch_config)[4]

            raw_res = timer.pairs(
                raw_dispatch, lambda h: buf.combine(expert_out, h, config=owner.combine_config)
            )
            rows.append(_row("normal", "deepep raw", precision, raw_res, d_bytes, c_bytes))
            # A new Routing object per call: the uncached path (layout kernel + dispatch).
            res = timer.pairs(
                lambda: ddisp.dispatch(x, Routing(ids, weights))[1], lambda h: ddisp.combine(expert_out, h)
            )
            rows.append(_row("normal", "runtime deepep", precision, res, d_bytes, c_bytes, raw_res))

            # Cached layout (the same DeepEP handle / the same Routing object): dispatch only.
            handle = raw_dispatch()
            raw_cached = timer.single(
                lambda: buf.dispatch(x_in(), handle=handle, config=owner.dispatch_config)
            )
            ddisp.dispatch(x, routing)
            rt_cached = timer.single(lambda: ddisp.dispatch(x, routing))
            timed = [("deepep raw", raw_cached), ("runtime deepep", rt_cached)]
            if fp8:
                # DeepEP's published FP8 figures time the cached dispatch of pre-quantised input:
                # that row is the one to hold against them (the two above include the quantisation).
                x_q = x_in()
                timed.append(
                    (
                        "deepep raw, pre-quantised",
                        timer.single(lambda: buf.dispatch(x_q, handle=handle, config=owner.dispatch_config)),
                    )
                )
            for impl, t_us in timed:
                row = {
                    "mode": "normal (cached layout)",
                    "impl": impl,
                    "precision": precision,
                    "dispatch_us": t_us,
                    "dispatch_GBps": d_bytes / t_us / 1e3,
                }
                if impl == "runtime deepep":
                    row["dispatch_overhead_pct"] = 100 * (t_us / raw_cached - 1)
                rows.append(row)
            ddisp.close()
        res = timer.pairs(lambda: tdisp.dispatch(x, routing)[1], lambda h: tdisp.combine(expert_out, h))
        rows.append(_row("normal", "runtime torch", precision, res, d_bytes, c_bytes, raw_res))
        tdisp.close()

    return _over_precisions(rank, ("bf16", "fp8"), one_precision, rows, owners)


def _bench_low_latency(
    rank: int, world: int, args, timer: _Timer, device: str, have_deepep: bool
) -> list[dict]:
    from ep_runtime.comm.deepep import DeepEPBufferOwner, DeepEPDispatcher
    from ep_runtime.comm.torch_backend import TorchDispatcher
    from ep_runtime.types import Layout

    T = C = args.ll_tokens
    E = args.ll_experts
    L = E // world
    x = torch.randn(T, HIDDEN, device=device).to(torch.bfloat16)
    routing = _routing(T, E, device, seed=100 + rank)
    ids, weights = routing.topk_ids, routing.topk_weights
    num_selections = int((ids >= 0).sum())
    expert_out = torch.randn(L, C * world, HIDDEN, device=device).to(torch.bfloat16)
    rows: list[dict] = []
    owners: list[Any] = []

    def one_precision(precision: str) -> None:
        fp8 = precision == "fp8"
        plan = _plan("low_latency", precision, E, world, C, device)
        mode_plan = plan.for_layout(Layout.LOW_LATENCY)
        d_bytes = num_selections * ((HIDDEN + HIDDEN // 128 * 4 + 16) if fp8 else (2 * HIDDEN + 16))
        c_bytes = num_selections * 2 * HIDDEN
        raw_res = None
        if have_deepep:
            if not owners:
                owners.append(DeepEPBufferOwner(plan, None).acquire())  # held until the section ends
            buf = owners[0].buffer
            ddisp = DeepEPDispatcher(plan, mode_plan, None, owner=owners[0])

            raw_ids = ids.to(getattr(owners[0].deep_ep, "topk_idx_t", torch.int64))  # DeepEP's index type

            def raw_dispatch():
                _, _, handle, _, _ = buf.low_latency_dispatch(
                    x, raw_ids, C, E, use_fp8=fp8, async_finish=False, return_recv_hook=False
                )
                return handle

            raw_res = timer.pairs(
                raw_dispatch, lambda h: buf.low_latency_combine(expert_out, raw_ids, weights, h)
            )
            rows.append(_row("low_latency", "deepep raw", precision, raw_res, d_bytes, c_bytes))
            res = timer.pairs(lambda: ddisp.dispatch(x, routing)[1], lambda h: ddisp.combine(expert_out, h))
            rows.append(_row("low_latency", "runtime deepep", precision, res, d_bytes, c_bytes, raw_res))
            ddisp.close()
        tdisp = TorchDispatcher(plan, mode_plan, None)
        res = timer.pairs(lambda: tdisp.dispatch(x, routing)[1], lambda h: tdisp.combine(expert_out, h))
        rows.append(_row("low_latency", "runtime torch", precision, res, d_bytes, c_bytes, raw_res))
        tdisp.close()

    return _over_precisions(rank, ("fp8", "bf16"), one_precision, rows, owners)


def _over_precisions(rank: int, precisions, one_precision, rows: list[dict], owners: list) -> list[dict]:
    """Run `one_precision` for each precision (printing its rows as they come), then release the
    DeepEP buffers the section held; returns `rows`."""
    for precision in precisions:
        n0 = len(rows)
        one_precision(precision)
        _print_rows(rank, rows[n0:])
    for owner in owners:
        owner.release()
    return rows


def _print_rows(rank: int, rows: list[dict]) -> None:
    """Progress lines on rank 0, so a later hang still leaves the numbers measured so far."""
    if rank != 0:
        return
    for r in rows:
        vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
        print(f"[bench] {vals}", flush=True)


def _worker(rank: int, world: int, init_file: str, args, queue) -> None:
    try:
        device = args.device
        if device == "cuda":
            torch.cuda.set_device(rank)
            dist.init_process_group(
                "nccl",
                init_method=f"file://{init_file}",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=120),
                device_id=torch.device("cuda", rank),
            )
        else:
            torch.set_num_threads(1)
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        from ep_runtime.comm.deepep import import_deep_ep

        have_deepep = import_deep_ep()[0] is not None and not args.no_deepep
        timer = _Timer(device, args.iters, args.warmup)
        rows: list[dict] = []
        errors: list[str] = []
        for name, fn in (("normal", _bench_normal), ("low_latency", _bench_low_latency)):
            if name in args.skip:
                continue
            try:
                rows += fn(rank, world, args, timer, device, have_deepep)
            except Exception:  # noqa: BLE001 - reported, and the other section still runs
                errors.append(f"{name}: {traceback.format_exc()}")
                break  # a failed collective leaves the ranks out of step; stop here
        queue.put((rank, rows, errors, have_deepep))
    except Exception:  # noqa: BLE001
        queue.put((rank, [], [traceback.format_exc()], False))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--normal-tokens", type=int, default=4096)
    p.add_argument("--ll-tokens", type=int, default=128, help="tokens per rank in low-latency mode (= C)")
    p.add_argument("--ll-experts", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ranks", type=int, default=0, help="default: all visible GPUs")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a gloo smoke run (tiny shapes)"
    )
    p.add_argument("--no-deepep", action="store_true", help="torch backend only")
    p.add_argument("--skip", nargs="*", default=[], choices=("normal", "low_latency"))
    p.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results/")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(
            f"bench_dispatch needs >= 2 GPUs (found {torch.cuda.device_count()}); use --device cpu for a smoke run"
        )
        return 2
    world = args.ranks or (torch.cuda.device_count() if args.device == "cuda" else 2)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    results: dict[int, tuple] = {}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, args, queue)) for r in range(world)]
        for proc in procs:
            proc.start()
        try:
            for _ in range(world):
                rank, rows, errors, have_deepep = queue.get(timeout=args.timeout)
                results[rank] = (rows, errors, have_deepep)
        finally:
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
    for rank in sorted(results):
        for err in results[rank][1]:
            print(f"[rank {rank}] ERROR {err}")
    rows0 = results.get(0, ([], [], False))[0]
    columns = [
        "mode",
        "impl",
        "precision",
        "dispatch_us",
        "dispatch_GBps",
        "dispatch_overhead_pct",
        "combine_us",
        "combine_GBps",
        "combine_overhead_pct",
        "loop_us",
        "loop_overhead_pct",
    ]
    print_table(
        f"dispatch/combine, {world} ranks, D={HIDDEN} K={TOP_K}: normal E={NUM_EXPERTS} T={args.normal_tokens}/rank, "
        f"low-latency E={args.ll_experts} T=C={args.ll_tokens}/rank (rank 0)",
        rows0,
        columns,
    )
    payload = {
        "shapes": {
            "hidden": HIDDEN,
            "top_k": TOP_K,
            "normal": {"num_experts": NUM_EXPERTS, "tokens_per_rank": args.normal_tokens},
            "low_latency": {
                "num_experts": args.ll_experts,
                "tokens_per_rank": args.ll_tokens,
                "capacity": args.ll_tokens,
            },
        },
        "ranks": world,
        "timing": f"median of {args.iters} iterations (L2 flushed) after {args.warmup} warm-up; loop_us: back-to-back mean",
        "deepep_available": bool(results.get(0, (None, None, False))[2]),
        "targets": {
            "runtime_overhead_vs_raw_pct_max": 5,
            "deepep_reference_2xH200": {
                "normal_fp8_dispatch_GBps": 247,
                "normal_bf16_dispatch_GBps": 340,
                "normal_combine_GBps": 293,
                "low_latency_dispatch_us": "52-56",
                "low_latency_combine_us": "52-54",
            },
        },
        "rows_by_rank": {r: results[r][0] for r in sorted(results)},
        "errors": {r: results[r][1] for r in sorted(results) if results[r][1]},
    }
    if len(results) == world and rows0:
        write_results("dispatch" if args.device == "cuda" else "dispatch-cpu-smoke", payload, args.out_dir)
    ok = len(results) == world and not any(results[r][1] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
