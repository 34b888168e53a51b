# ruff: noqa: E741  (I is the intermediate size, DESIGN.md)
"""Masked grouped GEMM / expert MLP (low-latency layout) against torch references.

Every case poisons the invalid rows of the input with NaN (they must never be read) and fills the
outputs with NaN first (the kernels allocate with torch.empty; valid rows must all be written, so a
NaN left there fails the check). Counts include 0 and M.

Tolerances (relative to the reference's max |value| per expert, `_close`). The references round
float32 to bf16 where the kernels do, and the way the backend does (`backend_bf16`: Triton's CPU
interpreter truncates, the GPU rounds to nearest even); without that, the interpreter's one-sided
truncation alone used up 90% of the bf16 tolerance on some seeds. Worst of 25 seeds, interpreter:
- bf16: 2e-2 (bf16 operands, fp32 accumulation in another order, which can move the bf16
  intermediate by one ulp); measured <= 0.74e-2.
- fp8_block: 2e-2 (measured <= 0.75e-2). Both sides quantise identically; the kernel's fp32 sums
  differ from the reference's in order, which can flip an e4m3 rounding of the requantised
  intermediate (one e4m3 ulp is 2^-3 relative on that element).
- w4a8: 8e-2 (measured <= 0.73e-2 here; up to 4.7e-2 seen before the rounding was matched). The
  intermediate is rounded to bf16 and then requantised per tensor; a one-ulp bf16 difference
  between kernel and reference (summation order, on the GPU) flips many e4m3 roundings, and small
  elements sit near the bottom of the per-tensor range where an e4m3 step is coarse.
- masked grouped GEMM: 2e-3 (fp32 accumulation over K=256 against float64 on the same operands).
"""

from __future__ import annotations

import os

import pytest
import torch

from ep_runtime.kernels import masked_grouped_gemm as mg
from ep_runtime.kernels.masked_grouped_gemm import (
    _masked_amax,
    _masked_tensor_quant,
    masked_grouped_gemm,
    masked_moe,
    masked_moe_reference,
)
from ep_runtime.kernels.quant import (
    FP8_DTYPE,
    dequantize_w4a8,
    per_token_group_dequant_fp8,
    per_token_group_quant_fp8,
    quantize_fp8_block,
    quantize_w4a8,
)
from tests.kernels.rounding import backend_bf16

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()), reason="needs GPU or interpreter"
)


