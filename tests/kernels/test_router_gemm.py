"""Router GEMM Triton kernel (split-K and tiled) against a float64 reference.

Tolerance: inputs are bf16 (exact in fp32), products are accumulated in fp32, so the error is
fp32 summation error: |err| <= 1e-4 * sum_k |x_k w_k| + 1e-6 (K <= 1000 here: ~K * 2^-24 << 1e-4).
"""

from __future__ import annotations

import os

import pytest
import torch

from ep_runtime.kernels.router_gemm import heuristic_config, router_gemm, select

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()), reason="needs GPU or interpreter"
)


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = x.double().cpu() @ w.double().cpu().t()
    mag = x.double().abs().cpu() @ w.double().abs().cpu().t()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out.double().cpu() - ref).abs()
    assert bool((err <= 1e-4 * mag + 1e-6).all()), f"max err {err.max().item():.3g}"


SPLIT = {"BLOCK_T": 16, "BLOCK_E": 16, "BLOCK_K": 32, "SPLIT_K": 3, "num_warps": 4, "num_stages": 2}
TILED = {"BLOCK_T": 16, "BLOCK_E": 32, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}
SERIAL = dict(SPLIT, REDUCE="serial")
ACCUMULATE = dict(SPLIT, REDUCE="accumulate")
GEMV = {"BLOCK_T": 4, "BLOCK_E": 16, "BLOCK_K": 64, "SPLIT_K": 1, "KERNEL": "gemv", "num_warps": 4}
"""GEMV-style kernel: T (19) not a multiple of BLOCK_T, E (24) not of BLOCK_E, D (200) not of BLOCK_K."""


@needs_triton
@pytest.mark.parametrize("T", [0, 1, 19])
@pytest.mark.parametrize(
    "config",
    [SPLIT, TILED, SERIAL, ACCUMULATE, GEMV],
    ids=["splitk", "tiled", "serial", "accumulate", "gemv"],
)
def test_router_gemm_triton_vs_float64(rng_seed, T, config):
    D, E = 200, 24  # D not a multiple of BLOCK_K, E not a power of two
    x = torch.randn(T, D, dtype=torch.bfloat16, device=DEVICE)
    w = (torch.randn(E, D) * 0.05).to(torch.bfloat16).to(DEVICE)
    out = router_gemm(x, w, impl="triton", config=config)
    _check(out, x, w)
    if config is SERIAL or config is ACCUMULATE:
        # the arrival counters (and the accumulate workspace) are left at zero: a second call
        # (other data) is right too; the serial reduction is deterministic
        x2 = torch.randn(T, D, dtype=torch.bfloat16, device=DEVICE)
        out2 = router_gemm(x2, w, impl="triton", config=config)
        _check(out2, x2, w)
        if config is SERIAL:
            assert torch.equal(router_gemm(x2, w, impl="triton", config=config), out2)
        else:
            _check(router_gemm(x2, w, impl="triton", config=config), x2, w)


@needs_triton
def test_router_gemm_heuristic_and_strided_input(rng_seed):
    D, E = 384, 40
    base = torch.randn(5, 2 * D, dtype=torch.bfloat16, device=DEVICE)
    x = base[:, ::2]  # non-contiguous rows and columns
    w = (torch.randn(E, D) * 0.05).to(torch.bfloat16).to(DEVICE)
    out = router_gemm(x, w, impl="triton")
    _check(out, x, w)
    cfg = heuristic_config(5, D, E)
    assert cfg["SPLIT_K"] >= 1 and cfg["BLOCK_T"] == 16


def test_router_gemm_auto_on_cpu_is_torch(rng_seed):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(5, 64, dtype=torch.bfloat16)
    _check(router_gemm(x, w, impl="torch"), x, w)
    _check(router_gemm(x, w), x, w)
    assert router_gemm(x, w, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_router_gemm_errors():
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(5, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="impl must be one of"):
        router_gemm(x, w, impl="magic")
    with pytest.raises(ValueError, match="bfloat16"):
        router_gemm(x.float(), w)
    with pytest.raises(ValueError, match="disagree on D"):
        router_gemm(x, w[:, :32])
    with pytest.raises(ValueError, match="out_dtype"):
        router_gemm(x, w, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        router_gemm(x[0], w)
    with pytest.raises(ValueError, match="REDUCE must be one of .*'accumulate'"):
        router_gemm(x, w, impl="triton", config=dict(SPLIT, REDUCE="tree"))


@pytest.mark.gpu  # the selection table is keyed by CUDA device name
def test_select_fallback_for_unseen_shape():
    impl, cfg = select(8, 1234, 7, torch.device("cuda"))
    assert impl == "triton" and cfg is not None
    assert select(100000, 1234, 7, torch.device("cuda"))[0] == "cublas"
