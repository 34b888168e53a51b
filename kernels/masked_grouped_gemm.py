"""Masked grouped GEMM and expert MLP for the low-latency layout.

DeepEP's low-latency dispatch hands each rank `x [L, M, D]` (`M = C*R` rows per local expert) with
`counts [L]` int32: only the first `counts[e]` rows of expert `e` are valid. The kernels here run
one GEMM per expert over the valid rows only. The grid is `(GRID_M, N-blocks, L)` and each program
walks the M-blocks below `cdiv(counts[e], BLOCK_M)`, so rows at or past the count are never read
and time grows with the valid rows, not with M. No host syncs: counts stay on the device.

Two `@triton.jit` GEMM kernels, with compile-time modes:

`_masked_gemm_kernel`, bf16 and fp8 weights:
A (activations):  `bf16`; `fp8 + per-token-group-128 scales` dequantised to bf16 (bf16 weights);
    `fp8 + group scales` with an fp8 dot (fp8_block; bf16 x for fp8 weights is first quantised
    per token group over its valid rows by `_masked_group_quant`).
B (weights):      `bf16`; `fp8 e4m3 + 128x128 block scales`.
Epilogue:         plain store; gated `silu(gate) * up` (gate rows [0, I), up rows [I, 2I) of w13)
    stored bf16, or requantised per-token-group-128 to fp8 + scales.

`_masked_w4a8_kernel`, int4 weights packed two per byte with per-(row, 128-group) scales: the
weights are the register operand of the tensor-core instruction (swap-AB, see the section there),
unpacked in registers to exact fp16; activations are quantised per tensor onto the e4m3 grid by a
pass of their own (`_masked_tensor_quant`, from a device amax). Epilogue: plain or gated store,
and for gate_up the block's amax folded into a device scalar (the down GEMM's per-tensor scale).

Rows >= counts[e] of every output are left UNDEFINED (never written; outputs come from
`torch.empty`). Under TRITON_INTERPRET bf16 operands are upcast to fp32 before `tl.dot` and the
in-kernel fp32->e4m3 cast is done on an exactly representable value rounded in fp32 arithmetic
(the interpreter's own cast mis-rounds); compiled GPU code uses native bf16/fp8 dots and casts.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from .launch import FastLaunch
from .quant import (
    FP8_DTYPE,
    FP8_MAX,
    SCALE_EPS,
    _scales_empty,
    e4m3_scale,
    int4_to_fp16_pair,
    quant_rows_e4m3,
    to_e4m3_grid,
)
from .tables import (
    arrival_counters,
    cdiv,
    for_device,
    k_splits,
    next_pow2,
    schedule_counters,
    sm_count,
    split_k_reduce,
)

SCHEMES = ("bf16", "fp8_block", "w4a8")
GROUP = 128
CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "masked_grouped_gemm.json"
_ALL_ROWS = 2**31 - 1
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# A modes (retired: 3, bf16 x for fp8 weights, now quantised by `_masked_group_quant` first; 4, bf16
# x quantised per tensor inside the GEMM's K loop, now `_masked_tensor_quant` + mode 5; the numbers
# stay, the tuned tables' kind names carry them)
A_BF16, A_FP8G_DEQ, A_FP8G, A_FP16_QT, A_BF16_QG = 0, 1, 2, 5, 6
# (A_BF16_QG: bf16 A quantised per row per 128-group as it is loaded, then the fp8 dot; the one-launch
# MLP's down GEMM reads a bf16 intermediate this way, so its gate_up tiles need not span a group)
# B modes
B_BF16, B_FP8_BLOCK, B_INT4 = 0, 1, 2
# epilogue modes
OUT_PLAIN, OUT_FP8G, OUT_AMAX = 0, 1, 2


@triton.jit
def _masked_gemm_kernel(
    # pointers
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    out_ptr,
    out_scale_ptr,
    counts_ptr,
    ws_ptr,
    counter_ptr,
    # sizes
    M,
    N,
    K,
    up_offset,
    min_rows,
    max_rows,
    split_tiles,
    # strides
    stride_al,
    stride_am,
    stride_ak,
    stride_asl,
    stride_asm,
    stride_ask,
    stride_bl,
    stride_bn,
    stride_bk,
    stride_bsl,
    stride_bsn,
    stride_bsk,
    stride_ol,
    stride_om,
    stride_on,
    stride_osl,
    stride_osm,
    stride_osn,
    # meta
    A_MODE: tl.constexpr,
    B_MODE: tl.constexpr,
    OUT_MODE: tl.constexpr,
    GATED: tl.constexpr,
    B_SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_K: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRELOAD: tl.constexpr = 0,
):
    """Program (m-lane, n-block, expert e) computes out[e, m-blocks, n-block] for the valid m-blocks
    m-lane, m-lane + GRID_M, ... of expert e (none when counts[e] == 0). Experts whose row count is
    outside [min_rows, max_rows] are left to another launch (see `_launch`: small and large row
    counts can run with different tiles, chosen on the device). SPLIT_K > 1 (launches of one
    m-block per expert): grid axis 1 is (n-block, K split), each split sums `split_tiles` K blocks
    and the last to finish reduces (`tables.split_k_reduce`). PRELOAD > 0: see `_masked_acc`."""
    # m-lanes on the fastest grid axis: lanes of one (expert, n-block) run side by side and share
    # the weight tile through L2
    pid_m0 = tl.program_id(0)
    grid_m = tl.num_programs(0)
    pid_n = tl.program_id(1) // SPLIT_K
    split = tl.program_id(1) % SPLIT_K
    e = tl.program_id(2)
    count = tl.minimum(tl.load(counts_ptr + e), M)
    num_m_blocks = tl.cdiv(count, BLOCK_M)
    if (count < min_rows) | (count > max_rows):
        num_m_blocks = 0

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    b_base = b_ptr + e.to(tl.int64) * stride_bl
    a_base = a_ptr + e.to(tl.int64) * stride_al

    for pid_m in range(pid_m0, num_m_blocks, grid_m):
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        # K blocks of this split (tile indices, so the compiler sees k0 as a multiple of BLOCK_K)
        acc, acc_up = _masked_acc(
            a_base, a_scale_ptr, b_base, b_scale_ptr, e, offs_m, mask_m, offs_n, mask_n,
            split * split_tiles, tl.minimum(tl.cdiv(K, BLOCK_K), (split + 1) * split_tiles), K, up_offset,
            stride_am, stride_ak, stride_asl, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsl,
            stride_bsn, stride_bsk, A_MODE, B_MODE, GATED, B_SCALE_ROWS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_K,
            UPCAST, False, PRELOAD,
        )  # fmt: skip
        if SPLIT_K > 1:
            tile = e * (tl.num_programs(1) // SPLIT_K) + pid_n
            last, acc, acc_up = split_k_reduce(acc, acc_up, ws_ptr, counter_ptr, tile, split, BLOCK_M, BLOCK_N,
                                                GATED, SPLIT_K)  # fmt: skip
            mask_m = tl.where(last, mask_m, False)  # (`&` with the scalar trips the interpreter)
        _masked_store(acc, acc_up, out_ptr, out_scale_ptr, e, pid_n, offs_m, mask_m, offs_n, mask_n, stride_ol,
                      stride_om, stride_on, stride_osl, stride_osm, stride_osn, OUT_MODE, GATED, UPCAST)  # fmt: skip


_masked_gemm_launch = FastLaunch(_masked_gemm_kernel)


@triton.jit
def _masked_acc(a_base, a_scale_ptr, b_base, b_scale_ptr, e, offs_m, mask_m, offs_n, mask_n, kt_lo, kt_hi, K,
                up_offset, stride_am, stride_ak, stride_asl, stride_asm, stride_ask, stride_bn, stride_bk,
                stride_bsl, stride_bsn, stride_bsk, A_MODE: tl.constexpr, B_MODE: tl.constexpr,
                GATED: tl.constexpr, B_SCALE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr, UPCAST: tl.constexpr, A_CG: tl.constexpr,
                PRELOAD: tl.constexpr = 0):  # fmt: skip
    """The fp32 accumulators `(acc, acc_up)` `[BLOCK_M, BLOCK_N]` of rows `offs_m` of expert e's A
    (`a_base`: its [M, K] slab) times its weight columns `offs_n` (and `offs_n + up_offset` when
    GATED) over the K blocks [kt_lo, kt_hi), in the A/B modes of `_masked_gemm_kernel`. A_CG: A is
    read through L2 only (`.cg`): it was written by other programs of the same launch.
    PRELOAD > 0 (A mode 2 with B mode 1, the tile within one weight-block scale row, BLOCK_K ==
    GROUP_K): all scales of [kt_lo, kt_hi) are loaded before the K loop (`[BLOCK_M, PRELOAD]` for
    the rows, `[PRELOAD]` for the weight tile, PRELOAD a power of two >= kt_hi - kt_lo) and each K
    step picks its column in registers (`fused_moe.PRELOAD_NOTE`: a per-step scale load is one the
    pipeliner does not run ahead; sm_90, gated 64 x 128 tile with 8 warps: 34 synchronous loads per
    K step without it, none with it; with PRELOAD 64, DeepSeek-V3's K, that tile spills 7 words,
    so the tuner's A/B decides per entry)."""
    offs_kb = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PRELOAD > 0:
        offs_g = tl.arange(0, PRELOAD)
        g_ok = kt_lo + offs_g < kt_hi
        bs_row = b_scale_ptr + e.to(tl.int64) * stride_bsl + (kt_lo + offs_g) * stride_bsk
        n0 = tl.min(offs_n, axis=0)  # the tile's first column: its weight-block scale row
        bs_all = tl.load(bs_row + (n0 // B_SCALE_ROWS) * stride_bsn, mask=g_ok, other=0.0)
        if GATED:
            bs_up_all = tl.load(
                bs_row + ((n0 + up_offset) // B_SCALE_ROWS) * stride_bsn, mask=g_ok, other=0.0
            )
        a_s_all = tl.load(
            a_scale_ptr + e.to(tl.int64) * stride_asl + offs_m[:, None] * stride_asm
            + (kt_lo + offs_g)[None, :] * stride_ask,
            mask=mask_m[:, None] & g_ok[None, :], other=0.0,
        )  # fmt: skip
    for kt in range(kt_lo, kt_hi):
        k0 = kt * BLOCK_K
        # ---- B tile(s), [BLOCK_K, BLOCK_N]
        kb = k0 + offs_kb
        mask_b = (kb[:, None] < K) & mask_n[None, :]
        b0 = tl.load(b_base + offs_n[None, :] * stride_bn + kb[:, None] * stride_bk, mask=mask_b, other=0.0)
        if GATED:
            u0 = tl.load(
                b_base + (offs_n + up_offset)[None, :] * stride_bn + kb[:, None] * stride_bk,
                mask=mask_b,
                other=0.0,
            )
        # per-k-block weight scales, a vector over n
        if PRELOAD > 0:
            pick = offs_g == kt - kt_lo
            bs = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.sum(tl.where(pick, bs_all, 0.0), axis=0)
            if GATED:
                bs_up = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.sum(
                    tl.where(pick, bs_up_all, 0.0), axis=0
                )
        elif B_MODE != 0:
            bs_base = b_scale_ptr + e.to(tl.int64) * stride_bsl + (k0 // GROUP_K) * stride_bsk
            bs = tl.load(bs_base + (offs_n // B_SCALE_ROWS) * stride_bsn, mask=mask_n, other=0.0)
            if GATED:
                bs_up = tl.load(
                    bs_base + ((offs_n + up_offset) // B_SCALE_ROWS) * stride_bsn, mask=mask_n, other=0.0
                )

        # ---- A tile and the product
        ka = k0 + offs_kb
        mask_a = mask_m[:, None] & (ka[None, :] < K)
        a_ptrs = a_base + offs_m[:, None] * stride_am + ka[None, :] * stride_ak
        if A_CG:
            a = tl.load(a_ptrs, mask=mask_a, other=0.0, cache_modifier=".cg")
        else:
            a = tl.load(a_ptrs, mask=mask_a, other=0.0)
        if PRELOAD > 0:
            a_s = tl.sum(tl.where(pick[None, :], a_s_all, 0.0), axis=1)
        elif A_MODE == 1 or A_MODE == 2:
            a_s_ptrs = (
                a_scale_ptr + e.to(tl.int64) * stride_asl + offs_m * stride_asm + (k0 // GROUP_K) * stride_ask
            )
            if A_CG:
                a_s = tl.load(a_s_ptrs, mask=mask_m, other=0.0, cache_modifier=".cg")
            else:
                a_s = tl.load(a_s_ptrs, mask=mask_m, other=0.0)
        if A_MODE == 1:
            a = (a.to(tl.float32) * a_s[:, None]).to(tl.bfloat16)
        if A_MODE == 6:  # per-row group scale of this K block (BLOCK_K == GROUP_K), as OUT_FP8G makes it
            a, a_s = quant_rows_e4m3(a.to(tl.float32), UPCAST)
        if UPCAST and (A_MODE == 0 or A_MODE == 1):
            a = a.to(tl.float32)
            b0 = b0.to(tl.float32)
            if GATED:
                u0 = u0.to(tl.float32)
        if B_MODE == 0:
            acc = tl.dot(a, b0, acc)
            if GATED:
                acc_up = tl.dot(a, u0, acc_up)
        else:
            acc += tl.dot(a, b0) * (a_s[:, None] * bs[None, :])
            if GATED:
                acc_up += tl.dot(a, u0) * (a_s[:, None] * bs_up[None, :])
    return acc, acc_up


@triton.jit
def _masked_store(acc, acc_up, out_ptr, out_scale_ptr, e, pid_n, offs_m, mask_m, offs_n, mask_n, stride_ol,
                  stride_om, stride_on, stride_osl, stride_osm, stride_osn, OUT_MODE: tl.constexpr,
                  GATED: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """The epilogue of one tile: `silu(gate) * up` when GATED, then a plain store (OUT_PLAIN) or the
    per-token-group-128 requant (OUT_FP8G: the tile is exactly one 128-channel group of its rows,
    n-block `pid_n`), for the rows of `mask_m` and the columns of `mask_n`."""
    mask_o = mask_m[:, None] & mask_n[None, :]
    if GATED:
        h = acc / (1.0 + tl.exp(-acc)) * acc_up
    else:
        h = acc
    out_ptrs = (
        out_ptr + e.to(tl.int64) * stride_ol + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    )
    if OUT_MODE == 1:
        h = tl.where(mask_n[None, :], h, 0.0)
        q, h_s = quant_rows_e4m3(h, UPCAST)
        tl.store(out_ptrs, q, mask=mask_o)
        tl.store(
            out_scale_ptr + e.to(tl.int64) * stride_osl + offs_m * stride_osm + pid_n * stride_osn,
            h_s,
            mask=mask_m,
        )
    else:
        tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=mask_o)


# --------------------------------------------------------------------------------------------------
# The whole expert MLP in one persistent launch (bf16 and fp8_block)
# --------------------------------------------------------------------------------------------------
#
# A decode step's expert MLP is two short GEMMs; as two launches each pays its own start, ramp and
# tail, and the down GEMM cannot start until the last gate_up tile is done. Here a grid of a few
# programs per SM takes work items from a device-side queue (an atomic ticket): first every gate_up
# tile (in (expert, n-block, m-block) order), then every down tile. The item list is built on the
# device from counts (no host sync, nothing launched for empty experts or rows). A down tile of
# expert e waits until all of e's gate_up tiles are done (a per-expert counter, release/acquire);
# since every gate_up ticket is handed out before any down ticket and gate_up tiles never wait, a
# waiting program only waits for tiles that running programs hold: no deadlock, whatever the
# residency, and under the interpreter (programs run one after another) the first program simply
# takes every ticket in order. The last program to leave resets the queue for the next launch.


@triton.jit
def _masked_mlp_kernel(
    x_ptr,
    x_scale_ptr,
    w13_ptr,
    w13_scale_ptr,
    h_ptr,
    h_scale_ptr,
    w2_ptr,
    w2_scale_ptr,
    out_ptr,
    counts_ptr,
    sched_ptr,
    # sizes
    L,
    M,
    D,
    I,  # noqa: E741 (DESIGN.md term)
    # strides
    stride_xl,
    stride_xm,
    stride_xk,
    stride_xsl,
    stride_xsm,
    stride_xsk,
    stride_gl,
    stride_gn,
    stride_gk,
    stride_gsl,
    stride_gsn,
    stride_gsk,
    stride_hl,
    stride_hm,
    stride_hk,
    stride_hsl,
    stride_hsm,
    stride_hsk,
    stride_dl,
    stride_dn,
    stride_dk,
    stride_dsl,
    stride_dsn,
    stride_dsk,
    stride_ol,
    stride_om,
    stride_on,
    # meta
    A_MODE: tl.constexpr,
    H_MODE: tl.constexpr,
    B_MODE: tl.constexpr,
    B_SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_M_BIG: tl.constexpr,
    BLOCK_N1: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_K: tl.constexpr,
    L_POW2: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[e, rows] = down(silu(gate) * up)(x[e, rows]) for the valid rows of every expert, gate_up
    into `h` (bf16, or fp8 + per-token-group scales when H_MODE == OUT_FP8G) and down from it, in
    one launch (see the section comment). sched: int32 [2 + L] (ticket, programs finished, gate_up
    tiles done per expert), zero on entry and left zero."""
    # the down GEMM reads h as A_FP8G after OUT_FP8G; a bf16 h for fp8 weights is quantised as loaded
    A2_MODE: tl.constexpr = 2 if H_MODE == 1 else (6 if B_MODE == 1 else 0)
    offs_e = tl.arange(0, L_POW2)
    cnt = tl.minimum(tl.load(counts_ptr + offs_e, mask=offs_e < L, other=0), M)
    # experts with more than BLOCK_M rows take BLOCK_M_BIG-row tiles (the same in one-regime configs)
    big = cnt > BLOCK_M
    blocks = tl.where(big, tl.cdiv(cnt, BLOCK_M_BIG), tl.cdiv(cnt, BLOCK_M))  # m-blocks per expert
    ends = tl.cumsum(blocks, axis=0)
    total = tl.sum(blocks, axis=0)
    nb1 = tl.cdiv(I, BLOCK_N1)
    nb2 = tl.cdiv(D, BLOCK_N2)
    n_gate_up = total * nb1
    n_items = n_gate_up + total * nb2
    done_ptr = sched_ptr + 2

    t = tl.atomic_add(sched_ptr, 1, sem="relaxed", scope="gpu")
    while t < n_items:
        down = t >= n_gate_up
        u = tl.where(down, t - n_gate_up, t)
        nb = tl.where(down, nb2, nb1)
        # items in (expert, n-block, m-block) order: the m-blocks of one weight tile are neighbours
        # in the queue, so they run side by side and share the tile through L2
        e = tl.sum((ends * nb <= u).to(tl.int32), axis=0)
        sel = offs_e == e
        e_blocks = tl.sum(tl.where(sel, blocks, 0), axis=0)
        j = u - (tl.sum(tl.where(sel, ends, 0), axis=0) - e_blocks) * nb
        pid_n = j // e_blocks
        pid_m = j % e_blocks
        count = tl.sum(tl.where(sel, cnt, 0), axis=0)
        # one tile path per phase when the regimes coincide (disjoint branches still add up in
        # shared memory)
        e_big = (count > BLOCK_M) & (BLOCK_M_BIG != BLOCK_M)
        if down:
            # all of expert e's gate_up tiles must be in h (acquire pairs with their release)
            need = e_blocks * nb1
            while tl.atomic_add(done_ptr + e, 0, sem="acquire", scope="gpu") < need:
                pass
            tl.debug_barrier()
            if e_big:
                _mlp_down_tile(h_ptr, h_scale_ptr, w2_ptr, w2_scale_ptr, out_ptr, e, pid_m, pid_n, count, D, I,
                               stride_hl, stride_hm, stride_hk, stride_hsl, stride_hsm, stride_hsk, stride_dl,
                               stride_dn, stride_dk, stride_dsl, stride_dsn, stride_dsk, stride_ol, stride_om,
                               stride_on, A2_MODE, B_MODE, B_SCALE_ROWS, BLOCK_M_BIG, BLOCK_N2, BLOCK_K, GROUP_K,
                               UPCAST)  # fmt: skip
            else:
                _mlp_down_tile(h_ptr, h_scale_ptr, w2_ptr, w2_scale_ptr, out_ptr, e, pid_m, pid_n, count, D, I,
                               stride_hl, stride_hm, stride_hk, stride_hsl, stride_hsm, stride_hsk, stride_dl,
                               stride_dn, stride_dk, stride_dsl, stride_dsn, stride_dsk, stride_ol, stride_om,
                               stride_on, A2_MODE, B_MODE, B_SCALE_ROWS, BLOCK_M, BLOCK_N2, BLOCK_K, GROUP_K,
                               UPCAST)  # fmt: skip
        else:
            if e_big:
                _mlp_gate_up_tile(x_ptr, x_scale_ptr, w13_ptr, w13_scale_ptr, h_ptr, h_scale_ptr, e, pid_m, pid_n,
                                  count, D, I, stride_xl, stride_xm, stride_xk, stride_xsl, stride_xsm, stride_xsk,
                                  stride_gl, stride_gn, stride_gk, stride_gsl, stride_gsn, stride_gsk, stride_hl,
                                  stride_hm, stride_hk, stride_hsl, stride_hsm, stride_hsk, A_MODE, H_MODE, B_MODE,
                                  B_SCALE_ROWS, BLOCK_M_BIG, BLOCK_N1, BLOCK_K, GROUP_K, UPCAST)  # fmt: skip
            else:
                _mlp_gate_up_tile(x_ptr, x_scale_ptr, w13_ptr, w13_scale_ptr, h_ptr, h_scale_ptr, e, pid_m, pid_n,
                                  count, D, I, stride_xl, stride_xm, stride_xk, stride_xsl, stride_xsm, stride_xsk,
                                  stride_gl, stride_gn, stride_gk, stride_gsl, stride_gsn, stride_gsk, stride_hl,
                                  stride_hm, stride_hk, stride_hsl, stride_hsm, stride_hsk, A_MODE, H_MODE, B_MODE,
                                  B_SCALE_ROWS, BLOCK_M, BLOCK_N1, BLOCK_K, GROUP_K, UPCAST)  # fmt: skip
            tl.debug_barrier()  # every thread's part of the tile is written before the release
            tl.atomic_add(done_ptr + e, 1, sem="release", scope="gpu")
        t = tl.atomic_add(sched_ptr, 1, sem="relaxed", scope="gpu")
    # the last program to leave resets the queue (every other program has left the loop)
    if tl.atomic_add(sched_ptr + 1, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        tl.store(done_ptr + offs_e, tl.zeros((L_POW2,), dtype=tl.int32), mask=offs_e < L)
        tl.atomic_xchg(sched_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sched_ptr + 1, 0, sem="relaxed", scope="gpu")


_masked_mlp_launch = FastLaunch(_masked_mlp_kernel)


@triton.jit
def _mlp_gate_up_tile(x_ptr, x_scale_ptr, w13_ptr, w13_scale_ptr, h_ptr, h_scale_ptr, e, pid_m, pid_n, count, D, inter,
                      stride_xl, stride_xm, stride_xk, stride_xsl, stride_xsm, stride_xsk, stride_gl, stride_gn,
                      stride_gk, stride_gsl, stride_gsn, stride_gsk, stride_hl, stride_hm, stride_hk, stride_hsl,
                      stride_hsm, stride_hsk, A_MODE: tl.constexpr, H_MODE: tl.constexpr, B_MODE: tl.constexpr,
                      B_SCALE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """One gate_up tile of `_masked_mlp_kernel`: h[e, m-block, n-block] = silu(gate) * up."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < inter
    acc, acc_up = _masked_acc(
        x_ptr + e.to(tl.int64) * stride_xl, x_scale_ptr, w13_ptr + e.to(tl.int64) * stride_gl, w13_scale_ptr, e,
        offs_m, mask_m, offs_n, mask_n, 0, tl.cdiv(D, BLOCK_K), D, inter, stride_xm, stride_xk, stride_xsl,
        stride_xsm, stride_xsk, stride_gn, stride_gk, stride_gsl, stride_gsn, stride_gsk, A_MODE, B_MODE, True,
        B_SCALE_ROWS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_K, UPCAST, False,
    )  # fmt: skip
    _masked_store(acc, acc_up, h_ptr, h_scale_ptr, e, pid_n, offs_m, mask_m, offs_n, mask_n, stride_hl, stride_hm,
                  stride_hk, stride_hsl, stride_hsm, stride_hsk, H_MODE, True, UPCAST)  # fmt: skip


@triton.jit
def _mlp_down_tile(h_ptr, h_scale_ptr, w2_ptr, w2_scale_ptr, out_ptr, e, pid_m, pid_n, count, D, inter, stride_hl,
                   stride_hm, stride_hk, stride_hsl, stride_hsm, stride_hsk, stride_dl, stride_dn, stride_dk,
                   stride_dsl, stride_dsn, stride_dsk, stride_ol, stride_om, stride_on, A2_MODE: tl.constexpr,
                   B_MODE: tl.constexpr, B_SCALE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
                   UPCAST: tl.constexpr):  # fmt: skip
    """One down tile of `_masked_mlp_kernel`: out[e, m-block, n-block] from h (read through L2: other
    programs of the launch wrote it)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    acc, acc_up = _masked_acc(
        h_ptr + e.to(tl.int64) * stride_hl, h_scale_ptr, w2_ptr + e.to(tl.int64) * stride_dl, w2_scale_ptr, e,
        offs_m, mask_m, offs_n, mask_n, 0, tl.cdiv(inter, BLOCK_K), inter, 0, stride_hm, stride_hk, stride_hsl,
        stride_hsm, stride_hsk, stride_dn, stride_dk, stride_dsl, stride_dsn, stride_dsk, A2_MODE, B_MODE, False,
        B_SCALE_ROWS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_K, UPCAST, True,
    )  # fmt: skip
    _masked_store(acc, acc_up, out_ptr, out_ptr, e, pid_n, offs_m, mask_m, offs_n, mask_n, stride_ol, stride_om,
                  stride_on, 0, 0, 0, 0, False, UPCAST)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# w4a8: int4 weights as the register operand (swap-AB)
# --------------------------------------------------------------------------------------------------
#
# The expert GEMM is computed transposed, `out^T [N, rows] = W [N, K] @ x^T [K, rows]`, so the
# weights are the left operand, which Hopper's wgmma takes from registers: the int4 tile is loaded
# (16 bytes per thread), unpacked in registers to exact fp16 (`quant.int4_to_fp16_pair`, packed PTX)
# and fed to the tensor cores without a trip through shared memory; the few token rows are the
# right operand (N = 16..128 of the instruction). Activations arrive pre-quantised onto the e4m3
# grid per tensor, held as fp16 (exact), so the dot is an fp16 dot with fp32 accumulation over
# exactly the products an e4m3 dot would form.
#
# Two order tricks make the unpacked tile land where the instruction wants it with no data movement:
# - K: a 128-wide K step is one packed 64-byte row chunk. Low nibbles (even k) and high nibbles
#   (odd k) form two 64-wide halves, joined into one K=128 tile (`_w4a8_weights`); within each half
#   the column order is a permutation of the bytes (`_w4a8_tile`) under which a thread's 16 loaded
#   bytes are exactly the fp16 pairs its wgmma fragment holds. The sum over K does not care about order as long as x is permuted the same way,
#   which the quantisation pass does when it writes x (`_w4a8_x_source`); scales are per 128-group,
#   so they are unaffected.
# - N: the tile's rows are permuted the same way (which rows a thread holds in the load layout vs
#   in the fragment); the row index vector is permuted with them, so scales and stores follow.
# Both permutations are reshapes/permutes of register tensors: correctness does not depend on
# Triton's layout choices (the interpreter runs the same code), only the cost does; the sm_90
# compile test checks that wgmma takes the tile from registers and no sub-word shared loads appear.

W4A8_HALF = tl.constexpr(64)  # packed bytes per row in one 128-wide K step


@triton.jit
def _w4a8_rows(v, BLOCK_N: tl.constexpr, WARPS: tl.constexpr):
    """Row order of a weight tile, for the row-index vector `v` [BLOCK_N]: permuted so that the rows a
    thread loads are the rows its wgmma fragment holds (load layout: row bits 0-2 lanes, then warps,
    then registers; fragment: bits 0-2 lanes, bit 3 a register, then warps). `_w4a8_tile` permutes
    the tile's rows the same way."""
    if BLOCK_N >= 16 * WARPS:
        v = tl.reshape(v, (BLOCK_N // (16 * WARPS), 2, WARPS, 8))
        v = tl.reshape(tl.permute(v, (0, 2, 1, 3)), (BLOCK_N,))
    return v


@triton.jit
def _w4a8_tile(t, BLOCK_N: tl.constexpr, WARPS: tl.constexpr):
    """[BLOCK_N, 64] unpacked nibbles (column j = packed byte j) -> the dot's tile: rows as
    `_w4a8_rows`, column k' = 16 s + 8 h + 2 c + b holding byte j = 16 c + 4 s + 2 h + b (a thread's
    16 contiguous bytes become its fragment's k pairs)."""
    if BLOCK_N >= 16 * WARPS:
        t = tl.reshape(t, (BLOCK_N // (16 * WARPS), 2, WARPS, 8, 4, 4, 2, 2))
        t = tl.permute(t, (0, 2, 1, 3, 5, 6, 4, 7))
    else:
        t = tl.permute(tl.reshape(t, (BLOCK_N, 4, 4, 2, 2)), (0, 2, 3, 1, 4))
    return tl.reshape(t, (BLOCK_N, W4A8_HALF))


@triton.jit
def _w4a8_weights(p, BLOCK_N: tl.constexpr, WARPS: tl.constexpr, ASM: tl.constexpr, UPCAST: tl.constexpr):
    """Packed bytes [BLOCK_N, 64] (one 128-wide K step, rows in load order) -> the dot's [BLOCK_N, 128]
    weight tile: columns [0, 64) the low nibbles (even k), [64, 128) the high ones (odd k), each half
    in `_w4a8_tile`'s order; one K=128 dot per step. fp16 (fp32 when interpreted)."""
    lo, hi = int4_to_fp16_pair(p, ASM)
    w = tl.join(_w4a8_tile(lo, BLOCK_N, WARPS), _w4a8_tile(hi, BLOCK_N, WARPS))  # [BLOCK_N, 64, 2]
    w = tl.reshape(tl.permute(w, (0, 2, 1)), (BLOCK_N, 2 * W4A8_HALF))
    if UPCAST:
        w = w.to(tl.float32)
    return w


W4A8_FOLD_NOTE = """FOLD_SCALE (w4a8 config key, default off): the per-(row, 128-group) weight scale is
multiplied into the unpacked fp16 weights before the dot instead of into each group's fp32 partial
sum after it. The weights the dot sees are then fp16(q * fp16(s)) (`quant.dequantize_w4a8(...,
fold_fp16=True)`): a relative rounding of at most 2^-11 per weight, beside the 2^-4 of the e4m3
activations; scales below fp16's normal range (6.1e-5, weights of magnitude below about 5e-4 in a
whole group) lose relative precision, and scales above 8188 would overflow fp16 (int4 weights of
real models sit far inside both). What it buys: with the scale after the dot, every K step must wait
for its wgmma results before the fp32 multiply-add (two waits per step in the gated kernel); with it
folded, the dots accumulate in place and can stay in flight across steps, as in the bf16 kernels."""


@triton.jit
def _fold_scale(w, s, UPCAST: tl.constexpr):
    """Unpacked weights `w` [BLOCK_N, 128] (exact int4 values) times their rows' group scales `s`
    [BLOCK_N] fp32, rounded once to fp16 as the compiled fp16 multiply does (the interpreter, with
    fp32 `w`, rounds the scale and then the product to fp16 explicitly: the same two roundings)."""
    s16 = s.to(tl.float16)
    if UPCAST:
        return (w * s16.to(tl.float32)[:, None]).to(tl.float16).to(tl.float32)
    return w * s16[:, None]


@triton.jit
def _w4a8_x_source(c):
    """Column c (0..127) of a pre-quantised x group -> the column of x it holds: c < 64 pairs with
    the low nibbles (even k), c >= 64 with the high ones; within a half, the byte order of
    `_w4a8_tile` (k' -> j)."""
    kp = c & 63
    j = 16 * ((kp >> 1) & 3) + 4 * (kp >> 4) + 2 * ((kp >> 3) & 1) + (kp & 1)
    return 2 * j + (c >> 6)


@triton.jit
def _masked_w4a8_kernel(
    a_ptr,
    b_ptr,
    b_scale_ptr,
    out_ptr,
    counts_ptr,
    amax_in_ptr,
    amax_out_ptr,
    ws_ptr,
    counter_ptr,
    # sizes
    M,
    N,
    K,
    up_offset,
    min_rows,
    max_rows,
    split_tiles,
    # strides
    stride_al,
    stride_am,
    stride_ak,
    stride_bl,
    stride_bn,
    stride_bk,
    stride_bsl,
    stride_bsn,
    stride_bsk,
    stride_ol,
    stride_om,
    stride_on,
    # meta
    OUT_MODE: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WARPS: tl.constexpr,
    UPCAST: tl.constexpr,
    ASM: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
):
    """Program (m-lane, n-block, expert e): out[e, m-blocks, n-block] = x_q @ W^T for the valid
    m-blocks of its lane (as `_masked_gemm_kernel`), computed as W-tile @ x_q-tile^T.

    a: fp16 `[L, M, K]` x quantised per tensor onto the e4m3 grid (`_masked_tensor_quant`: K
    permuted per 128-group); b: uint8 `[L, N_total, K/2]` packed int4; b_scale: fp32
    `[L, N_total, K/128]`; the per-tensor x scale is `e4m3_scale(amax_in)`. OUT_MODE 2 also folds
    the block's amax of the stored bf16 values into amax_out. SPLIT_K as in `_masked_gemm_kernel`.

    FOLD_SCALE off: each 128-group's dot is formed on the exact int4 values and scaled in fp32
    (`acc += dot(w, x) * s`), so every K step waits for its dots. On: the group scale is folded into
    the fp16 weights before the dot (`acc = dot(w * s, x, acc)`, one fp16 rounding of each scaled
    weight, as fp16-dequantising int4 kernels do), so the dots chain through one accumulator and
    need not complete each step (see `W4A8_FOLD_NOTE`)."""
    pid_m0 = tl.program_id(0)
    grid_m = tl.num_programs(0)
    pid_n = tl.program_id(1) // SPLIT_K
    split = tl.program_id(1) % SPLIT_K
    e = tl.program_id(2)
    count = tl.minimum(tl.load(counts_ptr + e), M)
    num_m_blocks = tl.cdiv(count, BLOCK_M)
    if (count < min_rows) | (count > max_rows):
        num_m_blocks = 0

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # load order
    mask_rows = rows < N
    offs_n = _w4a8_rows(rows, BLOCK_N, WARPS)  # the tile's (and accumulator's) row order
    mask_n = offs_n < N
    offs_j = tl.arange(0, W4A8_HALF)
    b_base = b_ptr + e.to(tl.int64) * stride_bl
    bs_base = b_scale_ptr + e.to(tl.int64) * stride_bsl
    a_base = a_ptr + e.to(tl.int64) * stride_al
    b_tile = b_base + rows[:, None] * stride_bn + offs_j[None, :] * stride_bk
    a_scale = e4m3_scale(tl.load(amax_in_ptr), 1e-10, 448.0)

    for pid_m in range(pid_m0, num_m_blocks, grid_m):
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        a_cols = a_base + offs_m[None, :] * stride_am + tl.arange(0, 2 * W4A8_HALF)[:, None] * stride_ak
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kt in range(
            split * split_tiles, tl.minimum(tl.cdiv(K, 2 * W4A8_HALF), (split + 1) * split_tiles)
        ):
            k0 = kt * (2 * W4A8_HALF)
            x = tl.load(a_cols + k0 * stride_ak, mask=mask_m[None, :], other=0.0)  # [128, BLOCK_M]
            if UPCAST:
                x = x.to(tl.float32)
            w = _w4a8_weights(tl.load(b_tile + (k0 // 2) * stride_bk, mask=mask_rows[:, None], other=0),
                              BLOCK_N, WARPS, ASM, UPCAST)  # fmt: skip
            bs = tl.load(bs_base + offs_n * stride_bsn + kt * stride_bsk, mask=mask_n, other=0.0)
            if FOLD_SCALE:
                acc = tl.dot(_fold_scale(w, bs, UPCAST), x, acc)
            else:
                acc += tl.dot(w, x) * bs[:, None]
            if GATED:
                pu = tl.load(
                    b_tile + (up_offset * stride_bn + (k0 // 2) * stride_bk), mask=mask_rows[:, None], other=0
                )
                u = _w4a8_weights(pu, BLOCK_N, WARPS, ASM, UPCAST)
                bs_up = tl.load(
                    bs_base + (offs_n + up_offset) * stride_bsn + kt * stride_bsk, mask=mask_n, other=0.0
                )
                if FOLD_SCALE:
                    acc_up = tl.dot(_fold_scale(u, bs_up, UPCAST), x, acc_up)
                else:
                    acc_up += tl.dot(u, x) * bs_up[:, None]

        mask_o = mask_n[:, None] & mask_m[None, :]
        if SPLIT_K > 1:
            tile = e * (tl.num_programs(1) // SPLIT_K) + pid_n
            last, acc, acc_up = split_k_reduce(acc, acc_up, ws_ptr, counter_ptr, tile, split, BLOCK_N, BLOCK_M,
                                                GATED, SPLIT_K)  # fmt: skip
            mask_o = tl.where(last, mask_o, False)
        acc = acc * a_scale
        if GATED:
            h = acc / (1.0 + tl.exp(-acc)) * (acc_up * a_scale)
        else:
            h = acc
        hb = h.to(out_ptr.dtype.element_ty)
        out_ptrs = (
            out_ptr + e.to(tl.int64) * stride_ol + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        )
        tl.store(out_ptrs, hb, mask=mask_o)
        if OUT_MODE == 2:
            block_amax = tl.max(tl.max(tl.where(mask_o, tl.abs(hb.to(tl.float32)), 0.0), axis=1), axis=0)
            tl.atomic_max(amax_out_ptr, block_amax, sem="relaxed")


_masked_w4a8_launch = FastLaunch(_masked_w4a8_kernel)


@triton.jit
def _masked_tensor_quant_kernel(
    x_ptr,
    q_ptr,
    counts_ptr,
    amax_ptr,
    M,
    stride_xl,
    stride_xm,
    stride_xk,
    stride_ql,
    stride_qm,
    stride_qk,
    BLOCK_M: tl.constexpr,
):
    """Per-tensor e4m3 quantisation of the valid rows of x [L, M, K] for `_masked_w4a8_kernel`:
    scale = e4m3_scale(amax), values rounded exactly as torch does (`quant.to_e4m3_grid`), stored as
    fp16 with each 128-group's columns in the kernel's order (`_w4a8_x_source`). Program (group,
    expert) walks its valid rows; rows past the count are neither read nor written."""
    g = tl.program_id(0)
    e = tl.program_id(1)
    count = tl.minimum(tl.load(counts_ptr + e), M)
    scale = e4m3_scale(tl.load(amax_ptr), 1e-10, 448.0)
    cols = tl.arange(0, 2 * W4A8_HALF)
    src = g * 2 * W4A8_HALF + _w4a8_x_source(cols)
    dst = g * 2 * W4A8_HALF + cols
    x_base = x_ptr + e.to(tl.int64) * stride_xl
    q_base = q_ptr + e.to(tl.int64) * stride_ql
    for m0 in range(0, count, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < count)[:, None]
        x = tl.load(x_base + offs_m[:, None] * stride_xm + src[None, :] * stride_xk, mask=mask, other=0.0)
        q = to_e4m3_grid(x.to(tl.float32), scale, 448.0)
        tl.store(q_base + offs_m[:, None] * stride_qm + dst[None, :] * stride_qk, q.to(tl.float16), mask=mask)


_masked_tensor_quant_launch = FastLaunch(_masked_tensor_quant_kernel)


@triton.jit
def _masked_amax_kernel(
    x_ptr,
    counts_ptr,
    amax_ptr,
    M,
    D,
    stride_xl,
    stride_xm,
    stride_xd,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """amax over the valid rows of x [L, M, D] (folded into amax_ptr[0] by atomic max). Program
    (d-block, expert, m-lane) reads its columns of the m-blocks lane, lane + lanes, ... below the
    count: one load per m-block, no loop over D, so a few valid rows cost one wave of short
    programs rather than a walk along D."""
    pid_d = tl.program_id(0)
    e = tl.program_id(1)
    pid_m0 = tl.program_id(2)
    grid_m = tl.num_programs(2)
    count = tl.minimum(tl.load(counts_ptr + e), M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    base = x_ptr + e.to(tl.int64) * stride_xl + offs_d[None, :] * stride_xd
    run = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for pid_m in range(pid_m0, tl.cdiv(count, BLOCK_M), grid_m):
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < count)[:, None] & (offs_d < D)[None, :]
        v = tl.load(base + offs_m[:, None] * stride_xm, mask=mask, other=0.0)
        run = tl.maximum(run, tl.abs(v.to(tl.float32)))
    tl.atomic_max(amax_ptr, tl.max(tl.max(run, axis=1), axis=0), sem="relaxed")


_masked_amax_launch = FastLaunch(_masked_amax_kernel)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_table(path: str = str(CONFIG_PATH)) -> dict[str, Any]:
    """`{device name: {"<kind>": {"BLOCK_M":..., "BLOCK_N":..., "BLOCK_K":..., "num_warps":...,
    "num_stages":..., optional "GRID_M": max m-lanes, optional "FOLD_SCALE" (w4a8 only, see
    `W4A8_FOLD_NOTE`), optional "SCALE_PRELOAD" (fp8_block only, see `_masked_acc`; the one-launch
    MLP of an `MLP` entry ignores both), optional "SMALL": {a config of the same keys
    plus "MAX_ROWS"}: the tile for experts with at most MAX_ROWS valid rows, see `_row_regimes`}}}`
    where kind is `a<mode>-b<mode>-gated|plain` (see `_kind`; for the w4a8 kernel BLOCK_M is the
    token rows per tile, BLOCK_N the weight rows), optionally followed by `@<N>x<K>`: an entry for
    that GEMM shape only (`_shape_key`), which a launch of that shape takes before the kind's
    general entry. Missing file -> {}."""
    p = Path(path)
    if not p.exists():
        return {}
    return json.loads(p.read_text()).get("devices", {})


def _kind(a_mode: int, b_mode: int, gated: bool) -> str:
    return f"a{a_mode}-b{b_mode}-{'gated' if gated else 'plain'}"


def _shape_key(kind: str, N: int, K: int) -> str:
    """The table key of `kind`'s entry for one GEMM shape: N output columns per expert (the gate
    half for a gated launch: the intermediate size) and K the reduction length."""
    return f"{kind}@{N}x{K}"


def parse_kind(key: str) -> tuple[int, int, bool]:
    """(A mode, B mode, gated) of a table key, with or without a shape suffix."""
    a_part, b_part, how = key.split("@")[0].split("-")
    return int(a_part[1:]), int(b_part[1:]), how == "gated"


def heuristic_config(a_mode: int, b_mode: int, gated: bool, M: int) -> dict[str, Any]:
    """Decode-oriented default: 64-row blocks (wgmma's native M), 128-wide K (one scale group).
    w4a8: 64 weight rows (one warpgroup's wgmma M) by 16 token rows for experts with at most 16 rows
    (the `SMALL` tile), by 64 otherwise."""
    if a_mode == A_FP16_QT:
        small = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
        return dict(small, BLOCK_M=64, SMALL=dict(small, MAX_ROWS=16))
    quantised = a_mode == A_FP8G or b_mode != B_BF16
    return {
        "BLOCK_M": 64 if M > 16 else 16,
        "BLOCK_N": 128 if quantised else 64,
        "BLOCK_K": 128,
        "num_warps": 8 if quantised else 4,  # 128-wide fp8 tiles with 4 warps spill (2.4x slower on H200)
        "num_stages": 4 if not gated else 3,
    }


def _pick_config(
    a_mode: int, b_mode: int, gated: bool, M: int, device: torch.device, override, N: int, K: int
) -> dict[str, int]:
    """The config override, else the device table's entry for this shape, else for this kind,
    else `heuristic_config`."""
    if override is not None:
        return dict(override)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        kinds = for_device("masked GEMM", load_table, str(CONFIG_PATH), index)
        kind = _kind(a_mode, b_mode, gated)
        cfg = kinds.get(_shape_key(kind, N, K), kinds.get(kind))
        if cfg is not None:
            cfg = dict(cfg)
            if M <= 16:
                cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 16)
            return cfg
    return heuristic_config(a_mode, b_mode, gated, M)


def _effective_config(cfg: dict[str, int], a_mode: int, b_mode: int, out_mode: int) -> dict[str, int]:
    """The block config a launch runs with: `cfg` with what the modes force (a copy)."""
    cfg = dict(cfg)
    quantised = a_mode != A_BF16 or b_mode != B_BF16
    if quantised and cfg["BLOCK_K"] != GROUP:
        cfg["BLOCK_K"] = GROUP  # scales are per 128 channels of K: one group per K step
    if out_mode == OUT_FP8G and cfg["BLOCK_N"] != GROUP:
        cfg["BLOCK_N"] = GROUP  # one requant group per program
        cfg["num_warps"] = max(cfg.get("num_warps", 4), 8)
    return cfg


def _optional(t: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """An optional 3-d operand (scales) as a kernel takes it: the tensor and its strides, or a
    placeholder pointer (never dereferenced: its mode is off) and zero strides."""
    return (t, t.stride()) if t is not None else (dummy, (0, 0, 0))


MLP_KEYS = ("BLOCK_M", "BLOCK_N1", "BLOCK_N2", "num_warps")


def _launch_mlp(x, x_scale, w13, w13_scale, w2, w2_scale, h, h_scale, out, counts, *, a_mode, b_mode, h_mode,
                cfg) -> None:  # fmt: skip
    """The expert MLP in one launch (`_masked_mlp_kernel`) with the fused config `cfg` (the gate_up
    entry's `MLP`: BLOCK_M, BLOCK_N1 (gate_up columns; 128 when h is requantised per group),
    BLOCK_N2 (down columns), num_warps, optional num_stages, PROGRAMS_PER_SM and BLOCK_M_BIG (the
    row tile of experts with more than BLOCK_M rows; default BLOCK_M); fp8_block: H_BF16 (default
    false): h stays bf16 and the down GEMM quantises it per 128-group as it loads it, so BLOCK_N1
    need not be one group (decode: more gate_up tiles on the weight stream))."""
    missing = [k for k in MLP_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"MLP config needs keys {MLP_KEYS}; missing {missing}")
    if cfg.get("H_BF16", False) not in (False, True):
        raise ValueError(f"MLP config H_BF16 must be true or false, got {cfg['H_BF16']!r}")
    L, M, D = x.shape
    I = w2.shape[2]  # noqa: E741
    if L == 0 or M == 0:
        return
    bn1 = GROUP if h_mode == OUT_FP8G else cfg["BLOCK_N1"]
    programs = 3 if _INTERPRET else int(cfg.get("PROGRAMS_PER_SM", 2)) * sm_count(x.device.index or 0)
    sched = schedule_counters(x.device, 2 + L)
    (xs, xs_st), (gs, gs_st), (hs, hs_st), (ds, ds_st) = (
        _optional(t, counts) for t in (x_scale, w13_scale, h_scale, w2_scale)
    )
    _masked_mlp_launch(
        (programs,),
        x, xs, w13, gs, h, hs, w2, ds, out, counts, sched, L, M, D, I, *x.stride(), *xs_st, *w13.stride(),
        *gs_st, *h.stride(), *hs_st, *w2.stride(), *ds_st, *out.stride(),
        A_MODE=a_mode, H_MODE=h_mode, B_MODE=b_mode,
        B_SCALE_ROWS=GROUP if b_mode == B_FP8_BLOCK else 1, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_M_BIG=cfg.get("BLOCK_M_BIG", cfg["BLOCK_M"]), BLOCK_N1=bn1,
        BLOCK_N2=cfg["BLOCK_N2"], BLOCK_K=GROUP, GROUP_K=GROUP, L_POW2=next_pow2(L),
        UPCAST=_INTERPRET, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3),
    )  # fmt: skip


def _launch(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b: torch.Tensor,
    b_scale: torch.Tensor | None,
    out: torch.Tensor,
    out_scale: torch.Tensor | None,
    counts: torch.Tensor,
    *,
    N: int,
    K: int,
    a_mode: int,
    b_mode: int,
    out_mode: int,
    gated: bool,
    up_offset: int = 0,
    amax_in: torch.Tensor | None = None,
    amax_out: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> None:
    L, M = a.shape[0], a.shape[1]
    if L == 0 or M == 0 or N == 0:
        return
    for cfg, min_rows, max_rows in _row_regimes(
        _pick_config(a_mode, b_mode, gated, M, a.device, config, N, K), M
    ):
        _launch_one(a, a_scale, b, b_scale, out, out_scale, counts, N=N, K=K, a_mode=a_mode, b_mode=b_mode,
                    out_mode=out_mode, gated=gated, up_offset=up_offset, amax_in=amax_in, amax_out=amax_out,
                    cfg=_effective_config(cfg, a_mode, b_mode, out_mode), min_rows=min_rows,
                    max_rows=max_rows)  # fmt: skip


def _row_regimes(cfg: dict[str, Any], M: int) -> list[tuple[dict[str, Any], int, int]]:
    """(config, min rows, max rows) per launch. A config with a `SMALL` entry (a config of its own
    plus `MAX_ROWS`) runs as two launches over the same grid of experts: experts with at most
    MAX_ROWS valid rows take the small tile (decode: 16-row mma.sync tiles), the others the main
    tile; each program reads its expert's count on the device and skips the experts of the other
    launch, so the choice needs no host sync. Capacity M <= MAX_ROWS: the small launch only."""
    cfg = dict(cfg)
    small = cfg.pop("SMALL", None)
    if small is None:
        return [(cfg, 0, _ALL_ROWS)]
    small = dict(small)
    cap = int(small.pop("MAX_ROWS"))
    if M <= cap:
        return [(small, 0, _ALL_ROWS)]
    return [(small, 0, cap), (cfg, cap + 1, _ALL_ROWS)]


SPLIT_TARGET_CTAS = 2
"""Automatic split-K (see `_split_plan`) aims at this many programs per SM..."""
SPLIT_MIN_TILES = 16
"""...and keeps at least this many K blocks per split (the loads pipeline over them; shorter splits
do not repay the reduction)."""


def _split_plan(cfg: dict[str, Any], K: int, rows: int, tiles: int, num_sms: int) -> tuple[int, int]:
    """(K splits, K blocks per split) of a launch of `tiles` output tiles (experts x n-blocks).

    Config `SPLIT_K`: that many; absent: automatic for launches of one m-block per expert (`rows`,
    the most valid rows the launch sees, at most BLOCK_M: a SMALL tile, or a capacity within one
    block) whose tiles are fewer than the SMs, with enough splits for SPLIT_TARGET_CTAS programs
    per SM, keeping SPLIT_MIN_TILES K blocks per split. That is the down GEMM of few local experts
    with a long K (Mixtral-class decode: 2 experts x 64 n-blocks, each walking K = 14336): on an
    H200 (2026-11-23) 3 splits took the bf16 expert MLP from 229 to 173 us, fp8_block from 134 to
    115, w4a8 from 137 to 121; splitting Mixtral's gate_up (448 tiles) lost 5%, and Qwen3's gate_up
    (96-192 tiles, but only 16 K blocks) 15-20%. At most one split per K block; empty splits dropped. An
    explicit SPLIT_K > 1 on a launch of more rows than BLOCK_M is an error."""
    block_k = cfg["BLOCK_K"]
    k_tiles = cdiv(K, block_k)
    if "SPLIT_K" in cfg:
        split = int(cfg["SPLIT_K"])
    elif rows <= cfg["BLOCK_M"] and tiles < num_sms:
        split = min(cdiv(SPLIT_TARGET_CTAS * num_sms, max(tiles, 1)), k_tiles // SPLIT_MIN_TILES)
    else:
        split = 1
    split = max(1, min(split, k_tiles))
    if split > 1 and rows > cfg["BLOCK_M"]:
        raise ValueError(
            f"SPLIT_K={split} needs a launch of at most BLOCK_M={cfg['BLOCK_M']} rows per expert (a SMALL "
            f"tile, MAX_ROWS <= BLOCK_M); this one takes up to {rows}"
        )
    return k_splits(k_tiles, split)


def _flag(cfg: dict[str, Any], key: str) -> bool:
    """A config's boolean key (default false), or a clear error naming it."""
    value = cfg.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"config {key} must be true or false, got {value!r}")
    return value


def _preload_flag(cfg: dict[str, Any], a_mode: int, b_mode: int) -> bool:
    """A config's `SCALE_PRELOAD` (default false; see `_masked_acc`), checked against the modes and
    tile it needs: fp8 group-scaled A, fp8 block-scaled B, BLOCK_N dividing one 128-row scale block."""
    pre = _flag(cfg, "SCALE_PRELOAD")
    if pre and (a_mode != A_FP8G or b_mode != B_FP8_BLOCK or GROUP % cfg["BLOCK_N"]):
        raise ValueError(
            f"config SCALE_PRELOAD needs fp8 x and fp8_block weights (scheme 'fp8_block') with BLOCK_N "
            f"dividing {GROUP}; got kind {_kind(a_mode, b_mode, False).rsplit('-', 1)[0]}, BLOCK_N {cfg['BLOCK_N']}"
        )
    return pre


def _launch_one(a, a_scale, b, b_scale, out, out_scale, counts, *, N, K, a_mode, b_mode, out_mode, gated,
                up_offset, amax_in, amax_out, cfg, min_rows, max_rows) -> None:  # fmt: skip
    L, M = a.shape[0], a.shape[1]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    n_blocks = cdiv(N, bn)
    num_sms = sm_count(a.device.index or 0) if a.is_cuda else 8
    # m-lanes per (expert, n-block): lanes past the valid blocks exit at once, but each still
    # costs a CTA launch; GRID_M in the config caps them (1 = one lane walks all valid blocks)
    lanes = cfg.get("GRID_M") or max(4, cdiv(2 * num_sms, max(L * n_blocks, 1)))
    # a launch whose experts have at most BLOCK_M rows (a SMALL tile's launch, or a capacity within
    # one block) has one m-block per expert: a second lane could only exit (H200, Qwen3-30B-A3B decode:
    # an empty gate_up launch pair cost 4.9 us, mostly programs that exit at once)
    grid_m = 1 if min(M, max_rows) <= bm else min(cdiv(M, bm), lanes)
    dummy = counts  # placeholder pointer for unused operands (never dereferenced)
    split, split_tiles = _split_plan(cfg, K, min(M, max_rows), L * n_blocks, num_sms)
    ws = counters = dummy
    if split > 1:  # one m-block per expert; partial tiles [1 or 2, BLOCK_M, BLOCK_N] per split
        grid_m = 1
        ws = torch.empty(
            L * n_blocks * split * (2 if gated else 1) * bm * bn, dtype=torch.float32, device=a.device
        )
        counters = arrival_counters(a.device, L * n_blocks)
    (a_s, a_s_strides), (b_s, b_s_strides), (o_s, o_s_strides) = (
        _optional(t, dummy) for t in (a_scale, b_scale, out_scale)
    )
    warps = cfg.get("num_warps", 4)
    grid = (grid_m, n_blocks * split, L)
    if a_mode == A_FP16_QT:
        if "SCALE_PRELOAD" in cfg:
            raise ValueError("config key SCALE_PRELOAD applies to scheme 'fp8_block' only (w4a8: FOLD_SCALE)")
        _masked_w4a8_launch(
            grid,
            a, b, b_scale, out, counts, amax_in, amax_out if amax_out is not None else dummy, ws, counters,
            M, N, K, up_offset, min_rows, max_rows, split_tiles, *a.stride(), *b.stride(), *b_scale.stride(),
            *out.stride(), OUT_MODE=out_mode, GATED=gated, BLOCK_M=bm, BLOCK_N=bn, WARPS=warps,
            UPCAST=_INTERPRET, ASM=not _INTERPRET, SPLIT_K=split, FOLD_SCALE=_flag(cfg, "FOLD_SCALE"),
            num_warps=warps, num_stages=cfg.get("num_stages", 3),
        )  # fmt: skip
        return
    if "FOLD_SCALE" in cfg:
        raise ValueError("config key FOLD_SCALE applies to scheme 'w4a8' only")
    _masked_gemm_launch(
        grid,
        a, a_s, b, b_s, out, o_s, counts, ws, counters, M, N, K, up_offset, min_rows, max_rows, split_tiles,
        *a.stride(), *a_s_strides, *b.stride(), *b_s_strides, *out.stride(), *o_s_strides,
        A_MODE=a_mode, B_MODE=b_mode, OUT_MODE=out_mode, GATED=gated,
        B_SCALE_ROWS=GROUP if b_mode == B_FP8_BLOCK else 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"],
        GROUP_K=GROUP, UPCAST=_INTERPRET, SPLIT_K=split,
        PRELOAD=next_pow2(split_tiles) if _preload_flag(cfg, a_mode, b_mode) else 0,
        num_warps=warps, num_stages=cfg.get("num_stages", 3),
    )  # fmt: skip


@triton.jit
def _masked_group_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    counts_ptr,
    M,
    stride_xl,
    stride_xm,
    stride_xd,
    stride_ql,
    stride_qm,
    stride_qd,
    stride_sl,
    stride_sm,
    stride_sg,
    EPS: tl.constexpr,
    FMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
):
    """Per-token-group e4m3 quantisation of the valid rows (< counts[e]) of x [L, M, D]: program
    (group g, expert e) walks its rows; rows past the count are neither read nor written. Rounds
    as `quant.per_token_group_quant_fp8` does (IEEE divisions, exact rounding to the e4m3 grid)."""
    g = tl.program_id(0)
    e = tl.program_id(1)
    count = tl.minimum(tl.load(counts_ptr + e), M)
    offs_d = g * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    x_base = x_ptr + e.to(tl.int64) * stride_xl
    q_base = q_ptr + e.to(tl.int64) * stride_ql
    s_base = s_ptr + e.to(tl.int64) * stride_sl + g * stride_sg
    for m0 in range(0, count, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = offs_m < count
        x = tl.load(
            x_base + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd, mask=mask[:, None], other=0.0
        ).to(tl.float32)
        scale = e4m3_scale(tl.max(tl.abs(x), axis=1), EPS, FMAX)
        q = to_e4m3_grid(x, scale[:, None], FMAX)
        tl.store(
            q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            q.to(q_ptr.dtype.element_ty),
            mask=mask[:, None],
        )
        tl.store(s_base + offs_m * stride_sm, scale, mask=mask)


_masked_group_quant_launch = FastLaunch(_masked_group_quant_kernel)


def _masked_group_quant(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 x [L, M, D] -> (e4m3 [L, M, D], fp32 scales [L, M, D/128] column-major, as DeepEP's
    low-latency FP8 dispatch delivers them), valid rows only (the rest is left unwritten).

    Why a pass of its own rather than quantising inside the GEMM's K loop, as this file once did:
    every N-block program re-quantised the same x tile there, and on an H200 (DeepSeek-V3 decode
    shapes) that loop cost 3.7x the GEMM once it rounded exactly as the reference does, while
    without exact rounding the kernel-vs-reference error was 2-3x that of pre-quantised fp8 x."""
    L, M, D = x.shape
    q = torch.empty((L, M, D), dtype=FP8_DTYPE, device=x.device)
    scales = _scales_empty((L, M), D // GROUP, True, x.device)  # column-major, as DeepEP delivers
    if L and M and D:
        _masked_group_quant_launch(
            (D // GROUP, L),
            x, q, scales, counts, M, *x.stride(), *q.stride(), *scales.stride(),
            EPS=SCALE_EPS, FMAX=FP8_MAX, BLOCK_M=32, GROUP_SIZE=GROUP, num_warps=4,
        )  # fmt: skip
    return q, scales


def _masked_tensor_quant(x: torch.Tensor, counts: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x [L, M, K] (K a multiple of 128) -> fp16 [L, M, K]: the valid rows quantised per tensor onto
    the e4m3 grid with scale `max(amax, 1e-10) / 448`, each 128-group's columns in the order
    `_masked_w4a8_kernel` reads them (`_w4a8_x_source`); the other rows are left unwritten.

    A pass of its own, as `_masked_group_quant` is, rather than inside the GEMM's K loop: there
    every N-block program re-quantised the same x tile."""
    L, M, K = x.shape
    q = torch.empty((L, M, K), dtype=torch.float16, device=x.device)
    if L and M and K:
        _masked_tensor_quant_launch(
            (K // GROUP, L), x, q, counts, amax, M, *x.stride(), *q.stride(), BLOCK_M=32, num_warps=4
        )
    return q


def _masked_amax(x: torch.Tensor, counts: torch.Tensor, amax: torch.Tensor) -> None:
    L, M, D = x.shape
    if L == 0 or M == 0 or D == 0:
        return
    bm, bd = 8, 512
    grid = (cdiv(D, bd), L, min(cdiv(M, bm), 4))
    _masked_amax_launch(grid, x, counts, amax, M, D, *x.stride(), BLOCK_M=bm, BLOCK_D=bd, num_warps=4)


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _check_counts(counts: torch.Tensor, L: int, device: torch.device) -> None:
    if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int32 or tuple(counts.shape) != (L,):
        raise ValueError(
            f"counts must be a [L={L}] int32 tensor, got {getattr(counts, 'dtype', type(counts))} "
            f"{tuple(getattr(counts, 'shape', ()))}"
        )
    if counts.device != device:
        raise ValueError(f"counts is on {counts.device} but x is on {device}")
    if not counts.is_contiguous():
        raise ValueError("counts must be contiguous")


def _check_device(name: str, t: torch.Tensor | None, device: torch.device) -> None:
    if t is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_runnable(device: torch.device) -> None:
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"masked grouped GEMM needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
        )


def _check_group_scale(name: str, s: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if s is None:
        raise ValueError(f"{name} is required for float8_e4m3fn input: float32 {list(shape)}")
    if s.dtype != torch.float32 or tuple(s.shape) != shape:
        raise ValueError(f"{name} must be float32 {list(shape)}, got {s.dtype} {list(s.shape)}")


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def masked_grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    counts: torch.Tensor,
    *,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Per-expert `out[e, :counts[e]] = a[e, :counts[e]] @ b[e]^T`.

    Args:
        a: `[L, M, K]` bfloat16, or float8_e4m3fn with `a_scale` `[L, M, K/128]` float32 (any
            strides, e.g. DeepEP's column-major view). Rows >= counts[e] are never read.
        b: `[L, N, K]` bfloat16, or float8_e4m3fn with `b_scale` `[L, ceil(N/128), ceil(K/128)]`
            float32 (`quantize_fp8_block`). fp8 `a` with bf16 `b` is dequantised to bf16 in-kernel;
            bf16 `a` with fp8 `b` is quantised per-token-group-128 first (valid rows only).
        counts: `[L]` int32 valid rows per expert, on a's device (values above M act as M).
        out_dtype: bfloat16 or float32.
        config: block config override (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages; optional
            GRID_M, SPLIT_K (see `_split_plan`), SMALL (see `_row_regimes`)), as in the tuned tables.
    Returns: `[L, M, N]` out_dtype; rows >= counts[e] are undefined (not written).
    """
    if a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"a must be [L, M, K] and b [L, N, K], got {list(a.shape)} and {list(b.shape)}")
    L, M, K = a.shape
    if b.shape[0] != L or b.shape[2] != K:
        raise ValueError(f"b must be [L={L}, N, K={K}], got {list(b.shape)}")
    N = b.shape[1]
    if a.dtype not in (torch.bfloat16, FP8_DTYPE):
        raise ValueError(f"a.dtype must be bfloat16 or float8_e4m3fn, got {a.dtype}")
    if b.dtype not in (torch.bfloat16, FP8_DTYPE):
        raise ValueError(f"b.dtype must be bfloat16 or float8_e4m3fn, got {b.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype must be torch.bfloat16 or torch.float32, got {out_dtype}")
    _check_counts(counts, L, a.device)
    for name, t in (("b", b), ("a_scale", a_scale), ("b_scale", b_scale)):
        _check_device(name, t, a.device)
    _check_runnable(a.device)
    quantised = a.dtype == FP8_DTYPE or b.dtype == FP8_DTYPE
    if quantised and K % GROUP:
        raise ValueError(f"K ({K}) must be a multiple of {GROUP} for float8 operands")
    if a.dtype == FP8_DTYPE:
        _check_group_scale("a_scale", a_scale, (L, M, K // GROUP))
    if b.dtype == FP8_DTYPE:
        _check_group_scale("b_scale", b_scale, (L, cdiv(N, GROUP), K // GROUP))
    if a.dtype != FP8_DTYPE and b.dtype == FP8_DTYPE:
        a, a_scale = _masked_group_quant(a, counts)  # bf16 a for fp8 b: quantised per token group first
    if a.dtype == FP8_DTYPE:
        a_mode = A_FP8G if b.dtype == FP8_DTYPE else A_FP8G_DEQ
    else:
        a_mode = A_BF16
    b_mode = B_FP8_BLOCK if b.dtype == FP8_DTYPE else B_BF16
    out = torch.empty((L, M, N), dtype=out_dtype, device=a.device)
    _launch(
        a,
        a_scale if a.dtype == FP8_DTYPE else None,
        b,
        b_scale if b.dtype == FP8_DTYPE else None,
        out,
        None,
        counts,
        N=N,
        K=K,
        a_mode=a_mode,
        b_mode=b_mode,
        out_mode=OUT_PLAIN,
        gated=False,
        config=config,
    )
    return out


def masked_moe(
    x: torch.Tensor,
    counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    scheme: str = "bf16",
    x_scale: torch.Tensor | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    configs: tuple[dict[str, int] | None, dict[str, int] | None] = (None, None),
) -> torch.Tensor:
    """Expert MLP `down(silu(gate) * up)` over the valid rows of the low-latency layout (unweighted:
    combine applies the top-k weights).

    Args:
        x: `[L, M, D]` bfloat16; or float8_e4m3fn with `x_scale` `[L, M, D/128]` float32 (possibly
            a column-major view) for schemes `bf16` and `fp8_block`. Rows >= counts[e] are never read.
        counts: `[L]` int32 valid rows per expert, on x's device.
        w13: `[L, 2I, D]`: gate rows [0, I), up rows [I, 2I). bf16 (`bf16`), float8_e4m3fn with
            `w13_scale` `[L, ceil(2I/128), D/128]` (`fp8_block`), or uint8 `[L, 2I, D/2]` packed int4
            with `w13_scale` `[L, 2I, D/128]` (`w4a8`).
        w2: `[L, D, I]` (or `[L, D, I/2]` uint8 for `w4a8`) with `w2_scale` likewise.
        scheme: `bf16` | `fp8_block` | `w4a8`.
            - bf16: bf16 dots; fp8 x is dequantised to bf16 in-kernel.
            - fp8_block: fp8 dots with per-token-group-128 activation scales (from x_scale, or
              quantised from bf16 x over its valid rows first) times 128x128 weight-block scales; the intermediate
              is requantised per-token-group-128 (from its fp32 value) in the gate_up epilogue. A
              config with `SCALE_PRELOAD: true` loads each program's scales before its K loop
              (same results; `fused_moe.PRELOAD_NOTE`).
            - w4a8: x must be bf16; it is quantised per-tensor onto the e4m3 grid (a pass before
              the GEMM) with scale = max(amax over the valid rows of x, 1e-10) / 448 computed on
              device; int4 weights are unpacked in-kernel (exact) and scaled per 128-group of K
              inside the K loop; the bf16 intermediate is requantised per-tensor the same way (amax
              folded by the gate_up epilogue). The dots form exactly the products of e4m3 operands
              (held as fp16) and accumulate them in fp32; a config with `FOLD_SCALE: true` folds the
              group scales into the fp16 weights instead (`W4A8_FOLD_NOTE`).
        configs: block-config overrides for (gate_up, down), with the keys of `masked_grouped_gemm`'s
            `config`. A gate_up config (override or table entry) with an `MLP` entry (BLOCK_M,
            BLOCK_N1, BLOCK_N2, num_warps, optional num_stages and PROGRAMS_PER_SM) runs the bf16
            and fp8_block MLP as one persistent launch (`_masked_mlp_kernel`) instead.
    Returns: `[L, M, D]` bfloat16; rows >= counts[e] are undefined (not written).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be [L, M, D], got {list(x.shape)}")
    L, M, D = x.shape
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != L or w2.shape[0] != L:
        raise ValueError(f"w13 and w2 must be [L={L}, ., .], got {list(w13.shape)} and {list(w2.shape)}")
    _check_counts(counts, L, x.device)
    for name, t in (
        ("w13", w13),
        ("w2", w2),
        ("x_scale", x_scale),
        ("w13_scale", w13_scale),
        ("w2_scale", w2_scale),
    ):
        _check_device(name, t, x.device)
    _check_runnable(x.device)
    if x.dtype not in (torch.bfloat16, FP8_DTYPE):
        raise ValueError(f"x.dtype must be bfloat16 or float8_e4m3fn, got {x.dtype}")
    if x.dtype == FP8_DTYPE:
        if scheme == "w4a8":
            raise ValueError(
                "scheme 'w4a8' takes bfloat16 x (it quantises per-tensor itself); got float8_e4m3fn"
            )
        if D % GROUP:
            raise ValueError(f"D ({D}) must be a multiple of {GROUP} for float8_e4m3fn x")
        _check_group_scale("x_scale", x_scale, (L, M, D // GROUP))

    want = {"bf16": torch.bfloat16, "fp8_block": FP8_DTYPE, "w4a8": torch.uint8}[scheme]
    if w13.dtype != want or w2.dtype != want:
        what = "packed uint8 (quantize_w4a8)" if scheme == "w4a8" else str(want).replace("torch.", "")
        raise ValueError(f"scheme {scheme!r} needs {what} w13/w2, got {w13.dtype}/{w2.dtype}")
    packed = scheme == "w4a8"
    two_i = w13.shape[1]
    I = w2.shape[2] * (2 if packed else 1)  # noqa: E741 (DESIGN.md term)
    if two_i != 2 * I or w13.shape[2] * (2 if packed else 1) != D or w2.shape[1] != D:
        raise ValueError(
            f"scheme {scheme!r}: w13 must be [L, 2I, D{'/2' if packed else ''}] and w2 [L, D, I{'/2' if packed else ''}] "
            f"for x [L, M, D={D}]; got w13 {list(w13.shape)}, w2 {list(w2.shape)}"
        )
    out = torch.empty((L, M, D), dtype=torch.bfloat16, device=x.device)
    cfg1, cfg2 = configs

    if scheme == "bf16":
        h = torch.empty((L, M, I), dtype=torch.bfloat16, device=x.device)
        a_mode = A_FP8G_DEQ if x.dtype == FP8_DTYPE else A_BF16
        mlp = _pick_config(a_mode, B_BF16, True, M, x.device, cfg1, I, D).get("MLP")
        if mlp is not None:
            _launch_mlp(x, x_scale if x.dtype == FP8_DTYPE else None, w13, None, w2, None, h, None, out, counts,
                        a_mode=a_mode, b_mode=B_BF16, h_mode=OUT_PLAIN, cfg=mlp)  # fmt: skip
            return out
        _launch(x, x_scale if x.dtype == FP8_DTYPE else None, w13, None, h, None, counts, N=I, K=D,
                a_mode=a_mode, b_mode=B_BF16, out_mode=OUT_PLAIN, gated=True, up_offset=I, config=cfg1)  # fmt: skip
        _launch(h, None, w2, None, out, None, counts, N=D, K=I,
                a_mode=A_BF16, b_mode=B_BF16, out_mode=OUT_PLAIN, gated=False, config=cfg2)  # fmt: skip
        return out

    if D % GROUP or I % GROUP:
        raise ValueError(f"scheme {scheme!r} needs D ({D}) and I ({I}) multiples of {GROUP}")

    if scheme == "fp8_block":
        _check_group_scale("w13_scale", w13_scale, (L, 2 * I // GROUP, D // GROUP))
        _check_group_scale("w2_scale", w2_scale, (L, D // GROUP, I // GROUP))
        if x.dtype != FP8_DTYPE:
            x, x_scale = _masked_group_quant(x, counts)  # as DeepEP's FP8 dispatch would have delivered it
        mlp = _pick_config(A_FP8G, B_FP8_BLOCK, True, M, x.device, cfg1, I, D).get("MLP")
        if mlp is not None and mlp.get("H_BF16", False):  # bf16 h, quantised as the down GEMM loads it
            h = torch.empty((L, M, I), dtype=torch.bfloat16, device=x.device)
            h_s, h_mode = None, OUT_PLAIN
        else:  # h requantised per token group by the gate_up epilogue
            h = torch.empty((L, M, I), dtype=FP8_DTYPE, device=x.device)
            h_s = torch.empty((L, M, I // GROUP), dtype=torch.float32, device=x.device)
            h_mode = OUT_FP8G
        if mlp is not None:
            _launch_mlp(x, x_scale, w13, w13_scale, w2, w2_scale, h, h_s, out, counts, a_mode=A_FP8G,
                        b_mode=B_FP8_BLOCK, h_mode=h_mode, cfg=mlp)  # fmt: skip
            return out
        _launch(x, x_scale, w13, w13_scale, h, h_s, counts, N=I, K=D,
                a_mode=A_FP8G, b_mode=B_FP8_BLOCK, out_mode=OUT_FP8G, gated=True, up_offset=I, config=cfg1)  # fmt: skip
        _launch(h, h_s, w2, w2_scale, out, None, counts, N=D, K=I,
                a_mode=A_FP8G, b_mode=B_FP8_BLOCK, out_mode=OUT_PLAIN, gated=False, config=cfg2)  # fmt: skip
        return out

    # w4a8
    _check_group_scale("w13_scale", w13_scale, (L, 2 * I, D // GROUP))
    _check_group_scale("w2_scale", w2_scale, (L, D, I // GROUP))
    amax = torch.zeros(2, dtype=torch.float32, device=x.device)  # [amax(x valid rows), amax(h)]
    _masked_amax(x, counts, amax[0:1])
    xq = _masked_tensor_quant(x, counts, amax[0:1])
    h = torch.empty((L, M, I), dtype=torch.bfloat16, device=x.device)
    _launch(xq, None, w13, w13_scale, h, None, counts, N=I, K=D, a_mode=A_FP16_QT, b_mode=B_INT4,
            out_mode=OUT_AMAX, gated=True, up_offset=I, amax_in=amax[0:1], amax_out=amax[1:2], config=cfg1)  # fmt: skip
    hq = _masked_tensor_quant(h, counts, amax[1:2])
    _launch(hq, None, w2, w2_scale, out, None, counts, N=D, K=I, a_mode=A_FP16_QT, b_mode=B_INT4,
            out_mode=OUT_PLAIN, gated=False, amax_in=amax[1:2], config=cfg2)  # fmt: skip
    return out


def masked_moe_reference(
    x: torch.Tensor,
    counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    scheme: str = "bf16",
    x_scale: torch.Tensor | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    round_bf16: Callable[[torch.Tensor], torch.Tensor] | None = None,
    h_bf16: bool = False,
    fold_scale: bool = False,
) -> torch.Tensor:
    """Plain-torch float32 reference with the same activation-quantisation semantics as `masked_moe`
    (host-side loop over experts; for tests and benchmarks only). Rows >= counts[e] are zero.
    `h_bf16` (fp8_block): the intermediate is rounded to bf16 before its group quantisation, as the
    one-launch MLP with `H_BF16` does. `fold_scale` (w4a8): the weights as a `FOLD_SCALE` config
    forms them, each scaled weight rounded to fp16 (`dequantize_w4a8(..., fold_fp16=True)`).

    `round_bf16`: how the kernel's backend rounds float32 to bfloat16 where the kernel does (the
    dequantised fp8 input of the bf16 scheme, the bf16 intermediate); default torch's round to
    nearest even, as on the GPU. Tests under Triton's interpreter pass its rounding (truncation)."""
    if round_bf16 is None:

        def round_bf16(t: torch.Tensor) -> torch.Tensor:
            return t.to(torch.bfloat16)

    from .quant import (
        dequantize_fp8_block,
        dequantize_w4a8,
        per_tensor_quant_fp8,
        per_token_group_dequant_fp8,
        per_token_group_quant_fp8,
    )

    L, M, D = x.shape
    out = torch.zeros((L, M, D), dtype=torch.float32, device=x.device)
    n = counts.clamp(max=M).tolist()  # host sync: reference only
    if scheme == "bf16":
        w13f, w2f = w13.float(), w2.float()
    elif scheme == "fp8_block":
        w13f, w2f = dequantize_fp8_block(w13, w13_scale), dequantize_fp8_block(w2, w2_scale)
    else:
        w13f = dequantize_w4a8(w13, w13_scale, fold_fp16=fold_scale)
        w2f = dequantize_w4a8(w2, w2_scale, fold_fp16=fold_scale)
    I = w2f.shape[2]  # noqa: E741

    if scheme == "w4a8":
        valid = torch.cat([x[e, : n[e]] for e in range(L)]).float()
        s_x = per_tensor_quant_fp8(valid)[1] if valid.numel() else torch.full((1,), SCALE_EPS / FP8_MAX)
        hs = []
        for e in range(L):
            xq = (x[e, : n[e]].float() / s_x).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s_x
            gu = xq @ w13f[e].t()
            hs.append(round_bf16(torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]))
        hv = torch.cat(hs).float()
        s_h = per_tensor_quant_fp8(hv)[1] if hv.numel() else torch.full((1,), SCALE_EPS / FP8_MAX)
        for e in range(L):
            hq = (hs[e].float() / s_h).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s_h
            out[e, : n[e]] = hq @ w2f[e].t()
        return out

    for e in range(L):
        xe = x[e, : n[e]]
        if x.dtype == FP8_DTYPE:
            xs = x_scale[e, : n[e]]
            xe = per_token_group_dequant_fp8(xe, xs, GROUP, torch.float32)
            if scheme == "bf16":
                xe = round_bf16(xe)
        elif scheme == "fp8_block":
            xq, xs = per_token_group_quant_fp8(xe.float(), GROUP)
            xe = per_token_group_dequant_fp8(xq, xs, GROUP, torch.float32)
        gu = xe.float() @ w13f[e].t()
        h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
        if scheme == "fp8_block":
            if h_bf16:
                h = round_bf16(h).float()
            hq, hs_ = per_token_group_quant_fp8(h, GROUP)
            h = per_token_group_dequant_fp8(hq, hs_, GROUP, torch.float32)
        else:
            h = round_bf16(h).float()
        out[e, : n[e]] = h @ w2f[e].t()
    return out