def _poison_rows(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    for e, c in enumerate(counts.tolist()):
        if x.dtype == FP8_DTYPE:
            x.view(torch.uint8)[e, c:] = 0x7F  # e4m3 NaN
        else:
            x[e, c:] = float("nan")
    return x


def _close(out: torch.Tensor, ref: torch.Tensor, counts: torch.Tensor, rtol: float) -> None:
    for e, c in enumerate(counts.tolist()):
        o, r = out[e, :c].float().cpu(), ref[e, :c].float().cpu()
        assert not torch.isnan(o).any(), f"expert {e}: NaN in valid rows (unwritten or read poison)"
        if c == 0:
            continue
        err = (o - r).abs().max().item()
        scale = r.abs().max().item() + 1e-6
        assert err <= rtol * scale, f"expert {e}: max err {err:.3g} vs max |ref| {scale:.3g} (rtol {rtol})"


def _assert_not_written(out: torch.Tensor, counts: torch.Tensor) -> None:
    """Rows >= counts[e] still hold the poison bytes: the kernels did no work for them."""
    for e, c in enumerate(counts.tolist()):
        assert bool((out[e, c:].reshape(-1).view(torch.uint8) == 0xFF).all()), (
            f"expert {e}: rows >= {c} written"
        )


def _weights(L, I, D, scale=0.08):
    w13 = (torch.randn(L, 2 * I, D) * scale).to(torch.bfloat16).to(DEVICE)
    w2 = (torch.randn(L, D, I) * scale).to(torch.bfloat16).to(DEVICE)
    return w13, w2


def _w4a8_x_columns(K: int) -> torch.Tensor:
    """For each column of the w4a8 kernel's pre-quantised x, the x column it holds: per 128-group,
    c < 64 the even k = 2 j and c >= 64 the odd k = 2 j + 1, where j is the packed byte the tile's K
    permute (rebuilt here from its reshape/permute, independently of the kernel's index formula)
    moves to position c % 64."""
    j = torch.arange(64).reshape(4, 4, 2, 2).permute(1, 2, 0, 3).reshape(64)
    within = torch.cat([2 * j, 2 * j + 1])
    return torch.cat([g * 128 + within for g in range(K // 128)])


COUNTS = [0, 24, 5]  # empty expert, full expert (M), partial


@pytest.mark.parametrize("x_fp8", [False, True], ids=["x_bf16", "x_fp8_colmajor"])
def test_masked_moe_bf16(rng_seed, poisoned_empty, x_fp8):
    L, M = 3, 24
    D, I = (256, 80) if x_fp8 else (96, 80)  # D, I not multiples of the blocks
    counts = torch.tensor(COUNTS, dtype=torch.int32, device=DEVICE)
    x = torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE)
    w13, w2 = _weights(L, I, D)
    x_scale = None
    if x_fp8:
        x, x_scale = per_token_group_quant_fp8(x, 128, column_major_scales=True)
        assert x_scale.stride(-2) == 1
    x = _poison_rows(x, counts)
    out = masked_moe(x, counts, w13, w2, scheme="bf16", x_scale=x_scale)
    assert out.shape == (L, M, D) and out.dtype == torch.bfloat16
    ref = masked_moe_reference(x, counts, w13, w2, scheme="bf16", x_scale=x_scale, round_bf16=backend_bf16)
    _close(out, ref, counts.cpu(), 2e-2)
    _assert_not_written(out, counts.cpu())


@pytest.mark.parametrize("x_fp8", [False, True], ids=["x_bf16", "x_fp8"])
def test_masked_moe_fp8_block(rng_seed, poisoned_empty, x_fp8):
    L, M, D, I = 3, 24, 256, 128
    counts = torch.tensor(COUNTS, dtype=torch.int32, device=DEVICE)
    x = torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE)
    w13, w2 = _weights(L, I, D)
    w13_q, w13_s = quantize_fp8_block(w13)
    w2_q, w2_s = quantize_fp8_block(w2)
    x_scale = None
    if x_fp8:
        x, x_scale = per_token_group_quant_fp8(x, 128, column_major_scales=True)
    x = _poison_rows(x, counts)
    kw = dict(scheme="fp8_block", x_scale=x_scale, w13_scale=w13_s, w2_scale=w2_s)
    out = masked_moe(x, counts, w13_q, w2_q, **kw)
    ref = masked_moe_reference(x, counts, w13_q, w2_q, round_bf16=backend_bf16, **kw)
    _close(out, ref, counts.cpu(), 2e-2)
    _assert_not_written(out, counts.cpu())


MLP = {
    "one-regime": {"MLP": dict(BLOCK_M=16, BLOCK_N1=32, BLOCK_N2=64, num_warps=4, num_stages=2)},
    "two-regimes": {
        "MLP": dict(BLOCK_M=8, BLOCK_M_BIG=16, BLOCK_N1=32, BLOCK_N2=64, num_warps=4, num_stages=2)
    },
    # fp8_block: h kept bf16, 32 gate_up columns per tile, the down GEMM quantising h per group as it
    # loads it (bf16: h is bf16 anyway)
    "h-bf16": {"MLP": dict(BLOCK_M=16, BLOCK_N1=32, BLOCK_N2=64, num_warps=4, num_stages=2, H_BF16=True)},
}
"""The one-launch expert MLP (`_masked_mlp_kernel`): 16-row blocks, so the full expert (24 rows) has
two m-blocks; or 8-row blocks for experts of at most 8 rows (the 5- and 7-row experts) and 16-row
blocks for the others; 32 gate_up columns per tile (I = 80: three tiles, the last partial)."""


@pytest.mark.parametrize("mlp", list(MLP))
@pytest.mark.parametrize(
    "scheme,x_fp8", [("bf16", False), ("bf16", True), ("fp8_block", True), ("fp8_block", False)]
)
def test_masked_moe_one_launch_mlp(rng_seed, poisoned_empty, scheme, x_fp8, mlp):
    """The persistent one-launch MLP against the reference, twice with other counts: its work queue
    (ticket, finished programs, per-expert done counts) must be left at zero by every launch."""
    L, M = 3, 24
    D, I = (96, 80) if scheme == "bf16" and not x_fp8 else (256, 128)  # fp8: multiples of the group
    w13, w2 = _weights(L, I, D)
    kw = dict(scheme=scheme)
    if scheme == "fp8_block":
        (w13, kw["w13_scale"]), (w2, kw["w2_scale"]) = quantize_fp8_block(w13), quantize_fp8_block(w2)
    for counts_list in (COUNTS, [24, 7, 0]):
        counts = torch.tensor(counts_list, dtype=torch.int32, device=DEVICE)
        x = torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE)
        kw["x_scale"] = None
        if x_fp8:
            x, kw["x_scale"] = per_token_group_quant_fp8(x, 128, column_major_scales=True)
        x = _poison_rows(x, counts)
        out = masked_moe(x, counts, w13, w2, configs=(MLP[mlp], None), **kw)
        # H_BF16 quantises the bf16-rounded intermediate (the reference does the same with h_bf16)
        h_bf16 = bool(MLP[mlp]["MLP"].get("H_BF16"))
        ref = masked_moe_reference(x, counts, w13, w2, round_bf16=backend_bf16, h_bf16=h_bf16, **kw)
        _close(out, ref, counts.cpu(), 2e-2)
        _assert_not_written(out, counts.cpu())


def test_masked_mlp_config_errors(rng_seed):
    L, M, D, I = 2, 8, 96, 80
    w13, w2 = _weights(L, I, D)
    x = torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE)
    counts = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="MLP config needs keys .*missing \\['BLOCK_N2'\\]"):
        masked_moe(x, counts, w13, w2, configs=({"MLP": dict(BLOCK_M=16, BLOCK_N1=32, num_warps=4)}, None))
    bad = dict(MLP["h-bf16"]["MLP"], H_BF16="yes")
    with pytest.raises(ValueError, match="MLP config H_BF16 must be true or false"):
        masked_moe(x, counts, w13, w2, configs=({"MLP": bad}, None))


