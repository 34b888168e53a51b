"""The float32 reference MoE against hand-computed cases and an independent float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from ep_runtime.config import ModelConfig
from ep_runtime.reference import qdq_per_token_group, reference_moe, reference_routing
from ep_runtime.weights import RouterWeights, expert_provider, synthetic_router


def _silu(v: float) -> float:
    return v / (1.0 + math.exp(-v))


def test_hand_computed_softmax_top2():
    """D=2, E=2, K=2, I=1, softmax with renormalisation and scaling 2.0, computed by hand."""
    model = ModelConfig(
        hidden_size=2, num_experts=2, top_k=2, moe_intermediate_size=1, routed_scaling_factor=2.0
    )
    router = RouterWeights(weight=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    experts = {
        0: (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0], [2.0]])),  # gate x0, up x1
        1: (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[3.0], [0.0]])),  # gate x1, up x0
    }
    x = torch.tensor([[2.0, 1.0]])
    out = reference_moe(x, router, experts.__getitem__, model, quantize_activations=False)
    p0 = math.exp(2) / (math.exp(2) + math.exp(1))
    p1 = 1 - p0
    h0 = _silu(2.0) * 1.0
    h1 = _silu(1.0) * 2.0
    expect = [2.0 * (p0 * h0 * 1.0 + p1 * h1 * 3.0), 2.0 * (p0 * h0 * 2.0 + p1 * h1 * 0.0)]
    torch.testing.assert_close(out, torch.tensor([expect]), rtol=1e-6, atol=1e-6)


def test_hand_computed_sigmoid_bias_grouped():
    """Bias changes the selection but not the weights; grouped top-k keeps the best group."""
    model = ModelConfig(
        hidden_size=2,
        num_experts=4,
        top_k=1,
        moe_intermediate_size=1,
        scoring="sigmoid",
        n_group=2,
        topk_group=1,
        use_correction_bias=True,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
    )
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.4]])
    # Group scores (sum of top-2 of score+bias): group 0 = s(0)+s(1)+bias, group 1 = s(.5)+s(.4)+bias.
    bias = torch.tensor([0.0, 0.0, 0.3, 0.3])
    ids, w = reference_routing(logits, model, bias)
    # group 1: s(.5)+.3 + s(.4)+.3 = 0.6225+0.5987+0.6 = 1.821 > group 0: 0.5+0.7311 = 1.231
    assert ids.tolist() == [[2]]
    torch.testing.assert_close(w, torch.tensor([[1.5 / (1 + math.exp(-0.5))]]))
    ids, w = reference_routing(logits, model, torch.zeros(4))
    assert ids.tolist() == [[1]]  # without bias group 0 (0.5 + 0.731) beats group 1 (0.622 + 0.599)
    torch.testing.assert_close(w, torch.tensor([[1.5 / (1 + math.exp(-1.0))]]))


def test_ties_go_to_lower_index():
    model = ModelConfig(
        hidden_size=2, num_experts=6, top_k=3, moe_intermediate_size=1, n_group=3, topk_group=2
    )
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 0.0, 2.0, 2.0]])
    ids, _ = reference_routing(logits, model)
    # Row 1: all three groups tie (max 2.0): groups 0 and 1 are kept; experts 1, 2 (score of 2.0),
    # then experts 0 and 3 tie (score of 0.0): 0 wins.
    assert ids.tolist() == [[0, 1, 2], [1, 2, 0]]


def _float64_moe(x, router_w, bias, provider, m: ModelConfig):
    """Independent float64 implementation, one token at a time with Python sorting."""
    x = x.double()
    out = torch.zeros_like(x)
    per = m.num_experts // (m.n_group or 1)
    for t in range(x.shape[0]):
        logits = router_w.double() @ x[t]
        scores = torch.sigmoid(logits) if m.scoring == "sigmoid" else torch.softmax(logits, 0)
        choice = scores + (bias.double() if m.use_correction_bias else 0)
        allowed = list(range(m.num_experts))
        if m.n_group:
            gs = []
            for g in range(m.n_group):
                vals = sorted(choice[g * per : (g + 1) * per].tolist(), reverse=True)
                gs.append(sum(vals[:2]) if m.scoring == "sigmoid" else vals[0])
            keep = sorted(range(m.n_group), key=lambda g: (-gs[g], g))[: m.topk_group]
            allowed = [e for e in allowed if e // per in keep]
        chosen = sorted(allowed, key=lambda e: (-choice[e].item(), e))[: m.top_k]
        w = torch.stack([scores[e] for e in chosen])
        if m.norm_topk_prob:
            w = w / w.sum()
        w = w * m.routed_scaling_factor
        for e, we in zip(chosen, w, strict=True):
            w13, w2 = (t_.double() for t_ in provider(e))
            gu = w13 @ x[t]
            h = torch.nn.functional.silu(gu[: m.moe_intermediate_size]) * gu[m.moe_intermediate_size :]
            out[t] += we * (w2 @ h)
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(scoring="sigmoid", n_group=4, topk_group=2, use_correction_bias=True, routed_scaling_factor=2.5),
        dict(scoring="softmax", norm_topk_prob=False),
        dict(scoring="softmax", n_group=2, topk_group=1),
    ],
)
def test_against_float64(kw, rng_seed):
    m = ModelConfig(hidden_size=64, num_experts=8, top_k=3, moe_intermediate_size=32, seed=rng_seed, **kw)
    router = synthetic_router(m, 0)
    provider = expert_provider(m)
    x = torch.randn(12, 64).bfloat16().float()
    got = reference_moe(x, router, provider, m, quantize_activations=False)
    want = _float64_moe(x, router.weight, router.correction_bias, provider, m)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_provider_called_only_for_selected_experts_and_routing_override(rng_seed):
    m = ModelConfig(hidden_size=64, num_experts=16, top_k=2, moe_intermediate_size=32, seed=rng_seed)
    base = expert_provider(m)
    calls: list[int] = []

    def provider(e):
        calls.append(e)
        return base(e)

    x = torch.randn(3, 64)
    ids = torch.tensor([[1, 5], [5, -1], [1, 9]])
    w = torch.rand(3, 2)
    out = reference_moe(x, synthetic_router(m, 0), provider, m, routing=(ids, w), quantize_activations=False)
    assert sorted(calls) == [1, 5, 9]
    w13, w2 = base(5)
    y = torch.nn.functional.silu(x[1] @ w13[:32].t()) * (x[1] @ w13[32:].t())
    torch.testing.assert_close(out[1], w[1, 0] * (y @ w2.t()), rtol=1e-5, atol=1e-5)


def test_activation_quantisation_semantics(rng_seed):
    m = ModelConfig(hidden_size=128, num_experts=4, top_k=2, moe_intermediate_size=128, weights="fp8_block")
    router, provider = synthetic_router(m, 0), expert_provider(m)
    x = torch.randn(8, 128)
    plain = reference_moe(x, router, provider, m, quantize_activations=False)
    quant = reference_moe(x, router, provider, m, quantize_activations=True)
    rel = ((plain - quant).norm() / plain.norm()).item()
    assert 1e-4 < rel < 0.08, rel
    # fp8 dispatch of bf16 weights == quantising the input once.
    mb = ModelConfig(hidden_size=128, num_experts=4, top_k=2, moe_intermediate_size=128)
    pb = expert_provider(mb)
    rb = synthetic_router(mb, 0)
    a = reference_moe(x, rb, pb, mb, dispatch_precision="fp8")
    # The router sees the unquantised input; only the experts see the fp8 values.
    routing = reference_routing(x @ rb.weight.float().t(), mb)
    b = reference_moe(qdq_per_token_group(x), rb, pb, mb, quantize_activations=False, routing=routing)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dispatch_precision"):
        reference_moe(x, router, provider, m, dispatch_precision="int8")
    with pytest.raises(ValueError, match="hidden must be"):
        reference_moe(torch.randn(2, 64), router, provider, m)


def test_synthetic_scale_keeps_activations_order_one():
    m = ModelConfig(
        hidden_size=256, num_experts=8, top_k=4, moe_intermediate_size=128, routed_scaling_factor=1.0
    )
    x = torch.randn(64, 256)
    y = reference_moe(x, synthetic_router(m, 0), expert_provider(m), m, quantize_activations=False)
    assert 0.05 < y.std().item() < 2.0
