"""Step schedules of `EPMoE` beyond the plain one (`execution` section of the config).

Plain step (every switch off): one batch, `dispatch -> experts -> combine`, each call blocking its
stream on the previous one. The schedules here keep the numerics of that path (same per-row
arithmetic, same reduction order per token) and change only when communication is issued. One
exception: w4a8 low-latency experts quantise their input per tensor, so a micro-batch or chunk
gets its own activation scale and results differ within that scheme's quantisation tolerance.

  - `two_batch_round` (`execution.decode_two_batch`): a low-latency round split into two
    micro-batches A and B. Issue order, identical on every rank:

        dispatch A (send) | wait A | dispatch B (send) | experts A | wait B | combine A (send)
        | experts B | wait combine A | combine B (send) | wait combine B

    B's transfer overlaps A's experts and A's combine overlaps B's experts. Each low-latency call is
    waited before the next one is issued, which DeepEP's double-buffered low-latency area requires
    (every send clears the other slot's signals); with DeepEP the sends and receives are its
    `return_recv_hook` phases (no SMs held while the data is in flight), with the torch backend they
    are `async_op=True` all-to-alls on NCCL's own stream.
  - `chunked_normal_step` (`execution.prefill_chunks > 1`): a normal-layout step split into `n`
    chunks of consecutive tokens; per chunk: wait its dispatch, queue its experts, issue its
    combine. Chunk `i+1`'s dispatch and chunk `i-1`'s combine run on the communication stream
    (DeepEP: `async_finish` on its comm stream ordered by events, tensors recorded on both streams
    by DeepEP; torch: NCCL's stream, tensors kept alive by the work handles until `wait`) while
    chunk `i`'s experts run on the compute stream. When the dispatch is issued depends on where its
    host wait for the receive counts sits (`Dispatcher.dispatch_waits_behind_transfers`):
      * torch backend: the count exchange syncs on the compute stream, so all dispatches are issued
        before any experts are queued (issued later, each would wait for the experts before it);
      * DeepEP: the wait sits on the communication stream behind every transfer queued there, so
        issuing all dispatches first would let only the last one overlap any experts. Dispatch
        `i+1` is issued right after chunk `i`'s experts are queued (and before combine `i`),
        ordered after an event marked when the inputs were ready, not after those experts:

            comm:    D0 D1 . C0 D2 . C1 D3 ...   (C_i after E_i's event)
            compute:    E0 E1    E2    E3 ...    (E_i after D_i's event)

    The chunk count is fixed by the config, so every rank issues the same collectives even when
    some of its chunks are empty.
  - `DecodeGraphRunner` (`execution.cuda_graph_decode`): the whole low-latency step (router,
    dispatch, experts, combine, the telemetry counts) captured in one CUDA graph per token bucket
    and replayed from static buffers. See its docstring for the caller's promise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ep_runtime.comm import check_combined_once, check_conservation
from ep_runtime.comm.base import PendingDispatch
from ep_runtime.types import Layout, Routing

if TYPE_CHECKING:  # pragma: no cover
    from ep_runtime.layer import EPMoE
    from ep_runtime.telemetry import StageTimer


def _slice_routing(routing: Routing, sl: slice) -> Routing:
    return Routing(topk_ids=routing.topk_ids[sl], topk_weights=routing.topk_weights[sl])


def split_bounds(num_tokens: int, parts: int) -> list[slice]:
    """`parts` consecutive slices covering `range(num_tokens)`, sizes differing by at most one (the
    first ones larger); some are empty when `num_tokens < parts`."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(num_tokens, parts)
    out, start = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append(slice(start, start + n))
        start += n
    return out


class _Lap:
    """`timer.lap` that tolerates no timer (graph capture records no events)."""

    def __init__(self, timer: StageTimer | None):
        self.timer = timer

    def __call__(self, stage: str) -> None:
        if self.timer is not None:
            self.timer.lap(stage)


def _run_checks(
    layer: EPMoE, layout: Layout, parts: list[tuple[Routing, Any, Any]], lap: _Lap, checks: bool = True
) -> None:
    """The debug conservation checks of overlapped schedules, after all their transfers completed
    (each check is a blocking collective and must not sit between an async call and its wait)."""
    if not (checks and layer.plan.config.dispatch.check_conservation and layer._dist):
        return
    dispatcher = layer.dispatchers[layout]
    for routing, dispatched, handle in parts:
        check_conservation(routing, dispatched, handle, layer.group)
        check_combined_once(dispatcher, routing, dispatched, handle, layer.group)
    lap("checks")