# w4a8 tiles (token rows BLOCK_M x weight rows BLOCK_N, warps): the default (16-row SMALL tile for the
# partial expert, 64 rows for the full one); 64 weight rows on 8 warps, where the row order of the
# tile is the load order (`_w4a8_rows` leaves it); 128 weight rows, two register row groups.
W4A8_CONFIGS = {
    "default": None,
    "bn64-w8": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=2),
    "bn128-w4": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=2),
    "fold-bn64-w4": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2, FOLD_SCALE=True),
    "fold-bn128-w4": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=2, FOLD_SCALE=True),
}


@pytest.mark.parametrize("cfg", list(W4A8_CONFIGS), ids=list(W4A8_CONFIGS))
def test_masked_moe_w4a8(rng_seed, poisoned_empty, cfg):
    L, M, D, I = 3, 24, 256, 128
    counts = torch.tensor(COUNTS, dtype=torch.int32, device=DEVICE)
    x = _poison_rows(torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE), counts)
    w13, w2 = _weights(L, I, D)
    w13_p, w13_s = quantize_w4a8(w13)
    w2_p, w2_s = quantize_w4a8(w2)
    kw = dict(scheme="w4a8", w13_scale=w13_s, w2_scale=w2_s)
    c = W4A8_CONFIGS[cfg]
    out = masked_moe(x, counts, w13_p, w2_p, configs=(c, c), **kw)
    fold = bool(c and c.get("FOLD_SCALE"))
    ref = masked_moe_reference(x, counts, w13_p, w2_p, round_bf16=backend_bf16, fold_scale=fold, **kw)
    _close(out, ref, counts.cpu(), 8e-2)
    _assert_not_written(out, counts.cpu())


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("bn", [64, 128])
def test_w4a8_gemm_fold_scale_rounds_each_scaled_weight_to_fp16(rng_seed, poisoned_empty, gated, bn):
    """One w4a8 GEMM launch (pre-quantised x, as `masked_moe` feeds it) with and without FOLD_SCALE,
    each against the fp32 product of the same operands: the unfolded kernel multiplies exact int4
    values and scales in fp32; the folded one sees fp16(q * fp16(s)) (`dequantize_w4a8(...,
    fold_fp16=True)`). The references differ by far more than the tolerance here (asserted), so
    each kernel must match its own weights: the scale of each row is applied in the permuted row
    order of the tile, and to every 128-group of K."""
    L, M, K, N = 2, 20, 384, 2 * bn
    counts = torch.tensor([13, 20], dtype=torch.int32, device=DEVICE)
    x = _poison_rows(torch.randn(L, M, K).to(torch.bfloat16).to(DEVICE), counts)
    w = (torch.randn(L, 2 * N if gated else N, K) * 0.05).to(DEVICE)
    w_p, w_s = quantize_w4a8(w)
    w_s = w_s * torch.exp(torch.randn_like(w_s))  # scales spread over ~e^+-3: rounding to fp16 differs
    amax = torch.zeros(2, dtype=torch.float32, device=DEVICE)
    _masked_amax(x, counts, amax[0:1])
    xq = _masked_tensor_quant(x, counts, amax[0:1])
    s_x = (amax[0].clamp_min(1e-10) / 448.0).cpu()
    src = _w4a8_x_columns(K)
    inv = torch.empty_like(src)
    inv[src] = torch.arange(K)
    outs, refs = {}, {}
    for fold in (False, True):
        wf = dequantize_w4a8(w_p, w_s, fold_fp16=fold).cpu()
        out = torch.empty(L, M, N, dtype=torch.bfloat16, device=DEVICE).fill_(float("nan"))
        cfg = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=2, FOLD_SCALE=fold)
        mg._launch(xq, None, w_p, w_s, out, None, counts, N=N, K=K, a_mode=mg.A_FP16_QT, b_mode=mg.B_INT4,
                   out_mode=mg.OUT_AMAX if gated else mg.OUT_PLAIN, gated=gated, up_offset=N if gated else 0,
                   amax_in=amax[0:1], amax_out=amax[1:2], config=cfg)  # fmt: skip
        for e, c in enumerate(counts.tolist()):
            xe = xq[e, :c].float().cpu()[:, inv] * s_x  # back to x's column order
            gu = xe @ wf[e].t()
            refs[(fold, e)] = torch.nn.functional.silu(gu[:, :N]) * gu[:, N:] if gated else gu
            outs[(fold, e)] = out[e, :c].float().cpu()
            assert not torch.isnan(outs[(fold, e)]).any()

    def err(o, ref):  # normwise, against the reference rounded to bf16 as the backend rounds
        return ((o - backend_bf16(ref).float()).norm() / ref.norm()).item()

    for e in range(L):
        # measured <= 1.4e-5 (fp32 summation order flips a rare bf16 rounding); against the other
        # weight form's reference (2.5e-4 away before rounding, which flips a few % of the bf16
        # outputs) 6.9e-4 or more
        own = [err(outs[(f, e)], refs[(f, e)]) for f in (False, True)]
        other = [err(outs[(f, e)], refs[(not f, e)]) for f in (False, True)]
        assert max(own) < 1e-4, own
        assert min(other) > 2 * max(own), (own, other)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2),
        dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=2, SPLIT_K=2),
        dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=2, GRID_M=1),
    ],
    ids=["bn64", "bn128-split2", "bn128-one-lane"],
)
def test_fp8_scale_preload_same_bits(rng_seed, poisoned_empty, cfg):
    """SCALE_PRELOAD (`_masked_acc`): the scales of a K range loaded before the K loop give the same
    bits as loading them per K step (several m-blocks per lane, K splits, 3 K blocks so the preload
    width 4 has a masked column), and match the reference."""
    split = bool(cfg.get("SPLIT_K"))  # a K split needs one m-block per expert: capacity 16
    L, M, D, I = 3, 16 if split else 40, 384, 256
    counts = torch.tensor([0, 16 if split else 37, 9], dtype=torch.int32, device=DEVICE)
    x = torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE)
    xq, xs = per_token_group_quant_fp8(x, 128, column_major_scales=True)
    xq = _poison_rows(xq, counts)
    w13, w2 = _weights(L, I, D)
    (q13, s13), (q2, s2) = quantize_fp8_block(w13), quantize_fp8_block(w2)
    kw = dict(scheme="fp8_block", x_scale=xs, w13_scale=s13, w2_scale=s2)
    pre = dict(cfg, SCALE_PRELOAD=True)
    down = {k: v for k, v in cfg.items() if k != "SPLIT_K"}
    outs = [
        masked_moe(xq, counts, q13, q2, configs=(c, dict(down, SCALE_PRELOAD=c is pre)), **kw)
        for c in (cfg, pre)
    ]
    for e, c in enumerate(counts.tolist()):
        assert torch.equal(outs[0][e, :c], outs[1][e, :c]), e
    ref = masked_moe_reference(xq, counts, q13, q2, **kw)
    _close(outs[1], ref, counts.cpu(), 2e-2)
    _assert_not_written(outs[1], counts.cpu())


