"""FP8 and INT4 quantisation: per-token-group-128 FP8 (DeepEP's activation format), per-tensor FP8,
128x128 block FP8 weights (`fp8_block`) and packed INT4 weights with per-128-group scales (`w4a8`).

Every function has a plain torch implementation that runs on CPU and GPU; the hot activation path
(`per_token_group_quant_fp8`) launches a Triton kernel on CUDA with the same semantics:

    scale = max(amax(group), 1e-10) / 448        (fp32)
    x_q   = clamp(x / scale, -448, 448) -> float8_e4m3fn (round to nearest even)

None of these functions synchronises with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLaunch
from .tables import cdiv, next_pow2

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
SCALE_EPS = 1e-10
"""Floor on amax so all-zero groups get a finite scale."""
INT4_MIN, INT4_MAX = -8, 7

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype must be one of bfloat16, float16, float32; got {t.dtype}")


def _check_group(name: str, size: int, group_size: int, what: str) -> None:
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if size % group_size:
        raise ValueError(f"{name} {what} ({size}) must be a multiple of group_size ({group_size})")


# --------------------------------------------------------------------------------------------------
# Per-token-group FP8
# --------------------------------------------------------------------------------------------------


@triton.jit
def round_to_e4m3_grid(v):
    """Round fp32 `v` (already clamped to +-448) to the nearest e4m3 value, ties to even, in exact
    fp32 arithmetic (exponent from the bits, scaling by exact powers of two). The result converts
    to float8e4nv exactly on any conversion path, so kernels match torch's cast bit for bit (the
    Triton interpreter's own fp32->e4m3 cast mis-rounds a few % of values)."""
    a = tl.abs(v)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    e = tl.maximum(e, -6)  # below 2^-6 e4m3 is subnormal with the same 2^-9 spacing
    step = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e-3)
    inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3-e)
    r = a * inv_step
    f = tl.floor(r)
    d = r - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    f = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))
    q = f * step
    return tl.where(v < 0, -q, q)


@triton.jit
def e4m3_scale(amax, EPS: tl.constexpr, FMAX: tl.constexpr):
    """The fp32 scale of a group with absolute maximum `amax`: max(amax, EPS) / FMAX, an IEEE
    division (plain `/` lowers to an approximate divide), as torch computes it."""
    return tl.math.div_rn(tl.maximum(amax, EPS), FMAX)


@triton.jit
def to_e4m3_grid(x, scale, FMAX: tl.constexpr):
    """x / scale (IEEE division), clamped to +-FMAX, on the e4m3 grid (`round_to_e4m3_grid`): the
    value torch's `(x / scale).clamp(...).to(float8_e4m3fn)` gives, bit for bit."""
    return round_to_e4m3_grid(tl.clamp(tl.math.div_rn(x, scale), -FMAX, FMAX))


_FP8_MAX = tl.constexpr(FP8_MAX)
_SCALE_EPS = tl.constexpr(SCALE_EPS)


@triton.jit
def quant_e4m3(v, scale, EXACT: tl.constexpr):
    """fp32 `v / scale`, clamped to +-448 -> float8e4nv, rounded to nearest even.

    EXACT: rounded to the e4m3 grid in exact fp32 arithmetic before the cast (`to_e4m3_grid`), the
    bits `per_token_group_quant_fp8` makes (the interpreter's own cast mis-rounds). Otherwise `/`
    and the plain cast (round to nearest even on the GPU)."""
    if EXACT:
        return to_e4m3_grid(v, scale, _FP8_MAX).to(tl.float8e4nv)
    else:
        return tl.clamp(v / scale, -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)


@triton.jit
def quant_rows_e4m3(v, EXACT: tl.constexpr):
    """Each row of the fp32 tile `v` (one 128-channel group) quantised to e4m3 with its own scale
    (max(amax, 1e-10) / 448): `(q, scales)`."""
    scale = e4m3_scale(tl.max(tl.abs(v), axis=1), _SCALE_EPS, _FP8_MAX)
    return quant_e4m3(v, scale[:, None], EXACT), scale


