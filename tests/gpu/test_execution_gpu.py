"""Execution switches on 2 GPUs (NCCL): CUDA-graph decode, two-batch decode and chunked prefill, each
against the plain eager path of the same layer (same seed, same weights) and the float32 reference,
for the torch backend and the DeepEP backend (which fails with the install hint when `deep_ep` is
not importable). The torch backend also runs on one GPU (one NCCL rank, rank 0's token counts), so
the graph decode of the runtime is checked on a single-GPU machine too.

Launches its own 2 processes (1 for the one-GPU case). Per backend, every configuration builds its
layer, runs the same steps and closes it (one DeepEP buffer per process at a time); the outputs are
then compared with the plain configuration's. Every mismatch is recorded so one failure still shows
the others.

The steps keep the CUDA-graph caller's promise: decode steps have `T <= C` on every rank, prefill
steps are flagged on every rank. Tolerances: graph replay vs eager and overlapped vs plain must agree
within bf16 rounding (relative Frobenius error < 1e-2; usually bitwise equal); against the reference,
the layer tests' bounds.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_ranks
from tests.gpu import HIDDEN, TOP_K, WORLD, require_deep_ep, small_layer_plan

SAME_TOL = 1e-2
REF_TOL = {"bf16": 2e-2, "fp8_block": 4e-2}

# (tokens per rank, is_prefill)
STEPS = [
    ((5, 32), False),
    ((16, 1), False),
    ((300, 200), True),  # normal layout between graph replays (DeepEP cleans the low-latency area)
    ((0, 9), False),  # zero-token rank, different buckets per rank
    ((32, 32), False),
    ((7, 3), False),
    ((513, 64), True),
]

CONFIGS = {
    "plain": {},
    "graph": {"cuda_graph_decode": True},
    "graph+two_batch": {"cuda_graph_decode": True, "decode_two_batch": True},
    "two_batch": {"decode_two_batch": True},
    "chunks2": {"prefill_chunks": 2},
    "chunks4+two_batch": {"prefill_chunks": 4, "decode_two_batch": True},
}


def _run_config(
    rank: int, world: int, backend: str, scheme: str, name: str
) -> tuple[list[torch.Tensor], list[str]]:
    from ep_runtime.layer import EPMoE

    failures: list[str] = []
    outs: list[torch.Tensor] = []
    layer = EPMoE(small_layer_plan(backend, scheme, world, execution=CONFIGS[name]), rank=rank)
    try:
        for step, (all_tokens, is_prefill) in enumerate(STEPS):
            tokens = all_tokens[:world]
            g = torch.Generator(device="cuda").manual_seed(100 * step + rank)
            h = torch.randn(tokens[rank], HIDDEN, generator=g, device="cuda").to(torch.bfloat16)
            y = layer(h, is_prefill=is_prefill)
            tel = layer.last_telemetry
            where = f"{backend}/{scheme}/{name} step {step} rank {rank}"
            outs.append(y.clone())
            expect = "normal" if is_prefill else "low_latency"
            if tel.layout != expect:
                failures.append(f"{where}: ran {tel.layout}, expected {expect}")
            if tel.tokens_per_rank is not None and sum(tel.tokens_per_rank) != TOP_K * sum(tokens):
                failures.append(
                    f"{where}: tokens_per_rank {tel.tokens_per_rank} (expected sum {TOP_K * sum(tokens)})"
                )
            if y.shape != h.shape or not torch.isfinite(y).all():
                failures.append(f"{where}: output {tuple(y.shape)} or non-finite values")
            if tokens[rank] == 0:
                continue
            r = layer.last_routing
            ref = layer.reference_forward(h, layout=tel.layout, routing=(r.topk_ids, r.topk_weights))
            rel = float((y.float() - ref).norm() / ref.norm())
            if not rel < REF_TOL[scheme]:
                failures.append(f"{where}: relative error vs reference {rel:.4g} >= {REF_TOL[scheme]}")
        if CONFIGS[name].get("cuda_graph_decode") and layer.graph_runner is not None:
            if not layer.graph_runner.captured:
                failures.append(f"{backend}/{scheme}/{name} rank {rank}: no graph was captured")
    except Exception:  # noqa: BLE001 - recorded
        failures.append(f"{backend}/{scheme}/{name} rank {rank}: {traceback.format_exc()}")
    finally:
        layer.close()
        torch.cuda.synchronize()
    return outs, failures


def _worker(rank: int, world: int, backend: str, schemes: list[str]) -> list[str]:
    failures: list[str] = []
    try:
        for scheme in schemes:
            results = {}
            for name in CONFIGS:
                outs, f = _run_config(rank, world, backend, scheme, name)
                failures += f
                results[name] = outs
                dist.barrier()
                if f and any("Traceback" in x for x in f):
                    break  # a peer may be stuck in a collective of this configuration
            base = results.get("plain", [])
            for name, outs in results.items():
                for step, (a, b) in enumerate(zip(outs, base, strict=False)):
                    if a.shape != b.shape:
                        failures.append(f"{backend}/{scheme}/{name} step {step} rank {rank}: shape differs")
                    elif a.numel():
                        rel = float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
                        if not rel < SAME_TOL:
                            failures.append(
                                f"{backend}/{scheme}/{name} step {step} rank {rank}: differs from plain, "
                                f"rel {rel:.3g} (bitwise equal: {bool(torch.equal(a, b))})"
                            )
    except Exception:  # noqa: BLE001 - reported with the failures before it
        failures.append(f"rank {rank}: {traceback.format_exc()}")
    return failures


def _run(dispatch_backend: str, schemes: list[str], world: int = WORLD) -> list[str]:
    return sum(run_ranks(_worker, world, dispatch_backend, schemes, timeout=300, backend="nccl"), [])


@pytest.mark.gpu
def test_execution_torch_backend_one_gpu():
    """The same configurations on one NCCL rank: graph capture and replay (on the warm-up stream),
    bucket padding, the zero-token step and normal steps between replays, without a second GPU."""
    failures = _run("torch", ["bf16", "fp8_block"], world=1)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu(count=2)
def test_execution_torch_backend():
    failures = _run("torch", ["bf16", "fp8_block"])
    assert not failures, "\n".join(failures)


@pytest.mark.gpu(count=2)
def test_execution_deepep_backend():
    require_deep_ep()
    failures = _run("deepep", ["bf16", "fp8_block"])
    assert not failures, "\n".join(failures)
