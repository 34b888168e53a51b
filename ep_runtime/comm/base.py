"""The dispatcher interface every communication backend implements, and the backend registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.distributed as dist

from ep_runtime.config import ModePlan, RuntimePlan
from ep_runtime.types import DispatchedTokens, DispatchHandle, Layout, Precision, Routing

_R = TypeVar("_R")


class Pending(Generic[_R]):
    """A dispatch or combine whose send was issued and whose receive completes at `wait()`.

    `wait()` runs the backend's receive step once (DeepEP: the receive hook, or the current stream
    waiting on the communication event; torch: the async collective's work handle and the unpacking)
    and returns the result; later calls return the same result. On CUDA, `wait()` does not block the
    host by itself: it orders the current stream after the communication.
    """

    __slots__ = ("_finish", "_result", "_done")

    def __init__(self, finish: Callable[[], _R] | None = None, *, result: _R | None = None):
        self._finish = finish
        self._result = result
        self._done = finish is None

    @classmethod
    def ready(cls, result: _R) -> Pending[_R]:
        """An already-completed operation (the synchronous fallback)."""
        return cls(None, result=result)

    @property
    def done(self) -> bool:
        return self._done

    def wait(self) -> _R:
        if not self._done:
            self._result = self._finish()
            self._finish = None
            self._done = True
        return self._result


PendingDispatch = Pending[tuple[DispatchedTokens, DispatchHandle]]
"""`dispatch_async(...)`: `.wait()` -> `(DispatchedTokens, DispatchHandle)`."""
PendingCombine = Pending[torch.Tensor]
"""`combine_async(...)`: `.wait()` -> `[T, D]` bfloat16."""


class Dispatcher(ABC):
    """Moves this rank's tokens to the ranks owning their experts (`dispatch`) and brings the
    expert outputs back (`combine`). One instance serves one layout; it owns its buffers.

    Contract with the experts (checked once at construction by the layer):
      - `Layout.NORMAL`: the experts return `[N_recv, D]` rows that are already the top-k
        weighted sum over this rank's experts for each received row; `combine` adds the rows of
        all ranks back into each source token.
      - `Layout.LOW_LATENCY`: the experts return `[L, C*R, D]` unweighted outputs; `combine`
        applies `routing.topk_weights`.
    """

    name: ClassVar[str]
    layouts: ClassVar[frozenset[Layout]]
    call_parity: ClassVar[bool] = False
    """True when the backend alternates between two buffers on every low-latency call (DeepEP):
    a captured decode graph then needs an even number of eager low-latency calls between capture
    and replay, and extra calls (e.g. a debug probe) must come in pairs."""

    def __init__(self, plan: RuntimePlan, mode_plan: ModePlan, group: dist.ProcessGroup | None = None):
        self.plan = plan
        self.mode_plan = mode_plan
        self.group = group
        model = plan.config.model
        self.num_experts = model.num_experts
        self.num_local_experts = plan.num_local_experts
        self.hidden = model.hidden_size
        self.is_fp8 = mode_plan.precision == Precision.FP8
        self.capacity = mode_plan.capacity
        """`C` for the low-latency layout, None for normal."""

    @classmethod
    @abstractmethod
    def supports(cls, plan: RuntimePlan, mode_plan: ModePlan) -> tuple[bool, str]:
        """Whether this backend can serve `mode_plan` on this machine; the reason if not."""

    @property
    def layout(self) -> Layout:
        return self.mode_plan.layout

    @abstractmethod
    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[DispatchedTokens, DispatchHandle]:
        """Send each token to the ranks that own its top-k experts.

        Args:
            x: `[T, D]` bfloat16 hidden states of this rank's tokens (quantised to fp8 inside when
                the plan says so).
            routing: `topk_ids` `[T, K]` int64 global ids (-1 = none), `topk_weights` `[T, K]` fp32.
        Returns: the received tokens in this dispatcher's layout, and the handle combine needs.
        """

    @abstractmethod
    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Return expert outputs to their source ranks and reduce them: `[T, D]` bfloat16."""

    dispatch_waits_behind_transfers: ClassVar[bool] = False
    """True when a normal-layout `dispatch_async` blocks the host until the transfers already queued
    on the communication stream have finished (DeepEP: the host waits for the receive counts, which
    its notify kernel computes behind the earlier chunks' dispatches). Chunked schedules then issue
    one chunk's dispatch at a time, right after the previous chunk's experts were queued, ordered
    after a `mark()` taken when the inputs were ready (not after those experts). False: the host
    waits, if at all, on the current stream, so all dispatches are issued before any experts."""

    def mark(self) -> Any:
        """An opaque marker of the current stream's present position, for `dispatch_async(after=)`
        (default None: this backend orders its transfers on the current stream at the call)."""
        return None

    def dispatch_async(self, x: torch.Tensor, routing: Routing, *, after: Any = None) -> PendingDispatch:
        """Issue `dispatch(x, routing)`; the receive completes at `.wait()`.

        Lets the caller overlap the transfer with other work (two-batch decode, chunked prefill).
        Rules shared by every backend: every rank issues the same sequence of calls; in the
        low-latency layout a call (dispatch or combine) may be issued only after the previous
        low-latency call was waited (DeepEP's double buffer: each send clears the other slot's
        signals), so at most one low-latency transfer is in flight while compute runs. The default
        runs the synchronous path at the call and returns a completed `Pending`.

        `after`: a `mark()` of this dispatcher taken once `x` and `routing` were complete. A
        backend that honours it starts the transfer after that point of the current stream rather
        than after everything queued there at the call (e.g. another chunk's experts); one that
        orders on the current stream at the call ignores it, which is correct, only less overlapped.
        """
        return Pending.ready(self.dispatch(x, routing))

    def combine_async(self, expert_out: torch.Tensor, handle: DispatchHandle) -> PendingCombine:
        """Issue `combine(expert_out, handle)`; `.wait()` -> `[T, D]` bfloat16. Default: synchronous."""
        return Pending.ready(self.combine(expert_out, handle))

    def close(self) -> None:
        """Free buffers; the dispatcher is unusable afterwards (default: nothing to free)."""
        return None

    @classmethod
    def build_all(
        cls,
        plan: RuntimePlan,
        group: dist.ProcessGroup | None = None,
        *,
        shared: Any | None = None,
        mpi_comm: Any | None = None,
    ) -> dict[Layout, Dispatcher]:
        """One dispatcher per mode of `plan` (both under `mode: auto`). Backends whose modes share
        state (DeepEP: one buffer for both layouts) override this; `shared` is what
        `shared_state` made (None: this call makes its own). `mpi_comm`: an `mpi4py.MPI.Comm` for
        a backend that builds its state from one (DeepEP); the default ignores it and uses `group`."""
        return {layout: cls(plan, mode_plan, group) for layout, mode_plan in plan.modes.items()}

    @classmethod
    def shared_state(
        cls, plan: RuntimePlan, group: dist.ProcessGroup | None = None, *, mpi_comm: Any | None = None
    ) -> Any:
        """State that every layer of one process should share, or None (default: nothing to share).
        DeepEP: one `deep_ep.Buffer` per process (NVSHMEM is initialised once per process), sized
        for the plan. The object has `acquire()` / `release()`: whoever makes it holds one reference
        and releases it after the layers that use it are closed."""
        return None