def two_batch_round(
    layer: EPMoE,
    x: torch.Tensor,
    routing: Routing,
    counts: torch.Tensor,
    timer: StageTimer | None = None,
    checks: bool = True,
) -> torch.Tensor:
    """One low-latency round as two overlapped micro-batches (first `ceil(T/2)` rows, then the rest).

    Args:
        layer: the `EPMoE` (its low-latency dispatcher, experts and weights are used).
        x: `[T, D]` bfloat16, `T <= C`. routing: `[T, K]` slot ids / weights.
        counts: `[L]` int64, incremented by the rows each local expert received.
        timer: stage laps (None: none, as under graph capture). checks: run the debug conservation
            checks when the config enables them (off inside graphs: they sync with the host).
    Returns: `[T, D]` bfloat16, equal to the plain round's output.
    """
    lap = _Lap(timer)
    dispatcher = layer.dispatchers[Layout.LOW_LATENCY]
    half = (x.shape[0] + 1) // 2
    sa, sb = slice(0, half), slice(half, x.shape[0])
    ra, rb = _slice_routing(routing, sa), _slice_routing(routing, sb)
    da, ha = dispatcher.dispatch_async(x[sa], ra).wait()
    pend_b = dispatcher.dispatch_async(x[sb], rb)
    lap("dispatch")
    ya = layer.experts.forward(da, layer.weights.experts)
    counts += da.num_recv_per_expert.to(torch.int64)
    lap("experts")
    db, hb = pend_b.wait()
    comb_a = dispatcher.combine_async(ya, ha)
    lap("dispatch")
    yb = layer.experts.forward(db, layer.weights.experts)
    counts += db.num_recv_per_expert.to(torch.int64)
    lap("experts")
    out_a = comb_a.wait()
    out_b = dispatcher.combine_async(yb, hb).wait()
    lap("combine")
    _run_checks(layer, Layout.LOW_LATENCY, [(ra, da, ha), (rb, db, hb)], lap, checks)
    return torch.cat([out_a, out_b], 0)


def chunked_normal_step(
    layer: EPMoE,
    x: torch.Tensor,
    routing: Routing,
    num_chunks: int,
    counts: torch.Tensor,
    timer: StageTimer | None = None,
) -> torch.Tensor:
    """A normal-layout step as `num_chunks` chunks whose communication overlaps the other chunks'
    expert compute (see the module docstring). Args as `two_batch_round`; `T` is unbounded.
    Returns: `[T, D]` bfloat16, equal to the unchunked step's output."""
    lap = _Lap(timer)
    dispatcher = layer.dispatchers[Layout.NORMAL]
    bounds = split_bounds(x.shape[0], num_chunks)
    routings = [_slice_routing(routing, sl) for sl in bounds]
    # One-at-a-time issue when the host's wait inside a dispatch sits behind the queued transfers
    # (DeepEP); all at once otherwise (the torch backend's count sync is on the current stream).
    one_at_a_time = dispatcher.dispatch_waits_behind_transfers
    ready = dispatcher.mark() if one_at_a_time else None

    def issue(i: int) -> PendingDispatch:
        return dispatcher.dispatch_async(x[bounds[i]], routings[i], after=ready)

    pending = [issue(0)] if one_at_a_time else [issue(i) for i in range(num_chunks)]
    lap("dispatch")
    combines, parts = [], []
    for i in range(num_chunks):
        dispatched, handle = pending[i].wait()
        lap("dispatch")
        y = layer.experts.forward(dispatched, layer.weights.experts)
        counts += dispatched.num_recv_per_expert.to(torch.int64)
        lap("experts")
        if one_at_a_time and i + 1 < num_chunks:
            pending.append(issue(i + 1))  # before combine i, so it does not queue behind it
            lap("dispatch")
        combines.append(dispatcher.combine_async(y, handle))
        parts.append((routings[i], dispatched, handle))
    outs = [c.wait() for c in combines]
    lap("combine")
    _run_checks(layer, Layout.NORMAL, parts, lap)
    return torch.cat(outs, 0) if outs else x.new_empty((0, x.shape[1]))


# ----------------------------------------------------------------------------------------------
# CUDA-graph decode
# ----------------------------------------------------------------------------------------------


def default_buckets(capacity: int) -> list[int]:
    """Powers of two below `capacity`, then `capacity` itself: `[1, 2, 4, ..., C]`."""
    out, b = [], 1
    while b < capacity:
        out.append(b)
        b *= 2
    out.append(capacity)
    return out


@dataclass
class _Captured:
    bucket: int
    x: torch.Tensor  # [B, D] bf16 static input
    num_valid: torch.Tensor  # [] int64: real rows of this step (rows past it are masked)
    out: torch.Tensor | None = None  # [B, D] bf16
    counts: torch.Tensor | None = None  # [L] int64
    per_rank: torch.Tensor | None = None  # [R] int64 or None
    graph: Any = None
    router_out: Routing | None = None  # the router's decision (global ids) of the last run


