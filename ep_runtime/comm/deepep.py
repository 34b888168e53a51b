"""The DeepEP dispatcher: `deep_ep.Buffer` (DeepEP's V1 API, revision 567632d).

Normal layout: `get_dispatch_layout` + `dispatch` + `combine` (intranode NVLink kernels, BF16 rows or
FP8 `(x, scales)` input, `Config` values from the file or DeepEP's defaults for the rank count).
Low-latency layout: `low_latency_dispatch(use_fp8=...)` + `low_latency_combine` (the top-k weights are
applied there); no host sync, CUDA-graph capturable.

One `deep_ep.Buffer` serves both layouts of a run: `DeepEPBufferOwner` creates it (sized for every
mode of the plan, `low_latency_mode=True` when the plan has the low-latency layout) and hands it to
the normal and the low-latency dispatcher; `DeepEPDispatcher.build_all(plan, group)` wires that up.
The owner cleans the low-latency buffer when the low-latency kernels follow normal ones, as DeepEP
requires.

`deep_ep` is an optional dependency (built from source); this module imports it lazily so that
`import ep_runtime.comm` works without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ep_runtime.comm.base import Dispatcher, Pending, PendingCombine, PendingDispatch, register
from ep_runtime.config import (
    DEEPEP_LOW_LATENCY_HIDDEN_SIZES,
    DEEPEP_LOW_LATENCY_MAX_TOPK,
    ModePlan,
    RuntimePlan,
    deepep_default_num_qps,
    deepep_qp_depth,
    max_buffer_bytes,
)
from ep_runtime.types import FP8_GROUP, DispatchedTokens, DispatchHandle, Layout, Precision, Routing

INSTALL_HINT = (
    "DeepEP is an optional dependency built from source; build deepseek-ai/DeepEP (revision 567632d works "
    "with NCCL 2.28 / NVSHMEM 3.4), put deep_ep and deep_ep_cpp on PYTHONPATH; or use dispatch.backend: torch"
)


def import_deep_ep() -> tuple[Any | None, str]:
    """Return `(deep_ep module, "")`, or `(None, reason)` when it cannot be imported."""
    try:
        import deep_ep  # noqa: PLC0415 - optional dependency
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken build's OSError
        return None, f"`import deep_ep` failed ({type(exc).__name__}: {exc}). {INSTALL_HINT}"
    return deep_ep, ""


def _chunk_config(deep_ep: Any, num_sms: int, cfg: Any, path: str) -> Any:
    """A `deep_ep.Config` from the file's values, checked against DeepEP's own assertions."""
    if cfg.num_max_nvl_chunked_send_tokens >= cfg.num_max_nvl_chunked_recv_tokens:
        raise ValueError(
            f"{path}.num_max_nvl_chunked_send_tokens ({cfg.num_max_nvl_chunked_send_tokens}) must be < "
            f"num_max_nvl_chunked_recv_tokens ({cfg.num_max_nvl_chunked_recv_tokens}) for DeepEP"
        )
    rdma_recv = -(-cfg.num_max_rdma_chunked_recv_tokens // cfg.num_max_rdma_chunked_send_tokens)
    rdma_recv *= cfg.num_max_rdma_chunked_send_tokens  # DeepEP rounds it up to a multiple of send
    if cfg.num_max_rdma_chunked_send_tokens > rdma_recv // 2:
        raise ValueError(
            f"{path}.num_max_rdma_chunked_send_tokens ({cfg.num_max_rdma_chunked_send_tokens}) must be <= half of "
            f"num_max_rdma_chunked_recv_tokens ({cfg.num_max_rdma_chunked_recv_tokens}) for DeepEP"
        )
    return deep_ep.Config(
        num_sms,
        cfg.num_max_nvl_chunked_send_tokens,
        cfg.num_max_nvl_chunked_recv_tokens,
        cfg.num_max_rdma_chunked_send_tokens,
        cfg.num_max_rdma_chunked_recv_tokens,
    )


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """`[len]` int32 on `device` from a host list. On CUDA the copy goes through pinned memory and is
    non-blocking, so it does not synchronise the stream behind the dispatch kernel (a pageable copy may)."""
    t = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _normal_received(
    recv: Any, recv_ids: torch.Tensor, recv_weights: torch.Tensor, counts: torch.Tensor
) -> DispatchedTokens:
    """Wrap what DeepEP's normal dispatch returned (`recv` is `x` or `(x_fp8, scales)`)."""
    recv_x, recv_scale = recv if isinstance(recv, tuple) else (recv, None)
    return DispatchedTokens(
        layout=Layout.NORMAL,
        x=recv_x,
        x_scale=recv_scale,
        num_recv_per_expert=counts,
        recv_topk_ids=recv_ids.to(torch.int64),
        recv_topk_weights=recv_weights,
    )