def test_scale_preload_config_is_validated(rng_seed):
    L, M, D, I = 1, 4, 128, 128
    counts = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    x = torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE)
    w13, w2 = _weights(L, I, D)
    base = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match="needs fp8 x and fp8_block weights"):
        masked_moe(x, counts, w13, w2, scheme="bf16", configs=(dict(base, SCALE_PRELOAD=True), None))
    (q13, s13), (q2, s2) = quantize_fp8_block(w13), quantize_fp8_block(w2)
    for bad, what in (
        (dict(base, SCALE_PRELOAD="on"), "true or false"),
        (dict(base, BLOCK_N=256, SCALE_PRELOAD=True), "BLOCK_N"),
    ):
        with pytest.raises(ValueError, match=what):  # the down launch (gate_up forces 128-wide tiles)
            masked_moe(
                x, counts, q13, q2, scheme="fp8_block", w13_scale=s13, w2_scale=s2, configs=(None, bad)
            )
    p13, ps13 = quantize_w4a8(w13)
    p2, ps2 = quantize_w4a8(w2)
    with pytest.raises(ValueError, match="SCALE_PRELOAD applies to scheme 'fp8_block' only"):
        masked_moe(x, counts, p13, p2, scheme="w4a8", w13_scale=ps13, w2_scale=ps2,
                   configs=(dict(base, SCALE_PRELOAD=True), None))  # fmt: skip


