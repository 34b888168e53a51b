"""The router: GEMM to float32 logits, then scoring and top-k selection.

Selection follows `ep_runtime.reference.reference_routing` operation for operation (scores, the
correction bias for selection only, grouped top-k, stable descending sort so ties go to the lower
index, renormalisation, routed scaling), so on equal logits the selected experts are identical and
the weights agree to float32 rounding; so does the one-kernel selection (`kernels.router_topk:
triton`, sigmoid scoring). Nothing here synchronises with the host.
"""

from __future__ import annotations

import torch

from ep_runtime.config import ModelConfig
from ep_runtime.types import Routing
from ep_runtime.weights import RouterWeights

ROUTER_GEMM_IMPLS = ("auto", "cublas", "triton", "torch")


def _router_gemm_fn():
    from ep_runtime.kernels.router_gemm import router_gemm

    return router_gemm


def router_logits(hidden: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """`[T, D] x [E, D] -> [T, E]` float32 logits.

    bfloat16 inputs go through `kernels.router_gemm` (cuBLAS or Triton by `impl`, torch on CPU);
    float32 hidden states (accepted on CPU) use a float32 matmul on the bf16 weight's values.
    """
    if impl not in ROUTER_GEMM_IMPLS:
        raise ValueError(f"router_gemm '{impl}' is unknown; allowed: {', '.join(ROUTER_GEMM_IMPLS)}")
    if hidden.dtype == torch.float32:
        return hidden @ weight.float().t()
    return _router_gemm_fn()(hidden, weight, out_dtype=torch.float32, impl=impl)


ROUTER_TOPK_IMPLS = ("torch", "triton")


def select_experts(
    logits: torch.Tensor,
    model: ModelConfig,
    correction_bias: torch.Tensor | None = None,
    impl: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits [T, E]` float32 -> `topk_ids [T, K]` int64 (best first), `topk_weights [T, K]` float32
    (renormalised when `model.norm_topk_prob`, times `model.routed_scaling_factor`).

    `impl`: `torch` (the operations below) or `triton` (`kernels.select_experts`: one launch, the
    same selection; sigmoid scoring only)."""
    if impl not in ROUTER_TOPK_IMPLS:
        raise ValueError(f"router_topk '{impl}' is unknown; allowed: {', '.join(ROUTER_TOPK_IMPLS)}")
    if model.use_correction_bias and correction_bias is None:
        raise ValueError("correction_bias is required when model.use_correction_bias is set")
    if impl == "triton":
        from ep_runtime.kernels.select_experts import select_experts_sigmoid

        if model.scoring != "sigmoid":
            raise ValueError(
                f"router_topk 'triton' serves sigmoid scoring only, got '{model.scoring}'; allowed: torch"
            )
        return select_experts_sigmoid(
            logits,
            top_k=model.top_k,
            correction_bias=correction_bias if model.use_correction_bias else None,
            n_group=model.n_group,
            topk_group=model.topk_group,
            norm_topk_prob=model.norm_topk_prob,
            routed_scaling_factor=model.routed_scaling_factor,
        )
    num_tokens, num_experts = logits.shape
    if model.scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
    choice = scores
    if model.use_correction_bias:
        choice = scores + correction_bias.unsqueeze(0)
    if model.n_group is not None:
        num_groups = model.n_group
        per_group = num_experts // num_groups
        grouped = choice.view(num_tokens, num_groups, per_group)
        if model.scoring == "sigmoid" and per_group >= 2:
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_score = grouped.amax(dim=-1)
        kept = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, : model.topk_group]
        is_kept = torch.zeros(num_tokens, num_groups, dtype=torch.bool, device=logits.device)
        is_kept.scatter_(1, kept, True)
        choice = choice.masked_fill(
            ~is_kept.unsqueeze(-1).expand(num_tokens, num_groups, per_group).reshape(num_tokens, num_experts),
            float("-inf"),
        )
    topk_ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, : model.top_k]
    topk_weights = scores.gather(1, topk_ids)
    if model.norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    topk_weights = topk_weights * model.routed_scaling_factor
    return topk_ids, topk_weights


class Router(torch.nn.Module):
    """Router GEMM + top-k for one layer.

    Args:
        model: the model section of the config (routing rules and shapes).
        weights: router weight `[E, D]` bfloat16 and optional correction bias `[E]` float32.
        impl: router GEMM implementation, `auto`, `cublas` or `triton`.
        topk_impl: expert selection, `torch` or `triton` (see `select_experts`).
    """

    def __init__(
        self, model: ModelConfig, weights: RouterWeights, impl: str = "auto", topk_impl: str = "torch"
    ):
        super().__init__()
        e, d = model.num_experts, model.hidden_size
        if tuple(weights.weight.shape) != (e, d):
            raise ValueError(f"router weight must be [{e}, {d}], got {tuple(weights.weight.shape)}")
        if model.use_correction_bias:
            if weights.correction_bias is None:
                raise ValueError("model.use_correction_bias is set but the router has no correction_bias")
            if tuple(weights.correction_bias.shape) != (e,):
                raise ValueError(f"correction_bias must be [{e}], got {tuple(weights.correction_bias.shape)}")
        if impl not in ROUTER_GEMM_IMPLS:
            raise ValueError(f"router_gemm '{impl}' is unknown; allowed: {', '.join(ROUTER_GEMM_IMPLS)}")
        if topk_impl not in ROUTER_TOPK_IMPLS:
            raise ValueError(f"router_topk '{topk_impl}' is unknown; allowed: {', '.join(ROUTER_TOPK_IMPLS)}")
        self.model = model
        self.impl = impl
        self.topk_impl = topk_impl
        self.weight = weights.weight.to(torch.bfloat16)
        self.correction_bias = None if weights.correction_bias is None else weights.correction_bias.float()

    def forward(self, hidden: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """`hidden [T, D]` bfloat16 (float32 on CPU) -> (`Routing` with global ids, logits `[T, E]` fp32)."""
        logits = router_logits(hidden, self.weight, self.impl)
        topk_ids, topk_weights = select_experts(logits, self.model, self.correction_bias, self.topk_impl)
        return Routing(topk_ids=topk_ids, topk_weights=topk_weights), logits
