"""Shared benchmark plumbing: device facts, measured ceilings (copy bandwidth, matmul rate), timing,
printing a table and writing JSON to `benchmarks/results/`.

Every benchmark measures its own baseline and the ceilings in the same run on the same device.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import socket
from pathlib import Path
from typing import Any

import torch

from ep_runtime.kernels.tables import normalise

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            device=p.name,
            num_gpus=torch.cuda.device_count(),
            sm_count=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            capability=f"{p.major}.{p.minor}",
        )
    else:
        info["device"] = "cpu"
    return info


def device_slug() -> str:
    return normalise(device_info()["device"])


def bench_us(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median time of `fn()` in microseconds (`triton.testing.do_bench` on GPU)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")) * 1e3
    import time

    for _ in range(max(1, warmup // 5)):
        fn()
    times = []
    for _ in range(max(3, rep // 10)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def loop_us(fn, calls: int = 2000, tries: int = 3) -> float:
    """Wall time per call of `calls` back-to-back eager calls with no cache flush between them (the
    host's cost per call, or the GPU's time where that is larger), best of `tries`, in microseconds."""
    import time

    best = float("inf")
    for _ in range(tries):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative difference ||a - b|| / ||b|| in float32 (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def capture_graph(fn, replays: int = 1):
    """Run `fn` once eagerly and once on a side stream (compilation, allocator warm-up), then
    capture `replays` back-to-back calls in a CUDA graph. Returns `(graph, output of the last
    captured call)`; the output's storage is refreshed by every `graph.replay()`."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    out = None
    # captured on the warm-up stream, whose self-cleaning kernel workspaces (`kernels.tables._zeroed`,
    # per stream) exist already: no zero-fill of a fresh one lands in the graph
    with torch.cuda.graph(graph, stream=side):
        for _ in range(replays):
            out = fn()
    return graph, out


def graph_us(fn, replays: int = 1, tries: int = 1, warmup: int = 5, rep: int = 40) -> float:
    """Median time of one `fn()` replayed from a CUDA graph that holds `replays` back-to-back calls
    (more replays amortise the graph launch), best of `tries` measurements, in microseconds."""
    graph, _ = capture_graph(fn, replays)
    t = min(bench_us(graph.replay, warmup=warmup, rep=rep) for _ in range(tries)) / replays
    del graph
    return t


def deepep_normal_dispatch(buffer, x_in, ids, weights, num_experts: int, config):
    """Raw DeepEP (no runtime wrapper): `get_dispatch_layout` then an uncached normal `dispatch`
    of `x_in` (a tensor, or `(e4m3, scales)`); returns dispatch's tuple `(recv_x, recv_topk_idx,
    recv_topk_weights, counts list, handle, event)`. `ids` must already be DeepEP's index type."""
    n_rank, n_rdma, n_expert, in_rank, _ = buffer.get_dispatch_layout(ids, num_experts)
    return buffer.dispatch(
        x_in,
        num_tokens_per_rank=n_rank,
        num_tokens_per_rdma_rank=n_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=n_expert,
        topk_idx=ids,
        topk_weights=weights,
        config=config,
    )


def measure_copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (reads + writes counted), the HBM ceiling."""
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_us = bench_us(lambda: dst.copy_(src), warmup=5, rep=30)
    return 2 * (num_bytes // 2) / (t_us * 1e-6)


def measure_matmul_flops(dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Dense matmul rate (FLOP/s) on random data for `dtype` (bf16: torch.mm; fp8: torch._scaled_mm)."""
    a = torch.randn(n, n, device="cuda").to(dtype if dtype != torch.float8_e4m3fn else torch.bfloat16)
    b = torch.randn(n, n, device="cuda").to(a.dtype)
    if dtype == torch.float8_e4m3fn:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        fn = lambda: torch.mm(a, b)
    t_us = bench_us(fn, warmup=5, rep=30)
    return 2 * n**3 / (t_us * 1e-6)


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Print rows as a table (rich when available)."""
    if not rows:
        print(f"{title}: no rows")
        return
    columns = columns or list(rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="right")
        for r in rows:
            table.add_row(*(fmt(r.get(c, "")) for c in columns))
        Console(width=200).print(table)
    except ImportError:  # pragma: no cover
        print(title)
        print(" | ".join(columns))
        for r in rows:
            print(" | ".join(fmt(r.get(c, "")) for c in columns))


def write_results(what: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write `<date>-<device>-<what>.json` with device facts and the date; return the path."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC)
    doc = {"what": what, "date": now.isoformat(timespec="seconds"), "device": device_info(), **payload}
    path = out_dir / f"{now:%Y-%m-%d}-{device_slug()}-{what}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {path}")
    return path


def deepseek_style_model(args, scheme: str) -> dict[str, Any]:
    """The `model` section of a DeepSeek-V3-style layer (sigmoid scoring, correction bias, scaling
    2.5, optional grouped top-k) from a benchmark's `--hidden/--num-experts/--topk/--inter/--n-group/
    --topk-group` arguments."""
    model: dict[str, Any] = dict(
        name="deepseek-v3-layer",
        hidden_size=args.hidden,
        num_experts=args.num_experts,
        top_k=args.topk,
        moe_intermediate_size=args.inter,
        scoring="sigmoid",
        use_correction_bias=True,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        weights=scheme,
        seed=0,
    )
    if args.n_group:
        model.update(n_group=args.n_group, topk_group=args.topk_group)
    return model


def init_rank(rank: int, world: int, device_kind: str, init_file: str, timeout_s: float) -> torch.device:
    """Join a spawned benchmark's process group (NCCL on `cuda`, one GPU per rank; gloo on `cpu`)
    and return this rank's device."""
    import datetime

    import torch.distributed as dist

    if device_kind == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if device_kind == "cuda" else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": device} if device_kind == "cuda" else {}),
    )
    return device