def test_fold_scale_config_is_validated(rng_seed):
    L, M, D, I = 1, 4, 128, 128
    counts = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    x = torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE)
    w13, w2 = _weights(L, I, D)
    bad = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2, FOLD_SCALE=1)
    with pytest.raises(ValueError, match="FOLD_SCALE must be true or false"):
        w13_p, w13_s = quantize_w4a8(w13)
        w2_p, w2_s = quantize_w4a8(w2)
        masked_moe(x, counts, w13_p, w2_p, scheme="w4a8", w13_scale=w13_s, w2_scale=w2_s, configs=(bad, bad))
    with pytest.raises(ValueError, match="FOLD_SCALE applies to scheme 'w4a8' only"):
        masked_moe(x, counts, w13, w2, scheme="bf16", configs=(dict(bad, FOLD_SCALE=True), None))


def test_masked_amax_reads_valid_rows_only(rng_seed):
    """The per-tensor amax of the w4a8 path: over the valid rows only (the rest hold NaN and a huge
    value, which must not be read), across several D blocks (D not a multiple of the block) and
    m-lanes (37 rows: 5 row blocks over 4 lanes)."""
    L, M, D = 3, 40, 600
    counts = torch.tensor([0, 37, 9], dtype=torch.int32, device=DEVICE)
    x = _poison_rows(torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE), counts)
    x[1, 38, 5] = 1e4
    x[2, 3, 599] = 7.25  # the maximum, in the last column of the last D block
    amax = torch.zeros(1, dtype=torch.float32, device=DEVICE)
    _masked_amax(x, counts, amax)
    want = torch.cat([x[1, :37], x[2, :9]]).float().abs().max()
    assert amax.item() == want.item() == 7.25


def test_masked_tensor_quant_orders_columns_as_the_w4a8_tile(rng_seed, poisoned_empty):
    """The quantisation pass writes x per tensor on the e4m3 grid, valid rows only, and in each
    128-group puts at column c the x column the w4a8 kernel's tile pairs with it: c < 64 the even
    k = 2 j, c >= 64 the odd k = 2 j + 1, where j is the packed byte `_w4a8_tile` moves to position
    c % 64. The order is rebuilt here from the tile's reshape/permute, independently of the
    kernel's index formula."""
    L, M, K = 2, 20, 256
    counts = torch.tensor([13, 0], dtype=torch.int32, device=DEVICE)
    x = _poison_rows(torch.randn(L, M, K).to(torch.bfloat16).to(DEVICE), counts)
    amax = torch.tensor([3.5], dtype=torch.float32, device=DEVICE)
    q = _masked_tensor_quant(x, counts, amax)
    assert q.dtype == torch.float16
    src = _w4a8_x_columns(K)
    scale = torch.tensor(3.5) / 448.0
    valid = x[0, :13].float().cpu()
    want = (valid / scale).clamp(-448, 448).to(FP8_DTYPE).float()[:, src]
    assert torch.equal(q[0, :13].float().cpu(), want)
    assert bool((q[0, 13:].view(torch.uint16) == 0xFFFF).all()) and bool(
        (q[1].view(torch.uint16) == 0xFFFF).all()
    )


