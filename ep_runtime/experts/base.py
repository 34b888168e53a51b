"""The expert-compute interface: one implementation per library, each serving both layouts.

Contract with the dispatcher (`ep_runtime.comm.base.Dispatcher`):
  - `Layout.NORMAL`: input `x [N_recv, D]` with `recv_topk_ids`/`recv_topk_weights [N_recv, K]`
    (local ids, -1 = elsewhere); output `[N_recv, D]` = the top-k weighted sum over this rank's
    experts for each received row.
  - `Layout.LOW_LATENCY`: input `x [L, C*R, D]` with `num_recv_per_expert [L]`; output
    `[L, C*R, D]` unweighted expert outputs (rows past each expert's count are zero).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ep_runtime.config import RuntimePlan
from ep_runtime.kernels.quant import per_token_group_dequant_fp8
from ep_runtime.types import DispatchedTokens, Layout
from ep_runtime.weights import LocalExperts


class Experts(ABC):
    """Computes this rank's local experts over dispatched tokens."""

    name: ClassVar[str]

    def __init__(self, plan: RuntimePlan):
        self.plan = plan
        self.scheme = plan.config.model.weights

    @classmethod
    @abstractmethod
    def supports(cls, plan: RuntimePlan, layout: Layout) -> tuple[bool, str]:
        """Whether this implementation can serve `layout` under `plan`; the reason if not."""

    def forward(self, dispatched: DispatchedTokens, weights: LocalExperts) -> torch.Tensor:
        """Run the local experts; see the module docstring for the per-layout output contract."""
        if weights.scheme != self.scheme:
            raise ValueError(
                f"weights.scheme '{weights.scheme}' does not match model.weights '{self.scheme}'"
            )
        if dispatched.layout == Layout.NORMAL:
            if dispatched.recv_topk_ids is None or dispatched.recv_topk_weights is None:
                raise ValueError("normal-layout dispatched tokens need recv_topk_ids and recv_topk_weights")
            return self.forward_normal(dispatched, weights)
        return self.forward_low_latency(dispatched, weights)

    @abstractmethod
    def forward_normal(self, dispatched: DispatchedTokens, weights: LocalExperts) -> torch.Tensor:
        """`[N_recv, D]` top-k weighted sums over this rank's experts."""

    @abstractmethod
    def forward_low_latency(self, dispatched: DispatchedTokens, weights: LocalExperts) -> torch.Tensor:
        """`[L, C*R, D]` unweighted expert outputs."""


def dequantize_input(dispatched: DispatchedTokens, dtype: torch.dtype) -> torch.Tensor:
    """The dispatched activations as `dtype` (fp8 ones dequantised with their group-128 scales)."""
    if dispatched.is_fp8:
        return per_token_group_dequant_fp8(dispatched.x, dispatched.x_scale, 128, out_dtype=dtype)
    return dispatched.x.to(dtype)


def output_dtype(dispatched: DispatchedTokens) -> torch.dtype:
    """Experts answer in the activations' float dtype: bfloat16, or float32 for fp32 CPU runs."""
    return torch.float32 if dispatched.x.dtype == torch.float32 else torch.bfloat16


_REGISTRY: dict[str, type[Experts]] = {}


def register(cls: type[Experts]) -> type[Experts]:
    _REGISTRY[cls.name] = cls
    return cls


def get_experts(name: str) -> type[Experts]:
    if name not in _REGISTRY:
        raise ValueError(f"kernels.experts '{name}' is unknown; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_experts() -> list[str]:
    return sorted(_REGISTRY)
