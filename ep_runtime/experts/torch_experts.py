"""Plain PyTorch experts: the CPU default and a GPU fallback, for every layout and scheme.

Weights are dequantised per expert (or per chunk of experts) when used, so memory stays at the
scheme's size; activations follow the kernels' quantisation semantics (`ep_runtime.reference`):
fp8 dispatch is dequantised first; `fp8_block` (and `w4a8` in the normal layout) quantise each GEMM
input per-token-group-128; `w4a8` in the low-latency layout quantises per tensor over the valid rows.
Compute is float32 on CPU and bfloat16 (fp32 accumulation) on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ep_runtime.config import RuntimePlan
from ep_runtime.experts.base import Experts, dequantize_input, output_dtype, register
from ep_runtime.kernels.quant import (
    per_tensor_quant_fp8,
    per_token_group_dequant_fp8,
    per_token_group_quant_fp8,
)
from ep_runtime.types import DispatchedTokens, Layout
from ep_runtime.weights import LocalExperts

# Bound on dequantised weight bytes materialised at once by the low-latency path.
_CHUNK_BYTES = 1 << 30


def _qdq_group(x: torch.Tensor) -> torch.Tensor:
    x_q, s = per_token_group_quant_fp8(x, 128)
    return per_token_group_dequant_fp8(x_q, s, 128, out_dtype=x.dtype)


def _qdq_tensor(x: torch.Tensor) -> torch.Tensor:
    x_q, s = per_tensor_quant_fp8(x)
    return (x_q.float() * s).to(x.dtype)


@register
class TorchExperts(Experts):
    name = "torch"

    def __init__(self, plan: RuntimePlan):
        super().__init__(plan)
        self.gemm_quant = self.scheme in ("fp8_block", "w4a8")

    @classmethod
    def supports(cls, plan: RuntimePlan, layout: Layout) -> tuple[bool, str]:
        return True, ""

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float32 if x.device.type == "cpu" else torch.bfloat16

    def forward_normal(self, dispatched: DispatchedTokens, weights: LocalExperts) -> torch.Tensor:
        """`x [N, D]`, `recv_topk_ids [N, K]` local ids -> `[N, D]` weighted sums.

        Sorts the (row, slot) pairs by local expert and runs one GEMM pair per local expert. The
        per-expert row counts are read on the host once per call (a torch fallback cannot size
        per-expert GEMMs otherwise; the Triton path has no such sync).
        """
        cdtype = self._compute_dtype(dispatched.x)
        x = dequantize_input(dispatched, cdtype)
        if self.gemm_quant:
            x = _qdq_group(x)
        num_rows, hidden = x.shape
        num_local = weights.num_local_experts
        ids = dispatched.recv_topk_ids.reshape(-1)
        slot_weights = dispatched.recv_topk_weights.reshape(-1)
        top_k = dispatched.recv_topk_ids.shape[1] if num_rows else 1
        key = torch.where(ids >= 0, ids, num_local)
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=num_local + 1)[:num_local].tolist()
        out = torch.zeros(num_rows, hidden, dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start : start + n]
            start += n
            rows = pairs // top_k
            w13, w2 = weights.dequantized(e, e + 1, cdtype)
            y = self._mlp(x[rows], w13[0], w2[0])
            out.index_add_(0, rows, y.float() * slot_weights[pairs].unsqueeze(1))
        return out.to(output_dtype(dispatched))

    def _mlp(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        inter = w2.shape[-1]
        gate_up = x @ w13.t()
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        if self.gemm_quant:
            h = _qdq_group(h)
        return h @ w2.t()

    def forward_low_latency(self, dispatched: DispatchedTokens, weights: LocalExperts) -> torch.Tensor:
        """`x [L, M, D]`, `num_recv_per_expert [L]` -> `[L, M, D]` unweighted; invalid rows are zero.

        Batched GEMMs over chunks of experts (no host sync); rows past each expert's count are
        masked to zero before any quantisation so they never reach a scale.
        """
        cdtype = self._compute_dtype(dispatched.x)
        num_local, rows_per_expert, hidden = dispatched.x.shape
        inter = weights.intermediate_size
        is_valid = (
            torch.arange(rows_per_expert, device=dispatched.x.device).unsqueeze(0)
            < dispatched.num_recv_per_expert.to(torch.int64).unsqueeze(1)
        ).unsqueeze(-1)
        x = torch.where(is_valid, dequantize_input(dispatched, cdtype), 0)
        per_tensor = self.scheme == "w4a8"
        if per_tensor:
            x = _qdq_tensor(x)
        elif self.gemm_quant:
            x = _qdq_group(x)
        bytes_per_expert = 3 * hidden * inter * torch.tensor([], dtype=cdtype).element_size()
        chunk = max(1, _CHUNK_BYTES // bytes_per_expert)
        h = torch.empty(num_local, rows_per_expert, inter, dtype=cdtype, device=x.device)
        for s in range(0, num_local, chunk):
            e = min(num_local, s + chunk)
            w13, _ = weights.dequantized(s, e, cdtype)
            gate_up = torch.bmm(x[s:e], w13.transpose(1, 2))
            h[s:e] = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]
        h = torch.where(is_valid, h, 0)
        if per_tensor:
            # The masked W4A8 kernel keeps the intermediate in bf16 before quantising it per tensor.
            h = _qdq_tensor(h.to(torch.bfloat16).to(cdtype))
        elif self.gemm_quant:
            h = _qdq_group(h)
        out = torch.empty(num_local, rows_per_expert, hidden, dtype=cdtype, device=x.device)
        for s in range(0, num_local, chunk):
            e = min(num_local, s + chunk)
            _, w2 = weights.dequantized(s, e, cdtype)
            out[s:e] = torch.bmm(h[s:e], w2.transpose(1, 2))
        return torch.where(is_valid, out, 0).to(output_dtype(dispatched))