@pytest.mark.parametrize("mode", ["bf16", "fp8a_bf16b", "fp8a_fp8b", "bf16a_fp8b"])
def test_masked_grouped_gemm(rng_seed, poisoned_empty, mode):
    L, M, K, N = 3, 24, 256, 72
    counts = torch.tensor([7, 0, 24], dtype=torch.int32, device=DEVICE)
    a = torch.randn(L, M, K).to(torch.bfloat16).to(DEVICE)
    b = (torch.randn(L, N, K) * 0.1).to(torch.bfloat16).to(DEVICE)
    a_scale = b_scale = None
    a_ref, b_ref = a.float(), b.float()
    if mode.startswith("fp8a"):
        a, a_scale = per_token_group_quant_fp8(a, 128)
    if mode == "fp8a_bf16b":
        # The kernel dequantises a to bf16 before the dot; the reference rounds the same way
        # (backend_bf16: the interpreter truncates where the GPU rounds to nearest).
        a_ref = backend_bf16(per_token_group_dequant_fp8(a, a_scale, 128, out_dtype=torch.float32)).float()
    if mode.endswith("fp8b"):
        from ep_runtime.kernels.quant import dequantize_fp8_block

        b, b_scale = quantize_fp8_block(b)
        b_ref = dequantize_fp8_block(b, b_scale)
        # bf16 a is quantised per token group first, exactly as per_token_group_quant_fp8 does
        aq, aq_scale = (a, a_scale) if mode == "fp8a_fp8b" else per_token_group_quant_fp8(a, 128)
        a_ref = per_token_group_dequant_fp8(aq, aq_scale, 128, out_dtype=torch.float32)
    a = _poison_rows(a, counts)
    out = masked_grouped_gemm(a, b, counts, a_scale=a_scale, b_scale=b_scale, out_dtype=torch.float32)
    ref = torch.einsum("lmk,lnk->lmn", a_ref.cpu().double(), b_ref.cpu().double())
    # fp32 accumulation over K=256 against a float64 reference of the same operands.
    _close(out, ref, counts.cpu(), 2e-3)
    _assert_not_written(out, counts.cpu())


def test_masked_errors():
    L, M, D, I = 2, 4, 128, 128
    x = torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE)
    counts = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)
    w13, w2 = _weights(L, I, D)
    with pytest.raises(ValueError, match="scheme must be one of"):
        masked_moe(x, counts, w13, w2, scheme="int8")
    with pytest.raises(ValueError, match="counts must be a"):
        masked_moe(x, counts.long(), w13, w2)
    with pytest.raises(ValueError, match="w13 must be"):
        masked_moe(x, counts, w13[:, :100], w2)
    with pytest.raises(ValueError, match="x_scale is required"):
        masked_moe(x.to(FP8_DTYPE), counts, w13, w2)
    with pytest.raises(ValueError, match="w4a8' takes bfloat16 x"):
        masked_moe(x.to(FP8_DTYPE), counts, w13, w2, scheme="w4a8")
    with pytest.raises(ValueError, match="packed uint8"):
        masked_moe(
            x,
            counts,
            w13,
            w2,
            scheme="w4a8",
            w13_scale=torch.ones(1, device=DEVICE),
            w2_scale=torch.ones(1, device=DEVICE),
        )
    with pytest.raises(ValueError, match="b must be"):
        masked_grouped_gemm(x, w2[:, :, :64], counts)


def test_masked_grouped_gemm_lanes_loop(rng_seed, poisoned_empty):
    """More valid M-blocks than m-lanes: each program walks several blocks (stride GRID_M)."""
    L, M, K, N = 3, 80, 64, 48
    counts = torch.tensor([80, 70, 3], dtype=torch.int32, device=DEVICE)
    a = _poison_rows(torch.randn(L, M, K).to(torch.bfloat16).to(DEVICE), counts.cpu())
    b = (torch.randn(L, N, K) * 0.1).to(torch.bfloat16).to(DEVICE)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2)
    out = masked_grouped_gemm(a, b, counts, out_dtype=torch.float32, config=cfg)
    ref = torch.einsum("lmk,lnk->lmn", torch.nan_to_num(a.double().cpu()), b.double().cpu())
    _close(out, ref, counts.cpu(), 1e-3)
    _assert_not_written(out, counts.cpu())


