"""DeepEP low-latency on ONE GPU (EP=1), for machines with a single GPU.

DeepEP's normal (intranode) kernels need 2, 4 or 8 ranks, but its low-latency kernels run with one
rank (NVSHMEM with a single PE). This checks, in this process:
- the `deepep` low-latency dispatcher against the `torch` one (NCCL, world 1) in bf16 and fp8:
  same per-expert counts, same received rows as multisets, combine == sum_k w_k x;
- one DeepEP low-latency dispatch + combine captured in a CUDA graph and replayed on new inputs
  (no host sync on that path);
- the whole `EPMoE` layer on the deepep backend (Triton masked experts) against the reference,
  plain, with `decode_two_batch`, and with `cuda_graph_decode`.
The 2-GPU comparisons (normal mode too) are in test_deepep_gpu.py / test_layer_gpu.py.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.gpu import require_deep_ep
from tests.gpu.test_deepep_gpu import _compare_low_latency, _identity_experts, _reference, _routing

HIDDEN, NUM_EXPERTS, TOP_K, CAPACITY = 2048, 16, 4, 64


def _plan(precision: str = "auto", experts: str = "triton", weights: str = "bf16", **execution):
    from ep_runtime.config import parse_config, resolve_plan

    return resolve_plan(
        parse_config(
            {
                "model": {
                    "hidden_size": HIDDEN,
                    "num_experts": NUM_EXPERTS,
                    "top_k": TOP_K,
                    "moe_intermediate_size": 256,
                    "weights": weights,
                    "scoring": "sigmoid",
                    "use_correction_bias": True,
                    "routed_scaling_factor": 2.5,
                },
                "parallel": {"ep_size": 1, "device": "cuda"},
                "dispatch": {
                    "backend": "deepep",
                    "mode": "low_latency",
                    "precision": {"low_latency": precision},
                    "num_max_dispatch_tokens_per_rank": CAPACITY,
                },
                "kernels": {"experts": experts},
                "execution": execution,
            }
        )
    )


@pytest.fixture(scope="module")
def nccl_world_1():
    require_deep_ep()
    torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "nccl",
            init_method=f"file://{os.path.join(tmp, 'rdv')}",
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=120),
            device_id=torch.device("cuda", 0),
        )
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_low_latency_deepep_matches_torch(nccl_world_1, precision):
    from ep_runtime.comm.deepep import DeepEPBufferOwner, DeepEPDispatcher
    from ep_runtime.comm.torch_backend import TorchDispatcher
    from ep_runtime.types import Layout

    plan = _plan(precision)
    mp = plan.for_layout(Layout.LOW_LATENCY)
    owner = DeepEPBufferOwner(plan, nccl_world_1)
    deepep = DeepEPDispatcher(plan, mp, nccl_world_1, owner=owner)
    ref_disp = TorchDispatcher(plan, mp, nccl_world_1)
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    try:
        for num_tokens in (0, 1, 37, CAPACITY):
            x = torch.randn(num_tokens, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
            routing = _routing(num_tokens, gen)
            dt, ht = ref_disp.dispatch(x, routing)
            ot = ref_disp.combine(_identity_experts(dt), ht)
            dd, hd = deepep.dispatch(x, routing)
            od = deepep.combine(_identity_experts(dd), hd)
            torch.cuda.synchronize()
            tol = 0.1 if precision == "fp8" else 2e-2
            assert torch.allclose(od.float(), _reference(x, routing), rtol=tol, atol=tol)
            print(num_tokens, _compare_low_latency(dt, dd, ot, od, precision == "fp8"))
    finally:
        deepep.close()
        ref_disp.close()


@pytest.mark.gpu
def test_low_latency_deepep_cuda_graph(nccl_world_1):
    from ep_runtime.comm.deepep import DeepEPBufferOwner, DeepEPDispatcher
    from ep_runtime.types import Layout, Routing

    plan = _plan("bf16")
    owner = DeepEPBufferOwner(plan, nccl_world_1)
    deepep = DeepEPDispatcher(plan, plan.for_layout(Layout.LOW_LATENCY), nccl_world_1, owner=owner)
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    try:
        x = torch.randn(48, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
        r = _routing(48, gen)
        ids, w = r.topk_ids.clone(), r.topk_weights.clone()

        def step():
            d, h = deepep.dispatch(x, Routing(ids, w))
            return deepep.combine(_identity_experts(d), h)

        eager = step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for _ in range(3):
            x.copy_(torch.randn(48, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16))
            r2 = _routing(48, gen)
            ids.copy_(r2.topk_ids)
            w.copy_(r2.topk_weights)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.allclose(out.float(), _reference(x, Routing(ids, w)), rtol=2e-2, atol=2e-2)
        assert eager.shape == out.shape
    finally:
        deepep.close()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "weights,execution",
    [
        ("bf16", {}),
        ("fp8_block", {}),
        ("bf16", {"decode_two_batch": True}),
        ("bf16", {"cuda_graph_decode": True}),
    ],
)
def test_layer_on_deepep_low_latency(nccl_world_1, weights, execution):
    from ep_runtime.layer import EPMoE

    layer = EPMoE(_plan(weights=weights, **execution), rank=0, group=nccl_world_1)
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    try:
        for num_tokens in (1, 17, CAPACITY, 2 * CAPACITY + 5):
            x = torch.randn(num_tokens, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
            y = layer(x, is_prefill=False)
            ref = layer.reference_forward(
                x, routing=(layer.last_routing.topk_ids, layer.last_routing.topk_weights)
            )
            rel = ((y.float() - ref).norm() / ref.norm()).item()
            print(weights, execution, num_tokens, f"rel err {rel:.3g}")
            assert rel < 4e-2, (weights, execution, num_tokens, rel)
    finally:
        layer.close()