class DecodeGraphRunner:
    """Runs low-latency decode steps of `layer` from CUDA graphs, one per token bucket.

    A step with `T` tokens uses the smallest bucket `B >= T`: the tokens are copied into the
    bucket's static `[B, D]` input, a device scalar holds `T`, and inside the graph rows `>= T` get
    routing `-1` (never dispatched) and weight 0, so the real rows' results are those of the eager
    step. The graph holds router, dispatch, experts, combine (two-batch when
    `execution.decode_two_batch`) and the telemetry counts with their per-rank all-reduce; nothing
    in it syncs with the host, and the layer skips its mode all-reduce for these steps.

    The caller's promise (not checked, to keep the step sync-free): every rank of the EP group runs
    a graph decode step at the same time, i.e. `is_prefill=False` and `T <= C` on every rank (the
    bucket a step uses may differ between ranks: every graph issues the same collectives, whose
    sizes depend only on `C`; the bucket lists must be the same, which the capture checks). The
    first graph step captures every bucket on every rank (the captures run collectives, so they
    happen together, in the same order); later steps only replay. A rank that broke the promise
    would leave its peers waiting in a collective (until the collective timeout).

    Args:
        layer: the `EPMoE` (low-latency layout in its plan).
        buckets: token counts to capture (default `default_buckets(C)`); each in `[1, C]`, `C` is
            always added.
        use_graph: capture and replay CUDA graphs (default: on CUDA). `False` runs the same padded,
            masked body eagerly (how the CPU tests check the padding).
        warmup: eager runs of each bucket's body before its capture (NCCL/Triton initialisation).
    """

    def __init__(
        self,
        layer: EPMoE,
        buckets: Sequence[int] | None = None,
        *,
        use_graph: bool | None = None,
        warmup: int = 2,
    ):
        if Layout.LOW_LATENCY not in layer.plan.modes:
            raise ValueError(
                "DecodeGraphRunner needs dispatch.mode low_latency or auto (a low-latency layout)"
            )
        self.layer = layer
        self.capacity = layer.plan.for_layout(Layout.LOW_LATENCY).capacity
        cap = self.capacity
        chosen = sorted(set(default_buckets(cap) if buckets is None else [*buckets, cap]))
        for b in chosen:
            if not isinstance(b, int) or not 1 <= b <= cap:
                raise ValueError(f"graph buckets must be ints in [1, {cap}] (the capacity C), got {b!r}")
        self.buckets = chosen
        self.use_graph = layer.device.type == "cuda" if use_graph is None else bool(use_graph)
        if self.use_graph and layer.device.type != "cuda":
            raise ValueError("use_graph=True needs a CUDA layer")
        self.warmup = warmup
        self._slots: dict[int, _Captured] = {}
        self._pool: Any = None
        self._parity: int | None = None
        self.captured = False

    def bucket_for(self, num_tokens: int) -> int:
        if not 0 <= num_tokens <= self.capacity:
            raise ValueError(f"a graph decode step needs 0 <= T <= C = {self.capacity}, got T = {num_tokens}")
        for b in self.buckets:
            if b >= num_tokens:
                return b
        return self.buckets[-1]  # unreachable: C is a bucket

    # -- the captured body ----------------------------------------------------------------------

    def _body(self, slot: _Captured) -> None:
        layer = self.layer
        rows = torch.arange(slot.bucket, device=layer.device)
        valid = (rows < slot.num_valid).unsqueeze(1)  # [B, 1] device compare, no host value
        routing = layer._route(slot.x)
        slot.router_out = layer.last_routing  # global ids, [B, K]
        routing = Routing(
            topk_ids=torch.where(valid, routing.topk_ids, -1),
            topk_weights=torch.where(valid, routing.topk_weights, 0.0),
        )
        counts = torch.zeros(layer.num_local_experts, dtype=torch.int64, device=layer.device)
        out = layer._low_latency_round(slot.x, routing, counts, None)
        per_rank = layer._gather_per_rank(counts)
        if slot.out is None:
            slot.out, slot.counts, slot.per_rank = out, counts, per_rank
        else:  # eager mode: results land in the same static buffers
            slot.out.copy_(out)
            slot.counts.copy_(counts)
            if per_rank is not None:
                slot.per_rank.copy_(per_rank)

    def _new_slot(self, bucket: int) -> _Captured:
        layer = self.layer
        d = layer.model_cfg.hidden_size
        return _Captured(
            bucket=bucket,
            x=torch.zeros((bucket, d), dtype=torch.bfloat16, device=layer.device),
            num_valid=torch.zeros((), dtype=torch.int64, device=layer.device),
        )

    def capture_all(self) -> None:
        """Capture every bucket (collective: every rank calls it at the same point)."""
        if self.captured:
            return
        # Every bucket's capture runs collectives: the bucket lists must match on every rank (one
        # small all-reduce of max and -min of a signature; every rank reaches the same verdict).
        sig = [len(self.buckets), sum(self.buckets), sum(b * b for b in self.buckets)]
        agreed = self.layer._all_reduce_max(sig + [-v for v in sig])
        if agreed[:3] != [-v for v in agreed[3:]]:
            raise ValueError(
                f"CUDA-graph decode buckets differ between ranks (this rank: {self.buckets}); pass the "
                "same graph_buckets on every rank"
            )
        if not self.use_graph:
            self.captured = True
            return
        self._clean_deepep()
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        for b in self.buckets:
            slot = self._new_slot(b)
            slot.num_valid.fill_(b)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    slot.out = None
                    self._body(slot)
            main.wait_stream(side)
            # No eager work in flight during the capture (NCCL's watchdog thread polls the events of
            # eager collectives); the capture restricts only this thread's CUDA calls.
            torch.cuda.synchronize()
            slot.out = None
            graph = torch.cuda.CUDAGraph()
            # captured on the warm-up stream: per-stream self-cleaning kernel workspaces
            # (`kernels.tables._zeroed`) exist already, so no zero-fill lands in the graph
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                self._body(slot)
            if self._pool is None:
                self._pool = graph.pool()
            slot.graph = graph
            self._slots[b] = slot
        torch.cuda.current_stream().synchronize()  # once, at capture time only
        owner = self._deepep_owner()
        # Every body makes an even number of low-latency calls, so all buckets share this parity.
        self._parity = None if owner is None else owner.low_latency_calls % 2
        self.captured = True

    def _deepep_owner(self) -> Any:
        disp = self.layer.dispatchers[Layout.LOW_LATENCY]
        return getattr(disp, "owner", None) if getattr(disp, "call_parity", False) else None

    def _check_parity(self) -> None:
        """DeepEP alternates two low-latency buffers per call and a graph replays the buffers it
        captured: replaying after an odd number of eager low-latency calls since the capture would
        run into the buffer the last call used (corrupt counts or a hang). The parity is the same on
        every rank, so every rank raises together."""
        owner = self._deepep_owner()
        if owner is not None and self._parity is not None and owner.low_latency_calls % 2 != self._parity:
            raise RuntimeError(
                "CUDA-graph decode: an odd number of DeepEP low-latency calls ran eagerly since the "
                "graphs were captured (every eager step must issue dispatch/combine pairs); call "
                "layer.graph_runner.reset() to capture again"
            )

    def _clean_deepep(self) -> None:
        """DeepEP: a replayed low-latency step after normal-mode kernels needs a clean low-latency
        area (host bookkeeping in the dispatcher ran at capture time only)."""
        owner = getattr(self.layer.dispatchers[Layout.LOW_LATENCY], "owner", None)
        if owner is not None and getattr(owner, "_last_layout", None) == Layout.NORMAL:
            owner.clean_low_latency()

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One decode step: `x` `[T, D]` bfloat16 (`T <= C`) -> (`[T, D]` bfloat16 output,
        `[L]` int64 rows per local expert, `[R]` int64 rows per rank or None). The outputs are fresh
        tensors (copies of the static buffers, no host sync)."""
        num_tokens = x.shape[0]
        bucket = self.bucket_for(num_tokens)
        if not self.captured:
            self.capture_all()
        if self.use_graph:
            self._clean_deepep()
            self._check_parity()
            slot = self._slots[bucket]
        else:
            slot = self._slots.get(bucket) or self._new_slot(bucket)
            self._slots[bucket] = slot
        slot.x[:num_tokens].copy_(x)
        slot.num_valid.fill_(num_tokens)
        if self.use_graph:
            slot.graph.replay()
        else:
            self._body(slot)
        per_rank = None if slot.per_rank is None else slot.per_rank.clone()
        r = slot.router_out
        self.layer.last_routing = Routing(
            topk_ids=r.topk_ids[:num_tokens].clone(), topk_weights=r.topk_weights[:num_tokens].clone()
        )
        return slot.out[:num_tokens].clone(), slot.counts.clone(), per_rank

    def reset(self) -> None:
        """Drop the captured graphs (the next step captures again)."""
        self._slots.clear()
        self._pool = None
        self.captured = False
