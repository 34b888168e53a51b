"""Memory budget: estimates scale with the plan, and an oversized plan fails before allocating."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ep_runtime.config import load_config, parse_config, resolve_plan
from ep_runtime.resources import ResourceError, check_memory, estimate_memory

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"


def _plan(**model):
    doc = {
        "model": {
            "hidden_size": 7168,
            "num_experts": 288,
            "top_k": 8,
            "moe_intermediate_size": 2048,
            **model,
        },
        "parallel": {"ep_size": 8, "device": "cuda"},
        "dispatch": {"backend": "deepep", "mode": "low_latency", "num_max_dispatch_tokens_per_rank": 128},
    }
    return resolve_plan(parse_config(doc))


def test_low_latency_buffer_matches_the_documented_order_of_magnitude():
    # DESIGN/issue: ~2 GB at C=128, E=288, D=7168.
    b = estimate_memory(_plan())
    assert 0.8e9 < b.comm_buffers < 3e9


def test_weights_shrink_with_scheme():
    bf16 = estimate_memory(_plan()).expert_weights
    fp8 = estimate_memory(_plan(weights="fp8_block")).expert_weights
    w4 = estimate_memory(_plan(weights="w4a8")).expert_weights
    assert bf16 > fp8 > w4
    assert bf16 == 36 * 3 * 2048 * 7168 * 2  # 36 local experts, 3 matrices, bf16


def test_cpu_default_checks_nothing_on_gpu():
    plan = resolve_plan(load_config(CONFIGS / "local-cpu.yaml"))
    budget = check_memory(plan, torch.device("cpu"))
    assert budget.comm_buffers == 0 and budget.total > 0
    assert not torch.cuda.is_initialized()


@pytest.mark.gpu
def test_oversized_plan_raises_before_allocating():
    doc = {
        "model": {"hidden_size": 7168, "num_experts": 4096, "top_k": 8, "moe_intermediate_size": 8192},
        "parallel": {"ep_size": 1, "device": "cuda"},
        "dispatch": {"backend": "torch", "mode": "normal"},
    }
    with pytest.raises(ResourceError, match="raise parallel.ep_size"):
        check_memory(resolve_plan(parse_config(doc)), torch.device("cuda", 0))
