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


@pytest.fixture
def backend_scores(monkeypatch):
    """References score with the one-kernel expert selection's sigmoid on this backend
    (`tests.kernels.rounding.backend_sigmoid`; torch's own on the GPU)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from tests.kernels.rounding import backend_sigmoid

        monkeypatch.setattr(torch, "sigmoid", backend_sigmoid)