@triton.jit
def int4_to_e4m3(nib, MAGIC: tl.constexpr):
    """uint8 `nib` holding one two's-complement int4 in its low 4 bits (values -8..7) -> the same
    value in float8e4nv (exact: every int4 is an e4m3 value).

    MAGIC=0 converts through an int8 -> fp16 cast (an integer-to-float conversion instruction).
    MAGIC=1 builds the fp16 directly: `0x6400 | u` is the fp16 `1024 + u` for the offset-binary
    `u = nib ^ 8 = v + 8`, and `- 1032` leaves `v` exactly; bit operations and one fp16
    subtract replace the conversion, which runs at a fraction of the ALU rate on Hopper. Both
    give the same bits; the tuned tables pick per kernel kind (config key `INT4_MAGIC`)."""
    if MAGIC:
        h = ((nib ^ 8).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
        return (h - 1032.0).to(tl.float8e4nv)
    else:
        v = (nib.to(tl.int8) ^ 8) - 8
        return v.to(tl.float16).to(tl.float8e4nv)


# Four packed bytes -> eight fp16 per asm invocation, all exact. Byte i holds int4 values (lo, hi)
# in two's complement. `prmt` spreads bytes (b0, b1) and (b2, b3) into the 16-bit halves of two
# words; `lop3 (w & mask) ^ magic` makes, per half, the fp16 `1024 + (v + 8)` from the low nibble
# (the xor with 8 turns two's complement into offset binary, 0x6400 is the exponent of 1024) and
# `1024 + 16 * (v + 8)` from the high nibble in place; one packed fp16 subtract / fma leaves `v`.
_INT4_FP16_ASM = tl.constexpr("""
{
.reg .b32 t0, t1, l0, l1, h0, h1, bias, mul, add;
mov.b32 bias, 0x64086408;
mov.b32 mul, 0x2c002c00;
mov.b32 add, 0xd480d480;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 l0, t0, 0x000f000f, 0x64086408, 0x6a;
lop3.b32 l1, t1, 0x000f000f, 0x64086408, 0x6a;
lop3.b32 h0, t0, 0x00f000f0, 0x64806480, 0x6a;
lop3.b32 h1, t1, 0x00f000f0, 0x64806480, 0x6a;
sub.f16x2 $0, l0, bias;
sub.f16x2 $1, l1, bias;
fma.rn.f16x2 $2, h0, mul, add;
fma.rn.f16x2 $3, h1, mul, add;
}
""")


@triton.jit
def int4_to_fp16_pair(p, ASM: tl.constexpr):
    """uint8 `p` holding two two's-complement int4 (low nibble, high nibble) -> `(lo, hi)` fp16,
    exact (values -8..7).

    ASM (compiled code): packed PTX, four bytes per invocation: 10 instructions for 8 values
    (`_INT4_FP16_ASM`; fp16 `1024 + (v + 8) - 1032` for the low nibble, `(1024 + 16 (v + 8)) / 16
    - 72` for the high one). Otherwise (the interpreter, which cannot run PTX) the same magic
    numbers one element at a time."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            _INT4_FP16_ASM, "=r,=r,=r,=r,r", [p], dtype=(tl.float16, tl.float16), is_pure=True, pack=4
        )
    else:
        lo = (((p & 15) ^ 8).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
        hi = (((p >> 4) ^ 8).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    return lo, hi


@triton.jit
def _per_token_group_quant_fp8_kernel(
    x_ptr,
    xq_ptr,
    scale_ptr,
    # sizes
    num_rows_inner,
    # strides (elements)
    stride_x_row,
    stride_s_outer,
    stride_s_row,
    stride_s_group,
    # meta
    GROUP_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    EPS: tl.constexpr,
    FMAX: tl.constexpr,
):
    """One program per (row, group): amax -> scale -> scaled, clamped e4m3 values."""
    row = tl.program_id(0)
    group = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < GROUP_SIZE
    x = tl.load(x_ptr + row * stride_x_row + group * GROUP_SIZE + offs, mask=mask, other=0.0)
    x = x.to(tl.float32)
    # IEEE divisions and exact e4m3 rounding: the result equals the torch implementation bit for bit
    scale = e4m3_scale(tl.max(tl.abs(x), axis=0), EPS, FMAX)
    q = to_e4m3_grid(x, scale, FMAX)
    tl.store(
        xq_ptr + row * stride_x_row + group * GROUP_SIZE + offs, q.to(xq_ptr.dtype.element_ty), mask=mask
    )
    outer = row // num_rows_inner
    inner = row % num_rows_inner
    tl.store(scale_ptr + outer * stride_s_outer + inner * stride_s_row + group * stride_s_group, scale)


_per_token_group_quant_fp8_launch = FastLaunch(_per_token_group_quant_fp8_kernel)


def _scales_empty(lead: tuple[int, ...], num_groups: int, column_major: bool, device) -> torch.Tensor:
    if column_major:
        shape_t = (*lead[:-1], num_groups, lead[-1])
        return torch.empty(shape_t, dtype=torch.float32, device=device).transpose(-1, -2)
    return torch.empty((*lead, num_groups), dtype=torch.float32, device=device)


def _per_token_group_quant_fp8_triton(
    x: torch.Tensor, group_size: int, column_major_scales: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher behind `per_token_group_quant_fp8` (CUDA, or the interpreter in tests)."""
    x = x.contiguous()
    lead = tuple(x.shape[:-1])
    d = x.shape[-1]
    num_groups = d // group_size
    x_q = torch.empty_like(x, dtype=FP8_DTYPE)
    scales = _scales_empty(lead, num_groups, column_major_scales, x.device)
    num_rows = x.numel() // d if d else 0
    if num_rows == 0 or num_groups == 0:
        return x_q, scales
    inner = lead[-1] if lead else 1
    s3 = scales.reshape(-1, inner, num_groups) if not column_major_scales else None
    if column_major_scales:
        # [..., M, G] view with strides (.., 1, M): flatten the outer dims without copying.
        stride_outer = inner * num_groups
        stride_row, stride_group = scales.stride(-2), scales.stride(-1)
    else:
        stride_outer, stride_row, stride_group = s3.stride()
    grid = (num_rows, num_groups)
    _per_token_group_quant_fp8_launch(
        grid,
        x,
        x_q,
        scales,
        inner,
        d,
        stride_outer,
        stride_row,
        stride_group,
        GROUP_SIZE=group_size,
        BLOCK=next_pow2(group_size),
        EPS=SCALE_EPS,
        FMAX=FP8_MAX,
    )
    return x_q, scales


def _per_token_group_quant_fp8_torch(
    x: torch.Tensor, group_size: int, column_major_scales: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    lead = tuple(x.shape[:-1])
    d = x.shape[-1]
    xg = x.float().reshape(*lead, d // group_size, group_size)
    scale = xg.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_EPS) / FP8_MAX
    x_q = (xg / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(x.shape)
    scale = scale.squeeze(-1)
    if column_major_scales:
        scale = scale.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x_q, scale


def per_token_group_quant_fp8(
    x: torch.Tensor, group_size: int = 128, column_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each `group_size` consecutive channels of each row to e4m3 with one fp32 scale.

    Args:
        x: `[..., D]` bfloat16/float16/float32, `D % group_size == 0`.
        group_size: channels per scale (128 in DeepEP's format).
        column_major_scales: return the scales with their last two dims stored transposed (a
            `.transpose(-1, -2).contiguous().transpose(-1, -2)` view), as DeepEP low-latency FP8
            delivers them; needs `x.dim() >= 2`.
    Returns:
        x_q: `[..., D]` float8_e4m3fn; scales: `[..., D / group_size]` float32 (x ~= x_q * scale).
    """
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., D]")
    _check_group("x", x.shape[-1], group_size, "last dim D")
    if column_major_scales and x.dim() < 2:
        raise ValueError(f"column_major_scales=True needs x with >= 2 dims, got shape {tuple(x.shape)}")
    if x.is_cuda:
        return _per_token_group_quant_fp8_triton(x, group_size, column_major_scales)
    return _per_token_group_quant_fp8_torch(x, group_size, column_major_scales)


def per_token_group_dequant_fp8(
    x_q: torch.Tensor, scales: torch.Tensor, group_size: int = 128, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of `per_token_group_quant_fp8`: `x_q [..., D]` e4m3, `scales [..., D/group_size]` fp32
    (any strides) -> `[..., D]` `out_dtype`."""
    if x_q.dtype != FP8_DTYPE:
        raise ValueError(f"x_q.dtype must be float8_e4m3fn, got {x_q.dtype}")
    _check_group("x_q", x_q.shape[-1], group_size, "last dim D")
    expect = (*x_q.shape[:-1], x_q.shape[-1] // group_size)
    if tuple(scales.shape) != expect:
        raise ValueError(
            f"scales shape must be {expect} for x_q {tuple(x_q.shape)}, got {tuple(scales.shape)}"
        )
    if scales.dtype != torch.float32:
        raise ValueError(f"scales.dtype must be float32, got {scales.dtype}")
    xg = x_q.float().reshape(*expect, group_size) * scales.unsqueeze(-1)
    return xg.reshape(x_q.shape).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Per-tensor FP8
# --------------------------------------------------------------------------------------------------


def per_tensor_quant_fp8(
    x: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the whole tensor with one fp32 scale.

    Args:
        x: any shape, bfloat16/float16/float32.
        scale: optional 1-element float32 tensor; when None it is computed on x's device as
            `max(amax(x), 1e-10) / 448` (no host sync).
    Returns: x_q float8_e4m3fn (x's shape) and scale `[1]` float32 on x's device.
    """
    _check_float("x", x)
    if scale is None:
        amax = x.abs().amax() if x.numel() else torch.zeros((), device=x.device)
        scale = (amax.float().clamp_min(SCALE_EPS) / FP8_MAX).reshape(1)
    else:
        if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
            raise ValueError("scale must be a 1-element float32 tensor or None")
        if scale.dtype != torch.float32:
            raise ValueError(f"scale.dtype must be float32, got {scale.dtype}")
        if scale.device != x.device:
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}")
        scale = scale.reshape(1)
    x_q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_q, scale


# --------------------------------------------------------------------------------------------------
# 128x128 block FP8 weights
# --------------------------------------------------------------------------------------------------


def _pad_last2(w: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    n, k = w.shape[-2:]
    pn, pk = (-n) % block_n, (-k) % block_k
    if pn or pk:
        w = torch.nn.functional.pad(w, (0, pk, 0, pn))
    return w


def quantize_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise weights to e4m3 with one fp32 scale per `block x block` tile.

    Args:
        w: `[..., N, K]` bfloat16/float16/float32 (N, K need not be multiples of `block`).
    Returns: w_q `[..., N, K]` float8_e4m3fn and scale `[..., ceil(N/block), ceil(K/block)]` float32
        with scale = max(amax(tile), 1e-10) / 448.
    """
    _check_float("w", w)
    if w.dim() < 2:
        raise ValueError(f"w must be [..., N, K], got shape {tuple(w.shape)}")
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    n, k = w.shape[-2:]
    lead = w.shape[:-2]
    wp = _pad_last2(w.float(), block, block)
    nb, kb = wp.shape[-2] // block, wp.shape[-1] // block
    t = wp.reshape(*lead, nb, block, kb, block)
    scale = t.abs().amax(dim=(-3, -1)).clamp_min(SCALE_EPS) / FP8_MAX  # [..., nb, kb]
    q = (t / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*lead, nb * block, kb * block)[..., :n, :k].contiguous()
    return q, scale


def dequantize_fp8_block(
    w_q: torch.Tensor, scale: torch.Tensor, block: int = 128, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize_fp8_block`: `[..., N, K]` e4m3 and `[..., ceil(N/b), ceil(K/b)]` fp32 ->
    `[..., N, K]` `out_dtype`."""
    if w_q.dtype != FP8_DTYPE:
        raise ValueError(f"w_q.dtype must be float8_e4m3fn, got {w_q.dtype}")
    n, k = w_q.shape[-2:]
    expect = (*w_q.shape[:-2], cdiv(n, block), cdiv(k, block))
    if tuple(scale.shape) != expect:
        raise ValueError(f"scale shape must be {expect} for w_q {tuple(w_q.shape)}, got {tuple(scale.shape)}")
    s = scale.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :n, :k]
    return (w_q.float() * s).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# INT4 packing and W4A8 weights
# --------------------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] two per byte: `[..., K]` int8 -> `[..., K/2]` uint8,
    low nibble = even k, high nibble = odd k (two's complement nibbles)."""
    if q.dtype != torch.int8:
        raise ValueError(f"q.dtype must be int8, got {q.dtype}")
    if q.dim() < 1 or q.shape[-1] % 2:
        raise ValueError(f"q last dim K must be even, got shape {tuple(q.shape)}")
    u = q.to(torch.uint8) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: `[..., K/2]` uint8 -> `[..., K]` int8 in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed.dtype must be uint8, got {packed.dtype}")
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    both = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(both > 7, both - 16, both)


def quantize_w4a8(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 weights with one fp32 scale per (row, `group_size` channels of K).

    Args:
        w: `[..., N, K]` bfloat16/float16/float32, `K % group_size == 0`.
    Returns: w_packed `[..., N, K/2]` uint8 (see `pack_int4`) and w_scale `[..., N, K/group_size]`
        float32 with scale = max(amax, 1e-10) / 7 and q = clamp(round(w / scale), -8, 7).
    """
    _check_float("w", w)
    if w.dim() < 2:
        raise ValueError(f"w must be [..., N, K], got shape {tuple(w.shape)}")
    _check_group("w", w.shape[-1], group_size, "last dim K")
    if group_size % 2:
        raise ValueError(f"group_size must be even, got {group_size}")
    k = w.shape[-1]
    wg = w.float().reshape(*w.shape[:-1], k // group_size, group_size)
    scale = wg.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_EPS) / INT4_MAX
    q = torch.round(wg / scale).clamp(INT4_MIN, INT4_MAX).to(torch.int8).reshape(w.shape)
    return pack_int4(q), scale.squeeze(-1)


def dequantize_w4a8(
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int = 128,
    out_dtype: torch.dtype = torch.float32,
    fold_fp16: bool = False,
) -> torch.Tensor:
    """Inverse of `quantize_w4a8`: `[..., N, K/2]` uint8, `[..., N, K/group_size]` fp32 -> `[..., N, K]`.

    fold_fp16: each weight as an fp16 multiply forms it, fp16(q * fp16(scale)) (the masked w4a8
    kernel's `FOLD_SCALE`), instead of q * scale in fp32."""
    q = unpack_int4(w_packed)
    k = q.shape[-1]
    _check_group("w_packed", k, group_size, "unpacked last dim K")
    expect = (*q.shape[:-1], k // group_size)
    if tuple(w_scale.shape) != expect:
        raise ValueError(f"w_scale shape must be {expect}, got {tuple(w_scale.shape)}")
    scale = w_scale.float()
    if fold_fp16:
        scale = scale.to(torch.float16).float()
    wg = q.float().reshape(*expect, group_size) * scale.unsqueeze(-1)
    if fold_fp16:
        wg = wg.to(torch.float16).float()  # q * fp16(scale) is exact in fp32: one rounding, as the GPU's
    return wg.reshape(q.shape).to(out_dtype)
