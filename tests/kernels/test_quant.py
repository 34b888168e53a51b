"""Quantisation: round trips, float64 reference math, INT4 packing, the Triton per-token-group kernel.

Tolerances: the quantised values must equal the float64 reference exactly except where the
scaled value lies within rounding distance of an e4m3 tie (checked as |dequant error| <= half an
e4m3 ulp at that magnitude, i.e. <= 2^-4 relative + scale*2^-9 absolute); scales match to fp32
rounding (1e-6 relative).
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from ep_runtime.kernels.quant import (
    FP8_DTYPE,
    FP8_MAX,
    _per_token_group_quant_fp8_triton,
    dequantize_fp8_block,
    dequantize_w4a8,
    int4_to_e4m3,
    pack_int4,
    per_tensor_quant_fp8,
    per_token_group_dequant_fp8,
    per_token_group_quant_fp8,
    quantize_fp8_block,
    quantize_w4a8,
    round_to_e4m3_grid,
    unpack_int4,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ref_group_scales(x: torch.Tensor, g: int) -> torch.Tensor:
    xg = x.double().reshape(*x.shape[:-1], x.shape[-1] // g, g)
    return xg.abs().amax(-1).clamp_min(1e-10) / 448.0


def _assert_fp8_close(x: torch.Tensor, x_q: torch.Tensor, scales: torch.Tensor, g: int) -> None:
    """x_q * scale reproduces x within e4m3 rounding (3 mantissa bits: 2^-4 relative half-ulp)."""
    deq = per_token_group_dequant_fp8(x_q, scales, g, out_dtype=torch.float32).double()
    sc = scales.double().repeat_interleave(g, dim=-1)
    err = (deq - x.double()).abs()
    bound = x.double().abs() * 2.0**-4 + sc * 2.0**-9 + 1e-12
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(5, 256), (2, 3, 128), (384,)])
def test_per_token_group_quant_matches_float64(rng_seed, dtype, shape):
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10).to(dtype).to(DEVICE)
    x_q, scales = per_token_group_quant_fp8(x, 128)
    assert x_q.dtype == FP8_DTYPE and x_q.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (*shape[:-1], shape[-1] // 128)
    torch.testing.assert_close(scales.double().cpu(), _ref_group_scales(x.cpu(), 128), rtol=1e-6, atol=0)
    # values: exactly the float64 math rounded to e4m3 (torch's cast is RNE)
    ref_q = (
        x.cpu().double().reshape(*shape[:-1], -1, 128) / _ref_group_scales(x.cpu(), 128)[..., None]
    ).clamp(-FP8_MAX, FP8_MAX)
    ref_q = ref_q.reshape(shape).to(FP8_DTYPE).float()
    # float64 quotient vs the fp32 quotient: a double rounding can move a value that sits within
    # an fp32 ulp of an e4m3 midpoint, so allow a handful
    # (a count, not only a share: one such value in the 384 of a small case is 0.26 %)
    mismatch = int((x_q.cpu().float() != ref_q).sum().item())
    allowed = max(2, int(0.002 * x_q.numel()))
    assert mismatch <= allowed, f"{mismatch} of {x_q.numel()} values differ from the float64 reference"
    _assert_fp8_close(x.cpu(), x_q.cpu(), scales.cpu(), 128)
    # the group max maps to +-448 exactly
    assert x_q.float().abs().amax().item() == FP8_MAX


def test_per_token_group_quant_column_major_and_zero_group(rng_seed):
    x = torch.randn(3, 4, 256, dtype=torch.bfloat16)
    x[1, 2, :128] = 0
    xq_r, s_r = per_token_group_quant_fp8(x, 128)
    xq_c, s_c = per_token_group_quant_fp8(x, 128, column_major_scales=True)
    assert s_c.shape == (3, 4, 2) and s_c.stride() == (8, 1, 4)
    torch.testing.assert_close(s_c, s_r, rtol=0, atol=0)
    assert torch.equal(xq_c.view(torch.uint8), xq_r.view(torch.uint8))
    assert s_r[1, 2, 0].item() == pytest.approx(1e-10 / 448)
    assert bool((xq_r[1, 2, :128].float() == 0).all())


@pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()), reason="needs Triton (GPU or interpreter)"
)
@pytest.mark.parametrize("column_major", [False, True])
def test_per_token_group_quant_triton_kernel(rng_seed, column_major):
    x = (torch.randn(2, 3, 256) * 4).to(torch.bfloat16).to(DEVICE)
    x_q, scales = _per_token_group_quant_fp8_triton(x, 128, column_major)
    ref_q, ref_s = per_token_group_quant_fp8(x.cpu(), 128, column_major_scales=column_major)
    assert scales.stride() == ref_s.stride()
    torch.testing.assert_close(scales.cpu(), ref_s, rtol=1e-6, atol=0)
    assert torch.equal(x_q.cpu().view(torch.uint8), ref_q.view(torch.uint8))


@triton.jit
def _round_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(o_ptr + offs, round_to_e4m3_grid(v), mask=offs < n)


@pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()), reason="needs Triton (GPU or interpreter)"
)
def test_round_to_e4m3_grid_matches_torch_cast(rng_seed):
    """Every e4m3 value, every midpoint between neighbours (ties to even) and random values."""
    grid_vals = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid_vals = grid_vals[grid_vals.isfinite()].unique()
    mids = (grid_vals[1:] + grid_vals[:-1]) / 2
    x = torch.cat([grid_vals, mids, (torch.rand(4000) * 2 - 1) * 448, torch.randn(1000) * 1e-2])
    x = x.to(DEVICE)
    out = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    assert torch.equal(out.cpu(), x.cpu().to(FP8_DTYPE).float())


@triton.jit
def _int4_kernel(p_ptr, lo_ptr, hi_ptr, MAGIC: tl.constexpr):
    offs = tl.arange(0, 256)
    p = tl.load(p_ptr + offs)
    tl.store(lo_ptr + offs, int4_to_e4m3(p & 15, MAGIC).to(tl.uint8, bitcast=True))
    tl.store(hi_ptr + offs, int4_to_e4m3(p >> 4, MAGIC).to(tl.uint8, bitcast=True))


@pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()), reason="needs Triton (GPU or interpreter)"
)
@pytest.mark.parametrize("magic", [0, 1])
def test_int4_to_e4m3_every_byte(magic):
    """Both in-kernel int4 -> e4m3 conversions give torch's e4m3 bits of the unpacked int4, for
    every byte (low and high nibble)."""
    packed = torch.arange(256, dtype=torch.uint8)
    want = unpack_int4(packed).float().to(FP8_DTYPE).view(torch.uint8)  # [lo0, hi0, lo1, hi1, ...]
    lo = torch.empty(256, dtype=torch.uint8, device=DEVICE)
    hi = torch.empty_like(lo)
    _int4_kernel[(1,)](packed.to(DEVICE), lo, hi, MAGIC=magic)
    assert torch.equal(lo.cpu(), want[0::2]) and torch.equal(hi.cpu(), want[1::2])


def test_per_token_group_dequant_roundtrip(rng_seed):
    x = torch.randn(7, 512) * 3
    x_q, s = per_token_group_quant_fp8(x, 128)
    y = per_token_group_dequant_fp8(x_q, s, 128, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    _assert_fp8_close(x, x_q, s, 128)


def test_per_tensor_quant(rng_seed):
    x = torch.randn(9, 33, dtype=torch.bfloat16) * 5
    x_q, s = per_tensor_quant_fp8(x)
    assert s.shape == (1,) and s.dtype == torch.float32
    assert s.item() == pytest.approx(x.float().abs().max().item() / 448, rel=1e-6)
    torch.testing.assert_close(x_q.float() * s, x.float(), rtol=2.0**-4, atol=s.item() * 2.0**-9)
    given = torch.tensor([0.01])
    x_q2, s2 = per_tensor_quant_fp8(x, given)
    assert s2.item() == pytest.approx(0.01)
    assert x_q2.float().abs().max().item() <= 448  # clamped, not inf/nan
    with pytest.raises(ValueError, match="scale"):
        per_tensor_quant_fp8(x, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("shape", [(256, 384), (2, 200, 130)])
def test_fp8_block_roundtrip(rng_seed, shape):
    w = torch.randn(shape) * 0.05
    w_q, s = quantize_fp8_block(w)
    nb, kb = -(-shape[-2] // 128), -(-shape[-1] // 128)
    assert w_q.shape == w.shape and w_q.dtype == FP8_DTYPE and s.shape == (*shape[:-2], nb, kb)
    ref_s = torch.nn.functional.pad(w.double(), (0, kb * 128 - shape[-1], 0, nb * 128 - shape[-2]))
    ref_s = ref_s.reshape(*shape[:-2], nb, 128, kb, 128).abs().amax(dim=(-3, -1)) / 448
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-6, atol=0)
    back = dequantize_fp8_block(w_q, s)
    sc = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    assert bool(((back - w).abs() <= w.abs() * 2.0**-4 + sc * 2.0**-9).all())


def test_int4_pack_unpack_exact(rng_seed):
    q = torch.randint(-8, 8, (3, 5, 64), dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, 32)
    assert torch.equal(unpack_int4(p), q)
    # nibble order: low = even k, high = odd k
    p1 = pack_int4(torch.tensor([[3, -2]], dtype=torch.int8))
    assert p1.item() == (3 | (0xE << 4))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.zeros(4, dtype=torch.int32))


def test_w4a8_quant_matches_float64(rng_seed):
    w = torch.randn(2, 16, 256, dtype=torch.bfloat16)
    wp, ws = quantize_w4a8(w, 128)
    assert wp.shape == (2, 16, 128) and ws.shape == (2, 16, 2)
    wg = w.double().reshape(2, 16, 2, 128)
    ref_s = wg.abs().amax(-1) / 7
    torch.testing.assert_close(ws.double(), ref_s, rtol=1e-6, atol=0)
    ref_q = torch.round(wg / ref_s[..., None]).clamp(-8, 7).reshape(2, 16, 256)
    q = unpack_int4(wp).double()
    assert (q != ref_q).float().mean().item() < 1e-3  # only exact .5 ties can differ
    back = dequantize_w4a8(wp, ws, 128)
    assert bool(((back.double() - w.double()).abs() <= ref_s.repeat_interleave(128, -1) * 0.5 + 1e-6).all())


def test_w4a8_dequant_fold_fp16_is_the_fp16_product(rng_seed):
    """`fold_fp16`: each weight is fp16(q * fp16(s)), the masked kernel's FOLD_SCALE weights; computed
    here in float64 (torch casts to fp16 round to nearest even), and checked to differ from the fp32
    dequantisation (so the flag does something)."""
    w = torch.randn(3, 8, 256) * torch.exp(2 * torch.randn(3, 8, 1))
    wp, ws = quantize_w4a8(w, 128)
    q = unpack_int4(wp).double().reshape(3, 8, 2, 128)
    s16 = ws.half().double()[..., None]
    want = (q * s16).half().double().reshape(3, 8, 256)
    got = dequantize_w4a8(wp, ws, 128, fold_fp16=True)
    assert got.dtype == torch.float32 and torch.equal(got.double(), want)
    plain = dequantize_w4a8(wp, ws, 128)
    assert not torch.equal(plain, got)
    assert ((plain - got).abs() <= plain.abs() * 2.0**-10).all()  # two fp16 roundings at most


def test_quant_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        per_token_group_quant_fp8(torch.randn(4, 100), 128)
    with pytest.raises(ValueError, match="dtype"):
        per_token_group_quant_fp8(torch.randint(0, 3, (4, 128)), 128)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_w4a8(torch.randn(4, 100), 128)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        per_token_group_dequant_fp8(torch.randn(2, 128), torch.ones(2, 1))
