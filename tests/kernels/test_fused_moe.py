"""fused_moe under the Triton interpreter against float64 torch references (tiny shapes).

Tolerances (normwise relative error vs the float64 reference with the same activation quantisation):
bf16 1e-2 (bf16 operands, bf16-rounded SiLU*mul activation); fp8_block and w4a8 3e-2 (the reference
and the kernel may round a handful of activations to neighbouring fp8 values). The reference rounds
to bf16 the way the backend does (`tests.kernels.rounding`: the interpreter truncates); worst of 6
seeds per case then: bf16 0.46 of its tolerance (was 0.90 with round-to-nearest), fp8/w4a8 <= 0.13.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ep_runtime.kernels import fused_moe as fm
from ep_runtime.kernels.quant import (
    dequantize_fp8_block,
    dequantize_w4a8,
    per_token_group_dequant_fp8,
    per_token_group_quant_fp8,
    quantize_fp8_block,
    quantize_w4a8,
)
from tests.kernels.rounding import backend_bf16


def make_weights(num_experts, inter, hidden, scheme, device="cpu", std=0.1):
    """Random expert weights in the scheme's format plus their dequantised float32 values.

    Returns (w13, w13_scale, w2, w2_scale, w13_f32, w2_f32)."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=device) * std
    w2 = torch.randn(num_experts, hidden, inter, device=device) * std
    if scheme == "bf16":
        w13, w2 = w13.bfloat16(), w2.bfloat16()
        return w13, None, w2, None, w13.float(), w2.float()
    if scheme == "fp8_block":
        q13, s13 = quantize_fp8_block(w13)
        q2, s2 = quantize_fp8_block(w2)
        return q13, s13, q2, s2, dequantize_fp8_block(q13, s13), dequantize_fp8_block(q2, s2)
    q13, s13 = quantize_w4a8(w13)
    q2, s2 = quantize_w4a8(w2)
    return q13, s13, q2, s2, dequantize_w4a8(q13, s13), dequantize_w4a8(q2, s2)


def ref_moe(x, x_scale, w13_f, w2_f, topk_ids, topk_weights, scheme):
    """float64 reference with the kernel's activation semantics: fp8 schemes quantise x per token
    group (unless it arrives as fp8) and the bf16-rounded SiLU*mul activation per token group. It
    rounds to bf16 where the kernel does, the way the backend does (`backend_bf16`)."""
    if x.dtype == torch.float8_e4m3fn:
        xa = per_token_group_dequant_fp8(x, x_scale, out_dtype=torch.float32)
        if scheme == "bf16":
            xa = backend_bf16(xa).float()
    elif scheme == "bf16":
        xa = x.float()
    else:
        q, s = per_token_group_quant_fp8(x)
        xa = per_token_group_dequant_fp8(q, s, out_dtype=torch.float32)
    xa = xa.double()
    T, D = x.shape
    inter = w2_f.shape[2]
    out = torch.zeros(T, D, dtype=torch.float64, device=x.device)
    for e in range(w13_f.shape[0]):
        t, k = torch.nonzero(topk_ids == e, as_tuple=True)
        if t.numel() == 0:
            continue
        h = xa[t] @ w13_f[e].double().t()
        g, u = h[:, :inter], h[:, inter:]
        act = backend_bf16(g * torch.sigmoid(g) * u)
        if scheme != "bf16":
            q, s = per_token_group_quant_fp8(act)
            act = per_token_group_dequant_fp8(q, s, out_dtype=torch.float32)
        y = act.double() @ w2_f[e].double().t()
        out.index_add_(0, t, y * topk_weights[t, k].double()[:, None])
    return out


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def random_routing(T, K, num_experts, device="cpu", skip_frac=0.0):
    """Distinct experts per token; a fraction of slots set to -1."""
    ids = (
        torch.rand(T, num_experts, device=device).argsort(dim=1)[:, :K].long()
        if T
        else torch.empty(0, K, dtype=torch.long, device=device)
    )
    if skip_frac:
        ids = torch.where(torch.rand(ids.shape, device=device) < skip_frac, -1, ids)
    w = torch.rand(T, K, device=device) + 0.1
    return ids, w.float()


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


TOL = {"bf16": 1e-2, "fp8_block": 3e-2, "w4a8": 3e-2}


def tiny_config(scheme, block_m=16, block_n=32, block_k=32):
    bk = block_k if scheme == "bf16" else 128
    g = dict(BLOCK_N=block_n, BLOCK_K=bk, GROUP_M=2, num_warps=4, num_stages=2)
    return dict(BLOCK_M=block_m, gate_up=dict(g), down=dict(g))


@contextlib.contextmanager
def poisoned_empty():
    """Every float torch.empty inside the block comes back NaN-filled (catches unwritten, then read, rows)."""
    orig = torch.empty

    def empty(*args, **kwargs):
        t = orig(*args, **kwargs)
        if t.is_floating_point() and t.dtype != torch.float8_e4m3fn:
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = orig