@pytest.mark.parametrize("split_k", [1, 3], ids=["one_split", "split_k"])
@pytest.mark.parametrize("scheme", ["bf16", "fp8_block", "w4a8"])
def test_masked_moe_small_and_main_tiles(rng_seed, poisoned_empty, scheme, split_k):
    """A config with a SMALL tile: experts with <= MAX_ROWS valid rows go to the small launch, the
    others (including a full expert and one just past the threshold) to the main one; every valid
    row is written once, nothing past the counts, and the result matches the reference.

    split_k: the SMALL tile splits K (3 splits of gate_up's K = 384, 2 of down's K = 256): each
    split's partial goes to a workspace and the last one to arrive reduces; a second call gives the
    same bits (the reduction runs in split order, and each launch leaves its counters at zero)."""
    L, M, D, I = 5, 40, 384, 256
    counts = torch.tensor([0, 3, 8, 9, 40], dtype=torch.int32, device=DEVICE)
    x = _poison_rows(torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE), counts)
    w13, w2 = _weights(L, I, D)
    kw = dict(scheme=scheme)
    if scheme == "w4a8":
        w13, s13 = quantize_w4a8(w13)
        w2, s2 = quantize_w4a8(w2)
        kw.update(w13_scale=s13, w2_scale=s2)
    if scheme == "fp8_block":
        w13, s13 = quantize_fp8_block(w13)
        w2, s2 = quantize_fp8_block(w2)
        kw.update(w13_scale=s13, w2_scale=s2)
    main = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2)
    small = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=2, MAX_ROWS=8, SPLIT_K=split_k)
    cfg = dict(main, SMALL=small)
    out = masked_moe(x, counts, w13, w2, configs=(cfg, cfg), **kw)
    ref = masked_moe_reference(x, counts, w13, w2, round_bf16=backend_bf16, **kw)
    _close(out, ref, counts.cpu(), {"bf16": 2e-2, "fp8_block": 2e-2, "w4a8": 8e-2}[scheme])
    _assert_not_written(out, counts.cpu())
    if split_k > 1:
        again = masked_moe(x, counts, w13, w2, configs=(cfg, cfg), **kw)
        valid = torch.arange(M, device=DEVICE)[None, :] < counts[:, None]
        assert torch.equal(again[valid], out[valid])


def test_split_k_needs_one_row_block_per_expert(rng_seed):
    a = torch.randn(2, 24, 256).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(2, 64, 256).to(torch.bfloat16).to(DEVICE)
    counts = torch.tensor([24, 3], dtype=torch.int32, device=DEVICE)
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2, SPLIT_K=2)
    with pytest.raises(ValueError, match="SPLIT_K=2 needs a launch of at most BLOCK_M=16 rows"):
        masked_grouped_gemm(a, b, counts, config=cfg)
    # within one block (capacity 16): split, and the same product as one split (valid rows)
    counts = counts.clamp(max=16)
    out = masked_grouped_gemm(a[:, :16], b, counts, config=cfg, out_dtype=torch.float32)
    one = masked_grouped_gemm(a[:, :16], b, counts, config=dict(cfg, SPLIT_K=1), out_dtype=torch.float32)
    torch.testing.assert_close(out[0], one[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :3], one[1, :3], rtol=1e-5, atol=1e-5)


def test_split_plan():
    from ep_runtime.kernels.masked_grouped_gemm import _split_plan

    small = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)
    # Mixtral-class decode down GEMM on 132 SMs: 2 experts x 64 n-blocks, K = 14336 (112 blocks):
    # ceil(2 * 132 / 128) = 3 splits of 38 blocks (the last 36)
    assert _split_plan(small, 14336, 16, 128, 132) == (3, 38)
    # tiles fill the SMs already (DeepSeek-V3: 32 experts x 32 n-blocks; Qwen3 gate_up: 192): one split
    assert _split_plan(small, 7168, 16, 1024, 132) == (1, 56)
    assert _split_plan(small, 2048, 16, 192, 132) == (1, 16)
    # at least 16 K blocks per split: Qwen3's gate_up (96 tiles, 16 blocks) stays whole
    assert _split_plan(small, 2048, 16, 96, 132) == (1, 16)
    assert _split_plan(small, 4096, 16, 64, 132) == (2, 16)
    # more rows than one block: never automatic; explicit is an error
    assert _split_plan(small, 14336, 40, 128, 132) == (1, 112)
    with pytest.raises(ValueError, match="SPLIT_K=2"):
        _split_plan(dict(small, SPLIT_K=2), 14336, 40, 128, 132)
    # explicit, capped at one split per K block, empty splits dropped (3 blocks, 4 asked -> 3)
    assert _split_plan(dict(small, SPLIT_K=4), 384, 16, 1, 132) == (3, 1)
    assert _split_plan(dict(small, SPLIT_K=2), 640, 16, 1, 132) == (2, 3)


