"""Memory budget of one rank, checked before anything large is allocated.

An EP rank holds its `L` local experts, the communication buffers (DeepEP's low-latency buffer
grows with `C x E x D`: about 2 GiB at C=128, E=288, D=7168) and the step's activations. Running
out of device memory deep inside a kernel or a DeepEP init is a poor error; `check_memory`
compares the plan's needs with the free memory first and says what to lower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ep_runtime.config import RuntimePlan, human_bytes, max_buffer_bytes

# Bytes per weight element by scheme (scales counted separately).
_WEIGHT_BYTES = {"bf16": 2.0, "fp8_block": 1.0, "w4a8": 0.5}


class ResourceError(RuntimeError):
    """The plan does not fit the device; the message says what to lower."""


@dataclass(frozen=True)
class MemoryBudget:
    """Estimated bytes one rank needs, by item."""

    expert_weights: int
    router: int
    comm_buffers: int
    activations: int

    @property
    def total(self) -> int:
        return self.expert_weights + self.router + self.comm_buffers + self.activations


def estimate_memory(plan: RuntimePlan) -> MemoryBudget:
    m = plan.config.model
    w = plan.config.workload
    d, i, e, k = m.hidden_size, m.moe_intermediate_size, m.num_experts, m.top_k
    per_expert = 3 * i * d
    scheme_bytes = _WEIGHT_BYTES[m.weights]
    scales = 0
    if m.weights == "fp8_block":
        scales = 4 * (-(-2 * i // 128) * -(-d // 128) + -(-d // 128) * -(-i // 128))
    elif m.weights == "w4a8":
        scales = 4 * (2 * i * (d // 128) + d * (i // 128))
    experts = int(plan.num_local_experts * (per_expert * scheme_bytes + scales)) * w.num_layers
    router = (e * d * 2 + e * 4) * w.num_layers
    nvl, rdma = max_buffer_bytes(plan)
    # Activations of the largest step: received rows (each token at most once per rank, at most K
    # ranks), the gate/up intermediate of every (row, expert) pair, fp32 accumulators.
    tokens = max(w.prefill_tokens_per_rank, w.decode_tokens_per_rank, 1)
    ll_rows = 0
    if plan.mode in ("low_latency", "auto"):
        capacity = plan.config.dispatch.num_max_dispatch_tokens_per_rank
        ll_rows = plan.num_local_experts * capacity * plan.ep_size
    recv_rows = max(tokens * min(k, plan.ep_size), ll_rows)
    pairs = max(tokens * k, ll_rows)
    activations = recv_rows * d * 2 + pairs * (2 * i * 2 + i * 2 + d * 4) + tokens * d * 4 * 2
    return MemoryBudget(experts, router, nvl + rdma, activations)


def check_memory(plan: RuntimePlan, device: torch.device, headroom: float = 0.9) -> MemoryBudget:
    """Raise `ResourceError` when the plan needs more than `headroom` of the device's free memory.

    On CPU nothing is checked against the GPU (and nothing touches CUDA).
    """
    budget = estimate_memory(plan)
    if device.type != "cuda":
        return budget
    free, total = torch.cuda.mem_get_info(device)
    if budget.total > headroom * free:
        parts = {
            "expert weights": budget.expert_weights,
            "communication buffers": budget.comm_buffers,
            "activations": budget.activations,
        }
        biggest = max(parts, key=parts.get)
        advice = {
            "expert weights": "raise parallel.ep_size (fewer local experts) or use model.weights fp8_block / w4a8",
            "communication buffers": "lower dispatch.num_max_dispatch_tokens_per_rank (C) or dispatch.buffer sizes",
            "activations": "lower workload.prefill_tokens_per_rank / decode_tokens_per_rank",
        }[biggest]
        detail = ", ".join(f"{k} {human_bytes(v)}" for k, v in parts.items())
        raise ResourceError(
            f"rank needs about {human_bytes(budget.total)} ({detail}) but {device} has {human_bytes(free)} free "
            f"of {human_bytes(total)}; the largest item is {biggest}: {advice}"
        )
    return budget
