"""Debug checks that dispatch and combine conserve tokens (`dispatch.check_conservation: true`).

`check_conservation` runs right after `dispatch` on every rank: from all-reduced counts it verifies
that every (token, expert) pair sent was received exactly once by the rank owning the expert, that
(normal layout) every rank received exactly one row per (token, rank) pair addressed to it, and that
each rank's received metadata is self-consistent. `check_combined_once` runs after `combine` (it
combines a probe, so the real expert outputs must already be consumed) and verifies that every
token is reduced from exactly the ranks it was sent to.

Both are collective (every rank of the group must call them) and make host syncs; they are meant
for debugging, never for the hot path. A failure raises `ConservationError` on every rank, naming
the rank(s) and the mismatch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ep_runtime.types import DispatchedTokens, DispatchHandle, Layout, Routing

_MAX_LISTED = 8


class ConservationError(RuntimeError):
    """Dispatch or combine lost, duplicated or misrouted tokens."""


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def _raise(rank: int, what: str, problems: list[str]) -> None:
    more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    raise ConservationError(
        f"rank {rank}: {what} conservation failed: " + "; ".join(problems[:_MAX_LISTED]) + more
    )


def check_conservation(
    routing: Routing,
    dispatched: DispatchedTokens,
    handle: DispatchHandle,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Verify one dispatch on every rank (collective; host syncs).

    Args:
        routing: this rank's routing (`topk_ids [T, K]` int64 global ids, -1 = none).
        dispatched: what this rank received (either layout).
        handle: the dispatch handle (its `num_tokens` must equal `T`).
        group: the EP process group (None = the default group).
    Raises: ConservationError naming the rank(s) and the mismatch.
    """
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    dev = routing.topk_ids.device
    L = dispatched.num_recv_per_expert.shape[0]
    E = L * num_ranks
    ids = routing.topk_ids

    # Local consistency of what this rank holds.
    local: list[str] = []
    if handle.num_tokens != routing.num_tokens:
        local.append(f"handle.num_tokens ({handle.num_tokens}) != routing tokens ({routing.num_tokens})")
    if handle.layout != dispatched.layout:
        local.append(f"handle layout {handle.layout.value} != dispatched layout {dispatched.layout.value}")
    if ((ids < -1) | (ids >= E)).any().item():
        local.append(f"routing.topk_ids has ids outside [-1, {E})")
    num_recv = dispatched.num_recv_per_expert.to(device=dev, dtype=torch.int64)
    if dispatched.layout == Layout.NORMAL:
        rids = dispatched.recv_topk_ids
        if rids is None or dispatched.recv_topk_weights is None:
            local.append("normal layout without recv_topk_ids / recv_topk_weights")
        else:
            rids = rids.to(dev)
            if rids.shape[0] != dispatched.x.shape[0]:
                local.append(f"recv_topk_ids has {rids.shape[0]} rows but x has {dispatched.x.shape[0]}")
            if ((rids < -1) | (rids >= L)).any().item():
                local.append(f"recv_topk_ids holds ids outside [-1, {L})")
            counted = torch.zeros(L + 1, dtype=torch.int64, device=dev)
            counted.scatter_add_(
                0, torch.where(rids >= 0, rids, L).reshape(-1), torch.ones_like(rids).reshape(-1)
            )
            if not torch.equal(counted[:L], num_recv):
                local.append(
                    f"num_recv_per_expert {num_recv.tolist()} != counts of recv_topk_ids {counted[:L].tolist()}"
                )
            num_empty = int((rids < 0).all(1).sum().item()) if rids.numel() else 0
            if num_empty:
                local.append(f"{num_empty} received row(s) carry no local expert")
    else:
        capacity_rows = dispatched.x.shape[1]
        if (num_recv > capacity_rows).any().item():
            local.append(
                f"num_recv_per_expert {num_recv.tolist()} exceeds the {capacity_rows} rows per expert"
            )
    bad_ranks = torch.zeros(num_ranks, dtype=torch.int64, device=dev)
    bad_ranks[rank] = 1 if local else 0
    _all_reduce(bad_ranks, group)
    if local:
        _raise(rank, "dispatch", local)
    if bad_ranks.any().item():
        others = [r for r, b in enumerate(bad_ranks.tolist()) if b]
        raise ConservationError(
            f"rank {rank}: dispatch conservation failed on rank(s) {others} (see their errors)"
        )

    # (token, expert) pairs: sent per global expert (all sources) vs received by the owner.
    is_valid = ids >= 0
    sent = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    sent.scatter_add_(0, torch.where(is_valid, ids, E).reshape(-1), torch.ones_like(ids).reshape(-1))
    sent = _all_reduce(sent[:E].contiguous(), group)
    received = torch.zeros(E, dtype=torch.int64, device=dev)
    received[rank * L : (rank + 1) * L] = num_recv
    received = _all_reduce(received, group)
    problems = [
        f"expert {e} (on rank {e // L}): {s} (token, expert) pair(s) sent, {r} received"
        for e, (s, r) in enumerate(zip(sent.tolist(), received.tolist(), strict=True))
        if s != r
    ]
    if problems:
        _raise(rank, "dispatch", problems)

    if dispatched.layout == Layout.NORMAL:
        # Rows: one per (token, destination rank) pair.
        dest = torch.where(is_valid, ids // L, num_ranks)
        is_in_rank = torch.zeros((ids.shape[0], num_ranks + 1), dtype=torch.int64, device=dev)
        is_in_rank.scatter_(1, dest, 1)
        rows_sent = _all_reduce(is_in_rank[:, :num_ranks].sum(0).contiguous(), group)
        rows_received = torch.zeros(num_ranks, dtype=torch.int64, device=dev)
        rows_received[rank] = dispatched.x.shape[0]
        rows_received = _all_reduce(rows_received, group)
        problems = [
            f"rank {r} was sent {s} row(s) (one per token addressed to it) but received {g}"
            for r, (s, g) in enumerate(zip(rows_sent.tolist(), rows_received.tolist(), strict=True))
            if s != g
        ]
        if problems:
            _raise(rank, "dispatch", problems)


def check_combined_once(
    dispatcher,
    routing: Routing,
    dispatched: DispatchedTokens,
    handle: DispatchHandle,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Verify that combine reduces every token from exactly the ranks it was sent to (collective).

    Combines a probe through `dispatcher` with `handle` (call it after the real combine): normal
    layout: every received row is 1, so token `t` must come back as the number of distinct ranks
    holding its experts (exact); low-latency: every valid row is 1, so `t` must come back as the sum
    of its valid top-k weights (bf16 tolerance).
    Raises: ConservationError naming the rank and the first mismatching tokens.
    """
    rank = dist.get_rank(group)
    num_ranks = dist.get_world_size(group)
    ids = routing.topk_ids
    dev = dispatched.x.device
    D = handle.hidden_size
    probe = torch.ones((*dispatched.x.shape[:-1], D), dtype=torch.bfloat16, device=dev)
    outs = [dispatcher.combine(probe, handle).float()]
    if dispatched.layout == Layout.LOW_LATENCY and getattr(dispatcher, "call_parity", False):
        # A backend that alternates buffers per low-latency call gets the probe twice, so a step
        # keeps an even call count (captured decode graphs rely on it); both must pass.
        outs.append(dispatcher.combine(probe, handle).float())
    is_valid = ids >= 0
    if dispatched.layout == Layout.NORMAL:
        L = dispatched.num_recv_per_expert.shape[0]
        dest = torch.where(is_valid, ids // L, num_ranks)
        is_in_rank = torch.zeros((ids.shape[0], num_ranks + 1), dtype=torch.float32, device=ids.device)
        is_in_rank.scatter_(1, dest, 1.0)
        expect = is_in_rank[:, :num_ranks].sum(1)
        tol = 0.0
    else:
        expect = torch.where(is_valid, routing.topk_weights, 0.0).sum(1)
        tol = 1e-2
    expect = expect.to(dev).unsqueeze(1).expand_as(outs[0])
    is_bad = torch.zeros(expect.shape[0], dtype=torch.bool, device=dev)
    for o in outs:
        is_bad |= ((o - expect).abs() > tol * expect.abs() + tol).any(1)
    num_bad = int(is_bad.sum().item())
    bad_flags = torch.zeros(num_ranks, dtype=torch.int64, device=dev)
    bad_flags[rank] = num_bad
    _all_reduce(bad_flags, group)
    if num_bad:
        tokens = torch.nonzero(is_bad).flatten()[:_MAX_LISTED].tolist()
        details = [
            f"token {t}: got {' and '.join(f'{o[t, 0].item():g}' for o in outs)}, expected {expect[t, 0].item():g}"
            for t in tokens
        ]
        _raise(rank, f"combine ({num_bad} token(s) not combined exactly once)", details)
    if bad_flags.any().item():
        others = [r for r, b in enumerate(bad_flags.tolist()) if b]
        raise ConservationError(
            f"rank {rank}: combine conservation failed on rank(s) {others} (see their errors)"
        )
