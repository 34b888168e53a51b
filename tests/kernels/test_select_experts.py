"""One-kernel sigmoid expert selection (`kernels.select_experts`) against the torch path and the
reference routing: the same experts in the same order (exactly), weights to fp32 rounding.

The kernel computes its scores with the backend's `exp`: on the GPU that reproduces torch's CUDA
sigmoid bit for bit (checked here when a GPU runs these tests); under the interpreter it is numpy's,
so the references then score with the same `exp` (`backend_sigmoid`) and the comparison stays exact
on fresh random logits, near-ties included. Exact ties are planted to check the tie order.
"""

from __future__ import annotations

import os

import pytest
import torch

from ep_runtime.config import ConfigError, ModelConfig, parse_config, resolve_plan
from ep_runtime.kernels.select_experts import select_experts_sigmoid, supports
from ep_runtime.reference import reference_routing
from ep_runtime.router import select_experts

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()), reason="needs Triton (GPU or interpreter)"
)

VARIANTS = {
    # DeepSeek-V3: 256 experts in 8 groups of 32, best 4 groups, top 8, bias, renormalised, scaled
    "deepseek": dict(num_experts=256, top_k=8, n_group=8, topk_group=4, use_correction_bias=True,
                     routed_scaling_factor=2.5),
    "groups-of-2": dict(num_experts=32, top_k=4, n_group=16, topk_group=4, use_correction_bias=True),
    "groups-of-1": dict(num_experts=16, top_k=3, n_group=16, topk_group=5),  # group score = its best
    "plain-k6": dict(num_experts=64, top_k=6, norm_topk_prob=False, routed_scaling_factor=1.5),
    "one-group-kept": dict(num_experts=64, top_k=8, n_group=4, topk_group=1, use_correction_bias=True),
}  # fmt: skip


def _model(kw: dict) -> ModelConfig:
    return ModelConfig(hidden_size=64, moe_intermediate_size=32, scoring="sigmoid", **kw)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("T", [0, 1, 37])
def test_select_experts_sigmoid_equals_torch_and_reference(rng_seed, backend_scores, name, T):
    m = _model(VARIANTS[name])
    E = m.num_experts
    logits = torch.randn(T, E, device=DEVICE) * 2
    if T > 4:  # exact ties: equal logits within a row, and whole equal rows
        logits[:4] = torch.randint(-2, 3, (4, E), device=DEVICE).float()
    # A bias on a coarse grid keeps the planted ties tied after it is added.
    bias = (torch.randint(-2, 3, (E,), device=DEVICE) * 0.05) if m.use_correction_bias else None
    ids, w = select_experts(logits, m, bias, impl="triton")
    tids, tw = select_experts(logits, m, bias, impl="torch")
    rids, rw = reference_routing(logits, m, bias)
    assert ids.shape == (T, m.top_k) and ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, tids) and torch.equal(ids.cpu(), rids.cpu())
    torch.testing.assert_close(w, tw, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.cpu(), rw.cpu(), rtol=1e-6, atol=1e-7)


def test_non_contiguous_logits_and_many_blocks(rng_seed, backend_scores):
    m = _model(VARIANTS["deepseek"])
    base = torch.randn(256, 70, device=DEVICE)
    logits = base.t()  # [70, 256] with stride (1, 70): several programs of BLOCK_T tokens
    bias = torch.randn(256, device=DEVICE) * 0.1
    ids, w = select_experts(logits, m, bias, impl="triton")
    tids, tw = select_experts(logits.contiguous(), m, bias, impl="torch")
    assert torch.equal(ids, tids)
    torch.testing.assert_close(w, tw, rtol=1e-6, atol=1e-7)


def test_errors_name_the_argument():
    logits = torch.randn(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="logits must be"):
        select_experts_sigmoid(logits.double(), top_k=2)
    with pytest.raises(ValueError, match="power of two"):
        select_experts_sigmoid(torch.randn(3, 24, device=DEVICE), top_k=2)
    with pytest.raises(ValueError, match="given together"):
        select_experts_sigmoid(logits, top_k=2, n_group=4)
    with pytest.raises(ValueError, match="topk_group"):
        select_experts_sigmoid(logits, top_k=8, n_group=8, topk_group=2)  # 2 groups of 2 < 8
    with pytest.raises(ValueError, match="correction_bias must be"):
        select_experts_sigmoid(logits, top_k=2, correction_bias=torch.zeros(8, device=DEVICE))
    assert supports("softmax", 16, None, 2)[0] is False
    m = ModelConfig(hidden_size=64, moe_intermediate_size=32, num_experts=16, top_k=2, scoring="softmax")
    with pytest.raises(ValueError, match="sigmoid scoring only"):
        select_experts(logits, m, impl="triton")
    with pytest.raises(ValueError, match="router_topk 'cuda' is unknown; allowed: torch, triton"):
        select_experts(logits, m, impl="cuda")


def test_config_switch_is_checked():
    base = {"model": {"hidden_size": 128, "num_experts": 24, "top_k": 2, "moe_intermediate_size": 64,
                      "scoring": "sigmoid"},
            "parallel": {"ep_size": 2, "device": "cuda"}, "kernels": {"router_topk": "triton"}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"kernels.router_topk.*power of two"):
        resolve_plan(parse_config(base))
    base["model"]["num_experts"] = 32
    assert resolve_plan(parse_config(base)).router_topk == "triton"
    base["parallel"]["device"] = "cpu"
    with pytest.raises(ConfigError, match=r"kernels.router_topk.*needs parallel.device 'cuda'"):
        resolve_plan(parse_config(base))
    # auto (the default): the kernel on cuda where it serves the model, torch otherwise
    del base["kernels"]
    assert resolve_plan(parse_config(base)).router_topk == "torch"  # cpu
    base["parallel"]["device"] = "cuda"
    assert resolve_plan(parse_config(base)).router_topk == "triton"
    base["model"]["num_experts"] = 24  # not a power of two: the kernel does not serve it
    assert resolve_plan(parse_config(base)).router_topk == "torch"
    base["model"].update(num_experts=32, scoring="softmax")
    assert resolve_plan(parse_config(base)).router_topk == "torch"
