"""Shared test set-up.

Triton's CPU interpreter must be chosen before any kernel is defined, so it is set here, at
collection time, whenever no GPU is present (CI sets it too).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count()
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        need = marker.kwargs.get("count", 1)
        if gpus < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), found {gpus}"))


@pytest.fixture
def rng_seed() -> int:
    """A fresh seed per run (printed on failure) so inputs are random, not fixed zeros."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def poisoned_empty(monkeypatch):
    """`torch.empty` returns NaN-filled tensors (0xFF bytes; 0x7F, NaN, for e4m3), so a kernel output
    row that should have been written but was not shows up (masked GEMM tests, CPU and GPU)."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.view(torch.uint8).fill_(0x7F if t.dtype == torch.float8_e4m3fn else 0xFF)
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture(scope="session")
def backend_bf16():
    """fp32 -> bfloat16 rounding exactly as Triton's `.to(tl.bfloat16)` does it on this backend.

    On the GPU the cast rounds to nearest even, like torch. Triton's CPU interpreter (3.9) truncates
    instead, which puts a one-sided error of up to 2^-7 on every element a kernel casts. A reference
    that must match such a cast closely calls this function rather than `.to(torch.bfloat16)`. The
    rounding is probed once with a tiny kernel, not assumed from the Triton version.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _cast(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # 1 + 3*2^-9 lies between two bf16 values, nearer the upper one: RNE rounds up, truncation down.
    probe = torch.full((16,), 1.0 + 3 * 2.0**-9, device=device)
    out = torch.empty(16, dtype=torch.bfloat16, device=device)
    _cast[(1,)](probe, out, N=16)
    got = float(out[0])
    if got == float(probe.to(torch.bfloat16)[0]):
        return lambda x: x.float().to(torch.bfloat16)
    if got == 1.0:
        return lambda x: (
            (x.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
        )
    raise AssertionError(
        f"Triton's fp32 -> bf16 cast gave {got} for {float(probe[0])}: neither RNE nor truncation"
    )