def run_case(
    T, K, L, D, inter, scheme, *, fused=None, fp8_input=False, skip_frac=0.2, config=None, dead_row=True
):
    w13, s13, w2, s2, w13_f, w2_f = make_weights(L, inter, D, scheme)
    ids, w = random_routing(T, K, L, skip_frac=skip_frac)
    if dead_row and T > 1:
        ids[T // 2] = -1  # a token none of whose experts is local: its row must be exactly 0
    x = torch.randn(T, D).bfloat16()
    x_scale = None
    if fp8_input:
        x, x_scale = per_token_group_quant_fp8(x)
    with poisoned_empty():
        out = fm.fused_moe(
            x,
            w13,
            w2,
            ids,
            w,
            scheme=scheme,
            x_scale=x_scale,
            w13_scale=s13,
            w2_scale=s2,
            fused_topk_sum=fused,
            config=config or tiny_config(scheme),
        )
    ref = ref_moe(x, x_scale, w13_f, w2_f, ids, w, scheme)
    assert out.shape == (T, D) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    if T:
        err = rel_err(out, ref)
        assert err < TOL[scheme], f"{scheme} rel err {err}"
    dead = (ids < 0).all(dim=1)
    assert (out[dead] == 0).all()
    return out, ref


def outputs_of(configs, T, K, D, inter, scheme, fused, L=3):
    """fused_moe's fp32 outputs for each config on the same fresh inputs (NaN-poisoned buffers)."""
    w13, s13, w2, s2, _, _ = make_weights(L, inter, D, scheme)
    ids, w = random_routing(T, K, L)
    x = torch.randn(T, D).bfloat16()
    kw = dict(scheme=scheme, w13_scale=s13, w2_scale=s2, fused_topk_sum=fused, out_dtype=torch.float32)
    with poisoned_empty():
        return [fm.fused_moe(x, w13, w2, ids, w, config=c, **kw) for c in configs]


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_odd_sizes(rng_seed, fused):
    # D, I not multiples of the blocks; E = 3 (not a power of two); -1 slots; a dead row.
    run_case(T=9, K=3, L=3, D=72, inter=40, scheme="bf16", fused=fused)


def test_bf16_fused_matches_unfused(rng_seed):
    L, inter, D, T, K = 5, 48, 64, 11, 4
    w13, _, w2, _, _, _ = make_weights(L, inter, D, "bf16")
    ids, w = random_routing(T, K, L, skip_frac=0.1)
    x = torch.randn(T, D).bfloat16()
    cfg = tiny_config("bf16")
    a = fm.fused_moe(x, w13, w2, ids, w, fused_topk_sum=True, out_dtype=torch.float32, config=cfg)
    b = fm.fused_moe(x, w13, w2, ids, w, fused_topk_sum=False, out_dtype=torch.float32, config=cfg)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # fp32 accumulation, one bf16 rounding at the end: the bf16 result is the fp32 one rounded.
    c = fm.fused_moe(x, w13, w2, ids, w, fused_topk_sum=True, out_dtype=torch.bfloat16, config=cfg)
    torch.testing.assert_close(c, a.bfloat16(), rtol=0, atol=0)


def test_bf16_k2_default_unfused_and_fp8_input(rng_seed):
    # K = 2: the default is the unfused sum; x arrives in DeepEP's fp8 format and is dequantised first.
    run_case(T=6, K=2, L=4, D=128, inter=48, scheme="bf16", fp8_input=True)


def test_bf16_t0_t1_and_all_on_one_expert(rng_seed):
    run_case(T=0, K=2, L=3, D=40, inter=24, scheme="bf16")
    run_case(T=1, K=2, L=3, D=40, inter=24, scheme="bf16", skip_frac=0.0)
    L, inter, D, T = 3, 24, 40, 20
    w13, _, w2, _, w13_f, w2_f = make_weights(L, inter, D, "bf16")
    ids = torch.full((T, 1), 1, dtype=torch.long)
    w = torch.rand(T, 1)
    x = torch.randn(T, D).bfloat16()
    out = fm.fused_moe(x, w13, w2, ids, w, config=tiny_config("bf16", block_m=8))
    assert rel_err(out, ref_moe(x, None, w13_f, w2_f, ids, w, "bf16")) < TOL["bf16"]


def test_bf16_default_config(rng_seed):
    run_case(T=3, K=3, L=4, D=64, inter=32, scheme="bf16", config=fm.get_config(3, 3, 4, 32, 64, "bf16"))


@pytest.mark.parametrize("fused", [False, True])
def test_fp8_block(rng_seed, fused):
    run_case(T=7, K=3, L=3, D=256, inter=128, scheme="fp8_block", fused=fused)


def test_fp8_block_fp8_input(rng_seed):
    run_case(T=5, K=3, L=3, D=128, inter=256, scheme="fp8_block", fp8_input=True)


MASKED_MLP = {
    "MASKED": True,
    "masked": [{"MLP": dict(BLOCK_M=16, BLOCK_N1=32, BLOCK_N2=32, num_warps=4)}, None],
}


@pytest.mark.parametrize(
    "scheme,fp8_input,config",
    [
        ("bf16", False, {"MASKED": True}),
        ("bf16", True, {"MASKED": True}),
        ("bf16", False, MASKED_MLP),
        ("fp8_block", False, {"MASKED": True}),
        ("fp8_block", True, MASKED_MLP),
    ],
    ids=["bf16", "bf16-fp8x", "bf16-mlp", "fp8", "fp8-fp8x-mlp"],
)
def test_masked_decode_path(rng_seed, scheme, fp8_input, config):
    """Decode through the masked layout (scatter, masked expert MLP, combine): -1 slots, a token with
    no local expert (exactly 0), E not a power of two."""
    D, inter = (72, 40) if scheme == "bf16" and not fp8_input else (256, 128)
    run_case(T=6, K=3, L=5, D=D, inter=inter, scheme=scheme, fp8_input=fp8_input, config=config)


def test_masked_decode_path_duplicate_experts_and_t1(rng_seed):
    """A token that lists one expert twice gets it twice (both weights), through one row of the masked
    layout; T = 1; against the sorted-layout path."""
    L, inter, D = 4, 32, 64
    w13, _, w2, _, w13_f, w2_f = make_weights(L, inter, D, "bf16")
    ids = torch.tensor([[2, 0, 2], [1, 2, -1], [3, 3, 3]])
    w = torch.rand(3, 3) + 0.1
    x = torch.randn(3, D).bfloat16()
    with poisoned_empty():
        out = fm.fused_moe(x, w13, w2, ids, w, config={"MASKED": True})
    ref = ref_moe(x, None, w13_f, w2_f, ids, w, "bf16")
    assert rel_err(out, ref) < TOL["bf16"]
    sorted_path = fm.fused_moe(x, w13, w2, ids, w, fused_topk_sum=False, config=tiny_config("bf16"))
    torch.testing.assert_close(out, sorted_path, rtol=1e-2, atol=1e-2)
    one = fm.fused_moe(x[:1], w13, w2, ids[:1], w[:1], config={"MASKED": True})
    torch.testing.assert_close(one, out[:1], rtol=0, atol=0)


def test_masked_decode_path_errors():
    L, inter, D = 2, 32, 64
    w13, _, w2, _, _, _ = make_weights(L, inter, D, "bf16")
    ids, w = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    x = torch.randn(2, D).bfloat16()
    with pytest.raises(ValueError, match="sums the top-k outputs unfused"):
        fm.fused_moe(x, w13, w2, ids, w, fused_topk_sum=True, config={"MASKED": True})
    with pytest.raises(ValueError, match="MASKED.*must be true or false"):
        fm.fused_moe(x, w13, w2, ids, w, config={"MASKED": "yes"})


@pytest.mark.parametrize("fused", [False, True])
def test_w4a8(rng_seed, fused):
    kw = dict(T=6, K=3, L=3, D=256, inter=128, scheme="w4a8", fused=fused, fp8_input=fused)
    cfg = tiny_config("w4a8")
    plain, _ = run_case(**kw, config=cfg)
    # The bit-built int4 -> e4m3 unpack (a tuned-table option) gives the same weights. Same inputs
    # again (same seed): the same bits unfused; fused, the fp32 atomic adds may land in another
    # order on a GPU, so within one bf16 rounding.
    torch.manual_seed(rng_seed)
    magic_cfg = {k: (dict(v, INT4_MAGIC=1) if isinstance(v, dict) else v) for k, v in cfg.items()}
    magic, _ = run_case(**kw, config=magic_cfg)
    if fused:
        torch.testing.assert_close(magic, plain, rtol=8e-3, atol=1e-3)
    else:
        assert torch.equal(magic, plain)


@pytest.mark.parametrize(
    "scheme, D, inter, block_n",
    [("bf16", 72, 40, 16), ("fp8_block", 256, 256, 64), ("w4a8", 256, 128, 32)],
)
def test_merged_gate_up_tile(rng_seed, scheme, D, inter, block_n):
    # MERGE_GU: one [BLOCK_K, 2*BLOCK_N] gate|up weight tile per K step; I not a multiple of BLOCK_N
    # (bf16) and fp8 block scales that differ between the gate and up halves of the tile.
    cfg = tiny_config(scheme, block_n=block_n)
    cfg["gate_up"]["MERGE_GU"] = True
    run_case(T=7, K=3, L=3, D=D, inter=inter, scheme=scheme, config=cfg)


@pytest.mark.parametrize(
    "scheme, D, inter, K, fused, split",
    [
        ("bf16", 72, 104, 3, True, 3),  # 4 K tiles of 32 (the last one partial) over 3 splits
        ("bf16", 72, 104, 2, None, 2),  # K = 2: the unfused sum, per-slot rows accumulated in fp32
        ("bf16", 64, 40, 3, True, 8),  # more splits asked for than K tiles: empty splits dropped
        ("fp8_block", 256, 384, 3, True, 2),  # 3 K blocks of 128 with their own block scales
        ("w4a8", 256, 256, 3, False, 2),
    ],
)
def test_split_k_down(rng_seed, scheme, D, inter, K, fused, split):
    """SPLIT_K on the down GEMM: every split adds its weighted part atomically. Same result as one
    split (fp32 summation order aside), and the unfused top-k sum keeps one fp32 row per slot."""
    cfg = tiny_config(scheme)
    cfg["down"]["SPLIT_K"] = split
    out, ref = run_case(T=7, K=K, L=3, D=D, inter=inter, scheme=scheme, fused=fused, config=cfg)
    one, many = outputs_of([tiny_config(scheme), cfg], 5, K, D, inter, scheme, fused)
    # the unfused one-split path rounds each slot's output to out_dtype (fp32 here): same sums
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "D, inter, block_n, split, fused, fp8_input",
    [
        (384, 256, 32, 1, True, False),  # gate_up 3 K tiles (PRELOAD 4, one column masked), down 2
        (384, 256, 64, 2, True, True),  # down split in two: each split preloads its own K range
        (256, 384, 128, 3, False, False),  # one block scale per 128-wide tile; down 3 tiles over 3 splits
    ],
)
def test_fp8_scale_preload(rng_seed, D, inter, block_n, split, fused, fp8_input):
    """SCALE_PRELOAD (`fused_moe.PRELOAD_NOTE`): the scales of a program's K range loaded before its
    K loop and picked per step in registers give the same bits as loading them per step, against
    the reference too; split K ranges each preload their own."""
    plain = tiny_config("fp8_block", block_n=block_n)
    plain["down"]["SPLIT_K"] = split
    pre = {k: (dict(v, SCALE_PRELOAD=True) if isinstance(v, dict) else v) for k, v in plain.items()}
    run_case(
        T=7, K=3, L=3, D=D, inter=inter, scheme="fp8_block", fused=fused, fp8_input=fp8_input, config=pre
    )
    a, b = outputs_of([plain, pre], 6, 3, D, inter, "fp8_block", fused)
    assert torch.equal(a, b)


