"""`EPMoE`: one expert-parallel MoE layer on one rank (router -> dispatch -> experts -> combine).

What an inference engine calls once per MoE layer per step. Built from a `RuntimePlan`
(`ep_runtime.config.resolve_plan`): the plan names the dispatch backend and precision per mode,
the expert implementation, the router GEMM and the low-latency capacity `C`.

Mode per step:
  - `normal` / `low_latency`: fixed by the file.
  - `auto`: every step all-reduces (MAX) one 2-element device tensor `[T, is_prefill]` across the EP
    group and reads it on the host: normal when any rank carries prefill or more than
    `plan.normal_above_tokens` tokens, low-latency otherwise. We all-reduce rather than trust
    `is_prefill` alone because every rank must pick the same collectives (a rank whose caller
    disagreed would otherwise deadlock the group), and because the low-latency path needs the
    group's max `T` anyway to size its rounds. That is one host sync per step, taken before dispatch
    and outside dispatch, expert compute and combine (which make none of their own on the
    low-latency path); `low_latency` mode takes the same all-reduce for its round count, `normal`
    mode takes none.

Execution switches (`execution` section; each keeps the plain path's numerics, see
`ep_runtime/execution.py`):
  - `cuda_graph_decode` (cuda): a step with `is_prefill=False` and `T <= C` is taken as a low-latency
    decode step WITHOUT the mode all-reduce and replayed from a CUDA graph (`DecodeGraphRunner`).
    The caller promises that every rank of the group makes such a step at the same time (decode,
    `T <= C` everywhere); a rank that does not would leave its peers waiting in a collective. The
    first such step captures every token bucket on every rank. Steps outside the promise (prefill,
    `T > C`) take the eager path with its all-reduce. Conservation checks do not run in graphs.
  - `decode_two_batch`: every low-latency round runs as two overlapped micro-batches.
  - `prefill_chunks > 1`: normal-layout steps run as that many chunks, communication of one chunk
    overlapping the experts of another.

Chunking: a low-latency step runs `ceil(max_T / C)` rounds (at least one); every rank joins each
round, sending an empty batch once its own tokens are exhausted, so nothing is dropped and ranks
with zero tokens take part in every collective. Switching modes on a DeepEP buffer cleans its
low-latency area (the DeepEP backend does this on entry to low-latency mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from ep_runtime.comm import build_dispatchers, check_combined_once, check_conservation
from ep_runtime.config import ExecutionConfig, RuntimePlan, resolve_execution
from ep_runtime.execution import DecodeGraphRunner, chunked_normal_step, two_batch_round
from ep_runtime.experts import get_experts
from ep_runtime.reference import reference_moe
from ep_runtime.router import Router
from ep_runtime.telemetry import PendingTelemetry, StageTimer, StepTelemetry
from ep_runtime.types import Layout, Routing
from ep_runtime.weights import (
    ExpertProvider,
    MoEWeights,
    RouterWeights,
    build_local_weights,
    expert_provider,
    local_expert_ids,
)


class EPMoE(torch.nn.Module):
    """The routed-experts MoE block of one layer, expert-parallel over `plan.ep_size` ranks.

    Args:
        plan: the resolved runtime plan (`resolve_plan(load_config(path))`).
        rank: this rank's index in the EP group, `[0, R)`.
        group: the EP process group (None = the default group; may be absent on one rank).
        weights: this rank's `MoEWeights` (router + `L` local experts in the plan's scheme); None
            builds them from `plan.config.model` (checkpoint when set, else synthetic).
        device: where tensors live; default `cpu`, or the current CUDA device for `cuda` plans.
        mpi_comm: an `mpi4py.MPI.Comm` for DeepEP buffers when launched under MPI.
        check_finite: raise when `hidden` holds NaN/Inf (a host sync per step: debugging aid).
        debug: assert on device that router ids lie in `[0, E)` (no host sync).
        collect_telemetry: gather per-rank load each step (one small all-reduce, no host sync).
        placement: optional `[R][L]` global expert ids per rank (a permutation of `range(E)`);
            default: rank `r` holds experts `[r*L, (r+1)*L)`.
        layer_index: which layer's weights to build (default `model.layer_index`).
        graph_buckets: token counts captured by the CUDA-graph decode runner (default: powers of two
            up to `C`, and `C`); only with `execution.cuda_graph_decode`.
        shared_comm: communication state shared by every layer of this process, from
            `ep_runtime.comm.build_shared_state(plan, group)` (DeepEP: the one `deep_ep.Buffer`;
            a model with several MoE layers should pass it to each). None: the layer makes its own.
    """

    def __init__(
        self,
        plan: RuntimePlan,
        *,
        rank: int,
        group: dist.ProcessGroup | None = None,
        weights: MoEWeights | None = None,
        device: torch.device | str | None = None,
        mpi_comm: Any | None = None,
        check_finite: bool = False,
        debug: bool = False,
        collect_telemetry: bool = True,
        placement: Sequence[Sequence[int]] | None = None,
        layer_index: int | None = None,
        graph_buckets: Sequence[int] | None = None,
        shared_comm: Any | None = None,
    ):
        super().__init__()
        if not isinstance(plan, RuntimePlan):
            raise ValueError(f"plan must be a RuntimePlan (resolve_plan(config)), got {type(plan).__name__}")
        model = plan.config.model
        self.plan = plan
        self.model_cfg = model
        self.num_ranks = plan.ep_size
        self.num_local_experts = plan.num_local_experts
        if not isinstance(rank, int) or not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank ({rank}) must be an int in [0, {self.num_ranks}) (parallel.ep_size)")
        self.rank = rank
        self.group = group
        self._dist = dist.is_available() and dist.is_initialized()
        if self._dist:
            size, grank = dist.get_world_size(group), dist.get_rank(group)
            if size != self.num_ranks:
                raise ValueError(f"group has {size} ranks but parallel.ep_size is {self.num_ranks}")
            if grank != rank:
                raise ValueError(f"rank ({rank}) differs from this process's rank in group ({grank})")
        elif self.num_ranks > 1 and mpi_comm is None:
            raise ValueError(
                f"parallel.ep_size is {self.num_ranks}: initialise torch.distributed (or pass mpi_comm) first"
            )
        self.mpi_comm = mpi_comm
        self.device = self._resolve_device(plan, device)
        self.layer_index = model.layer_index if layer_index is None else layer_index
        self.check_finite = check_finite
        self.debug = debug
        self.collect_telemetry = collect_telemetry

        # Placement: router ids are global expert ids; dispatch addresses slots (rank * L + local).
        self.placement = placement
        self.local_expert_ids = local_expert_ids(model.num_experts, self.num_ranks, rank, placement)
        self._slot_of_expert = None
        if placement is not None:
            slot = torch.empty(model.num_experts, dtype=torch.int64)
            for r, ids in enumerate(placement):
                for j, e in enumerate(ids):
                    slot[int(e)] = r * self.num_local_experts + j
            self._slot_of_expert = slot.to(self.device)

        if weights is None:
            weights = build_local_weights(
                model,
                rank=rank,
                ep_size=self.num_ranks,
                device=self.device,
                layer=self.layer_index,
                placement=placement,
            )
        self._check_weights(weights)
        self.weights = weights
        self.router = Router(model, weights.router, impl=plan.router_gemm, topk_impl=plan.router_topk)

        experts_cls = get_experts(plan.experts_impl)
        for layout in plan.modes:
            ok, reason = experts_cls.supports(plan, layout)
            if not ok:
                raise ValueError(
                    f"kernels.experts '{plan.experts_impl}' cannot serve the {layout.value} layout: {reason}"
                )
        self.experts = experts_cls(plan)
        self.dispatchers = build_dispatchers(plan, group, shared=shared_comm, mpi_comm=mpi_comm)
        self._pending: PendingTelemetry | None = None
        self._telemetry: StepTelemetry | None = None
        self.last_routing: Routing | None = None
        """The last step's router decision (global expert ids), for verification."""
        self._closed = False
        self.execution: ExecutionConfig = plan.execution
        """The execution switches in force (the file's, `auto` resolved; `set_execution` changes them)."""
        self.graph_runner: DecodeGraphRunner | None = None
        """Replays low-latency decode steps from CUDA graphs (`execution.cuda_graph_decode`)."""
        if self.execution.cuda_graph_decode:
            self.graph_runner = DecodeGraphRunner(self, graph_buckets)

    def set_execution(
        self,
        *,
        cuda_graph_decode: bool | Literal["auto"] | None = None,
        decode_two_batch: bool | None = None,
        prefill_chunks: int | None = None,
        graph_buckets: Sequence[int] | None = None,
    ) -> None:
        """Change the execution switches between steps (None keeps a switch). Every rank must make the
        same change between the same two steps. Turning `cuda_graph_decode` on (or passing new
        `graph_buckets`) drops the captured graphs; the next decode step captures again.

        Raises ValueError naming the switch when the plan or device cannot use it."""
        cur = self.execution
        update = {
            k: v
            for k, v in dict(
                cuda_graph_decode=cuda_graph_decode,
                decode_two_batch=decode_two_batch,
                prefill_chunks=prefill_chunks,
            ).items()
            if v is not None
        }
        try:
            new = ExecutionConfig(**{**cur.model_dump(), **update})
        except Exception as exc:  # pydantic ValidationError: name the switch
            raise ValueError(f"execution: {exc}") from None
        new = resolve_execution(self.plan.config, new)  # `auto` decided as for the file
        if new.cuda_graph_decode and self.device.type != "cuda":
            raise ValueError("execution.cuda_graph_decode needs a CUDA layer; allowed on cpu: False")
        if (new.cuda_graph_decode or new.decode_two_batch) and Layout.LOW_LATENCY not in self.plan.modes:
            raise ValueError(
                "execution.cuda_graph_decode / decode_two_batch apply to low-latency steps; "
                f"dispatch.mode is '{self.plan.mode}' (allowed: auto, low_latency)"
            )
        if new.prefill_chunks > 1 and Layout.NORMAL not in self.plan.modes:
            raise ValueError(
                f"execution.prefill_chunks applies to normal-mode steps; dispatch.mode is '{self.plan.mode}'"
            )
        rebuild = new.cuda_graph_decode and (
            self.graph_runner is None
            or graph_buckets is not None
            or new.decode_two_batch != cur.decode_two_batch
        )
        if self.graph_runner is not None and (not new.cuda_graph_decode or rebuild):
            self.graph_runner.reset()
            self.graph_runner = None
        self.execution = new
        if rebuild:
            self.graph_runner = DecodeGraphRunner(self, graph_buckets)

    # ------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_device(plan: RuntimePlan, device: torch.device | str | None) -> torch.device:
        if device is None:
            if plan.device == "cuda":
                if not torch.cuda.is_available():
                    raise ValueError("parallel.device is 'cuda' but no CUDA device is visible")
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device("cpu")
        device = torch.device(device)
        if device.type != plan.device:
            raise ValueError(f"device ({device}) does not match parallel.device '{plan.device}'")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _check_weights(self, weights: MoEWeights) -> None:
        m = self.model_cfg
        if not isinstance(weights, MoEWeights):
            raise ValueError(f"weights must be MoEWeights, got {type(weights).__name__}")
        ex = weights.experts
        if ex.scheme != m.weights:
            raise ValueError(
                f"weights.experts.scheme '{ex.scheme}' does not match model.weights '{m.weights}'"
            )
        if ex.num_local_experts != self.num_local_experts:
            raise ValueError(
                f"weights hold {ex.num_local_experts} local experts, the plan needs {self.num_local_experts}"
            )
        if (ex.hidden_size, ex.intermediate_size) != (m.hidden_size, m.moe_intermediate_size):
            raise ValueError(
                f"weights are D={ex.hidden_size}, I={ex.intermediate_size}; the model is "
                f"D={m.hidden_size}, I={m.moe_intermediate_size}"
            )
        if tuple(ex.expert_ids) != tuple(self.local_expert_ids):
            raise ValueError(
                f"weights hold experts {list(ex.expert_ids)[:8]}..., rank {self.rank} owns "
                f"{list(self.local_expert_ids)[:8]}... (placement)"
            )
        if ex.w13.device != self.device or weights.router.weight.device != self.device:
            raise ValueError(f"weights are on {ex.w13.device}, the layer on {self.device}")

    # ------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------

    def _check_input(self, hidden: torch.Tensor, is_prefill: bool) -> None:
        d = self.model_cfg.hidden_size
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"hidden must be a torch.Tensor [T, {d}], got {type(hidden).__name__}")
        if hidden.dim() != 2 or hidden.shape[1] != d:
            raise ValueError(f"hidden must be [T, {d}] (model.hidden_size), got {tuple(hidden.shape)}")
        allowed = (torch.bfloat16, torch.float32) if self.device.type == "cpu" else (torch.bfloat16,)
        if hidden.dtype not in allowed:
            names = ", ".join(str(t).removeprefix("torch.") for t in allowed)
            raise ValueError(f"hidden.dtype must be one of {names} on {self.device.type}, got {hidden.dtype}")
        if hidden.device != self.device:
            raise ValueError(f"hidden is on {hidden.device} but the layer is on {self.device}")
        if not isinstance(is_prefill, bool):
            raise ValueError(f"is_prefill must be a bool, got {type(is_prefill).__name__}")
        if self.check_finite:
            self._check_finite(hidden)

    def _check_finite(self, hidden: torch.Tensor) -> None:
        """`check_finite` (a debug switch, so off the hot path): the verdict read on the host and,
        with several ranks, one all-reduce of it, so a bad input on one rank stops the step on every
        rank (no peer is left in a collective)."""
        bad = int(not bool(torch.isfinite(hidden).all()))
        any_bad = self._all_reduce_max([bad])[0]
        if bad:
            raise ValueError("hidden holds non-finite values (NaN or Inf)")
        if any_bad:
            raise ValueError(
                "another rank's hidden holds non-finite values (NaN or Inf; check_finite): every rank "
                "stops this step"
            )

    def _all_reduce_max(self, values: list[int]) -> list[int]:
        """Element-wise max of small host ints over the EP group (one collective, one host sync)."""
        if self.num_ranks == 1:
            return values
        if not self._dist:
            from mpi4py import MPI

            return [int(self.mpi_comm.allreduce(v, op=MPI.MAX)) for v in values]
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in t.tolist()]

    def _choose_layout(self, num_tokens: int, is_prefill: bool) -> tuple[Layout, int | None]:
        mode = self.plan.mode
        if mode == "normal":
            return Layout.NORMAL, None
        max_tokens, any_prefill = self._all_reduce_max([num_tokens, int(is_prefill)])
        if mode == "low_latency":
            return Layout.LOW_LATENCY, max_tokens
        prefill_normal = self.plan.config.dispatch.auto.prefill_uses_normal and any_prefill
        if prefill_normal or max_tokens > self.plan.normal_above_tokens:
            return Layout.NORMAL, max_tokens
        return Layout.LOW_LATENCY, max_tokens

    def forward(
        self, hidden: torch.Tensor, *, is_prefill: bool = False, graph_step: bool | None = None
    ) -> torch.Tensor:
        """One MoE step on this rank's tokens.

        Args:
            hidden: `[T, D]` bfloat16 (float32 also accepted on CPU; it is rounded to bfloat16 for the
                router and dispatch, and the output returns as float32). `T` may be 0; every rank
                must call forward for every step.
            is_prefill: the step carries prefill (auto mode then uses the normal layout).
            graph_step: with `execution.cuda_graph_decode`, whether this step replays a decode
                graph. It must be the same on every rank: an engine whose ranks' batches differ
                (e.g. data-parallel attention) decides it once per model step for the whole group
                (all ranks decode and every rank's `T <= C`) and passes it to every layer. None:
                decided from this rank's own step (`not is_prefill and T <= C`), which is
                group-consistent only when every rank's step is alike.
        Returns: `[T, D]` in `hidden.dtype`: the routed experts' weighted sum for each token.
        """
        if self._closed:
            raise RuntimeError("EPMoE.forward called after close()")
        self._check_input(hidden, is_prefill)
        x = hidden if hidden.dtype == torch.bfloat16 else hidden.to(torch.bfloat16)
        num_tokens = x.shape[0]
        timer = StageTimer(self.device)
        runner = self.graph_runner
        eligible = runner is not None and not is_prefill and num_tokens <= runner.capacity
        if graph_step is None:
            graph_step = eligible
        elif graph_step and not eligible:
            raise ValueError(
                "graph_step=True needs execution.cuda_graph_decode, is_prefill=False and T <= C "
                f"(dispatch.num_max_dispatch_tokens_per_rank); got T = {num_tokens}, is_prefill={is_prefill}"
            )
        if graph_step:
            return self._forward_graph(x, hidden.dtype, timer)
        layout, max_tokens = self._choose_layout(num_tokens, is_prefill)
        timer.lap("mode")

        routing = self._route(x)
        timer.lap("router")

        counts = torch.zeros(self.num_local_experts, dtype=torch.int64, device=self.device)
        chunks = self.execution.prefill_chunks
        if layout == Layout.NORMAL and chunks > 1:
            out = chunked_normal_step(self, x, routing, chunks, counts, timer)
            num_rounds = 1
        elif layout == Layout.NORMAL:
            out = self._round(x, routing, layout, timer, counts)
            num_rounds = 1
        else:
            cap = self.plan.for_layout(Layout.LOW_LATENCY).capacity
            num_rounds = max(1, -(-max_tokens // cap))
            outs = []
            for i in range(num_rounds):
                sl = slice(i * cap, (i + 1) * cap)  # empty past this rank's tokens: an empty round
                part = Routing(topk_ids=routing.topk_ids[sl], topk_weights=routing.topk_weights[sl])
                outs.append(self._low_latency_round(x[sl], part, counts, timer))
            out = outs[0] if num_rounds == 1 else torch.cat(outs, 0)

        per_rank = self._gather_per_rank(counts)
        self._pending = PendingTelemetry(
            layout=layout.value,
            num_rounds=num_rounds,
            num_tokens=num_tokens,
            max_tokens_any_rank=max_tokens,
            tokens_per_local_expert=counts,
            tokens_per_rank=per_rank,
            timer=timer,
        )
        self._telemetry = None
        return out if hidden.dtype == torch.bfloat16 else out.to(hidden.dtype)

    def _route(self, x: torch.Tensor) -> Routing:
        """Router decision for `x` `[T, D]` bf16, as dispatch slots (placement applied); sets
        `last_routing` (global expert ids)."""
        routing, _ = self.router(x)
        self.last_routing = routing
        if self._slot_of_expert is not None:
            ids = routing.topk_ids
            slots = torch.where(ids >= 0, self._slot_of_expert[ids.clamp(min=0)], -1)
            routing = Routing(topk_ids=slots, topk_weights=routing.topk_weights)
        if self.debug:
            ids = routing.topk_ids
            torch._assert_async(((ids >= 0) & (ids < self.model_cfg.num_experts)).all())
        return routing

    def _gather_per_rank(self, counts: torch.Tensor) -> torch.Tensor | None:
        """`[R]` int64 rows received per rank (one all-reduce, no host sync), or None when off."""
        if self.collect_telemetry and self.num_ranks > 1 and self._dist:
            per_rank = torch.zeros(self.num_ranks, dtype=torch.int64, device=self.device)
            per_rank[self.rank] = counts.sum()
            dist.all_reduce(per_rank, group=self.group)
            return per_rank
        if self.collect_telemetry and self.num_ranks == 1:
            return counts.sum().reshape(1)
        return None

    def _low_latency_round(
        self, x: torch.Tensor, routing: Routing, counts: torch.Tensor, timer: StageTimer | None
    ) -> torch.Tensor:
        """One low-latency round (`T <= C`): plain or two micro-batches (`execution.decode_two_batch`).
        `timer` None = inside a CUDA graph capture (no events, no conservation checks)."""
        if self.execution.decode_two_batch:
            return two_batch_round(self, x, routing, counts, timer, checks=timer is not None)
        return self._round(x, routing, Layout.LOW_LATENCY, timer, counts)

    def _forward_graph(self, x: torch.Tensor, out_dtype: torch.dtype, timer: StageTimer) -> torch.Tensor:
        """A decode step replayed from the CUDA graph of its token bucket (no mode all-reduce)."""
        timer.lap("mode")
        out, counts, per_rank = self.graph_runner.run(x)
        timer.lap("graph")
        self._pending = PendingTelemetry(
            layout=Layout.LOW_LATENCY.value,
            num_rounds=1,
            num_tokens=x.shape[0],
            max_tokens_any_rank=None,
            tokens_per_local_expert=counts,
            tokens_per_rank=per_rank,
            timer=timer,
        )
        self._telemetry = None
        return out if out_dtype == torch.bfloat16 else out.to(out_dtype)

    def _round(
        self,
        x: torch.Tensor,
        routing: Routing,
        layout: Layout,
        timer: StageTimer | None,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        """Dispatch, experts and combine of one batch (one low-latency round, or the normal step).
        `timer` None: inside a graph capture (no stage events, no conservation checks)."""
        lap = timer.lap if timer is not None else (lambda stage: None)
        dispatcher = self.dispatchers[layout]
        dispatched, handle = dispatcher.dispatch(x, routing)
        lap("dispatch")
        check = self.plan.config.dispatch.check_conservation and self._dist and timer is not None
        if check:
            check_conservation(routing, dispatched, handle, self.group)
            lap("checks")
        expert_out = self.experts.forward(dispatched, self.weights.experts)
        counts += dispatched.num_recv_per_expert.to(torch.int64)
        lap("experts")
        out = dispatcher.combine(expert_out, handle)
        lap("combine")
        if check:
            check_combined_once(dispatcher, routing, dispatched, handle, self.group)
            lap("checks")
        return out

    # ------------------------------------------------------------------------------------------
    # Telemetry, verification, teardown
    # ------------------------------------------------------------------------------------------

    @property
    def last_telemetry(self) -> StepTelemetry | None:
        """The last step's `StepTelemetry` (materialised on first read: waits for its events)."""
        if self._telemetry is None and self._pending is not None:
            self._telemetry = self._pending.resolve()
            self._pending = None
        return self._telemetry

    def dispatch_precision(self, layout: Layout | str) -> str:
        """`bf16` or `fp8`: the dispatch precision the plan resolved for `layout`."""
        return self.plan.for_layout(Layout(layout)).precision.value

    def reference_router(self) -> RouterWeights:
        """The router weights this layer uses (identical on every rank)."""
        return self.weights.router

    def reference_weights_provider(self, device: torch.device | str | None = None) -> ExpertProvider:
        """`e -> (w13 [2I, D], w2 [D, I])` float32 for any global expert `e`, rebuilt from the model's
        seed or checkpoint in the plan's scheme (dequantised), one expert per call."""
        return expert_provider(
            self.model_cfg,
            device=device or self.device,
            layer=self.layer_index,
            scheme=self.model_cfg.weights,
        )

    def reference_forward(
        self,
        hidden: torch.Tensor,
        *,
        layout: Layout | str | None = None,
        quantize_activations: bool = True,
        routing: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The single-process float32 reference of `forward(hidden)` (no communication): `[T, D]`
        float32. `layout` selects the dispatch precision to model (default: the last step's layout,
        else the plan's only or normal layout)."""
        if layout is None:
            last = self.last_telemetry
            layout = Layout(last.layout) if last is not None else next(iter(self.plan.modes))
        x = hidden.to(torch.bfloat16)
        return reference_moe(
            x,
            self.weights.router,
            self.reference_weights_provider(),
            self.model_cfg,
            scheme=self.model_cfg.weights,
            dispatch_precision=self.dispatch_precision(layout),
            quantize_activations=quantize_activations,
            routing=routing,
        )

    def close(self) -> None:
        """Free the communication buffers; the layer is unusable afterwards. Idempotent."""
        if self._closed:
            return
        if self.graph_runner is not None:
            self.graph_runner.reset()  # the graphs reference the dispatchers' buffers
            self.graph_runner = None
        for d in self.dispatchers.values():
            d.close()
        self._closed = True

    def extra_repr(self) -> str:
        m = self.model_cfg
        return (
            f"rank={self.rank}/{self.num_ranks}, E={m.num_experts}, L={self.num_local_experts}, "
            f"D={m.hidden_size}, I={m.moe_intermediate_size}, K={m.top_k}, weights={m.weights}, "
            f"mode={self.plan.mode}, backend={self.plan.config.dispatch.backend}, experts={self.plan.experts_impl}"
        )
