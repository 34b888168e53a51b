"""The runtime router against the reference routing: identical selection, weights to fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from ep_runtime.config import ModelConfig
from ep_runtime.reference import reference_router_logits, reference_routing
from ep_runtime.router import Router, router_logits, select_experts
from ep_runtime.weights import RouterWeights, synthetic_router

VARIANTS = [
    dict(scoring="softmax"),
    dict(scoring="softmax", norm_topk_prob=False),
    dict(scoring="sigmoid", routed_scaling_factor=2.5),
    dict(scoring="sigmoid", use_correction_bias=True),
    dict(scoring="sigmoid", n_group=4, topk_group=2, use_correction_bias=True, routed_scaling_factor=2.5),
    dict(scoring="softmax", n_group=8, topk_group=3),
    dict(scoring="sigmoid", n_group=16, topk_group=4),  # groups of 2
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_select_experts_equals_reference(kw, rng_seed):
    m = ModelConfig(hidden_size=64, num_experts=32, top_k=4, moe_intermediate_size=32, **kw)
    logits = torch.randn(200, 32) * 2
    # Exact ties in a few rows (selection must break them like the reference: lower index first).
    logits[:10] = torch.randint(-2, 3, (10, 32)).float()
    bias = torch.randn(32) * 0.1 if m.use_correction_bias else None
    ids, w = select_experts(logits, m, bias)
    rids, rw = reference_routing(logits, m, bias)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)
    # Invariants: distinct ids per token, weights from the unbiased scores.
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()
    if m.norm_topk_prob:
        torch.testing.assert_close(
            w.sum(-1), torch.full((200,), m.routed_scaling_factor), rtol=1e-5, atol=1e-5
        )


def test_grouped_selection_stays_in_topk_groups(rng_seed):
    m = ModelConfig(
        hidden_size=64, num_experts=32, top_k=6, moe_intermediate_size=32, n_group=8, topk_group=2
    )
    ids, _ = select_experts(torch.randn(100, 32), m)
    groups = ids // 4
    assert all(len(set(g)) <= 2 for g in groups.tolist())


@pytest.mark.parametrize("kw", [VARIANTS[0], VARIANTS[4]])
def test_router_module_matches_reference(kw, rng_seed):
    m = ModelConfig(
        hidden_size=128,
        num_experts=16,
        top_k=4,
        moe_intermediate_size=32,
        seed=rng_seed,
        n_group=None,
        **{k: v for k, v in kw.items() if k not in ("n_group", "topk_group")},
    )
    rw = synthetic_router(m, 0)
    router = Router(m, rw)
    x = torch.randn(50, 128).bfloat16()
    routing, logits = router(x)
    ref_logits = reference_router_logits(x, rw.weight)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    rids, rweights = reference_routing(logits, m, rw.correction_bias)
    assert torch.equal(routing.topk_ids, rids)
    torch.testing.assert_close(routing.topk_weights, rweights)
    # float32 hidden (CPU): logits from a float32 matmul on the bf16 weight values.
    xf = torch.randn(5, 128)
    torch.testing.assert_close(router_logits(xf, rw.weight), xf @ rw.weight.float().t())


def test_router_errors():
    m = ModelConfig(
        hidden_size=64, num_experts=8, top_k=2, moe_intermediate_size=32, use_correction_bias=True
    )
    with pytest.raises(ValueError, match=r"router weight must be \[8, 64\]"):
        Router(
            m, RouterWeights(weight=torch.zeros(8, 32, dtype=torch.bfloat16), correction_bias=torch.zeros(8))
        )
    with pytest.raises(ValueError, match="correction_bias"):
        Router(m, RouterWeights(weight=torch.zeros(8, 64, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="router_gemm 'fast' is unknown"):
        Router(m, RouterWeights(torch.zeros(8, 64, dtype=torch.bfloat16), torch.zeros(8)), impl="fast")


def test_router_triton_gemm_interpreted(rng_seed):
    """The Triton router GEMM (interpreted on CPU) feeds the same selection as the reference."""
    m = ModelConfig(hidden_size=128, num_experts=16, top_k=4, moe_intermediate_size=32, seed=rng_seed)
    rw = synthetic_router(m, 0)
    x = torch.randn(8, 128).bfloat16()
    routing, logits = Router(m, rw, impl="triton")(x)
    torch.testing.assert_close(logits, reference_router_logits(x, rw.weight), rtol=1e-4, atol=1e-4)
    rids, _ = reference_routing(logits, m)
    assert torch.equal(routing.topk_ids, rids)


def test_router_one_kernel_selection_interpreted(rng_seed, backend_scores):
    """`Router(topk_impl="triton")` routes through the one-kernel selection (interpreted on CPU) and
    picks the reference's experts; the references score with the kernel's exp (see
    tests/kernels/test_select_experts.py)."""
    m = ModelConfig(hidden_size=128, num_experts=32, top_k=4, moe_intermediate_size=32, seed=rng_seed,
                    scoring="sigmoid", n_group=4, topk_group=2, use_correction_bias=True)  # fmt: skip
    rw = synthetic_router(m, 0)
    router = Router(m, rw, impl="torch", topk_impl="triton")
    routing, logits = router(torch.randn(9, 128).bfloat16())
    rids, rweights = reference_routing(logits, m, rw.correction_bias)
    assert torch.equal(routing.topk_ids, rids)
    torch.testing.assert_close(routing.topk_weights, rweights, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="router_topk 'fast' is unknown; allowed: torch, triton"):
        Router(m, rw, topk_impl="fast")
