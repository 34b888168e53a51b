"""The portable dispatcher: `torch.distributed.all_to_all_single` (NCCL on GPU, gloo on CPU).

Both layouts, both precisions. Every message is moved as raw bytes (`uint8` rows), which gloo
needs for fp8 and costs nothing on NCCL: an fp8 row travels with its fp32 scales appended, so one
collective carries both (`plan.fp8_bytes_transport` is thus always honoured).

Normal layout (DeepEP normal semantics): one row per (source token, destination rank) pair; the
received rows are ordered by source rank, then by source token index, which is also the order of
DeepEP's intranode dispatch. The receive size depends on the routing, and `all_to_all_single` takes
its split sizes as Python lists, so normal dispatch makes exactly one host sync (one small
device-to-host copy of the send and receive counts); combine reuses those lists and makes none.

Low-latency layout (DeepEP low-latency semantics): every rank sends a fixed-size block to every
rank, so all shapes are static and the path makes no host sync (it can be captured in a CUDA graph
on NCCL). The block a rank sends to rank `r` is `h` header rows (its per-expert counts for `r`'s `L`
local experts, as int32 bytes) followed by `L * C` slots, `C` per local expert of `r`; a rank
receives `R` such blocks and packs each local expert's rows contiguously in source-rank order,
source token order within a rank, into `recv_x [L, C*R, D]` (rows past `num_recv_per_expert[e]`
are zero).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ep_runtime.comm.base import Dispatcher, Pending, PendingCombine, PendingDispatch, register
from ep_runtime.config import ModePlan, RuntimePlan
from ep_runtime.types import (
    FP8_DTYPE,
    FP8_GROUP,
    DispatchedTokens,
    DispatchHandle,
    Layout,
    Precision,
    Routing,
)

_BYTE = torch.uint8


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """`[N, X]` tensor of any dtype -> `[N, X * itemsize]` uint8 view (no copy)."""
    if t.numel() == 0:  # an empty tensor may carry a 0 stride, which view() rejects
        return t.new_empty((*t.shape[:-1], t.shape[-1] * t.element_size()), dtype=_BYTE)
    return t.contiguous().view(_BYTE)


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, D]` bf16 -> (`[T, D]` e4m3, `[T, D/128]` fp32 scales), per-token-group-128."""
    if x.shape[0] == 0:
        return (
            torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device),
            torch.empty((0, x.shape[1] // FP8_GROUP), dtype=torch.float32, device=x.device),
        )
    from ep_runtime.kernels.quant import per_token_group_quant_fp8

    return per_token_group_quant_fp8(x, group_size=FP8_GROUP, column_major_scales=False)


@register
class TorchDispatcher(Dispatcher):
    """Dispatch/combine over `torch.distributed` all-to-all; the reference and the portable path."""

    name = "torch"
    layouts = frozenset({Layout.NORMAL, Layout.LOW_LATENCY})

    def __init__(self, plan: RuntimePlan, mode_plan: ModePlan, group: dist.ProcessGroup | None = None):
        super().__init__(plan, mode_plan, group)
        ok, reason = self.supports(plan, mode_plan)
        if not ok:
            raise ValueError(
                f"dispatch.backend 'torch' cannot serve the {mode_plan.layout.value} mode: {reason}"
            )
        if not dist.is_initialized():
            raise ValueError(
                "TorchDispatcher needs torch.distributed to be initialised (dist.init_process_group)"
            )
        self.num_ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.num_ranks != plan.ep_size:
            raise ValueError(
                f"process group has {self.num_ranks} ranks but parallel.ep_size is {plan.ep_size}"
            )
        self.num_scales = self.hidden // FP8_GROUP if self.is_fp8 else 0
        # Bytes of one token's payload: bf16 row, or fp8 row followed by its fp32 scales.
        self.row_bytes = self.hidden + 4 * self.num_scales if self.is_fp8 else 2 * self.hidden
        self._closed = False

    @classmethod
    def supports(cls, plan: RuntimePlan, mode_plan: ModePlan) -> tuple[bool, str]:
        if mode_plan.layout not in cls.layouts:
            return False, f"layout {mode_plan.layout.value} is not implemented by the torch backend"
        if not dist.is_available():
            return False, "this torch build has no torch.distributed"
        if plan.device == "cuda":
            if not torch.cuda.is_available():
                return (
                    False,
                    "parallel.device is 'cuda' but no CUDA device is visible; use parallel.device: cpu",
                )
            if plan.dist_backend != "nccl":
                return (
                    False,
                    f"CUDA tensors need parallel.dist_backend 'nccl' (or auto), got '{plan.dist_backend}'",
                )
        elif plan.dist_backend != "gloo":
            return (
                False,
                f"CPU tensors need parallel.dist_backend 'gloo' (or auto), got '{plan.dist_backend}'",
            )
        if mode_plan.layout == Layout.LOW_LATENCY and not mode_plan.capacity:
            return False, "low-latency mode needs a capacity (dispatch.num_max_dispatch_tokens_per_rank)"
        if mode_plan.precision == Precision.FP8 and plan.config.model.hidden_size % FP8_GROUP:
            return False, f"fp8 dispatch needs model.hidden_size to be a multiple of {FP8_GROUP}"
        return True, "ok"

    # ------------------------------------------------------------------------------------------
    # Shared checks and payloads
    # ------------------------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, routing: Routing) -> None:
        if self._closed:
            raise RuntimeError("TorchDispatcher.dispatch called after close()")
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be [T, {self.hidden}] (model.hidden_size), got {tuple(x.shape)}")
        if x.dtype != torch.bfloat16:
            raise ValueError(f"x.dtype must be bfloat16, got {x.dtype}")
        if routing.num_tokens != x.shape[0]:
            raise ValueError(f"routing has {routing.num_tokens} tokens but x has {x.shape[0]} rows")
        if routing.topk_ids.device != x.device:
            raise ValueError(f"routing is on {routing.topk_ids.device} but x is on {x.device}")

    def _payload(self, x: torch.Tensor, extra_rows: int) -> torch.Tensor:
        """`[T + extra_rows, row_bytes]` uint8: each token's bytes (fp8 + scales, or bf16), then
        `extra_rows` uninitialised rows for the caller to fill."""
        num_tokens = x.shape[0]
        out = torch.empty((num_tokens + extra_rows, self.row_bytes), dtype=_BYTE, device=x.device)
        if self.is_fp8:
            x_q, scales = _quantize(x)
            out[:num_tokens, : self.hidden] = x_q.view(_BYTE)
            out[:num_tokens, self.hidden :] = _as_bytes(scales)
        else:
            out[:num_tokens] = _as_bytes(x)
        return out

    def _unpack(
        self, rows: torch.Tensor, index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gather `rows[index]` (all rows when None) and split into (x, x_scale) contiguous tensors."""
        if self.is_fp8:
            q, s = rows[:, : self.hidden], rows[:, self.hidden : self.hidden + 4 * self.num_scales]
            if index is not None:
                q, s = q.index_select(0, index), s.index_select(0, index)
            return q.contiguous().view(FP8_DTYPE), s.contiguous().view(torch.float32)
        b = rows[:, : 2 * self.hidden]
        b = b.index_select(0, index) if index is not None else b.contiguous()
        return b.view(torch.bfloat16), None

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[DispatchedTokens, DispatchHandle]:
        """Send each token to the ranks that own its top-k experts.

        Args:
            x: `[T, D]` bfloat16 hidden states of this rank's tokens (T may be 0).
            routing: `topk_ids` `[T, K]` int64 global ids (-1 = none), `topk_weights` `[T, K]` fp32.
        Returns:
            normal: `x [N_recv, D]` (bf16, or e4m3 with `x_scale [N_recv, D/128]` fp32),
            `recv_topk_ids [N_recv, K]` int64 local ids, `recv_topk_weights [N_recv, K]` fp32,
            `num_recv_per_expert [L]` int32. Low-latency: `x [L, C*R, D]` (+ `x_scale [L, C*R, D/128]`),
            `num_recv_per_expert [L]` int32. And the handle `combine` needs.
        """
        return self._start_dispatch(x, routing, async_op=False)()

    def dispatch_async(self, x: torch.Tensor, routing: Routing, *, after: Any = None) -> PendingDispatch:
        """`dispatch` with the payload all-to-all issued with `async_op=True`; `.wait()` waits for its
        work handle (on NCCL: the current stream waits for the NCCL stream, the host does not block)
        and unpacks. Normal layout: the count exchange and its host sync still happen at the call,
        on the current stream (so `after` is ignored: the transfer is ordered at the call)."""
        return Pending(self._start_dispatch(x, routing, async_op=True))

    def _start_dispatch(self, x: torch.Tensor, routing: Routing, async_op: bool) -> Callable[[], Any]:
        self._check_inputs(x, routing)
        if self.layout == Layout.NORMAL:
            return self._dispatch_normal(x, routing, async_op)
        return self._dispatch_low_latency(x, routing, async_op)

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Return expert outputs to their source ranks and reduce them (fp32 accumulation).

        Args:
            expert_out: normal: `[N_recv, D]` bfloat16, already top-k weighted and summed over this
                rank's experts; low-latency: `[L, C*R, D]` bfloat16, unweighted.
            handle: the handle `dispatch` returned.
        Returns: `[T, D]` bfloat16.
        """
        return self._start_combine(expert_out, handle, async_op=False)()

    def combine_async(self, expert_out: torch.Tensor, handle: DispatchHandle) -> PendingCombine:
        """`combine` with its all-to-all issued with `async_op=True`; `.wait()` -> `[T, D]` bfloat16."""
        return Pending(self._start_combine(expert_out, handle, async_op=True))

    def _start_combine(
        self, expert_out: torch.Tensor, handle: DispatchHandle, async_op: bool
    ) -> Callable[[], torch.Tensor]:
        if self._closed:
            raise RuntimeError("TorchDispatcher.combine called after close()")
        if handle.layout != self.layout:
            raise ValueError(
                f"handle is for the {handle.layout.value} layout, this dispatcher serves {self.layout.value}"
            )
        if expert_out.dtype != torch.bfloat16:
            raise ValueError(f"expert_out.dtype must be bfloat16, got {expert_out.dtype}")
        if self.layout == Layout.NORMAL:
            return self._combine_normal(expert_out, handle, async_op)
        return self._combine_low_latency(expert_out, handle, async_op)

    def close(self) -> None:
        self._closed = True

    # ------------------------------------------------------------------------------------------
    # Normal layout
    # ------------------------------------------------------------------------------------------

    def _dispatch_normal(
        self, x: torch.Tensor, routing: Routing, async_op: bool = False
    ) -> Callable[[], tuple[DispatchedTokens, DispatchHandle]]:
        """Everything up to the payload all-to-all; returns the function that finishes the dispatch."""
        dev = x.device
        num_tokens, top_k = routing.topk_ids.shape
        R, L = self.num_ranks, self.num_local_experts
        ids = routing.topk_ids
        is_valid = ids >= 0
        dest_rank = torch.where(is_valid, ids // L, R)  # R = "nowhere"
        is_token_in_rank = torch.zeros((num_tokens, R + 1), dtype=torch.bool, device=dev)
        is_token_in_rank.scatter_(1, dest_rank, True)
        is_token_in_rank = is_token_in_rank[:, :R]
        num_send_per_rank = is_token_in_rank.sum(0)  # [R] int64
        num_recv_per_rank = torch.empty_like(num_send_per_rank)
        dist.all_to_all_single(num_recv_per_rank, num_send_per_rank, group=self.group)
        # The one host sync of normal dispatch, forced by the API: all_to_all_single takes its
        # split sizes as Python lists and the receive buffer's size must be known to allocate it.
        splits = torch.cat([num_send_per_rank, num_recv_per_rank]).tolist()
        send_splits, recv_splits = splits[:R], splits[R:]
        num_send, num_recv = sum(send_splits), sum(recv_splits)

        # Send order: (destination rank, token) pairs, rank-major then token order.
        is_pair = is_token_in_rank.t().reshape(-1)  # [R*T]
        slot = torch.where(is_pair, torch.cumsum(is_pair, 0) - 1, num_send)
        pair_of_slot = torch.empty(num_send + 1, dtype=torch.int64, device=dev)
        pair_of_slot.scatter_(0, slot, torch.arange(R * num_tokens, device=dev))
        pair_of_slot = pair_of_slot[:num_send]
        send_token = pair_of_slot % max(num_tokens, 1)
        send_rank = pair_of_slot // max(num_tokens, 1)

        # Top-k ids as the destination sees them (local, -1 elsewhere) and weights (0 elsewhere).
        row_ids = ids.index_select(0, send_token)
        is_local = (row_ids >= 0) & (row_ids // L == send_rank.unsqueeze(1))
        row_local_ids = torch.where(is_local, row_ids - send_rank.unsqueeze(1) * L, -1).to(torch.int32)
        row_weights = torch.where(is_local, routing.topk_weights.index_select(0, send_token), 0.0)

        # One message per row: token payload (padded to 4 bytes), K int32 ids, K fp32 weights.
        x_bytes = (self.row_bytes + 3) // 4 * 4
        width = x_bytes + 8 * top_k
        payload = self._payload(x, 0)
        send = torch.empty((num_send, width), dtype=_BYTE, device=dev)
        send[:, : self.row_bytes] = payload.index_select(0, send_token)
        send[:, x_bytes : x_bytes + 4 * top_k] = _as_bytes(row_local_ids)
        send[:, x_bytes + 4 * top_k :] = _as_bytes(row_weights)
        recv = torch.empty((num_recv, width), dtype=_BYTE, device=dev)
        work = dist.all_to_all_single(
            recv, send, recv_splits, send_splits, group=self.group, async_op=async_op
        )
        return lambda: self._finish_dispatch_normal(
            work, recv, x_bytes, top_k, num_tokens, routing, send_token, send_splits, recv_splits
        )

    def _finish_dispatch_normal(
        self,
        work: Any,
        recv: torch.Tensor,
        x_bytes: int,
        top_k: int,
        num_tokens: int,
        routing: Routing,
        send_token: torch.Tensor,
        send_splits: list[int],
        recv_splits: list[int],
    ) -> tuple[DispatchedTokens, DispatchHandle]:
        if work is not None:
            work.wait()
        L, dev = self.num_local_experts, recv.device
        recv_x, recv_scale = self._unpack(recv, None)
        recv_ids = recv[:, x_bytes : x_bytes + 4 * top_k].contiguous().view(torch.int32).to(torch.int64)
        recv_weights = recv[:, x_bytes + 4 * top_k :].contiguous().view(torch.float32)
        num_recv_per_expert = torch.zeros(L + 1, dtype=torch.int32, device=dev)
        num_recv_per_expert.scatter_add_(
            0,
            torch.where(recv_ids >= 0, recv_ids, L).reshape(-1),
            torch.ones_like(recv_ids, dtype=torch.int32).reshape(-1),
        )
        dispatched = DispatchedTokens(
            layout=Layout.NORMAL,
            x=recv_x,
            x_scale=recv_scale,
            num_recv_per_expert=num_recv_per_expert[:L],
            recv_topk_ids=recv_ids,
            recv_topk_weights=recv_weights,
        )
        handle = DispatchHandle(
            layout=Layout.NORMAL,
            num_tokens=num_tokens,
            hidden_size=self.hidden,
            routing=routing,
            state=_NormalState(send_token, send_splits, recv_splits),
        )
        return dispatched, handle

    def _combine_normal(
        self, expert_out: torch.Tensor, handle: DispatchHandle, async_op: bool = False
    ) -> Callable[[], torch.Tensor]:
        st: _NormalState = handle.state
        num_recv = sum(st.recv_splits)
        if tuple(expert_out.shape) != (num_recv, self.hidden):
            raise ValueError(
                f"expert_out must be [N_recv, D] = [{num_recv}, {self.hidden}], got {tuple(expert_out.shape)}"
            )
        back = torch.empty((len(st.send_token), 2 * self.hidden), dtype=_BYTE, device=expert_out.device)
        send = _as_bytes(expert_out)
        work = dist.all_to_all_single(
            back, send, st.send_splits, st.recv_splits, group=self.group, async_op=async_op
        )

        def finish() -> torch.Tensor:
            if work is not None:
                work.wait()
            out = torch.zeros((handle.num_tokens, self.hidden), dtype=torch.float32, device=back.device)
            out.index_add_(0, st.send_token, back.view(torch.bfloat16).float())
            return out.to(torch.bfloat16)

        return finish

    # ------------------------------------------------------------------------------------------
    # Low-latency layout
    # ------------------------------------------------------------------------------------------

    def _dispatch_low_latency(
        self, x: torch.Tensor, routing: Routing, async_op: bool = False
    ) -> Callable[[], tuple[DispatchedTokens, DispatchHandle]]:
        """Everything up to the all-to-all; returns the function that finishes the dispatch."""
        dev = x.device
        num_tokens, top_k = routing.topk_ids.shape
        C, E, R, L = self.capacity, self.num_experts, self.num_ranks, self.num_local_experts
        if num_tokens > C:
            raise ValueError(
                f"low-latency dispatch got {num_tokens} tokens on rank {self.rank}, more than the capacity "
                f"C = dispatch.num_max_dispatch_tokens_per_rank ({C}); the layer must chunk the batch "
                "(tokens are never truncated)"
            )
        W = self.row_bytes
        H = (4 * L + W - 1) // W  # header rows per block carrying L int32 counts
        block = H + L * C

        # Position of each (token, slot) pair among this rank's pairs for the same expert.
        ids = routing.topk_ids
        is_valid = ids >= 0
        expert = torch.where(is_valid, ids, E).reshape(-1)  # E = "no expert"
        one_hot = torch.zeros((num_tokens * top_k, E + 1), dtype=torch.int32, device=dev)
        one_hot.scatter_(1, expert.unsqueeze(1), 1)
        running = torch.cumsum(one_hot, 0, dtype=torch.int32)
        pos = running.gather(1, expert.unsqueeze(1)).squeeze(1).to(torch.int64) - 1
        num_send_per_expert = one_hot[:, :E].sum(0, dtype=torch.int32)  # [E] = [R, L]
        # More than C pairs for one expert is only possible with duplicate ids in a token; those are
        # dropped rather than written past the expert's slots.
        is_sent = is_valid.reshape(-1) & (pos < C)
        send_slot = torch.where(is_sent, expert * C + pos, E * C)  # [T*K] into [E*C] (+1 dummy)
        num_send_per_expert = num_send_per_expert.clamp(max=C)

        # Source row of each send row: token payload rows, a zero row (empty slots), header rows.
        payload = self._payload(x, 1 + R * H)
        payload[num_tokens] = 0
        header = torch.zeros((R, H * W), dtype=_BYTE, device=dev)
        header[:, : 4 * L] = _as_bytes(num_send_per_expert.view(R, L))
        payload[num_tokens + 1 :] = header.view(R * H, W)
        slot_src = torch.full((E * C + 1,), num_tokens, dtype=torch.int64, device=dev)
        token_of_pair = torch.arange(num_tokens * top_k, device=dev) // top_k
        slot_src.scatter_(0, send_slot, token_of_pair)
        header_src = num_tokens + 1 + torch.arange(R * H, device=dev).view(R, H)
        send_src = torch.cat([header_src, slot_src[: E * C].view(R, L * C)], dim=1).reshape(-1)
        send = payload.index_select(0, send_src)  # [R * block, W]

        recv = torch.empty((R * block + 1, W), dtype=_BYTE, device=dev)
        recv[R * block] = 0  # the zero row that invalid output rows read
        work = dist.all_to_all_single(recv[: R * block], send, group=self.group, async_op=async_op)
        return lambda: self._finish_dispatch_low_latency(
            work, recv, H, block, num_tokens, top_k, routing, is_sent, send_slot
        )

    def _finish_dispatch_low_latency(
        self,
        work: Any,
        recv: torch.Tensor,
        H: int,  # noqa: N803 - header rows, as above
        block: int,
        num_tokens: int,
        top_k: int,
        routing: Routing,
        is_sent: torch.Tensor,
        send_slot: torch.Tensor,
    ) -> tuple[DispatchedTokens, DispatchHandle]:
        if work is not None:
            work.wait()
        dev, W = recv.device, self.row_bytes
        C, R, L = self.capacity, self.num_ranks, self.num_local_experts
        blocks = recv[: R * block].view(R, block, W)
        num_recv = blocks[:, :H].reshape(R, H * W)[:, : 4 * L].contiguous().view(torch.int32)  # [R(src), L]
        # Pack expert e's rows: source rank s's rows start at sum(num_recv[:s, e]).
        end = torch.cumsum(num_recv.t().to(torch.int64), 1)  # [L, R] inclusive
        start = end - num_recv.t()
        p = torch.arange(R * C, device=dev).expand(L, R * C).contiguous()
        src_rank = torch.searchsorted(end, p, right=True)  # [L, R*C]; R where p >= total
        is_row = src_rank < R
        src_rank = src_rank.clamp(max=R - 1)
        j = p - start.gather(1, src_rank)
        local = torch.arange(L, device=dev).unsqueeze(1)
        recv_row = torch.where(is_row, src_rank * block + H + local * C + j, R * block).reshape(-1)
        recv_x, recv_scale = self._unpack(recv, recv_row)
        recv_x = recv_x.view(L, R * C, self.hidden)
        if recv_scale is not None:
            recv_scale = recv_scale.view(L, R * C, self.num_scales)
        dispatched = DispatchedTokens(
            layout=Layout.LOW_LATENCY,
            x=recv_x,
            x_scale=recv_scale,
            num_recv_per_expert=end[:, -1].to(torch.int32),
        )
        # Combine: row (s, e, j) of the block returned to source s is expert e's row start[e, s] + j.
        back_row = local.unsqueeze(0) * (R * C) + (start.t().unsqueeze(2) + torch.arange(C, device=dev))
        back_row = back_row.clamp(max=L * R * C - 1).reshape(-1)  # [R*L*C]; overflow rows are unread
        weights = torch.where(is_sent.view(num_tokens, top_k), routing.topk_weights, 0.0)
        handle = DispatchHandle(
            layout=Layout.LOW_LATENCY,
            num_tokens=num_tokens,
            hidden_size=self.hidden,
            routing=routing,
            state=_LowLatencyState(send_slot=send_slot, back_row=back_row, weights=weights),
        )
        return dispatched, handle

    def _combine_low_latency(
        self, expert_out: torch.Tensor, handle: DispatchHandle, async_op: bool = False
    ) -> Callable[[], torch.Tensor]:
        st: _LowLatencyState = handle.state
        C, E, R, L, D = self.capacity, self.num_experts, self.num_ranks, self.num_local_experts, self.hidden
        if tuple(expert_out.shape) != (L, R * C, D):
            raise ValueError(
                f"expert_out must be [L, C*R, D] = [{L}, {R * C}, {D}], got {tuple(expert_out.shape)}"
            )
        send = expert_out.reshape(L * R * C, D).index_select(0, st.back_row)  # [R*L*C, D] by source rank
        back = torch.empty((E * C + 1, 2 * D), dtype=_BYTE, device=expert_out.device)
        back[E * C] = 0  # the zero row that unsent (token, slot) pairs read
        work = dist.all_to_all_single(back[: E * C], _as_bytes(send), group=self.group, async_op=async_op)

        def finish() -> torch.Tensor:
            if work is not None:
                work.wait()
            top_k = st.weights.shape[1]
            rows = back.view(torch.bfloat16).index_select(0, st.send_slot).view(handle.num_tokens, top_k, D)
            out = (rows.float() * st.weights.unsqueeze(2)).sum(1)
            return out.to(torch.bfloat16)

        return finish


class _NormalState:
    """Normal-layout combine state: the source token of each sent row and the split sizes."""

    __slots__ = ("send_token", "send_splits", "recv_splits")

    def __init__(self, send_token: torch.Tensor, send_splits: list[int], recv_splits: list[int]):
        self.send_token = send_token  # [N_send] int64, rows in send order
        self.send_splits = send_splits  # rows sent to each rank
        self.recv_splits = recv_splits  # rows received from each rank


class _LowLatencyState:
    """Low-latency combine state (all device tensors; no host values)."""

    __slots__ = ("send_slot", "back_row", "weights")

    def __init__(self, send_slot: torch.Tensor, back_row: torch.Tensor, weights: torch.Tensor):
        self.send_slot = send_slot  # [T*K] int64: slot of each (token, k) pair in [E*C], E*C = unsent
        self.back_row = back_row  # [R*L*C] int64: expert_out row returned in each slot of each source
        self.weights = weights  # [T, K] fp32: combine weights, 0 for unsent pairs
