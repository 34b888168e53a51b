"""The rank harness the distributed and 2-GPU tests share: results by rank, a failing rank's
traceback, a bounded wait for a rank that never reports, and a clear error for an unknown backend."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from tests.dist_utils import run_ranks


def _sum_of_ranks(rank: int, world: int, scale: int) -> tuple[int, int]:
    import torch

    t = torch.tensor([rank + 1])
    dist.all_reduce(t)
    return rank, scale * int(t.item())


def _rank_one_raises(rank: int, world: int) -> int:
    # Every rank is past process-group set-up first: a rank that exits while a peer is still
    # connecting makes the peer fail too, and then either error may reach the parent first.
    dist.barrier()
    if rank == 1:
        raise ValueError("rank one's own error")
    return rank


def _rank_one_hangs(rank: int, world: int) -> int:
    dist.barrier()
    if rank == 1:
        time.sleep(3600)
    return rank


def test_results_come_back_by_rank():
    assert run_ranks(_sum_of_ranks, 3, 10) == [(0, 60), (1, 60), (2, 60)]


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RuntimeError, match=r"rank 1 failed:(.|\n)*ValueError: rank one's own error"):
        run_ranks(_rank_one_raises, 2)


def test_a_silent_rank_ends_in_a_timeout_naming_it():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not report within 20 s"):
        run_ranks(_rank_one_hangs, 2, timeout=20)
    assert time.monotonic() - t0 < 60


def test_unknown_backend_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="backend 'mpi' is not supported; allowed: gloo, nccl"):
        run_ranks(_sum_of_ranks, 2, 1, backend="mpi")
