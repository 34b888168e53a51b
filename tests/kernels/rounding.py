"""fp32 -> bfloat16 rounding exactly as Triton's `.to(tl.bfloat16)` does it on this backend.

On the GPU the cast rounds to nearest even, like torch. Triton's CPU interpreter (3.9) truncates
instead, which puts a one-sided error of up to 2^-7 on every element a kernel casts, a bias that
adds up across a sum. A reference that must match such a cast closely rounds with `backend_bf16`
rather than `.to(torch.bfloat16)`. The rounding is probed once with a tiny kernel, not assumed from
the Triton version.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def _truncate(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def _nearest_even(x: torch.Tensor) -> torch.Tensor:
    return x.float().to(torch.bfloat16)


@functools.cache
def _backend_rounding():
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
    if got == float(_nearest_even(probe)[0]):
        return _nearest_even
    if got == float(_truncate(probe)[0]):
        return _truncate
    raise AssertionError(
        f"Triton's fp32 -> bf16 cast gave {got} for {float(probe[0])}: neither RNE nor truncation"
    )


def backend_bf16(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to bfloat16 the way this backend's Triton kernels round it."""
    return _backend_rounding()(x)


_torch_sigmoid = torch.sigmoid  # the real one: tests patch `torch.sigmoid` with `backend_sigmoid`


def backend_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """float32 sigmoid as `kernels.select_experts` computes it on this backend: on the GPU it
    reproduces torch's CUDA sigmoid (`1 / (1 + expf(-x))`), so this is `torch.sigmoid`; under the
    interpreter its `exp` is numpy's, which can differ from torch's CPU `exp` in the last bit."""
    from ep_runtime.kernels.select_experts import _INTERPRETED

    if not _INTERPRETED:
        return _torch_sigmoid(x)
    e = torch.from_numpy(np.exp(-x.detach().cpu().float().numpy())).to(x.device)
    return 1.0 / (1.0 + e)
