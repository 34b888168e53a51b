"""Triton experts: the fused MoE kernel for the normal layout, the masked grouped GEMM for the
low-latency layout (`ep_runtime.kernels`). No host synchronisation.

Dispatched activations go to the kernels as they arrive (DESIGN.md precision policy); the kernels
convert them: fp8 input to bf16 weights is dequantised, bf16 input to `fp8_block` (and to `w4a8`
in the normal layout) is quantised per-token-group-128, and the masked `w4a8` kernel takes bf16
(the policy forces bf16 low-latency dispatch) and quantises it per tensor itself.
"""

from __future__ import annotations

import os

import torch

from ep_runtime.config import RuntimePlan
from ep_runtime.experts.base import Experts, output_dtype, register
from ep_runtime.kernels.quant import per_token_group_dequant_fp8
from ep_runtime.types import DispatchedTokens, Layout
from ep_runtime.weights import LocalExperts


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@register
class TritonExperts(Experts):
    name = "triton"

    def __init__(self, plan: RuntimePlan):
        super().__init__(plan)
        from ep_runtime.kernels.fused_moe import fused_moe
        from ep_runtime.kernels.masked_grouped_gemm import masked_moe

        self._fused_moe = fused_moe
        self._masked_moe = masked_moe
        self.fused_topk_sum = plan.fused_topk_sum

    @classmethod
    def supports(cls, plan: RuntimePlan, layout: Layout) -> tuple[bool, str]:
        if plan.device != "cuda" and not _interpreted():
            return False, "triton experts need parallel.device 'cuda' (or TRITON_INTERPRET=1 on CPU)"
        if plan.device == "cuda" and not torch.cuda.is_available():
            return False, "triton experts need a CUDA device and none is visible"
        try:
            if layout == Layout.NORMAL:
                import ep_runtime.kernels.fused_moe  # noqa: F401
            else:
                import ep_runtime.kernels.masked_grouped_gemm  # noqa: F401
        except ImportError as exc:
            return False, f"the {layout.value} expert kernel is unavailable: {exc}"
        return True, ""

    def forward_normal(self, dispatched: DispatchedTokens, weights: LocalExperts) -> torch.Tensor:
        out = self._fused_moe(
            dispatched.x,
            weights.w13,
            weights.w2,
            dispatched.recv_topk_ids,
            dispatched.recv_topk_weights,
            scheme=self.scheme,
            x_scale=dispatched.x_scale,
            w13_scale=weights.w13_scale,
            w2_scale=weights.w2_scale,
            fused_topk_sum=self.fused_topk_sum,
            out_dtype=torch.bfloat16,
        )
        return out.to(output_dtype(dispatched))

    def forward_low_latency(self, dispatched: DispatchedTokens, weights: LocalExperts) -> torch.Tensor:
        x, x_scale = dispatched.x, dispatched.x_scale
        if self.scheme == "w4a8" and dispatched.is_fp8:
            # The policy forces bf16 dispatch here; an fp8 input is dequantised for the kernel.
            x, x_scale = per_token_group_dequant_fp8(x, x_scale, 128, out_dtype=torch.bfloat16), None
        out = self._masked_moe(
            x,
            dispatched.num_recv_per_expert.to(torch.int32),
            weights.w13,
            weights.w2,
            scheme=self.scheme,
            x_scale=x_scale,
            w13_scale=weights.w13_scale,
            w2_scale=weights.w2_scale,
        )
        return out.to(output_dtype(dispatched))
