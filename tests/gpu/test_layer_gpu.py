"""EPMoE on 2 GPUs (NCCL) against the float32 reference: torch and DeepEP backends, Triton and torch
experts, every weights scheme, auto mode switching normal <-> low-latency, chunked low-latency
rounds, a zero-token rank.

Launches its own 2 processes (torch.multiprocessing). Every case records its result instead of
stopping the run, so one failure still shows the others. The DeepEP cases need `deep_ep`.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_ranks
from tests.gpu import HIDDEN, WORLD, require_deep_ep, small_layer_plan

# Relative Frobenius error vs the reference run on the layer's own routing (bf16 GEMMs on GPU;
# w4a8 low-latency quantises per tensor where the reference uses group-128 scales).
TOL = {"bf16": 2e-2, "fp8_block": 4e-2, "w4a8": 4e-2}
TOL_W4A8_LL = 0.15

# (tokens per rank, is_prefill, expected layout, expected rounds)
STEPS = [
    ((300, 200), True, "normal", 1),
    ((20, 32), False, "low_latency", 1),
    ((70, 5), False, "low_latency", 3),  # chunked: 70 > C, below normal_above_tokens
    ((0, 20), False, "low_latency", 1),  # zero-token rank
    ((150, 0), False, "normal", 1),  # > normal_above_tokens on one rank; zero tokens on the other
    ((16, 16), False, "low_latency", 1),  # back to low-latency after normal (DeepEP buffer clean)
]


def _case(rank: int, backend: str, scheme: str, experts: str) -> list[str]:
    from ep_runtime.layer import EPMoE

    failures = []
    plan = small_layer_plan(
        backend,
        scheme,
        dispatch={"auto": {"normal_above_tokens": 96}, "check_conservation": backend == "torch"},
        kernels={"experts": experts},
    )
    layer = EPMoE(plan, rank=rank)
    try:
        for step, (tokens, is_prefill, layout, rounds) in enumerate(STEPS):
            g = torch.Generator(device="cuda").manual_seed(100 * step + rank)
            h = torch.randn(tokens[rank], HIDDEN, generator=g, device="cuda").to(torch.bfloat16)
            y = layer(h, is_prefill=is_prefill)
            tel = layer.last_telemetry
            where = f"{backend}/{experts}/{scheme} step {step} rank {rank}"
            if y.shape != h.shape or y.dtype != torch.bfloat16:
                failures.append(f"{where}: output {tuple(y.shape)} {y.dtype}")
            if (tel.layout, tel.num_rounds) != (layout, rounds):
                failures.append(f"{where}: ran {tel.layout} x{tel.num_rounds}, expected {layout} x{rounds}")
            if tokens[rank] == 0:
                continue
            r = layer.last_routing
            ref = layer.reference_forward(h, layout=tel.layout, routing=(r.topk_ids, r.topk_weights))
            rel = float((y.float() - ref).norm() / ref.norm())
            tol = TOL_W4A8_LL if (scheme, tel.layout) == ("w4a8", "low_latency") else TOL[scheme]
            if not rel < tol:
                failures.append(f"{where}: relative error {rel:.4g} >= {tol}")
            if not torch.isfinite(y).all():
                failures.append(f"{where}: non-finite output")
    except Exception:  # noqa: BLE001 - recorded
        failures.append(f"{backend}/{experts}/{scheme} rank {rank}: {traceback.format_exc()}")
    finally:
        layer.close()
    return failures


def _worker(rank: int, world: int, cases: list[tuple[str, str, str]]) -> list[str]:
    failures: list[str] = []
    try:
        for backend, experts, scheme in cases:
            failures += _case(rank, backend, scheme, experts)
            dist.barrier()
    except Exception:  # noqa: BLE001 - reported with the failures before it
        failures.append(f"rank {rank}: {traceback.format_exc()}")
    return failures


def _run(cases: list[tuple[str, str, str]]) -> list[str]:
    return sum(run_ranks(_worker, WORLD, cases, timeout=480, backend="nccl"), [])


@pytest.mark.gpu(count=2)
def test_layer_torch_backend():
    cases = [("torch", "triton", s) for s in ("bf16", "fp8_block", "w4a8")] + [
        ("torch", "torch", "fp8_block")
    ]
    failures = _run(cases)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu(count=2)
def test_layer_deepep_backend():
    require_deep_ep()
    cases = [("deepep", "triton", s) for s in ("bf16", "fp8_block", "w4a8")]
    failures = _run(cases)
    assert not failures, "\n".join(failures)