def test_scale_preload_config_errors(rng_seed):
    x = torch.randn(2, 256).bfloat16()
    ids, w = random_routing(2, 2, 2)
    for scheme, change, what in (
        ("fp8_block", dict(SCALE_PRELOAD=1), "must be true or false"),
        ("bf16", dict(SCALE_PRELOAD=True), "needs scheme 'fp8_block'"),
        ("fp8_block", dict(SCALE_PRELOAD=True, RESCALE=True), "no RESCALE"),
        ("fp8_block", dict(SCALE_PRELOAD=True, BLOCK_N=256), "BLOCK_N <= 128"),
    ):
        w13, s13, w2, s2, _, _ = make_weights(2, 128, 256, scheme)
        cfg = tiny_config(scheme)
        cfg["down"].update(change)
        with pytest.raises(ValueError, match=what):
            fm.fused_moe(x, w13, w2, ids, w, scheme=scheme, w13_scale=s13, w2_scale=s2, config=cfg)


@pytest.mark.parametrize(
    "scheme, D, inter, band, fused",
    [
        ("bf16", 80, 48, 2, True),  # down: 5 N-blocks of 16 in bands 2, 2, 1; gate_up: 3 in 2, 1
        ("bf16", 80, 48, 1, False),  # one N-block per band, unfused sum (plain stores)
        ("bf16", 48, 40, 7, True),  # a band wider than the N-blocks: one band, as without bands
        ("fp8_block", 256, 256, 1, True),
    ],
)
def test_n_band_program_order(rng_seed, scheme, D, inter, band, fused):
    """N_BAND reorders programs only: every (M-block, N-block) tile still runs exactly once (no
    poisoned row left, within the reference tolerance), with stores bit-identical to the unbanded
    order and atomic sums equal up to fp32 summation order."""
    cfg = tiny_config(scheme, block_n=16 if scheme == "bf16" else 32)
    banded = {**cfg, "gate_up": dict(cfg["gate_up"], N_BAND=band), "down": dict(cfg["down"], N_BAND=band)}
    # 24 tokens x 3 slots over 3 experts: 5 or more M-blocks of 16, so GROUP_M = 2 leaves a partial group
    run_case(T=24, K=3, L=3, D=D, inter=inter, scheme=scheme, fused=fused, config=banded)
    plain, ordered = outputs_of([cfg, banded], 24, 3, D, inter, scheme, fused)
    if fused:
        torch.testing.assert_close(ordered, plain, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(ordered, plain)


def test_n_band_config_errors():
    w13, _, w2, _, _, _ = make_weights(2, 32, 64, "bf16")
    x = torch.randn(3, 64).bfloat16()
    ids, w = random_routing(3, 2, 2)
    for bad in (-1, 1.5, True, "2"):
        cfg = tiny_config("bf16")
        cfg["down"]["N_BAND"] = bad
        with pytest.raises(ValueError, match=r"config\['down'\]\['N_BAND'\] must be an int >= 0"):
            fm.fused_moe(x, w13, w2, ids, w, config=cfg)


def _rescaled(cfg):
    return {**cfg, "gate_up": dict(cfg["gate_up"], RESCALE=True), "down": dict(cfg["down"], RESCALE=True)}


@pytest.mark.parametrize(
    "scheme, D, inter, block_n, extra, fused, fp8_input",
    [
        ("fp8_block", 384, 256, 64, {}, True, False),  # one block scale per tile (scalar rescale)
        ("fp8_block", 256, 384, 32, {"MERGE_GU": True}, False, True),  # gate|up tile: column scales
        ("fp8_block", 256, 256, 256, {}, True, False),  # a tile over two weight blocks: column scales
        ("fp8_block", 256, 256, 64, {"TMA": True}, True, False),
        ("fp8_block", 256, 384, 64, {"SPLIT_K": 2}, True, False),  # each split in its own units
        ("w4a8", 256, 256, 32, {}, False, False),  # per-(row, group) weight scales
    ],
    ids=["fp8-scalar", "fp8-merged", "fp8-bn256", "fp8-tma", "fp8-splitk", "w4a8"],
)
def test_rescaled_accumulator(rng_seed, scheme, D, inter, block_n, extra, fused, fp8_input):
    """RESCALE (the accumulator kept in units of the current K step's scales, the dot accumulating in
    place): within the reference tolerance, and the same sums as the scaled-product path on the same
    inputs up to fp32 rounding (a few activations may round to neighbouring fp8 values, so normwise)."""
    cfg = tiny_config(scheme, block_n=block_n)
    for name, g in (("gate_up", cfg["gate_up"]), ("down", cfg["down"])):
        g.update({k: v for k, v in extra.items() if not (name == "gate_up" and k == "SPLIT_K")})
        if name == "down":
            g.pop("MERGE_GU", None)
    run_case(T=7, K=3, L=3, D=D, inter=inter, scheme=scheme, fused=fused, fp8_input=fp8_input,
             config=_rescaled(cfg))  # fmt: skip
    plain, rescaled = outputs_of([cfg, _rescaled(cfg)], 7, 3, D, inter, scheme, fused)
    assert rel_err(rescaled, plain.double()) < 5e-3


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # SiLU of large gates, as on a GPU
def test_rescaled_accumulator_extreme_and_zero_scales(rng_seed):
    """Scales that jump by 10^12 between K groups, an all-zero activation group given scale 0 and an
    all-zero weight block given scale 0 (a checkpoint may hold either): finite, and within the
    reference tolerance, the zero groups adding nothing (the kernel floors scales at _MIN_SCALE)."""
    T, K, L, D, inter = 6, 3, 3, 384, 256
    w13, s13, w2, s2, _, _ = make_weights(L, inter, D, "fp8_block")
    w13[1, 128:256, 128:256] = 0  # expert 1: an up block of zeros, scale 0
    s13[1, 1, 1] = 0.0
    w13_f, w2_f = dequantize_fp8_block(w13, s13), dequantize_fp8_block(w2, s2)
    ids, w = random_routing(T, K, L)
    x = torch.randn(T, D) * torch.tensor([1e-6, 1.0, 1e6]).repeat_interleave(128)  # per-group magnitudes
    xq, xs = per_token_group_quant_fp8(x.bfloat16())
    xq[2, 128:256] = 0  # token 2: its middle group zero, with scale 0
    xs[2, 1] = 0.0
    cfg = _rescaled(tiny_config("fp8_block", block_n=64))
    with poisoned_empty():
        out = fm.fused_moe(xq, w13, w2, ids, w, scheme="fp8_block", x_scale=xs, w13_scale=s13, w2_scale=s2,
                           config=cfg, out_dtype=torch.float32)  # fmt: skip
    ref = ref_moe(xq, xs, w13_f, w2_f, ids, w, "fp8_block")
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL["fp8_block"]


def test_rescale_config_errors():
    w13, _, w2, _, _, _ = make_weights(2, 32, 64, "bf16")
    x = torch.randn(3, 64).bfloat16()
    ids, w = random_routing(3, 2, 2)
    cfg = tiny_config("bf16")
    cfg["down"]["RESCALE"] = True
    with pytest.raises(
        ValueError, match=r"config\['down'\]\['RESCALE'\] is for schemes 'fp8_block' and 'w4a8'"
    ):
        fm.fused_moe(x, w13, w2, ids, w, config=cfg)
    cfg["down"]["RESCALE"] = 1
    with pytest.raises(ValueError, match=r"config\['down'\]\['RESCALE'\] must be true or false"):
        fm.fused_moe(x, w13, w2, ids, w, config=cfg)


@pytest.mark.parametrize(
    "K, D, dtype", [(2, 1500, torch.bfloat16), (3, 64, torch.float32), (8, 72, torch.float16)]
)
def test_sum_slots_one_launch(rng_seed, K, D, dtype):
    """The unfused top-k sum (one Triton launch): each token's K rows summed in fp32, rounded once;
    D spans two 1024-wide blocks (the second partial) or is not a power of two."""
    T = 5
    c = torch.randn(T * K, D).to(dtype)
    with poisoned_empty():
        out = fm._sum_slots(c, T, K, dtype)
    ref = c.view(T, K, D).double().sum(dim=1)
    assert out.dtype == dtype and out.shape == (T, D)
    # fp32 sum, one rounding: within torch's default tolerance for the dtype (about one unit in the
    # last place; the interpreter's fp32 -> bf16 cast does not round to nearest)
    torch.testing.assert_close(out, ref.to(dtype))


def test_split_k_config_errors():
    L, inter, D, T, K = 4, 32, 64, 3, 3
    w13, _, w2, _, _, _ = make_weights(L, inter, D, "bf16")
    x = torch.randn(T, D).bfloat16()
    ids, w = random_routing(T, K, L)
    cfg = tiny_config("bf16")
    cfg["gate_up"]["SPLIT_K"] = 2
    with pytest.raises(ValueError, match=r"config\['gate_up'\]\['SPLIT_K'\] must be 1"):
        fm.fused_moe(x, w13, w2, ids, w, config=cfg)
    for bad in (0, 1.5, True):
        cfg = tiny_config("bf16")
        cfg["down"]["SPLIT_K"] = bad
        with pytest.raises(ValueError, match=r"config\['down'\]\['SPLIT_K'\] must be an int >= 1"):
            fm.fused_moe(x, w13, w2, ids, w, config=cfg)


@pytest.mark.parametrize("numel, dtype", [(20000, torch.float32), (37, torch.bfloat16), (0, torch.float32)])
def test_gate_up_writes_every_valid_row(rng_seed, numel, dtype):
    """Launch the gate_up GEMM alone into a NaN-poisoned buffer: the row of every position that holds
    a valid slot is written (act is in sorted-position order), padding and tail rows stay untouched.
    Its zero-fill of the down GEMM's output (`zero=`) clears the whole NaN-poisoned buffer, whether
    it spans several store steps per program (20000 elements over this grid's 8 programs) or fewer
    elements than one step; with no buffer it writes nothing else."""
    L, inter, D, T, K = 3, 40, 72, 7, 2
    zero = torch.full((numel,), float("nan"), dtype=dtype)
    w13, _, _, _, w13_f, _ = make_weights(L, inter, D, "bf16")
    ids, _ = random_routing(T, K, L, skip_frac=0.3)
    x = torch.randn(T, D).bfloat16()
    cfg = tiny_config("bf16")
    align = fm.moe_align_block_size(ids, cfg["BLOCK_M"], L)
    sorted_ids = align[0].long()
    act = torch.full((sorted_ids.shape[0], inter), float("nan"), dtype=torch.bfloat16)
    fm._launch_gemm(
        x,
        w13,
        act,
        None,
        None,
        None,
        align,
        n=inter,
        k=D,
        num_slots=T * K,
        top_k=K,
        up_offset=inter,
        scheme="bf16",
        gate_up=True,
        mul_weight=False,
        atomic=False,
        block_m=cfg["BLOCK_M"],
        cfg=cfg["gate_up"],
        zero=zero if numel else None,
    )
    assert (zero == 0).all() and zero.dtype == dtype
    programs = sorted_ids.shape[0] // cfg["BLOCK_M"] * -(-inter // cfg["gate_up"]["BLOCK_N"])
    assert programs == 8 and (numel < 20000 or numel > 2 * programs * fm._ZERO_BLOCK)
    pos = sorted_ids < T * K
    assert int(pos.sum()) == int((ids >= 0).sum())
    assert torch.isfinite(act[pos]).all()
    assert torch.isnan(act[~pos]).all()
    slot = sorted_ids[pos]
    tok = slot // K
    e = ids.reshape(-1)[slot]
    h = torch.einsum("sd,snd->sn", x[tok].double(), w13_f[e].double())
    ref = h[:, :inter] * torch.sigmoid(h[:, :inter]) * h[:, inter:]
    assert rel_err(act[pos], ref) < 1e-2


def _gate_up(x, xs, w13, s13, align, scheme, cfg, act, act_scale, T, K, inter):
    fm._launch_gemm(x, w13, act, xs, s13, None, align, n=inter, k=x.shape[1], num_slots=T * K, top_k=K,
                    up_offset=inter, scheme=scheme, gate_up=True, mul_weight=False, atomic=False,
                    block_m=cfg["BLOCK_M"], cfg=cfg["gate_up"], c_scale=act_scale)  # fmt: skip


@pytest.mark.parametrize(
    "scheme, inter, block_n, extra",
    [
        ("fp8_block", 256, 128, {}),
        ("fp8_block", 384, 256, {}),  # the last N-block half past I: its second group not stored
        ("fp8_block", 256, 128, {"MERGE_GU": True, "RESCALE": True}),
        ("fp8_block", 256, 128, {"TMA": True}),
        ("w4a8", 256, 128, {}),
    ],
    ids=["fp8-128", "fp8-256-partial", "fp8-merged-rescale", "fp8-tma", "w4a8"],
)
def test_gate_up_quantises_its_output(rng_seed, scheme, inter, block_n, extra):
    """QUANT_OUT (fp8 schemes, gate_up N-block of whole 128-groups): the epilogue's e4m3 values and
    per-row group scales are bit for bit what the bf16 epilogue followed by
    `per_token_group_quant_fp8` gives; padding rows (and groups past I) stay unwritten."""
    L, D, T, K = 3, 256, 7, 3
    w13, s13, _, _, _, _ = make_weights(L, inter, D, scheme)
    ids, _ = random_routing(T, K, L, skip_frac=0.2)
    xq, xs = per_token_group_quant_fp8(torch.randn(T, D).bfloat16())
    cfg = tiny_config(scheme, block_n=block_n)
    cfg["gate_up"].update(extra)
    assert fm.quant_act(scheme, cfg["gate_up"])
    align = fm.moe_align_block_size(ids, cfg["BLOCK_M"], L)
    rows = align[0].shape[0]
    act_bf16 = torch.full((rows, inter), float("nan"), dtype=torch.bfloat16)
    plain = dict(cfg["gate_up"], BLOCK_N=64)  # whole groups per N-block never hold at 64: bf16 out
    assert not fm.quant_act(scheme, plain)
    _gate_up(xq, xs, w13, s13, align, scheme, dict(cfg, gate_up=plain), act_bf16, None, T, K, inter)
    act, act_s = fm.gate_up_output(rows, inter, scheme, cfg["gate_up"], "cpu")
    assert act.dtype == torch.float8_e4m3fn and act_s.shape == (rows, inter // 128)
    act.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
    act_s.fill_(float("nan"))
    _gate_up(xq, xs, w13, s13, align, scheme, cfg, act, act_s, T, K, inter)
    pos = align[0].long() < T * K
    want_q, want_s = per_token_group_quant_fp8(act_bf16[pos])
    assert torch.equal(act[pos].view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(act_s[pos], want_s)
    assert (act[~pos].view(torch.uint8) == 0x7F).all() and torch.isnan(act_s[~pos]).all()


@pytest.mark.parametrize("fused", [True, False])
def test_fused_moe_with_quantised_gate_up_output(rng_seed, fused):
    """The whole call with the gate_up epilogue quantising (BLOCK_N 128): within the reference
    tolerance and within fp32 rounding of the same call with a separate quantisation launch."""
    cfg = tiny_config("fp8_block", block_n=128)
    run_case(T=7, K=3, L=3, D=256, inter=256, scheme="fp8_block", fused=fused, config=cfg)
    separate = dict(cfg, gate_up=dict(cfg["gate_up"], BLOCK_N=64))
    q, sep = outputs_of([cfg, separate], 7, 3, 256, 256, "fp8_block", fused)
    assert rel_err(q, sep.double()) < 5e-3


@pytest.mark.parametrize(
    "scheme, D, inter, block_n, fused",
    [("bf16", 72, 40, 16, True), ("bf16", 64, 48, 32, False), ("fp8_block", 256, 256, 64, True)],
)
def test_tma_tiles(rng_seed, scheme, D, inter, block_n, fused):
    # TMA: weight tiles (and the down GEMM's activation tiles) through tensor descriptors; K not a
    # multiple of BLOCK_K (bf16, the descriptor pads with zeros), I not a multiple of BLOCK_N (rows
    # past an expert's N read its neighbour's and are masked), fp8 with one block scale per tile.
    cfg = tiny_config(scheme, block_n=block_n)
    for name in ("gate_up", "down"):
        cfg[name]["TMA"] = True
    run_case(T=9, K=3, L=3, D=D, inter=inter, scheme=scheme, fused=fused, config=cfg)


@pytest.mark.parametrize("with_scale", [False, True])
def test_gather_sorted_rows(rng_seed, with_scale):
    """Rows (and scale rows) land at their sorted positions; padding positions stay unwritten."""
    T, K, L, D = 11, 3, 4, 200
    ids, _ = random_routing(T, K, L, skip_frac=0.3)
    x = torch.randn(T, D)
    scale = torch.rand(T, 3).t().contiguous().t() if with_scale else None  # column-major, as DeepEP's
    align = fm.moe_align_block_size(ids, 16, L)
    with poisoned_empty():
        out, out_scale = fm.gather_sorted_rows(x, scale, align, T * K, K)
    sorted_ids = align[0].long()
    pos = sorted_ids < T * K
    assert out.shape == (sorted_ids.shape[0], D)
    assert torch.equal(out[pos], x[sorted_ids[pos] // K])
    assert torch.isnan(out[~pos]).all()
    if with_scale:
        assert torch.equal(out_scale[pos], scale[sorted_ids[pos] // K])
        assert torch.isnan(out_scale[~pos]).all()
    else:
        assert out_scale is None


def test_tma_falls_back_to_pointers_where_tma_cannot_address():
    """A weight view that is not contiguous gets no descriptor (pointer loads, same result)."""
    t = torch.randn(4, 64).bfloat16()
    assert fm._descriptor(t, 16, 32) is not None
    assert fm._descriptor(t[:, :40].t(), 16, 32) is None  # last dim strided
    assert fm._descriptor(torch.randn(4, 36).bfloat16()[:, :35], 16, 32) is None  # 70-byte rows


def test_config_table_lookup(tmp_path):
    table = {
        "cpu": {
            fm.shape_key(4, 32, 64, "bf16"): {"16": tiny_config("bf16", 16), "256": tiny_config("bf16", 64)}
        }
    }
    p = tmp_path / "t.json"
    p.write_text(__import__("json").dumps(table))
    assert fm.get_config(10, 2, 4, 32, 64, "bf16", path=p)["BLOCK_M"] == 16
    assert fm.get_config(200, 2, 4, 32, 64, "bf16", path=p)["BLOCK_M"] == 64
    assert fm.get_config(64, 2, 4, 32, 64, "bf16", path=p)["BLOCK_M"] == 64  # a tie: the larger bucket
    assert fm.nearest_bucket(["128", "2048", "16"], 512) == "2048"
    assert fm.nearest_bucket(["2048", "128"], 511) == "128"
    assert fm.get_config(10, 2, 4, 32, 96, "bf16", path=p) == fm.heuristic_config(10, 2, 4, "bf16")


def test_errors():
    L, inter, D, T, K = 2, 128, 128, 3, 2
    w13, s13, w2, s2, _, _ = make_weights(L, inter, D, "fp8_block")
    b13, _, b2, _, _, _ = make_weights(L, inter, D, "bf16")
    x = torch.randn(T, D).bfloat16()
    ids, w = random_routing(T, K, L)
    with pytest.raises(ValueError, match="scheme"):
        fm.fused_moe(x, b13, b2, ids, w, scheme="int8")
    with pytest.raises(ValueError, match="w13_scale is required"):
        fm.fused_moe(x, w13, w2, ids, w, scheme="fp8_block")
    with pytest.raises(ValueError, match="w13.dtype"):
        fm.fused_moe(x, b13, b2, ids, w, scheme="fp8_block", w13_scale=s13, w2_scale=s2)
    with pytest.raises(ValueError, match="w2 shape"):
        fm.fused_moe(x, b13, b2[:, :, :64], ids, w)
    with pytest.raises(ValueError, match="x.dtype"):
        fm.fused_moe(x.float(), b13, b2, ids, w)
    with pytest.raises(ValueError, match="x_scale"):
        fm.fused_moe(x.to(torch.float8_e4m3fn), b13, b2, ids, w)
    with pytest.raises(ValueError, match="topk_ids"):
        fm.fused_moe(x, b13, b2, ids[:2], w[:2])
    with pytest.raises(ValueError, match="topk_weights"):
        fm.fused_moe(x, b13, b2, ids, w.double())
    with pytest.raises(ValueError, match="out_dtype"):
        fm.fused_moe(x, b13, b2, ids, w, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="multiples of 128"):
        o13, o13s, o2, o2s, _, _ = make_weights(L, 64, D, "fp8_block")
        fm.fused_moe(x, o13, o2, ids, w, scheme="fp8_block", w13_scale=o13s, w2_scale=o2s)
    with pytest.raises(ValueError, match="BLOCK_K"):
        fm.fused_moe(
            x,
            w13,
            w2,
            ids,
            w,
            scheme="fp8_block",
            w13_scale=s13,
            w2_scale=s2,
            config=tiny_config("bf16")
            | {"gate_up": dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)},
        )


def test_shipped_config_table_is_valid():
    """Every tuned entry in kernels/configs/fused_moe.json passes the launcher's config check."""
    table = fm._load_table(str(fm.CONFIG_DIR / "fused_moe.json"))
    assert table, "the tuned table is missing"
    for dev, shapes in table.items():
        for key, buckets in shapes.items():
            scheme = next(s for s in fm.SCHEMES if key.endswith("_" + s))
            for bucket, cfg in buckets.items():
                assert int(bucket) in fm.T_BUCKETS, (dev, key, bucket)
                fm._check_config(cfg, scheme)
