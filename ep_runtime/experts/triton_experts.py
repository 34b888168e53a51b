"""Triton experts: the fused MoE kernel for the normal layout, the masked grouped GEMM for the
low-latency layout (`ep_runtime.kernels`). No host synchronisation.

Input precision handling (DESIGN.md precision policy):
  - `bf16` weights: fp8-dispatched activations are dequantised to bfloat16 first (normal layout) or
    by the masked kernel's operand load (low-latency layout);
  - `fp8_block`: activations reach the kernels as fp8 with group-128 scales (bf16 dispatch is
    quantised here);
  - `w4a8`: normal layout as `fp8_block`; low-latency input is bfloat16 (the policy forces bf16
    dispatch) and the masked kernel quantises it per tensor itself.
"""

from __future__ import annotations

import os

import torch

from ep_runtime.config import RuntimePlan
from ep_runtime.experts.base import Experts, output_dtype, register
from ep_runtime.kernels.quant import per_token_group_dequant_fp8, per_token_group_quant_fp8
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

    def _activations(self, dispatched: DispatchedTokens, want_fp8: bool):
        x, x_scale = dispatched.x, dispatched.x_scale
        if want_fp8 and not dispatched.is_fp8:
            x, x_scale = per_token_group_quant_fp8(x.to(torch.bfloat16), 128)
        elif not want_fp8 and dispatched.is_fp8:
            x = per_token_group_dequant_fp8(x, x_scale, 128, out_dtype=torch.bfloat16)
            x_scale = None
        elif not want_fp8:
            x = x.to(torch.bfloat16)
        return x, x_scale

    def forward_normal(self, dispatched: DispatchedTokens, weights: LocalExperts) -> torch.Tensor:
        x, x_scale = self._activations(dispatched, want_fp8=self.scheme in ("fp8_block", "w4a8"))
        out = self._fused_moe(
            x,
            weights.w13,
            weights.w2,
            dispatched.recv_topk_ids,
            dispatched.recv_topk_weights,
            scheme=self.scheme,
            x_scale=x_scale,
            w13_scale=weights.w13_scale,
            w2_scale=weights.w2_scale,
            fused_topk_sum=self.fused_topk_sum,
            out_dtype=torch.bfloat16,
        )
        return out.to(output_dtype(dispatched))

    def forward_low_latency(self, dispatched: DispatchedTokens, weights: LocalExperts) -> torch.Tensor:
        if self.scheme == "bf16" and dispatched.is_fp8:
            # The masked kernel dequantises fp8 activations in its operand load for bf16 weights.
            x, x_scale = dispatched.x, dispatched.x_scale
        else:
            x, x_scale = self._activations(dispatched, want_fp8=self.scheme == "fp8_block")
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
