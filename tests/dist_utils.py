"""Run a function on N ranks (torch multiprocessing), with a bounded wait: over gloo on CPU in CI,
over NCCL (one GPU per rank) in the 2-GPU tests of `tests/gpu`."""

from __future__ import annotations

import os
import queue as queue_mod
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BACKENDS = ("gloo", "nccl")


def _entry(
    rank: int, world_size: int, backend: str, init_file: str, fn: Callable, args: tuple, queue
) -> None:
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60 if backend == "gloo" else 120),
            **kwargs,
        )
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    backend: str = "gloo",
) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` ranks; return the results by rank.

    `fn` must be a module-level function (it is pickled into spawned processes). `backend` is
    `gloo` (CPU) or `nccl` (rank r on GPU r). Raises with the failing rank's traceback, or after
    `timeout` seconds if a rank never reports.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is not supported; allowed: {', '.join(BACKENDS)}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, backend, init_file, fn, args, queue))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        try:
            for _ in range(world_size):
                try:
                    rank, status, payload = queue.get(timeout=timeout)
                except queue_mod.Empty:
                    missing = sorted(set(range(world_size)) - set(results))
                    raise TimeoutError(
                        f"ranks {missing} did not report within {timeout:g} s (hang or crash)"
                    ) from None
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{payload}")
                results[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world_size)]


def marked_pids(marker: str) -> list[int]:
    """Processes (other than this one) whose environment carries `EP_TEST_MARKER=marker` (Linux
    /proc): how the launcher tests find what a job left behind."""
    from pathlib import Path

    needle = f"EP_TEST_MARKER={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def wait_no_marked(marker: str, timeout: float = 20.0, poll: float = 0.5) -> list[int]:
    """Wait up to `timeout` s for the marked processes to exit; returns those still alive."""
    import time

    deadline = time.monotonic() + timeout
    left = marked_pids(marker)
    while left and time.monotonic() < deadline:
        time.sleep(poll)
        left = marked_pids(marker)
    return left