class DeepEPBufferOwner:
    """Owns the one `deep_ep.Buffer` that the normal and low-latency dispatchers of a run share.

    Sizes: NVL bytes = max(plan, `Config.get_nvl_buffer_size_hint` of the dispatch and combine
    configs) when the plan has the normal layout; RDMA bytes = max(plan,
    `Buffer.get_low_latency_rdma_size_hint(C, D, R, E)`) when it has the low-latency layout.
    Reference-counted: `acquire()` per user, `release()` per user; the last release destroys it.

    Args:
        plan: the resolved plan (model shape, `dispatch.deepep` tuning, buffer bytes).
        group: the torch process group of the EP ranks (None with `comm`: use the MPI communicator).
        comm: an `mpi4py.MPI.Comm` to initialise the buffer from when launched under MPI.
    """

    def __init__(self, plan: RuntimePlan, group: dist.ProcessGroup | None = None, comm: Any | None = None):
        deep_ep, reason = import_deep_ep()
        if deep_ep is None:
            raise RuntimeError(reason)
        self.deep_ep = deep_ep
        self.plan = plan
        model, tune = plan.config.model, plan.config.dispatch.deepep
        self.num_ranks = plan.ep_size
        self.hidden = model.hidden_size
        self.num_experts = model.num_experts
        self.num_local_experts = plan.num_local_experts
        self.has_low_latency = Layout.LOW_LATENCY in plan.modes
        self.capacity = plan.modes[Layout.LOW_LATENCY].capacity if self.has_low_latency else 0

        # Buffer.num_sms is DeepEP class state read by its default configs; set it before building them.
        deep_ep.Buffer.set_num_sms(tune.num_sms)
        # Normal-mode configs only where normal mode runs: DeepEP has defaults for 2, 4, 8, ... ranks,
        # while a low-latency-only plan may run on one rank.
        self.dispatch_config = self.combine_config = None
        if Layout.NORMAL in plan.modes:
            self.dispatch_config = (
                _chunk_config(deep_ep, tune.num_sms, tune.normal_dispatch, "dispatch.deepep.normal_dispatch")
                if tune.normal_dispatch
                else deep_ep.Buffer.get_dispatch_config(self.num_ranks)
            )
            self.combine_config = (
                _chunk_config(deep_ep, tune.num_sms, tune.normal_combine, "dispatch.deepep.normal_combine")
                if tune.normal_combine
                else deep_ep.Buffer.get_combine_config(self.num_ranks)
            )
        nvl, rdma = max_buffer_bytes(plan)
        if Layout.NORMAL in plan.modes:
            hidden_bytes = self.hidden * 2
            for cfg in (self.dispatch_config, self.combine_config):
                nvl = max(nvl, cfg.get_nvl_buffer_size_hint(hidden_bytes, self.num_ranks))
                if self.num_ranks > 8:
                    rdma = max(rdma, cfg.get_rdma_buffer_size_hint(hidden_bytes, self.num_ranks))
        if self.has_low_latency:
            hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(
                self.capacity, self.hidden, self.num_ranks, self.num_experts
            )
            rdma = max(rdma, hint)
        nvl, rdma = -(-nvl // 128) * 128, -(-rdma // 128) * 128  # DeepEP needs 128-byte multiples
        if rdma > 0 and nvl > 2**31 - 1:
            raise ValueError(
                f"DeepEP needs the NVL buffer (dispatch.buffer.num_nvl_bytes, {nvl}) <= 2^31 - 1 bytes when an "
                "RDMA/low-latency buffer is also allocated; lower it or the normal-mode chunk sizes"
            )
        self.num_nvl_bytes, self.num_rdma_bytes = nvl, rdma
        self.num_qps_per_rank = tune.num_qps_per_rank or deepep_default_num_qps(
            self.num_local_experts,
            tune.num_sms,
            low_latency=self.has_low_latency,
            normal_internode=Layout.NORMAL in plan.modes and plan.config.parallel.nodes > 1,
        )
        if self.has_low_latency and deepep_qp_depth() < 2 * (self.capacity + 1):
            # DeepEP asserts this at the first low-latency dispatch; say it before allocating.
            raise ValueError(
                f"DeepEP low-latency with C = {self.capacity} (dispatch.num_max_dispatch_tokens_per_rank) "
                f"needs NVSHMEM_QP_DEPTH >= {2 * (self.capacity + 1)} in this rank's environment; it is "
                f"{deepep_qp_depth()}"
            )
        self.explicitly_destroy = tune.explicitly_destroy
        if group is None and comm is None:
            group = dist.group.WORLD
        self.buffer = deep_ep.Buffer(
            group,
            num_nvl_bytes=nvl,
            num_rdma_bytes=rdma,
            low_latency_mode=self.has_low_latency,
            num_qps_per_rank=self.num_qps_per_rank,
            allow_nvlink_for_low_latency_mode=tune.allow_nvlink_for_low_latency_mode,
            allow_mnnvl=tune.allow_mnnvl,
            explicitly_destroy=self.explicitly_destroy,
            comm=comm,
        )
        self.rank = self.buffer.rank
        self._refs = 0
        self._last_layout: Layout | None = None
        self.low_latency_calls = 0
        """Low-latency dispatch/combine calls DeepEP accepted from the host (eagerly or while
        capturing): its parity says which of DeepEP's two low-latency buffers the next call uses."""
        self._receive_outstanding = False
        """A low-latency call issued with a receive hook whose hook has not run yet."""

    def acquire(self) -> DeepEPBufferOwner:
        if self.buffer is None:
            raise RuntimeError("the DeepEP buffer was already destroyed")
        self._refs += 1
        return self

    def release(self) -> None:
        self._refs -= 1
        if self._refs <= 0 and self.buffer is not None:
            if self.explicitly_destroy:
                self.buffer.destroy()
            self.buffer = None

    def enter(self, layout: Layout, *, is_dispatch: bool = True) -> Any:
        """The buffer, made ready for `layout`: a low-latency dispatch that follows normal-mode
        kernels first cleans the low-latency area (DeepEP requires it). Under CUDA graphs this
        host-side bookkeeping runs at capture only: replaying a captured low-latency step after
        normal-mode work needs `clean_low_latency()` first."""
        if self.buffer is None:
            raise RuntimeError("the DeepEP buffer was destroyed (dispatcher closed)")
        if self._receive_outstanding:
            # DeepEP's next send would clear the signals the pending receive still waits for, and
            # every rank would hang in it: refuse here, on the rank that broke the rule.
            raise RuntimeError(
                "a DeepEP call was issued while a low-latency receive was still pending: call .wait() "
                "on the previous low-latency dispatch_async/combine_async result first"
            )
        if is_dispatch and layout == Layout.LOW_LATENCY and self._last_layout == Layout.NORMAL:
            self.clean_low_latency()
        self._last_layout = layout
        return self.buffer

    def issued_low_latency(self, hook: Callable[[], None] | None) -> Callable[[], None] | None:
        """Book a low-latency call DeepEP accepted (it flipped its buffer index; a call it refused
        did not, so this runs after the call returns). With a receive `hook`, the call stays
        outstanding until the returned wrapper of the hook runs."""
        self.low_latency_calls += 1
        if hook is None:
            return None
        self._receive_outstanding = True

        def receive() -> None:
            hook()
            self._receive_outstanding = False

        return receive

    def clean_low_latency(self) -> None:
        """Zero the low-latency signalling area (`Buffer.clean_low_latency_buffer`)."""
        if self.buffer is not None and self.has_low_latency:
            self.buffer.clean_low_latency_buffer(self.capacity, self.hidden, self.num_experts)
            self._last_layout = Layout.LOW_LATENCY


class _CachedLayout(NamedTuple):
    """What a normal dispatch leaves for the next one on the same routing (DeepEP's cached mode):
    the routing object and its tensors' in-place versions (a routing edited in place must not reuse
    a stale layout), DeepEP's handle, and the receive-side metadata (the rows are not kept)."""

    routing: Routing
    versions: tuple[int, int]
    handle: Any
    counts: torch.Tensor
    recv_topk_ids: torch.Tensor
    recv_topk_weights: torch.Tensor


@register
class DeepEPDispatcher(Dispatcher):
    """Dispatch/combine through DeepEP's kernels (NVLink intranode; RDMA/NVSHMEM low-latency).

    Args:
        plan, mode_plan, group: as for every dispatcher.
        comm: an `mpi4py.MPI.Comm` to build the buffer from (when `group` is None).
        owner: a `DeepEPBufferOwner` shared with the other mode's dispatcher; created when None.
    """

    name = "deepep"
    layouts = frozenset({Layout.NORMAL, Layout.LOW_LATENCY})
    call_parity = True  # DeepEP flips its low-latency buffer index on every dispatch and combine

    def __init__(
        self,
        plan: RuntimePlan,
        mode_plan: ModePlan,
        group: dist.ProcessGroup | None = None,
        *,
        comm: Any | None = None,
        owner: DeepEPBufferOwner | None = None,
    ):
        super().__init__(plan, mode_plan, group)
        ok, reason = self.supports(plan, mode_plan)
        if not ok:
            raise ValueError(
                f"dispatch.backend 'deepep' cannot serve the {mode_plan.layout.value} mode: {reason}"
            )
        self.owner = (owner or DeepEPBufferOwner(plan, group, comm)).acquire()
        if mode_plan.layout == Layout.LOW_LATENCY and mode_plan.capacity != self.owner.capacity:
            self.owner.release()
            raise ValueError(
                f"the shared DeepEP buffer was sized for capacity {self.owner.capacity}, this low-latency "
                f"dispatcher needs {mode_plan.capacity} (dispatch.num_max_dispatch_tokens_per_rank)"
            )
        self.deep_ep = self.owner.deep_ep
        self._topk_dtype = getattr(self.deep_ep, "topk_idx_t", torch.int64)
        # Normal mode: the last uncached dispatch's layout, for DeepEP's cached path.
        self._last: _CachedLayout | None = None

    @classmethod
    def build_all(
        cls,
        plan: RuntimePlan,
        group: dist.ProcessGroup | None = None,
        *,
        shared: DeepEPBufferOwner | None = None,
        mpi_comm: Any | None = None,
    ) -> dict[Layout, Dispatcher]:
        """One dispatcher per mode of the plan, all sharing one `deep_ep.Buffer`: `shared` (the
        process's buffer, from `shared_state`) or a new one (built from `mpi_comm` when given)."""
        owner = shared or DeepEPBufferOwner(plan, group, mpi_comm)
        return {layout: cls(plan, mp, group, owner=owner) for layout, mp in plan.modes.items()}

    @classmethod
    def shared_state(
        cls, plan: RuntimePlan, group: dist.ProcessGroup | None = None, *, mpi_comm: Any | None = None
    ) -> DeepEPBufferOwner:
        """The process's one DeepEP buffer for every layer of `plan` (NVSHMEM is initialised once
        per process; a buffer per layer would also multiply its memory), built from `mpi_comm`
        when given. Holds one reference."""
        return DeepEPBufferOwner(plan, group, mpi_comm).acquire()

    @classmethod
    def supports(cls, plan: RuntimePlan, mode_plan: ModePlan) -> tuple[bool, str]:
        if mode_plan.layout not in cls.layouts:
            return False, f"layout {mode_plan.layout.value} is not implemented by the deepep backend"
        if plan.device != "cuda":
            return (
                False,
                "DeepEP needs parallel.device 'cuda' (CUDA GPUs); on cpu use dispatch.backend: torch",
            )
        deep_ep, reason = import_deep_ep()
        if deep_ep is None:
            return False, reason
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible; DeepEP needs CUDA GPUs"
        model = plan.config.model
        if mode_plan.layout == Layout.LOW_LATENCY:
            if not mode_plan.capacity:
                return False, "low-latency mode needs dispatch.num_max_dispatch_tokens_per_rank"
            if model.hidden_size not in DEEPEP_LOW_LATENCY_HIDDEN_SIZES:
                sizes = ", ".join(map(str, DEEPEP_LOW_LATENCY_HIDDEN_SIZES))
                return False, f"DeepEP low-latency kernels support model.hidden_size in {sizes}"
            if model.top_k > DEEPEP_LOW_LATENCY_MAX_TOPK:
                return (
                    False,
                    f"DeepEP low-latency kernels support model.top_k <= {DEEPEP_LOW_LATENCY_MAX_TOPK}",
                )
        if mode_plan.precision == Precision.FP8:
            if model.hidden_size % FP8_GROUP:
                return False, f"fp8 dispatch needs model.hidden_size to be a multiple of {FP8_GROUP}"
            if not deep_ep.Buffer.is_sm90_compiled():
                return (
                    False,
                    "this DeepEP build lacks SM90 features (FP8); rebuild without DISABLE_SM90_FEATURES",
                )
        return True, "ok"

    # ------------------------------------------------------------------------------------------

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[DispatchedTokens, DispatchHandle]:
        """Send each token to the ranks that own its top-k experts.

        Args:
            x: `[T, D]` bfloat16 (CUDA) hidden states of this rank's tokens.
            routing: `topk_ids` `[T, K]` int64 global ids (-1 = none), `topk_weights` `[T, K]` fp32.
        Returns: the received tokens (normal: `[N_recv, D]` with local top-k ids/weights;
            low-latency: `[L, C*R, D]`, fp8 scales column-major as DeepEP returns them) and the handle.
        """
        self._check_dispatch_args(x, routing)
        if self.layout == Layout.NORMAL:
            return self._dispatch_normal(x, routing)
        return self._dispatch_low_latency(x, routing)

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Return expert outputs to their sources and reduce them: `[T, D]` bfloat16."""
        self._check_combine_args(expert_out, handle)
        buffer = self.owner.enter(self.layout, is_dispatch=False)
        if self.layout == Layout.NORMAL:
            out, _, _ = buffer.combine(
                expert_out.contiguous(), handle.state, config=self.owner.combine_config
            )
            return out
        out, _, _ = buffer.low_latency_combine(
            expert_out.contiguous(),
            self._ids(handle.routing),
            handle.routing.topk_weights.contiguous(),
            handle.state,
        )
        self.owner.issued_low_latency(None)
        return out

    dispatch_waits_behind_transfers = True  # the normal dispatch's host wait for its counts

    def mark(self) -> Any:
        """A DeepEP event on the current stream (`Buffer.capture()`), for `dispatch_async(after=)`."""
        return self.deep_ep.Buffer.capture()

    def dispatch_async(self, x: torch.Tensor, routing: Routing, *, after: Any = None) -> PendingDispatch:
        """Issue the dispatch; the receive completes at `.wait()`.

        Low-latency: `low_latency_dispatch(return_recv_hook=True)` launches the send phase on the
        current stream; `.wait()` launches the receive phase (the hook); `after` is not used (the
        send is a kernel of the current stream). Normal: `get_dispatch_layout` and `dispatch` run on
        DeepEP's communication stream after `after` (a `mark()`; the inputs' fp8 cast and contiguous
        copies then run on that stream too, after it), or else after an event captured on the
        current stream once the inputs are prepared (`previous_event`, `async_finish=True`,
        `allocate_on_comm_stream=True`; DeepEP records the tensors it touches on both streams).
        `.wait()` makes the current stream wait for the dispatch's event. The normal dispatch still
        blocks the host until its receive counts arrive (DeepEP's notify step, on the communication
        stream behind the transfers queued there), as the synchronous one does; see
        `dispatch_waits_behind_transfers`.
        """
        self._check_dispatch_args(x, routing)
        if self.layout == Layout.NORMAL:
            return self._dispatch_normal_async(x, routing, after)
        result, hook = self._issue_low_latency(x, routing, return_recv_hook=True)

        def finish() -> tuple[DispatchedTokens, DispatchHandle]:
            hook()
            return result()

        return Pending(finish)

    def _dispatch_normal_async(self, x: torch.Tensor, routing: Routing, after: Any) -> PendingDispatch:
        buffer = self.owner.enter(Layout.NORMAL)
        if after is None:
            x_in, ids, weights = self._normal_inputs(x, routing)
            after = self.mark()  # after the preparation's kernels
        else:
            # The preparation (fp8 cast, contiguous copies of x and the routing) runs on the
            # communication stream after `after`: on the current stream it would queue behind later
            # work there (the previous chunk's experts), which the layout and the dispatch, ordered
            # only after `after`, do not wait for. The sources are read on that stream, so they are
            # recorded on it (the caller may free them once its own stream is past them).
            comm = buffer.get_comm_stream()
            with torch.cuda.stream(comm):
                after.current_stream_wait()
                x_in, ids, weights = self._normal_inputs(x, routing)
            for t in (x, routing.topk_ids, routing.topk_weights):
                if t.is_cuda:
                    t.record_stream(comm)
        recv, recv_ids, recv_weights, num_list, deep_handle, ev = self._layout_and_dispatch(
            buffer, x_in, ids, weights, after=after
        )
        counts = _to_device(num_list, x.device)

        def finish() -> tuple[DispatchedTokens, DispatchHandle]:
            ev.current_stream_wait()
            dispatched = _normal_received(recv, recv_ids, recv_weights, counts)
            handle = self._handle(Layout.NORMAL, x, routing, deep_handle)
            return dispatched, handle

        return Pending(finish)

    def combine_async(self, expert_out: torch.Tensor, handle: DispatchHandle) -> PendingCombine:
        """Issue the combine; `.wait()` -> `[T, D]` bfloat16. Low-latency: `return_recv_hook=True`
        (`.wait()` runs the hook); normal: on the communication stream after an event of the current
        stream (`.wait()` makes the current stream wait for it)."""
        self._check_combine_args(expert_out, handle)
        buffer = self.owner.enter(self.layout, is_dispatch=False)
        if self.layout == Layout.NORMAL:
            out, _, ev = buffer.combine(
                expert_out.contiguous(),
                handle.state,
                config=self.owner.combine_config,
                previous_event=self.mark(),
                async_finish=True,
                allocate_on_comm_stream=True,
            )

            def finish_normal() -> torch.Tensor:
                ev.current_stream_wait()
                return out

            return Pending(finish_normal)
        out, _, hook = buffer.low_latency_combine(
            expert_out.contiguous(),
            self._ids(handle.routing),
            handle.routing.topk_weights.contiguous(),
            handle.state,
            async_finish=False,
            return_recv_hook=True,
        )
        receive = self.owner.issued_low_latency(hook)

        def finish_ll() -> torch.Tensor:
            receive()
            return out

        return Pending(finish_ll)

    def close(self) -> None:
        if self.owner is not None:
            self._last = None
            self.owner.release()
            self.owner = None

    # ------------------------------------------------------------------------------------------

    def _ids(self, routing: Routing) -> torch.Tensor:
        ids = routing.topk_ids
        return (ids if ids.dtype == self._topk_dtype else ids.to(self._topk_dtype)).contiguous()

    def _dispatch_normal(self, x: torch.Tensor, routing: Routing) -> tuple[DispatchedTokens, DispatchHandle]:
        buffer = self.owner.enter(Layout.NORMAL)
        last = self._last
        versions = (routing.topk_ids._version, routing.topk_weights._version)
        if last is not None and last.routing is routing and last.versions == versions:
            # Same routing object as the previous dispatch, its tensors unchanged: DeepEP's cached
            # mode reuses the layout (no layout kernel, no CPU wait for the receive count).
            x_in = self._normal_input(x)
            recv, _, _, _, _, _ = buffer.dispatch(x_in, handle=last.handle, config=self.owner.dispatch_config)
            dispatched = _normal_received(recv, last.recv_topk_ids, last.recv_topk_weights, last.counts)
            deep_handle = last.handle
        else:
            recv, recv_ids, recv_weights, num_list, deep_handle, _ = self._layout_and_dispatch(
                buffer, *self._normal_inputs(x, routing)
            )
            dispatched = _normal_received(recv, recv_ids, recv_weights, _to_device(num_list, x.device))
            self._last = _CachedLayout(
                routing,
                versions,
                deep_handle,
                dispatched.num_recv_per_expert,
                dispatched.recv_topk_ids,
                dispatched.recv_topk_weights,
            )
        handle = self._handle(Layout.NORMAL, x, routing, deep_handle)
        return dispatched, handle

    def _normal_input(self, x: torch.Tensor) -> Any:
        """What normal dispatch sends: `(e4m3, scales)` for fp8, else `x` (DeepEP asserts contiguity)."""
        if self.is_fp8:
            from ep_runtime.kernels.quant import per_token_group_quant_fp8

            return per_token_group_quant_fp8(x, group_size=FP8_GROUP)
        return x.contiguous()

    def _normal_inputs(self, x: torch.Tensor, routing: Routing) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """`(payload, topk_idx, topk_weights)` as DeepEP's normal dispatch takes them (contiguous,
        ids in `deep_ep.topk_idx_t`). May launch kernels (the fp8 cast, copies) on the current stream."""
        return self._normal_input(x), self._ids(routing), routing.topk_weights.contiguous()

    def _layout_and_dispatch(
        self, buffer: Any, x_in: Any, ids: torch.Tensor, weights: torch.Tensor, *, after: Any = None
    ) -> tuple:
        """DeepEP's uncached normal dispatch of `_normal_inputs`: `get_dispatch_layout`, then
        `dispatch`; returns dispatch's `(recv_x, recv_topk_idx, recv_topk_weights, counts list,
        handle, event)`. With `after` (a DeepEP event, taken once the inputs are written):
        asynchronous, both on the communication stream, the layout after `after`, the dispatch after
        the layout's event."""

        def on_comm(event: Any) -> dict[str, Any]:
            if after is None:
                return {}
            return dict(async_finish=True, allocate_on_comm_stream=True, previous_event=event)

        num_per_rank, num_per_rdma_rank, num_per_expert, is_token_in_rank, ev = buffer.get_dispatch_layout(
            ids, self.num_experts, **on_comm(after)
        )
        return buffer.dispatch(
            x_in,
            num_tokens_per_rank=num_per_rank,
            num_tokens_per_rdma_rank=num_per_rdma_rank,  # None on one node; required across nodes
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_per_expert,
            topk_idx=ids,
            topk_weights=weights,
            config=self.owner.dispatch_config,
            **on_comm(ev),
        )

    def _handle(self, layout: Layout, x: torch.Tensor, routing: Routing, deep_handle: Any) -> DispatchHandle:
        return DispatchHandle(
            layout=layout, num_tokens=x.shape[0], hidden_size=self.hidden, routing=routing, state=deep_handle
        )

    def _check_dispatch_args(self, x: torch.Tensor, routing: Routing) -> None:
        if x.dim() != 2 or x.shape[1] != self.hidden or x.dtype != torch.bfloat16:
            raise ValueError(f"x must be [T, {self.hidden}] bfloat16, got {tuple(x.shape)} {x.dtype}")
        if routing.num_tokens != x.shape[0]:
            raise ValueError(f"routing has {routing.num_tokens} tokens but x has {x.shape[0]} rows")

    def _check_combine_args(self, expert_out: torch.Tensor, handle: DispatchHandle) -> None:
        if handle.layout != self.layout:
            raise ValueError(
                f"handle is for the {handle.layout.value} layout, this dispatcher serves {self.layout.value}"
            )
        if expert_out.dtype != torch.bfloat16:
            raise ValueError(f"expert_out.dtype must be bfloat16, got {expert_out.dtype}")

    def _dispatch_low_latency(
        self, x: torch.Tensor, routing: Routing
    ) -> tuple[DispatchedTokens, DispatchHandle]:
        result, _ = self._issue_low_latency(x, routing, return_recv_hook=False)
        return result()

    def _issue_low_latency(
        self, x: torch.Tensor, routing: Routing, *, return_recv_hook: bool
    ) -> tuple[Callable[[], tuple[DispatchedTokens, DispatchHandle]], Any]:
        """Issue DeepEP's low-latency dispatch; return a function that wraps what was received (call
        it after the receive hook when `return_recv_hook`), and the hook (None otherwise)."""
        if x.shape[0] > self.capacity:
            raise ValueError(
                f"low-latency dispatch got {x.shape[0]} tokens, more than the capacity C = "
                f"dispatch.num_max_dispatch_tokens_per_rank ({self.capacity}); the layer must chunk the batch"
            )
        buffer = self.owner.enter(Layout.LOW_LATENCY)
        recv, recv_count, deep_handle, _, hook = buffer.low_latency_dispatch(
            x.contiguous(),
            self._ids(routing),
            self.capacity,
            self.num_experts,
            use_fp8=self.is_fp8,
            async_finish=False,
            return_recv_hook=return_recv_hook,
        )
        hook = self.owner.issued_low_latency(hook if return_recv_hook else None)

        def result() -> tuple[DispatchedTokens, DispatchHandle]:
            recv_x, recv_scale = recv if isinstance(recv, tuple) else (recv, None)
            dispatched = DispatchedTokens(
                layout=Layout.LOW_LATENCY, x=recv_x, x_scale=recv_scale, num_recv_per_expert=recv_count
            )
            handle = self._handle(Layout.LOW_LATENCY, x, routing, deep_handle)
            return dispatched, handle

        return result, hook
