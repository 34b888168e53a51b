"""The single-process float32 reference of one MoE step; every runtime path is checked against it.

    logits = hidden @ router.T                         fp32 [T, E]
    scores = softmax(logits) | sigmoid(logits)         fp32 [T, E]
    choice = scores + correction_bias (selection only, when the model uses it)
    grouped top-k (n_group, topk_group): keep the best topk_group groups of E / n_group experts,
        a group's score = sum of its best two `choice` values (sigmoid, DeepSeek-V3) or its best
        `choice` value (softmax, DeepSeek-V2); then the top_k experts among the kept groups
    weights = scores[topk_ids] (renormalised to sum 1 when norm_topk_prob) * routed_scaling_factor
    out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t])
    expert(x) = w2 @ (silu(w13[:I] @ x) * (w13[I:] @ x))

Ties are broken toward the lower index (stable descending sort), for groups and for experts; the
runtime router (`ep_runtime.router`) follows the same rule, so selections agree exactly on equal
logits.

Quantisation semantics (`quantize_activations=True`, what the kernels compute, in float32):
- weights: the scheme's dequantised values (the provider returns them);
- fp8 dispatch (`dispatch_precision="fp8"`): the input is quantised per-token-group-128 and
  dequantised (bf16 weights: the experts then run on the dequantised values);
- `fp8_block`, and `w4a8` in the normal layout: the input of each GEMM (the hidden state and the
  SwiGLU intermediate) is quantised per-token-group-128 to e4m3 and dequantised;
- `w4a8` in the low-latency layout quantises per tensor over all rows a rank receives in one round
  (the masked kernel's choice); that depends on which tokens share a rank and round, so the
  reference uses per-token-group-128 there too and the comparison tolerance covers the difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ep_runtime.config import ModelConfig
from ep_runtime.kernels.quant import per_token_group_dequant_fp8, per_token_group_quant_fp8
from ep_runtime.weights import RouterWeights

ExpertProvider = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def qdq_per_token_group(x: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Quantise `[..., D]` to e4m3 per token group and dequantise back to float32."""
    x_q, s = per_token_group_quant_fp8(x.float(), group_size)
    return per_token_group_dequant_fp8(x_q, s, group_size, out_dtype=torch.float32)


def reference_router_logits(hidden: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """`[T, D] @ [E, D].T` in float32 (inputs upcast): `[T, E]` float32."""
    return hidden.float() @ router_weight.float().t()


def _stable_topk_desc(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest values along the last dim; ties go to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def reference_routing(
    logits: torch.Tensor,
    model: ModelConfig,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection and combine weights from router logits.

    Args:
        logits: `[T, E]` float32 router logits.
        model: scoring, grouped top-k, bias use, renormalisation and scaling come from here.
        correction_bias: `[E]` float32, added for selection only when `model.use_correction_bias`.
    Returns: `topk_ids [T, K]` int64 (global expert ids, best first) and `topk_weights [T, K]` float32.
    """
    logits = logits.float()
    t, e = logits.shape
    if e != model.num_experts:
        raise ValueError(f"logits has {e} experts, model.num_experts is {model.num_experts}")
    scores = torch.softmax(logits, dim=-1) if model.scoring == "softmax" else torch.sigmoid(logits)
    choice = scores
    if model.use_correction_bias:
        if correction_bias is None:
            raise ValueError("correction_bias is required when model.use_correction_bias is set")
        choice = scores + correction_bias.float().unsqueeze(0)
    if model.n_group is not None:
        g, per = model.n_group, e // model.n_group
        grouped = choice.reshape(t, g, per)
        if model.scoring == "sigmoid" and per >= 2:
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_score = grouped.amax(dim=-1)
        keep = _stable_topk_desc(group_score, model.topk_group)  # [T, topk_group]
        is_kept = torch.zeros(t, g, dtype=torch.bool, device=logits.device)
        is_kept.scatter_(1, keep, True)
        is_kept = is_kept.unsqueeze(-1).expand(t, g, per).reshape(t, e)
        choice = choice.masked_fill(~is_kept, float("-inf"))
    topk_ids = _stable_topk_desc(choice, model.top_k)
    weights = scores.gather(1, topk_ids)
    if model.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    weights = weights * model.routed_scaling_factor
    return topk_ids.to(torch.int64), weights.float()


def reference_expert(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, *, quantize_activations: bool = False
) -> torch.Tensor:
    """SwiGLU expert on float32 rows: `x [n, D]`, `w13 [2I, D]`, `w2 [D, I]` -> `[n, D]` float32.
    With `quantize_activations`, both GEMM inputs are per-token-group-128 fp8 quantised."""
    i = w2.shape[1]
    if quantize_activations:
        x = qdq_per_token_group(x)
    gate_up = x @ w13.float().t()
    h = F.silu(gate_up[:, :i]) * gate_up[:, i:]
    if quantize_activations:
        h = qdq_per_token_group(h)
    return h @ w2.float().t()


def reference_moe(
    hidden: torch.Tensor,
    router: RouterWeights,
    weights_provider: ExpertProvider,
    model: ModelConfig,
    *,
    scheme: str | None = None,
    dispatch_precision: str = "bf16",
    quantize_activations: bool = True,
    routing: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The whole MoE step in float32, one expert at a time.

    Args:
        hidden: `[T, D]` hidden states (any float dtype; used as float32).
        router: the router weight `[E, D]` and optional correction bias `[E]`.
        weights_provider: `e -> (w13 [2I, D], w2 [D, I])` with the scheme's dequantised values
            (`ep_runtime.weights.expert_provider`); called only for experts some token selected.
        model: routing and shapes.
        scheme: weights scheme (default `model.weights`): decides activation quantisation.
        dispatch_precision: `bf16` or `fp8` (fp8 quantises the input per token group first).
        quantize_activations: apply the kernels' activation quantisation (module docstring);
            False gives the plain float32 MoE on the same weights.
        routing: optional `(topk_ids [T, K] int64, topk_weights [T, K] float32)` to use instead of
            routing here (to compare expert paths independently of router rounding).
    Returns: `[T, D]` float32.
    """
    scheme = scheme or model.weights
    if dispatch_precision not in ("bf16", "fp8"):
        raise ValueError(f"dispatch_precision '{dispatch_precision}' is unknown; allowed: bf16, fp8")
    if hidden.dim() != 2 or hidden.shape[1] != model.hidden_size:
        raise ValueError(f"hidden must be [T, {model.hidden_size}], got {tuple(hidden.shape)}")
    x = hidden.float()
    if routing is None:
        topk_ids, topk_weights = reference_routing(
            reference_router_logits(hidden, router.weight), model, router.correction_bias
        )
    else:
        topk_ids, topk_weights = routing
    if quantize_activations and dispatch_precision == "fp8":
        x = qdq_per_token_group(x)
    gemm_quant = quantize_activations and scheme in ("fp8_block", "w4a8")
    out = torch.zeros_like(x)
    if x.shape[0] == 0:
        return out
    # Host-side loop over the experts that received tokens (a reference, not a hot path).
    present = torch.unique(topk_ids[topk_ids >= 0]).tolist()
    for e in present:
        rows, slots = (topk_ids == e).nonzero(as_tuple=True)
        w13, w2 = weights_provider(int(e))
        y = reference_expert(x[rows], w13.to(x.device), w2.to(x.device), quantize_activations=gemm_quant)
        out.index_add_(0, rows, y * topk_weights[rows, slots].float().unsqueeze(1))
    return out