_REGISTRY: dict[str, type[Dispatcher]] = {}


def register(cls: type[Dispatcher]) -> type[Dispatcher]:
    _REGISTRY[cls.name] = cls
    return cls


def get_backend(name: str) -> type[Dispatcher]:
    if name not in _REGISTRY:
        raise ValueError(f"dispatch.backend '{name}' is unknown; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def _plan_backend(plan: RuntimePlan) -> type[Dispatcher]:
    backends = {mp.backend for mp in plan.modes.values()}
    if len(backends) != 1:
        raise ValueError(f"all modes of a plan must use one backend, got {sorted(backends)}")
    cls = get_backend(backends.pop())
    for layout, mode_plan in plan.modes.items():
        ok, reason = cls.supports(plan, mode_plan)
        if not ok:
            raise ValueError(f"dispatch.backend '{cls.name}' cannot serve the {layout.value} mode: {reason}")
    return cls


def build_dispatchers(
    plan: RuntimePlan,
    group: dist.ProcessGroup | None = None,
    *,
    shared: Any | None = None,
    mpi_comm: Any | None = None,
) -> dict[Layout, Dispatcher]:
    """The dispatchers a rank needs for `plan`, one per mode, after checking `supports` for each.

    Raises ValueError naming the backend, the mode and the reason when a mode cannot be served.
    `shared`: from `build_shared_state` (one per process, for every layer). `mpi_comm`: an
    `mpi4py.MPI.Comm` (launched under MPI) for a backend that builds its state from one (DeepEP);
    other backends use `group`.
    """
    return _plan_backend(plan).build_all(plan, group, shared=shared, mpi_comm=mpi_comm)


def build_shared_state(
    plan: RuntimePlan, group: dist.ProcessGroup | None = None, *, mpi_comm: Any | None = None
) -> Any:
    """What the layers of one process share for `plan`'s backend (see `Dispatcher.shared_state`),
    or None when the backend shares nothing. The caller holds one reference (`release()` it after
    closing the layers). `mpi_comm` as for `build_dispatchers`."""
    return _plan_backend(plan).shared_state(plan, group, mpi_comm=mpi_comm)