def test_row_regimes():
    from ep_runtime.kernels.masked_grouped_gemm import _ALL_ROWS, _row_regimes

    plain = dict(BLOCK_M=64, BLOCK_N=64)
    assert _row_regimes(plain, 256) == [(plain, 0, _ALL_ROWS)]
    cfg = dict(plain, SMALL=dict(BLOCK_M=16, BLOCK_N=32, MAX_ROWS=16))
    small = dict(BLOCK_M=16, BLOCK_N=32)
    assert _row_regimes(cfg, 256) == [(small, 0, 16), (plain, 17, _ALL_ROWS)]
    assert _row_regimes(cfg, 16) == [(small, 0, _ALL_ROWS)]  # capacity within the small tile
    assert "SMALL" in cfg and "MAX_ROWS" in cfg["SMALL"]  # the table entry is not mutated


def test_masked_group_quant_matches_the_quantiser_on_valid_rows_only(rng_seed, poisoned_empty):
    """The pass that quantises bf16 x for fp8 weights (masked_moe fp8_block, masked_grouped_gemm
    bf16 a with fp8 b): bit for bit `per_token_group_quant_fp8` on the valid rows, scales laid out
    column-major as DeepEP delivers them, and rows >= counts[e] neither read (NaN there) nor written."""
    from ep_runtime.kernels.masked_grouped_gemm import _masked_group_quant

    L, M, D = 3, 40, 384
    counts = torch.tensor([0, 40, 33], dtype=torch.int32, device=DEVICE)
    x = torch.randn(L, M, D).to(torch.bfloat16).to(DEVICE) * torch.logspace(-3, 2, M)[None, :, None].to(
        DEVICE
    )
    x = _poison_rows(x, counts.cpu())
    q, scales = _masked_group_quant(x, counts)
    assert q.dtype == FP8_DTYPE and scales.shape == (L, M, D // 128) and scales.stride(1) == 1
    for e, c in enumerate(counts.tolist()):
        want_q, want_s = per_token_group_quant_fp8(x[e, :c].float(), 128)
        assert torch.equal(q[e, :c].view(torch.uint8), want_q.view(torch.uint8)), f"expert {e}: values"
        assert torch.equal(scales[e, :c], want_s), f"expert {e}: scales"
        assert bool((q[e, c:].view(torch.uint8) == 0x7F).all()) and bool(scales[e, c:].isnan().all())


def test_table_shape_entries_take_precedence(monkeypatch):
    """A launch takes its GEMM shape's entry (`kind@NxK`) over the kind's general entry; other shapes
    and kinds are unaffected; keys parse with or without the shape suffix."""
    general = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    shaped = dict(general, BLOCK_N=32)
    kind = mg._kind(mg.A_BF16, mg.B_BF16, True)
    table = {kind: general, mg._shape_key(kind, 768, 2048): shaped}
    monkeypatch.setattr(mg, "for_device", lambda *args: table)
    cuda0 = torch.device("cuda", 0)  # the table path; no CUDA call is made with an explicit index
    assert mg._pick_config(mg.A_BF16, mg.B_BF16, True, 1024, cuda0, None, 768, 2048) == shaped
    assert mg._pick_config(mg.A_BF16, mg.B_BF16, True, 1024, cuda0, None, 2048, 7168) == general
    plain = mg._pick_config(mg.A_BF16, mg.B_BF16, False, 1024, cuda0, None, 768, 2048)
    assert plain == mg.heuristic_config(mg.A_BF16, mg.B_BF16, False, 1024)
    assert mg.parse_kind(mg._shape_key(kind, 768, 2048)) == (mg.A_BF16, mg.B_BF16, True)
    assert mg.parse_kind("a5-b2-plain") == (mg.A_FP16_QT, mg.B_INT4, False)


def test_shipped_table_entries_are_launchable():
    """Every entry of the shipped masked table gives launches `_launch_one` accepts (an explicit
    SPLIT_K only on a SMALL tile whose MAX_ROWS fits one m-block) and complete MLP configs."""
    import json

    from ep_runtime.kernels.masked_grouped_gemm import MLP_KEYS, _row_regimes, _split_plan

    devices = json.loads(mg.CONFIG_PATH.read_text())["devices"]
    assert devices
    for dev, kinds in devices.items():
        for kind, cfg in kinds.items():
            mg.parse_kind(kind)
            for M in (16, 1024):
                for rcfg, _, max_rows in _row_regimes(cfg, M):
                    _split_plan(rcfg, 4096, min(M, max_rows), 64, 132)  # raises on a bad SPLIT_K
            if "MLP" in cfg:
                assert set(MLP_KEYS) <= set(cfg["MLP"]), (dev, kind, cfg["MLP"])
