"""Typed values passed between the stages of one MoE step.

Terms (DESIGN.md): `T` tokens on this rank, `K` top-k, `E` global experts, `L` local experts
(`E / R`), `R` ranks, `D` hidden size, `C` low-latency capacity per source rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch


class Layout(StrEnum):
    """How received tokens are laid out after dispatch (and so which expert kernel runs)."""

    NORMAL = "normal"
    """Flat `recv_x [N_recv, D]`, one row per (source token, destination rank) pair."""
    LOW_LATENCY = "low_latency"
    """Expert-batched `recv_x [L, C*R, D]`; only the first `num_recv_per_expert[e]` rows are valid."""


class Precision(StrEnum):
    BF16 = "bf16"
    FP8 = "fp8"


FP8_DTYPE = torch.float8_e4m3fn
FP8_GROUP = 128
"""Per-token-group quantisation: one fp32 scale per 128 consecutive channels of a row."""


@dataclass(frozen=True)
class Routing:
    """The router's decision for this rank's tokens.

    Attributes:
        topk_ids: `[T, K]` int64 global expert ids; -1 means "no expert" (the slot is skipped).
        topk_weights: `[T, K]` float32 combine weights (already scaled by `routed_scaling_factor`).
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor

    def __post_init__(self) -> None:
        if self.topk_ids.dim() != 2 or self.topk_ids.shape != self.topk_weights.shape:
            raise ValueError(
                f"Routing: topk_ids {tuple(self.topk_ids.shape)} and topk_weights "
                f"{tuple(self.topk_weights.shape)} must both be [T, K]"
            )
        if self.topk_ids.dtype != torch.int64:
            raise ValueError(f"Routing.topk_ids must be int64, got {self.topk_ids.dtype}")
        if self.topk_weights.dtype != torch.float32:
            raise ValueError(f"Routing.topk_weights must be float32, got {self.topk_weights.dtype}")

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]


@dataclass(frozen=True)
class DispatchedTokens:
    """What one rank receives from dispatch: the input of its local experts.

    Attributes:
        layout: `Layout.NORMAL` or `Layout.LOW_LATENCY`.
        x: normal: `[N_recv, D]`; low-latency: `[L, C*R, D]`. bfloat16, or float8_e4m3fn when
            dispatched in FP8 (then `x_scale` is set).
        x_scale: float32 per-token-group-128 scales, `[N_recv, D/128]` or `[L, C*R, D/128]`
            (the low-latency one may be a column-major view, as DeepEP returns it); None for bf16.
        num_recv_per_expert: `[L]` int32 on `x`'s device: rows received per local expert
            (normal: number of (row, local expert) pairs; low-latency: valid rows per expert).
        recv_topk_ids: normal only: `[N_recv, K]` int64 *local* expert ids (0..L-1), -1 where the
            slot's expert lives on another rank (or was -1 at the source).
        recv_topk_weights: normal only: `[N_recv, K]` float32, matching `recv_topk_ids`.
    """

    layout: Layout
    x: torch.Tensor
    x_scale: torch.Tensor | None
    num_recv_per_expert: torch.Tensor
    recv_topk_ids: torch.Tensor | None = None
    recv_topk_weights: torch.Tensor | None = None

    @property
    def is_fp8(self) -> bool:
        return self.x_scale is not None


@dataclass(frozen=True)
class DispatchHandle:
    """What `combine` needs to route expert outputs back; opaque outside the backend.

    Attributes:
        layout: the layout of the dispatch that produced it.
        num_tokens: `T`, rows of the combined output.
        hidden_size: `D`.
        routing: the source routing (low-latency combine applies its weights).
        state: backend-specific state (split sizes, permutations, DeepEP's handle).
    """

    layout: Layout
    num_tokens: int
    hidden_size: int
    routing: Routing
    state: Any = field(default=None, repr=False)
