"""Fused MoE for the normal (flat) layout: token alignment, gate_up GEMM with SiLU*mul in its epilogue,
down GEMM with the top-k weight (and optionally the top-k sum) in its epilogue.

Pipeline of `fused_moe` (no host synchronisation anywhere; CUDA-graph capturable):

    topk_ids [T, K] --moe_align_block_size--> sorted_token_ids (slots grouped by expert, padded to BLOCK_M)
    x [T, D] --gate_up grouped GEMM (rows gathered by slot // K), SiLU(gate) * up in the epilogue-->
        act [S, I] (row p = slot sorted_token_ids[p]; padding rows unwritten); the same launch
        zero-fills the down GEMM's output (no fill launch of its own)
    (fp8 schemes: act quantised per token per 128-channel group, in the gate_up epilogue where its
    N-block holds whole groups (`QUANT_OUT`), else by one more launch)
    act --down grouped GEMM (contiguous row blocks), * topk_weight in the epilogue--> either
        fused top-k sum:  fp32 acc [T, D] += (tl.atomic_add at row slot // K), then one cast to out_dtype
        unfused:          tmp [T*K, D] out_dtype, then one launch sums each token's K rows in fp32
    A decode config may split the down GEMM's K (`SPLIT_K`): its partial sums are then added
    atomically in fp32 (into acc, or into an fp32 tmp on the unfused path).

Schemes (see `SCHEMES`): "bf16" (bf16 weights; fp8 input is dequantised first), "fp8_block" (e4m3
weights with 128x128 block scales, fp8 activations with per-token-group-128 scales, fp8 tl.dot with
both scales applied per K-block), "w4a8" (int4 weights packed two per byte with a scale per (row,
128-group of K), unpacked in-kernel to e4m3 (-8..7 are exact) and multiplied with fp8 tl.dot).

Under the Triton interpreter (CPU tests) bf16 tl.dot is wrong, so the kernel upcasts bf16 operands to
fp32 through the `UPCAST` constexpr, set only when `TRITON_INTERPRET=1`; the GPU keeps native
bf16/fp8 tensor-core dots.
"""

from __future__ import annotations

import json
import math
import os
from functools import cache
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ep_runtime.kernels.launch import FastLaunch
from ep_runtime.kernels.quant import (
    FP8_DTYPE,
    int4_to_e4m3,
    per_token_group_dequant_fp8,
    per_token_group_quant_fp8,
    quant_rows_e4m3,
)
from ep_runtime.kernels.tables import cdiv, for_device, k_splits, next_pow2, normalise

SCHEMES = ("bf16", "fp8_block", "w4a8")
GROUP = 128
"""Quantisation group along K (activations and w4a8 weights) and the fp8_block weight tile side."""
_SCHEME_ID = {"bf16": 0, "fp8_block": 1, "w4a8": 2}
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MIN_SCALE = tl.constexpr(1e-15)
"""RESCALE's floor on fp8/int4 scales: below any scale the quantisers make (1e-10 / 448), and high
enough that an accumulator in units of two floored scales (1e-30) stays finite."""


# --------------------------------------------------------------------------------------------------
# Token alignment
# --------------------------------------------------------------------------------------------------


def align_buffer_size(num_slots: int, block_m: int, num_experts: int) -> int:
    """Worst-case length of `sorted_token_ids` for `num_slots = T*K` slots: each non-empty expert
    (at most min(E, T*K) of them) pads by at most block_m - 1; rounded up to a multiple of block_m."""
    worst = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return cdiv(worst, block_m) * block_m


@triton.jit
def _local_ids(ids_ptr, map_ptr, offs, num_slots, num_experts, HAS_MAP: tl.constexpr):
    """The local expert id of each slot in `offs` (through the expert map when there is one) and
    whether it is one of this rank's experts (`-1`, out of range and non-local ids are not)."""
    ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1)
    ok = (ids >= 0) & (ids < num_experts)
    if HAS_MAP:
        ids = tl.load(map_ptr + ids, mask=ok, other=-1).to(ids.dtype)
        ok = ok & (ids >= 0) & (ids < num_experts)
    return ids, ok


@triton.jit
def _moe_align_kernel(
    # pointers
    ids_ptr,
    map_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_ptr,
    # sizes
    num_slots,
    num_experts,
    size,
    # meta
    HAS_MAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_BINS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program per expert bucket. Each program histograms all slots (redundantly, so no second
    launch or grid sync is needed), takes its padded start from the prefix sum, then writes its slots
    in slot order, its padding sentinels and its blocks' expert id. Program 0 also writes the padded
    total and the tail past it (sentinels, expert id -1)."""
    e = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids, ok = _local_ids(ids_ptr, map_ptr, offs, num_slots, num_experts, HAS_MAP)
        b = tl.where(ok, ids, num_experts).to(tl.int32)
        counts += tl.histogram(b, NUM_BINS)
    padded = tl.where(bins < num_experts, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    my_start = tl.sum(tl.where(bins < e, padded, 0), axis=0)
    my_count = tl.sum(tl.where(bins == e, counts, 0), axis=0)
    my_padded = tl.sum(tl.where(bins == e, padded, 0), axis=0)

    running = my_start
    for start in range(0, num_slots, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids, ok = _local_ids(ids_ptr, map_ptr, offs, num_slots, num_experts, HAS_MAP)
        mine = ok & (ids == e)
        rank = tl.cumsum(mine.to(tl.int32), axis=0) - 1
        tl.store(sorted_ids_ptr + running + rank, offs.to(tl.int32), mask=mine)
        running += tl.sum(mine.to(tl.int32), axis=0)
    offs_p = tl.arange(0, BLOCK_M)
    pad_pos = my_start + my_count + offs_p
    tl.store(
        sorted_ids_ptr + pad_pos,
        tl.full((BLOCK_M,), 0, tl.int32) + num_slots,
        mask=pad_pos < my_start + my_padded,
    )
    for blk in range(my_start // BLOCK_M, (my_start + my_padded) // BLOCK_M):
        tl.store(expert_ids_ptr + blk, e)
    if e == 0:
        total = tl.sum(padded, axis=0)
        tl.store(num_post_ptr, total)
        for start in range(total, size, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            tl.store(sorted_ids_ptr + offs, tl.full((CHUNK,), 0, tl.int32) + num_slots, mask=offs < size)
            tail_blk = offs // BLOCK_M
            tl.store(
                expert_ids_ptr + tail_blk,
                tl.full((CHUNK,), -1, tl.int32),
                mask=(offs < size) & (offs % BLOCK_M == 0),
            )


_moe_align_launch = FastLaunch(_moe_align_kernel)


def _check_align_args(topk_ids, block_m, num_experts, expert_map) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(
            f"topk_ids must be a [T, K] tensor, got {getattr(topk_ids, 'shape', type(topk_ids))}"
        )
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_ids.dtype must be int64 (or int32), got {topk_ids.dtype}")
    if not isinstance(block_m, int) or block_m <= 0:
        raise ValueError(f"block_m must be a positive int, got {block_m!r}")
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if expert_map is not None:
        if expert_map.dim() != 1 or expert_map.shape[0] != num_experts:
            raise ValueError(f"expert_map must be [num_experts={num_experts}], got {tuple(expert_map.shape)}")
        if expert_map.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expert_map.dtype must be int32, got {expert_map.dtype}")
        if expert_map.device != topk_ids.device:
            raise ValueError(f"expert_map is on {expert_map.device} but topk_ids is on {topk_ids.device}")


def _align_chunk(num_slots: int) -> int:
    """Slots per step of the align kernel's scans: the slots rounded up to a power of two, 32 to
    1024 (4096 past 4096 slots)."""
    return 4096 if num_slots > 4096 else min(1024, max(32, next_pow2(num_slots)))


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the token slots by expert and pad each expert's group to a multiple of `block_m`.

    Args:
        topk_ids: `[T, K]` int64 expert ids; -1 (or any id outside [0, num_experts)) = skip the slot.
        block_m: rows per M-block of the grouped GEMM (positive).
        num_experts: number of experts the ids index (the size of `expert_map` when given).
        expert_map: optional `[num_experts]` int32 global id -> local id (-1 = not on this rank). The
            result's expert ids are then local ids; they must be < num_experts (always true when
            L <= E). Counting uses num_experts buckets, so the local count L is never needed (no sync):
            unused buckets are empty and take no blocks.
    Returns:
        sorted_token_ids: `[S]` int32 flat slot indices `t*K + k`, grouped by expert in ascending
            expert order, slot order kept within an expert, each group padded with the sentinel `T*K`
            up to a multiple of block_m; entries past the padded total are the sentinel too.
            `S = align_buffer_size(T*K, block_m, num_experts)` (worst case, so no host sync).
        expert_ids: `[S / block_m]` int32 expert of each M-block, -1 for blocks past the padded total.
        num_tokens_post_padded: `[1]` int32 on topk_ids' device, the padded total.
    One Triton launch on CUDA (and under the interpreter); plain torch ops otherwise. No host sync.
    """
    _check_align_args(topk_ids, block_m, num_experts, expert_map)
    dev = topk_ids.device
    num_slots = topk_ids.numel()
    size = align_buffer_size(num_slots, block_m, num_experts)
    if num_slots == 0:
        return (
            torch.full((size,), num_slots, dtype=torch.int32, device=dev),
            torch.full((size // block_m,), -1, dtype=torch.int32, device=dev),
            torch.zeros(1, dtype=torch.int32, device=dev),
        )
    if not (topk_ids.is_cuda or _INTERPRET):
        return _moe_align_torch(topk_ids, block_m, num_experts, expert_map)
    ids = topk_ids.reshape(-1).contiguous()
    sorted_ids = torch.empty(size, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(size // block_m, dtype=torch.int32, device=dev)
    num_post = torch.empty(1, dtype=torch.int32, device=dev)
    _moe_align_launch(
        (num_experts,),
        ids,
        expert_map if expert_map is not None else ids,
        sorted_ids,
        expert_ids,
        num_post,
        num_slots,
        num_experts,
        size,
        HAS_MAP=expert_map is not None,
        BLOCK_M=block_m,
        NUM_BINS=next_pow2(num_experts + 1),
        # Every program scans all slots twice: wider chunks (and warps) mean fewer dependent steps
        # for prefill-size T*K; at decode a chunk as small as the slots keeps the per-chunk histogram
        # and prefix sum cheap (H100, T=1, K=8, E=128: 1024-wide chunks took 3.4 us).
        CHUNK=_align_chunk(num_slots),
        num_warps=8 if num_slots > 4096 else 4,
    )
    return sorted_ids, expert_ids, num_post


def _moe_align_torch(
    topk_ids: torch.Tensor, block_m: int, num_experts: int, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_align_block_size` with torch ops only (stable sort by expert; no host sync)."""
    _check_align_args(topk_ids, block_m, num_experts, expert_map)
    dev = topk_ids.device
    num_slots = topk_ids.numel()
    size = align_buffer_size(num_slots, block_m, num_experts)
    num_blocks = size // block_m
    sorted_ids = torch.full((size + 1,), num_slots, dtype=torch.int32, device=dev)
    if num_slots == 0:
        return (
            sorted_ids[:size],
            torch.full((num_blocks,), -1, dtype=torch.int32, device=dev),
            torch.zeros(1, dtype=torch.int32, device=dev),
        )
    ids = topk_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    if expert_map is not None:
        local = expert_map.long()[ids.clamp(0, num_experts - 1)]
        valid &= (local >= 0) & (local < num_experts)
        ids = local
    # Invalid slots go to an extra bucket `num_experts`, which takes no blocks.
    bucket = torch.where(valid, ids, torch.full_like(ids, num_experts))
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    raw_start = torch.cumsum(counts, 0) - counts
    sorted_bucket, order = torch.sort(bucket, stable=True)
    rank = torch.arange(num_slots, device=dev) - raw_start[sorted_bucket]
    is_real = sorted_bucket < num_experts
    dst = torch.where(is_real, pad_start[sorted_bucket.clamp(max=num_experts - 1)] + rank, size)
    sorted_ids.index_put_((dst,), order.to(torch.int32))
    block_start = torch.arange(num_blocks, device=dev) * block_m
    expert_ids = torch.searchsorted(pad_end, block_start, right=True)
    total = pad_end[-1:]
    expert_ids = torch.where(block_start < total, expert_ids, -1).to(torch.int32)
    return sorted_ids[:size], expert_ids, total.to(torch.int32)


# --------------------------------------------------------------------------------------------------
# Grouped GEMM kernel (gate_up with SiLU*mul, or down with top-k weight / fused top-k sum)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_b_tile(
    b_ptrs,
    k_rem,
    offs_k,
    SCHEME: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    INT4_MAGIC: tl.constexpr,
):
    """[BLOCK_K, BLOCK_N] weight tile; w4a8 unpacks two int4 per byte (low nibble = even k) to e4m3."""
    if SCHEME == 2:
        p = tl.load(b_ptrs)
        lo = int4_to_e4m3(p & 0xF, INT4_MAGIC)
        hi = int4_to_e4m3(p >> 4, INT4_MAGIC)
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_K, BLOCK_N))
    elif SCHEME == 1 or EVEN_K:
        return tl.load(b_ptrs)
    else:
        return tl.load(b_ptrs, mask=offs_k[:, None] < k_rem, other=0.0)


PRELOAD_NOTE = """Why the fp8 scales of a whole K range are loaded before the K loop (`SCALE_PRELOAD`).
Triton's software pipeliner runs ahead (asynchronous copies, `num_stages` deep) only the loads
whose values feed a dot operand (`AssignLatencies` in Triton's pipeliner); the fp8 kernels' scale
loads multiply each K step's dot result, so they stay ordinary loads in the step that uses them
(sm_90 SASS of the decode tiles: synchronous LDGs in every fp8 K loop, none in the bf16 ones) and
each K step waits one global-memory latency for a few bytes. A decode launch has too few programs
per SM to hide that with other programs: fp8 decode rows reach 0.30-0.71 of the copy bandwidth
where bf16 reaches 0.52-0.92 (H100, 2026-12-08). Loaded up front, the scales cost one latency per
program, overlapped with the pipeline's first tile loads, and a register select per K step.
Carrying next step's scales through the loop instead does not help: the loop-carried copy reads
the fresh load at the end of the same step."""


@triton.jit
def _scale_tile(a_s, b_s, SCALAR: tl.constexpr):
    """The rescale of one K step's product: row scales times the weight tile's scale (a scalar when
    the whole tile shares one block scale, so one multiply per row) or column scales."""
    if SCALAR:
        return (a_s * b_s)[:, None]
    else:
        return a_s[:, None] * b_s[None, :]


@triton.jit(do_not_specialize=["num_slots", "top_k", "k_tiles_per_split", "zero_numel", "zero_chunk"])
def _fused_moe_gemm_kernel(
    # pointers
    a_ptr,
    b_ptr,
    c_ptr,
    a_scale_ptr,
    b_scale_ptr,
    topk_w_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_ptr,
    a_desc,
    b_desc,
    zero_ptr,
    c_scale_ptr,
    # sizes
    N,
    K,
    num_slots,
    top_k,
    up_offset,
    rows_per_expert,
    k_tiles_per_split,
    zero_numel,
    zero_chunk,
    # strides (elements)
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_asm,
    stride_ask,
    stride_bse,
    stride_bsn,
    stride_bsk,
    stride_csm,
    stride_csg,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    N_BAND: tl.constexpr,
    SCHEME: tl.constexpr,
    GATE_UP: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr,
    MERGE_GU: tl.constexpr,
    INT4_MAGIC: tl.constexpr,
    TMA_A: tl.constexpr,
    TMA_B: tl.constexpr,
    A_SORTED: tl.constexpr,
    ZERO: tl.constexpr,
    ZERO_BLOCK: tl.constexpr,
    RESCALE: tl.constexpr,
    QUANT_OUT: tl.constexpr,
    PRELOAD: tl.constexpr = 0,
):
    """One program = one M-block of one expert x one N-block.

    Rows of the intermediate `act` are positions in `sorted_token_ids` (grouped by expert), so the down
    GEMM reads whole contiguous row blocks of it.
    GATE_UP: a rows are tokens `slot // top_k` (a gather), or with A_SORTED rows already gathered
    into position order (`gather_sorted_rows`); two accumulators (gate rows [n], up rows
    [up_offset + n] of w13), epilogue silu(gate) * up stored at row `position` of c [S, N] (valid
    slots only; padding positions are not written).
    else (down, always A_SORTED): a rows are positions `[pid_m * BLOCK_M, +BLOCK_M)` of act; epilogue
    * topk_weight[slot];
    ATOMIC adds into c [T, N] fp32 at row `slot // top_k`, otherwise stores at row `slot` of c [T*K, N].
    b is [E, N_total, K] (k contiguous) or, for w4a8, [E, N_total, K/2] uint8.
    MERGE_GU (GATE_UP only): one [BLOCK_K, 2*BLOCK_N] weight tile (gate columns then up columns) and one
    [BLOCK_M, 2*BLOCK_N] accumulator, so each K step is one wider tensor-core dot (one read of the A
    tile from shared memory, one scale multiply for fp8) instead of two; split in the epilogue.
    TMA_B: weight tiles come through the tensor descriptor `b_desc` over b viewed as
    [E * rows_per_expert, K] with block [BLOCK_N, BLOCK_K] (Hopper TMA: no address arithmetic in the
    loop; K past the end reads zeros; rows past an expert's N land in columns the store masks off).
    TMA_A (A_SORTED only): the activation row block through `a_desc` ([S, K], block [BLOCK_M, BLOCK_K]).
    fp8_block with BLOCK_N <= 128 and no merged tile: every column of a weight tile shares one block
    scale, so the per-K-step rescale is one multiply-add per accumulator element (row scale * scalar).
    RESCALE (fp8_block, w4a8): instead of a scaled copy of each K step's product added to the
    accumulator (a dot temporary as large as the accumulator), the accumulator is kept in units of
    the current K step's scales: before each step it is multiplied by (previous scales / current
    scales) and the tensor-core dot accumulates into it in place; after the loop one multiply by the
    last scales. Same multiplies per element, half the accumulator registers, so wider tiles fit.
    Opt-in, less accurate on Hopper: the fp8 tensor cores then accumulate across K blocks with
    their limited-precision adder (H100, DeepSeek-V3 sizes, T 1024: normwise error 1.7 % against
    the float64 reference, 0.44 % for the scaled-product path), so the tuner never picks it.
    Scales are floored at `_MIN_SCALE` (a zero scale, whose group is zero, then adds ~0, not inf or
    NaN).
    PRELOAD > 0 (fp8_block, one block scale per weight tile, no RESCALE): every scale of the
    program's K range is loaded before the K loop, the rows' `[BLOCK_M, PRELOAD]` and the weight
    tile's `[PRELOAD]` (PRELOAD: a power of two >= the K tiles per split), and each K step picks its
    column in registers; off, each K step loads its scales, an ordinary load Triton's pipeliner does
    not run ahead (`PRELOAD_NOTE`), so every step waits one global-memory latency.
    QUANT_OUT (GATE_UP, BLOCK_N a multiple of 128): the epilogue quantises its SiLU*mul tile per row
    and 128-column group as `quant.per_token_group_quant_fp8` does the stored bf16 values (rounded
    to bf16 first, same scale and e4m3 rounding: the same bits), c is e4m3 and each group's fp32
    scale goes to c_scale [S, N / 128]: the down GEMM's fp8 operand without a quantisation launch
    or a bf16 round trip through memory.
    Split-K (down with ATOMIC only): grid axis 1 splits the K tiles, `k_tiles_per_split` each; every
    split scales its partial sum by the top-k weight and adds it atomically (a sum of linear parts), so
    decode sizes, where the M blocks are few, still put every SM on the weight stream.
    ZERO: first, every program (those that exit early too) zero-fills its `zero_chunk` elements of
    `zero_ptr` (`zero_numel` in all): the gate_up launch clears the down GEMM's output, which saves
    the separate fill launch (decode) and overlaps the fill with the GEMM (prefill).
    Program order: GROUP_M M-blocks at a time over the N-blocks (weight and A tiles reused in L2).
    N_BAND > 0: the N-blocks go in bands of N_BAND, every M-block of a band before the next band, so
    the output columns in flight are one band's: with the fused top-k sum the fp32 accumulator rows
    of a band, `T x N_BAND*BLOCK_N`, can stay in L2 while all K slots of its tokens add into them
    (the whole `T x N` accumulator may not fit at prefill sizes); each band reads A once more.
    """
    pid = tl.program_id(0)
    if ZERO:
        z_lo = pid.to(tl.int64) * zero_chunk
        z_hi = tl.minimum(z_lo + zero_chunk, zero_numel)
        for z in range(z_lo, z_hi, ZERO_BLOCK):
            offs_z = z + tl.arange(0, ZERO_BLOCK)
            tl.store(
                zero_ptr + offs_z, tl.zeros((ZERO_BLOCK,), zero_ptr.dtype.element_ty), mask=offs_z < z_hi
            )
    kb_lo = tl.program_id(1) * k_tiles_per_split
    kb_hi = tl.minimum(kb_lo + k_tiles_per_split, tl.cdiv(K, BLOCK_K))
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    if N_BAND > 0:  # every band before the last is full: band = pid // (num_pid_m * N_BAND)
        band = pid // (num_pid_m * N_BAND)
        n_first = band * N_BAND
        n_width = tl.minimum(num_pid_n - n_first, N_BAND)
        local = pid - band * (num_pid_m * N_BAND)
    else:
        n_first = 0
        n_width = num_pid_n
        local = pid
    group = GROUP_M * n_width
    first_m = (local // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (local % group) % group_size
    pid_n = n_first + (local % group) // group_size

    # Both loads before the branch: one memory round trip, not two, before the weight stream starts
    # (a decode launch is one or two waves of short programs, so this latency shows).
    num_post = tl.load(num_post_ptr)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if (pid_m * BLOCK_M >= num_post) | (expert < 0):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ids_ptr + offs_m)
    row_ok = slot < num_slots
    if A_SORTED:
        a_row = offs_m.to(tl.int64)
    else:
        a_row = tl.where(row_ok, slot // top_k, 0).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_bn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + (kb_lo * BLOCK_K + offs_k)[None, :] * stride_ak
    if SCHEME == 2:
        offs_kb = tl.arange(0, BLOCK_K // 2)
    else:
        offs_kb = offs_k
    b_base = b_ptr + expert * stride_be + offs_kb[:, None] * stride_bk
    if MERGE_GU:
        # Column j < BLOCK_N: gate row n0 + j; column BLOCK_N + j: up row up_offset + n0 + j.
        offs_j = tl.arange(0, 2 * BLOCK_N)
        offs_brow = ((pid_n * BLOCK_N + offs_j % BLOCK_N) % N + (offs_j // BLOCK_N) * up_offset).to(tl.int64)
    else:
        offs_brow = offs_bn
    TILE_N: tl.constexpr = 2 * BLOCK_N if MERGE_GU else BLOCK_N
    b_ptrs = b_base + offs_brow[None, :] * stride_bn
    b_row0 = (expert * rows_per_expert + pid_n * BLOCK_N).to(tl.int32)  # TMA_B: first weight row
    acc = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
    SPLIT_UP: tl.constexpr = GATE_UP and not MERGE_GU
    if SPLIT_UP:
        b_up_ptrs = b_base + (offs_bn + up_offset)[None, :] * stride_bn
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    SCALAR_BS: tl.constexpr = SCHEME == 1 and not MERGE_GU and BLOCK_N <= 128
    if SCHEME != 0:
        a_s_ptrs = a_scale_ptr + a_row * stride_asm
        if SCALAR_BS:
            b_s_ptrs = b_scale_ptr + expert * stride_bse + (pid_n * BLOCK_N // 128) * stride_bsn
            b_s_up_ptrs = (
                b_scale_ptr + expert * stride_bse + ((pid_n * BLOCK_N + up_offset) // 128) * stride_bsn
            )
        else:
            if SCHEME == 1:
                b_s_row = offs_brow // 128
                b_s_row_up = (offs_bn + up_offset) // 128
            else:
                b_s_row = offs_brow
                b_s_row_up = offs_bn + up_offset
            b_s_ptrs = b_scale_ptr + expert * stride_bse + b_s_row * stride_bsn
            b_s_up_ptrs = b_scale_ptr + expert * stride_bse + b_s_row_up * stride_bsn

    if PRELOAD > 0:  # the program's scales, one column per K tile of its range
        offs_g = tl.arange(0, PRELOAD)
        g_ok = kb_lo + offs_g < kb_hi
        a_s_all = tl.load(
            a_s_ptrs[:, None] + (kb_lo + offs_g)[None, :] * stride_ask, mask=g_ok[None, :], other=0.0
        )
        b_s_all = tl.load(b_s_ptrs + (kb_lo + offs_g) * stride_bsk, mask=g_ok, other=0.0)
        if SPLIT_UP:
            b_s_up_all = tl.load(b_s_up_ptrs + (kb_lo + offs_g) * stride_bsk, mask=g_ok, other=0.0)

    if SCHEME == 2:
        b_step = (BLOCK_K // 2) * stride_bk
    else:
        b_step = BLOCK_K * stride_bk
    b_ptrs += kb_lo * b_step
    if SPLIT_UP:
        b_up_ptrs += kb_lo * b_step
    if RESCALE:  # the scales the accumulator is in units of: those of the first K step
        pa = tl.maximum(tl.load(a_s_ptrs + kb_lo * stride_ask), _MIN_SCALE)
        pb = tl.maximum(tl.load(b_s_ptrs + kb_lo * stride_bsk), _MIN_SCALE)
        if SPLIT_UP:
            pb_up = tl.maximum(tl.load(b_s_up_ptrs + kb_lo * stride_bsk), _MIN_SCALE)
    for kb in range(kb_lo, kb_hi):
        k_rem = K - kb * BLOCK_K
        # Padding rows read row 0 (a_row was clamped) or unwritten rows of a sorted operand; either
        # way they are dropped at the store: no row mask.
        if TMA_A:
            a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_rem, other=0.0)
        if TMA_B:
            b = b_desc.load([b_row0, kb * BLOCK_K]).T
            if SPLIT_UP:
                b_up = b_desc.load([b_row0 + up_offset, kb * BLOCK_K]).T
        else:
            b = _load_b_tile(b_ptrs, k_rem, offs_k, SCHEME, BLOCK_K, TILE_N, EVEN_K, INT4_MAGIC)
            if SPLIT_UP:
                b_up = _load_b_tile(b_up_ptrs, k_rem, offs_k, SCHEME, BLOCK_K, BLOCK_N, EVEN_K, INT4_MAGIC)
        if SCHEME == 0:
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
                if SPLIT_UP:
                    b_up = b_up.to(tl.float32)
            acc = tl.dot(a, b, acc)
            if SPLIT_UP:
                acc_up = tl.dot(a, b_up, acc_up)
        elif RESCALE:
            a_s = tl.maximum(tl.load(a_s_ptrs + kb * stride_ask), _MIN_SCALE)
            b_s = tl.maximum(tl.load(b_s_ptrs + kb * stride_bsk), _MIN_SCALE)
            ra = pa / a_s
            acc = tl.dot(a, b, acc * _scale_tile(ra, pb / b_s, SCALAR_BS))
            if SPLIT_UP:
                b_s_up = tl.maximum(tl.load(b_s_up_ptrs + kb * stride_bsk), _MIN_SCALE)
                acc_up = tl.dot(a, b_up, acc_up * _scale_tile(ra, pb_up / b_s_up, SCALAR_BS))
                pb_up = b_s_up
            pa = a_s
            pb = b_s
        elif PRELOAD > 0:
            pick = offs_g == kb - kb_lo
            a_s = tl.sum(tl.where(pick[None, :], a_s_all, 0.0), axis=1)
            b_s = tl.sum(tl.where(pick, b_s_all, 0.0), axis=0)
            acc += tl.dot(a, b) * _scale_tile(a_s, b_s, SCALAR_BS)
            if SPLIT_UP:
                b_s_up = tl.sum(tl.where(pick, b_s_up_all, 0.0), axis=0)
                acc_up += tl.dot(a, b_up) * _scale_tile(a_s, b_s_up, SCALAR_BS)
        else:
            a_s = tl.load(a_s_ptrs + kb * stride_ask)
            b_s = tl.load(b_s_ptrs + kb * stride_bsk)
            acc += tl.dot(a, b) * _scale_tile(a_s, b_s, SCALAR_BS)
            if SPLIT_UP:
                b_s_up = tl.load(b_s_up_ptrs + kb * stride_bsk)
                acc_up += tl.dot(a, b_up) * _scale_tile(a_s, b_s_up, SCALAR_BS)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += b_step
        if SPLIT_UP:
            b_up_ptrs += b_step

    if RESCALE:  # from units of the last K step's scales to values
        acc = acc * _scale_tile(pa, pb, SCALAR_BS)
        if SPLIT_UP:
            acc_up = acc_up * _scale_tile(pa, pb_up, SCALAR_BS)
    n_ok = offs_n < N
    mask = row_ok[:, None] & n_ok[None, :]
    if GATE_UP:
        if MERGE_GU:
            gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        else:
            gate, up = acc, acc_up
        out = gate / (1.0 + tl.exp(-gate)) * up
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        if QUANT_OUT:
            GROUPS: tl.constexpr = BLOCK_N // 128
            # one row per (token row, 128-group), quantised exactly as the standalone quantiser does
            q, scale = quant_rows_e4m3(
                tl.reshape(out.to(tl.bfloat16).to(tl.float32), (BLOCK_M * GROUPS, 128)), True
            )
            scale = tl.reshape(scale, (BLOCK_M, GROUPS))
            tl.store(c_ptrs, tl.reshape(q, (BLOCK_M, BLOCK_N)).to(c_ptr.dtype.element_ty), mask=mask)
            offs_g = pid_n * GROUPS + tl.arange(0, GROUPS)
            s_ptrs = c_scale_ptr + offs_m.to(tl.int64)[:, None] * stride_csm + offs_g[None, :] * stride_csg
            tl.store(s_ptrs, scale, mask=row_ok[:, None] & (offs_g * 128 < N)[None, :])
        else:
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        if MUL_WEIGHT:
            w = tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0)
            acc = acc * w[:, None]
        if ATOMIC:
            c_row = (slot // top_k).to(tl.int64)
            c_ptrs = c_ptr + c_row[:, None] * stride_cm + offs_n[None, :] * stride_cn
            tl.atomic_add(c_ptrs, acc, mask=mask, sem="relaxed")
        else:
            c_ptrs = c_ptr + slot.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


_fused_moe_gemm_launch = FastLaunch(_fused_moe_gemm_kernel)


@triton.jit
def _gather_rows_kernel(
    src_ptr,
    src_scale_ptr,
    dst_ptr,
    dst_scale_ptr,
    sorted_ids_ptr,
    num_post_ptr,
    size,
    D,
    num_groups,
    num_slots,
    top_k,
    stride_src,
    stride_dst,
    stride_ss_m,
    stride_ss_g,
    stride_ds_m,
    stride_ds_g,
    HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """dst[p] = src[sorted_ids[p] // top_k] for the positions p of valid slots (and the scale rows
    likewise); padding positions and blocks past the padded total are left unwritten."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    num_post = tl.load(num_post_ptr)
    if pid_r * BLOCK_R >= num_post:
        return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(sorted_ids_ptr + offs_r, mask=offs_r < size, other=num_slots)
    ok = slot < num_slots
    row = tl.where(ok, slot // top_k, 0).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m = ok[:, None] & (offs_d < D)[None, :]
    v = tl.load(src_ptr + row[:, None] * stride_src + offs_d[None, :], mask=m)
    tl.store(dst_ptr + offs_r.to(tl.int64)[:, None] * stride_dst + offs_d[None, :], v, mask=m)
    if HAS_SCALE:
        if pid_d == 0:
            offs_g = tl.arange(0, BLOCK_G)
            mg = ok[:, None] & (offs_g < num_groups)[None, :]
            sc = tl.load(src_scale_ptr + row[:, None] * stride_ss_m + offs_g[None, :] * stride_ss_g, mask=mg)
            dst_s = dst_scale_ptr + offs_r.to(tl.int64)[:, None] * stride_ds_m + offs_g[None, :] * stride_ds_g
            tl.store(dst_s, sc, mask=mg)


_gather_rows_launch = FastLaunch(_gather_rows_kernel)


def gather_sorted_rows(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_slots: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token rows (and their per-group scales) copied into sorted-position order: row p of the result
    is row `sorted_token_ids[p] // top_k` of `a` for every valid slot; padding rows are unwritten.
    This makes the gate_up GEMM's activation tiles contiguous (so TMA can load them) at the price of
    one pass over T*K rows. One launch, no host sync."""
    sorted_ids, _, num_post = align
    size, hidden = sorted_ids.shape[0], a.shape[1]
    out = torch.empty((size, hidden), dtype=a.dtype, device=a.device)
    groups = a_scale.shape[1] if a_scale is not None else 0
    out_scale = None if a_scale is None else torch.empty((size, groups), dtype=a_scale.dtype, device=a.device)
    block_d = min(1024, next_pow2(hidden))
    block_r = 16
    grid = (cdiv(size, block_r), cdiv(hidden, block_d))
    _gather_rows_launch(
        grid,
        a,
        a_scale if a_scale is not None else a,
        out,
        out_scale if out_scale is not None else out,
        sorted_ids,
        num_post,
        size,
        hidden,
        groups,
        num_slots,
        top_k,
        a.stride(0),
        out.stride(0),
        *(a_scale.stride() if a_scale is not None else (0, 0)),
        *(out_scale.stride() if out_scale is not None else (0, 0)),
        HAS_SCALE=a_scale is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        BLOCK_G=next_pow2(max(groups, 1)),
    )
    return out, out_scale


# --------------------------------------------------------------------------------------------------
# Block configs: tuned table with a heuristic fallback
# --------------------------------------------------------------------------------------------------

_ZERO_BLOCK = 1024
"""Elements per store step of the gate_up launch's zero-fill of the down GEMM's output."""
_GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
T_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


# --------------------------------------------------------------------------------------------------
# Decode through the masked layout
# --------------------------------------------------------------------------------------------------
#
# For a handful of tokens the sorted-layout path is five launches (align, gate_up, zero-fill, down,
# cast) around two GEMMs that each stream their experts' weights once. The masked path instead
# scatters each token's row to a per-expert slot (`x_m [L, T, D]`, one launch, also counting the rows
# per expert), runs the low-layout expert MLP (`masked_grouped_gemm.masked_moe`: only experts with
# rows do any work, and its tuned entries may run the whole MLP as one persistent launch), and sums
# each token's K weighted expert outputs (one launch). Numerics are the unfused path's: each slot's
# output is rounded to bf16, the K terms are summed in fp32 and rounded once to out_dtype.


@triton.jit
def _scatter_rows_kernel(
    x_ptr,
    xs_ptr,
    ids_ptr,
    xm_ptr,
    xms_ptr,
    counts_ptr,
    pos_ptr,
    T,
    D,
    G,
    stride_xt,
    stride_xst,
    stride_ml,
    stride_mm,
    stride_msl,
    stride_msm,
    E: tl.constexpr,
    K: tl.constexpr,
    T_POW2: tl.constexpr,
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_D: tl.constexpr,
    G_POW2: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """Program s (one per slot t*K + k): the slot's row goes to `xm[e, r]`, r = the number of earlier
    tokens that picked expert e (a token picking e twice uses one row: its second slot copies
    nothing and points at the same row), and `pos[s] = r` (-1 for a skipped slot: id outside [0, E)).
    Program 0 also writes `counts[e]` = tokens that picked e, for every e."""
    s = tl.program_id(0)
    t = s // K
    k = s % K
    offs_t = tl.arange(0, T_POW2)
    offs_k = tl.arange(0, K_POW2)
    mask2 = (offs_t[:, None] < T) & (offs_k[None, :] < K)
    ids = tl.load(ids_ptr + offs_t[:, None] * K + offs_k[None, :], mask=mask2, other=-1).to(tl.int32)
    e = tl.load(ids_ptr + s).to(tl.int32)
    valid = (e >= 0) & (e < E)
    picked = tl.max(((ids == e) & mask2).to(tl.int32), axis=1)  # [T_POW2]: token picked e
    r = tl.sum(tl.where(offs_t < t, picked, 0), axis=0)
    # first: no earlier slot of this token picked e
    earlier = (ids == e) & (offs_t[:, None] == t) & (offs_k[None, :] < k)
    first = tl.sum(tl.sum(earlier.to(tl.int32), axis=1), axis=0) == 0
    tl.store(pos_ptr + s, tl.where(valid, r, -1))
    if valid & first:
        dst = xm_ptr + e.to(tl.int64) * stride_ml + r.to(tl.int64) * stride_mm
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            v = tl.load(x_ptr + t.to(tl.int64) * stride_xt + offs_d, mask=offs_d < D)
            tl.store(dst + offs_d, v, mask=offs_d < D)
        if HAS_SCALE:
            offs_g = tl.arange(0, G_POW2)
            sc = tl.load(xs_ptr + t.to(tl.int64) * stride_xst + offs_g, mask=offs_g < G)
            tl.store(
                xms_ptr + e.to(tl.int64) * stride_msl + r.to(tl.int64) * stride_msm + offs_g,
                sc,
                mask=offs_g < G,
            )
    if s == 0:
        offs_e = tl.arange(0, E_POW2)
        hit = (ids[None, :, :] == offs_e[:, None, None]) & mask2[None, :, :]
        cnt = tl.sum(tl.max(hit.to(tl.int32), axis=2), axis=1)
        tl.store(counts_ptr + offs_e, cnt, mask=offs_e < E)


_scatter_rows_launch = FastLaunch(_scatter_rows_kernel)


@triton.jit
def _combine_rows_kernel(
    ym_ptr,
    ids_ptr,
    pos_ptr,
    w_ptr,
    out_ptr,
    D,
    stride_yl,
    stride_ym,
    stride_ot,
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t, d-block] = sum_k w[t, k] * ym[ids[t, k], pos[t*K + k], d-block] over the slots that are
    not skipped, in fp32, rounded once (0 for a token whose slots are all skipped)."""
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(K):
        e = tl.load(ids_ptr + t * K + k).to(tl.int32)
        r = tl.load(pos_ptr + t * K + k)
        if (e >= 0) & (e < E) & (r >= 0):
            w = tl.load(w_ptr + t * K + k)
            y = tl.load(
                ym_ptr + e.to(tl.int64) * stride_yl + r.to(tl.int64) * stride_ym + offs_d, mask=mask_d
            )
            acc += w * y.to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


_combine_rows_launch = FastLaunch(_combine_rows_kernel)


@triton.jit
def _sum_slots_kernel(c_ptr, out_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The unfused top-k sum: out[t, d-block] = sum_k c[t*K + k, d-block] in fp32, rounded once to
    out's dtype (c holds one row per slot, already weighted; skipped slots' rows are zero)."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(K):
        acc += tl.load(c_ptr + (t * K + k) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


_sum_slots_launch = FastLaunch(_sum_slots_kernel)


def _sum_slots(c: torch.Tensor, num_tokens: int, top_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """`c [T*K, D]` (contiguous) summed over each token's K rows in fp32 -> `[T, D]` out_dtype, in one
    launch (torch's sum then cast is two, 4.7 us at decode on an H100); plain torch on the CPU."""
    hidden = c.shape[1]
    if not (c.is_cuda or _INTERPRET):
        return c.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(out_dtype)
    out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=c.device)
    block_d = min(1024, next_pow2(hidden))
    _sum_slots_launch((num_tokens, cdiv(hidden, block_d)), c, out, hidden, K=top_k, BLOCK_D=block_d,
                      num_warps=4, num_stages=1)  # fmt: skip
    return out


MASKED_MAX_SLOTS = 512
"""The masked decode path scans all T*K slot ids per program: at most this many slots."""


def _fused_moe_masked(a1, a1_scale, w13, w2, w13_scale, w2_scale, topk_ids, topk_weights, scheme, out_dtype,
                      masked_configs) -> torch.Tensor:  # fmt: skip
    """The expert MLP of a few tokens through the masked layout (see the section comment)."""
    from ep_runtime.kernels.masked_grouped_gemm import masked_moe

    num_tokens, hidden = a1.shape
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    num_slots = num_tokens * top_k
    if num_slots > MASKED_MAX_SLOTS:
        raise ValueError(
            f"the masked decode path takes at most {MASKED_MAX_SLOTS} slots (T*K), got {num_slots}"
        )
    dev = a1.device
    ids = topk_ids.contiguous()
    xm = torch.empty((num_experts, num_tokens, hidden), dtype=a1.dtype, device=dev)
    groups = hidden // GROUP if a1_scale is not None else 0
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    pos = torch.empty(num_slots, dtype=torch.int32, device=dev)
    # scale rows follow the token rows for fp8 activations; otherwise a placeholder, never read
    xms = torch.empty((num_experts, num_tokens, max(groups, 1)), dtype=torch.float32, device=dev)
    xs = a1_scale if a1_scale is not None else counts
    _scatter_rows_launch(
        (num_slots,),
        a1, xs, ids, xm, xms, counts, pos, num_tokens, hidden, groups, a1.stride(0),
        a1_scale.stride(0) if a1_scale is not None else 0, xm.stride(0), xm.stride(1), xms.stride(0), xms.stride(1),
        E=num_experts, K=top_k, T_POW2=next_pow2(num_tokens), K_POW2=next_pow2(top_k),
        E_POW2=next_pow2(num_experts), BLOCK_D=1024, G_POW2=next_pow2(max(groups, 1)),
        HAS_SCALE=a1_scale is not None,
    )  # fmt: skip
    ym = masked_moe(xm, counts, w13, w2, scheme=scheme, x_scale=xms if a1_scale is not None else None,
                    w13_scale=w13_scale, w2_scale=w2_scale, configs=masked_configs)  # fmt: skip
    out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=dev)
    block_d = 1024
    _combine_rows_launch(
        (num_tokens, cdiv(hidden, block_d)),
        ym, ids, pos, topk_weights.contiguous(), out, hidden, ym.stride(0), ym.stride(1), out.stride(0),
        E=num_experts, K=top_k, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def device_key(device: torch.device | None = None) -> str:
    """Table key of a CUDA device ('h200', 'h100-80gb-hbm3', ...) or 'cpu'."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    return normalise(torch.cuda.get_device_name(device))


def shape_key(num_experts: int, inter: int, hidden: int, scheme: str) -> str:
    """Table key for (L, N = I, D, scheme)."""
    return f"L{num_experts}_N{inter}_D{hidden}_{scheme}"


def t_bucket(num_tokens: int) -> int:
    """Smallest bucket >= T (the largest bucket past the end)."""
    for b in T_BUCKETS:
        if num_tokens <= b:
            return b
    return T_BUCKETS[-1]


@cache
def _load_table(path: str) -> dict[str, Any]:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


def heuristic_config(num_tokens: int, top_k: int, num_experts: int, scheme: str) -> dict[str, Any]:
    """Fallback block config from the expected rows per expert (T*K/L)."""
    rows = num_tokens * top_k / max(num_experts, 1)
    bk = 128 if scheme != "bf16" else 64
    if rows <= 16:
        gemm = dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
        return dict(BLOCK_M=16, gate_up=dict(gemm), down=dict(gemm))
    if rows <= 64:
        gemm = dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
        return dict(BLOCK_M=64, gate_up=dict(gemm), down=dict(gemm, BLOCK_N=128))
    # Prefill, from the H200 sweeps: bf16 128 x (2*128) merged gate|up tiles with 8 warps. fp8 (H100
    # sweep, 2026-12-07): 64-row tiles; gate_up TMA tiles of one 128-group (the epilogue quantises
    # the output) with 8 warps, down TMA 64 x 128 with 4.
    if scheme == "bf16":
        gate_up = dict(BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=4, MERGE_GU=True)
        down = dict(BLOCK_N=256, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=4)
        return dict(BLOCK_M=128, gate_up=gate_up, down=down)
    tma = scheme != "w4a8"  # the launcher refuses TMA for packed int4 weights
    gate_up = dict(BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=4, TMA=tma)
    down = dict(BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=4, TMA=tma)
    return dict(BLOCK_M=64, gate_up=gate_up, down=down)


def nearest_bucket(buckets, num_tokens: int) -> str:
    """The bucket (a str of T) nearest `num_tokens` in log scale; a tie goes to the larger bucket:
    a prefill tile run at fewer rows pads some of its blocks, while a decode config (16-row blocks,
    split K) run at many more rows costs a multiple (H100, DeepSeek-V3 E128 T 512, equidistant from
    the 128 and 2048 buckets: the 128 config took 1.3x the time of T 2048 itself)."""
    t = math.log2(max(num_tokens, 1))
    return min(buckets, key=lambda b: (abs(math.log2(int(b)) - t), -int(b)))


def get_config(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    inter: int,
    hidden: int,
    scheme: str,
    device: torch.device | None = None,
    path: str | Path | None = None,
) -> dict[str, Any]:
    """Block config for one fused_moe call: the tuned entry of `kernels/configs/fused_moe.json` for
    (device, L, I, D, scheme) at the T-bucket nearest T (in log scale), else `heuristic_config`.

    Returns `{"BLOCK_M": int, "gate_up": {BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, MERGE_GU,
    TMA]}, "down": {...}}` (TMA, bf16 and fp8_block, default False: weight and activation tiles
    through Hopper TMA descriptors, see `_descriptor`; for gate_up the token rows are first gathered
    into position order by `gather_sorted_rows`;
    MERGE_GU, gate_up only, default False: one merged gate|up weight tile per K step;
    SPLIT_K, down only, default 1: the down GEMM's K tiles split over that many programs per output
    tile, each adding its part atomically in fp32 (decode: more programs streaming the weights);
    INT4_MAGIC, w4a8 only, default 0: how int4 weights become e4m3, see `quant.int4_to_e4m3`;
    N_BAND, default 0: program order in bands of that many N-blocks, see `_fused_moe_gemm_kernel`;
    RESCALE, fp8_block and w4a8, default False: the accumulator kept in units of the current K step's
    scales, the dot accumulating in place; fewer registers, less accurate on Hopper, see
    `_fused_moe_gemm_kernel`; SCALE_PRELOAD, fp8_block with BLOCK_N <= 128, default False: each
    program's scales loaded before its K loop, same results, see `PRELOAD_NOTE`).
    """
    path = str(path or CONFIG_DIR / "fused_moe.json")
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        shapes = for_device("fused MoE", _load_table, path, index)
    else:
        shapes = _load_table(path).get("cpu", {})  # interpreter runs: the table's "cpu" entries
    entries = shapes.get(shape_key(num_experts, inter, hidden, scheme))
    if entries:
        return entries[nearest_bucket(entries, num_tokens)]
    return heuristic_config(num_tokens, top_k, num_experts, scheme)


def _check_config(config: dict[str, Any], scheme: str) -> None:
    masked = config.get("MASKED", False) if isinstance(config, dict) else False
    if masked not in (False, True):
        raise ValueError(f"config['MASKED'] must be true or false, got {masked!r}")
    if masked:
        if scheme not in ("bf16", "fp8_block"):
            raise ValueError(
                f"config MASKED (the masked decode path) is for 'bf16' and 'fp8_block', not {scheme!r}"
            )
        return
    if (
        not isinstance(config, dict)
        or "BLOCK_M" not in config
        or "gate_up" not in config
        or "down" not in config
    ):
        raise ValueError(f"config must be {{'BLOCK_M', 'gate_up': {{...}}, 'down': {{...}}}}, got {config!r}")
    for name in ("gate_up", "down"):
        g = config[name]
        missing = [k for k in _GEMM_KEYS if k not in g]
        if missing:
            raise ValueError(f"config[{name!r}] misses {missing}")
        if scheme != "bf16" and g["BLOCK_K"] != GROUP:
            raise ValueError(
                f"config[{name!r}]['BLOCK_K'] must be {GROUP} for scheme {scheme!r}, got {g['BLOCK_K']}"
            )
        split = g.get("SPLIT_K", 1)
        if not isinstance(split, int) or isinstance(split, bool) or split < 1:
            raise ValueError(f"config[{name!r}]['SPLIT_K'] must be an int >= 1, got {split!r}")
        if name == "gate_up" and split != 1:
            raise ValueError(
                "config['gate_up']['SPLIT_K'] must be 1: silu(gate) * up needs the whole K sum; "
                f"split K in config['down'] only, got {split!r}"
            )
        band = g.get("N_BAND", 0)
        if not isinstance(band, int) or isinstance(band, bool) or band < 0:
            raise ValueError(f"config[{name!r}]['N_BAND'] must be an int >= 0 (0: no bands), got {band!r}")
        if not isinstance(g.get("RESCALE", False), bool):
            raise ValueError(f"config[{name!r}]['RESCALE'] must be true or false, got {g['RESCALE']!r}")
        if g.get("RESCALE", False) and scheme == "bf16":
            raise ValueError(f"config[{name!r}]['RESCALE'] is for schemes 'fp8_block' and 'w4a8', not 'bf16'")
        preload = g.get("SCALE_PRELOAD", False)
        if not isinstance(preload, bool):
            raise ValueError(f"config[{name!r}]['SCALE_PRELOAD'] must be true or false, got {preload!r}")
        if preload and (
            scheme != "fp8_block" or g.get("RESCALE", False) or g["BLOCK_N"] > GROUP
            or (name == "gate_up" and g.get("MERGE_GU", False))
        ):  # fmt: skip
            raise ValueError(
                f"config[{name!r}]['SCALE_PRELOAD'] needs scheme 'fp8_block' with one block scale per weight "
                f"tile: BLOCK_N <= {GROUP}, no RESCALE, no MERGE_GU (got scheme {scheme!r}, {g})"
            )
        if g.get("TMA", False) not in (False, True):
            raise ValueError(f"config[{name!r}]['TMA'] must be true or false, got {g['TMA']!r}")
        if g.get("TMA", False) and scheme == "w4a8":
            raise ValueError(f"config[{name!r}]['TMA'] is for schemes 'bf16' and 'fp8_block', not 'w4a8'")
        if g.get("TMA", False) and g.get("MERGE_GU", False):
            raise ValueError(
                f"config[{name!r}] cannot set both TMA and MERGE_GU (TMA loads gate and up tiles apart)"
            )


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _descriptor(t: torch.Tensor | None, block_rows: int, block_k: int) -> TensorDescriptor | None:
    """A TMA descriptor over the 2-D `t` with block [block_rows, block_k], or None where TMA cannot
    address it (no tensor, rows not 16-byte aligned, a strided last dim, a CPU tensor outside the
    interpreter): the kernel then loads that operand through pointers, as without `TMA`."""
    if t is None or t.dim() != 2 or t.stride(1) != 1 or not (t.is_cuda or _INTERPRET):
        return None
    if (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16 or t.shape[0] == 0:
        return None
    return TensorDescriptor.from_tensor(t, [block_rows, block_k])


def _launch_gemm(
    a,
    b,
    c,
    a_scale,
    b_scale,
    topk_w,
    align,
    *,
    n,
    k,
    num_slots,
    top_k,
    up_offset,
    scheme,
    gate_up,
    mul_weight,
    atomic,
    block_m,
    cfg,
    zero=None,
    c_scale=None,
):
    """One grouped GEMM launch (gate_up or down) over the aligned slots; `zero`: a contiguous
    tensor the launch's programs zero-fill before their GEMM work (see the kernel's ZERO);
    `c_scale` (gate_up, fp8 `c`): the per-row 128-group scales of the quantised output
    (`quant_act`, the kernel's QUANT_OUT)."""
    sorted_ids, expert_ids, num_post = align
    num_pid_m = sorted_ids.shape[0] // block_m
    k_tiles = cdiv(k, cfg["BLOCK_K"])
    split_k, tiles_per_split = k_splits(k_tiles, cfg.get("SPLIT_K", 1)) if atomic else (1, k_tiles)
    grid = (num_pid_m * cdiv(n, cfg["BLOCK_N"]), split_k)
    zero_numel = 0 if zero is None else zero.numel()
    zero_chunk = cdiv(cdiv(zero_numel, grid[0]), _ZERO_BLOCK) * _ZERO_BLOCK
    sid = _SCHEME_ID[scheme]
    b_desc = a_desc = None
    if cfg.get("TMA", False):
        if gate_up:  # token rows into position order first, so both operands' tiles are contiguous
            a, a_scale = gather_sorted_rows(a, a_scale if sid != 0 else None, align, num_slots, top_k)
        b_rows = b.reshape(-1, b.shape[-1]) if b.is_contiguous() else None  # [E * N_total, K]
        b_desc = _descriptor(b_rows, cfg["BLOCK_N"], cfg["BLOCK_K"])
        a_desc = _descriptor(a, block_m, cfg["BLOCK_K"])
    a_sorted = not gate_up or cfg.get("TMA", False)
    if sid == 0:
        a_scale = b_scale = a  # unused pointers
        s_a = (0, 0)
        s_b = (0, 0, 0)
    else:
        s_a = a_scale.stride()
        s_b = b_scale.stride()
    _fused_moe_gemm_launch(
        grid,
        a,
        b,
        c,
        a_scale,
        b_scale,
        topk_w if topk_w is not None else a,
        sorted_ids,
        expert_ids,
        num_post,
        a_desc,
        b_desc,
        zero if zero is not None else c,
        c_scale if c_scale is not None else c,
        n,
        k,
        num_slots,
        top_k,
        up_offset,
        b.shape[1],
        tiles_per_split,
        zero_numel,
        zero_chunk,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        c.stride(0),
        c.stride(1),
        s_a[0],
        s_a[1],
        s_b[0],
        s_b[1],
        s_b[2],
        *(c_scale.stride() if c_scale is not None else (0, 0)),
        BLOCK_M=block_m,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        N_BAND=cfg.get("N_BAND", 0),
        SCHEME=sid,
        GATE_UP=gate_up,
        MUL_WEIGHT=mul_weight,
        ATOMIC=atomic,
        UPCAST=_INTERPRET and sid == 0,
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        MERGE_GU=bool(gate_up and cfg.get("MERGE_GU", False)),
        INT4_MAGIC=bool(sid == 2 and cfg.get("INT4_MAGIC", 0)),
        TMA_A=a_desc is not None,
        TMA_B=b_desc is not None,
        A_SORTED=bool(a_sorted),
        ZERO=zero_numel > 0,
        ZERO_BLOCK=_ZERO_BLOCK,
        RESCALE=bool(sid != 0 and cfg.get("RESCALE", False)),
        QUANT_OUT=c_scale is not None,
        PRELOAD=next_pow2(tiles_per_split) if cfg.get("SCALE_PRELOAD", False) else 0,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def quant_act(scheme: str, gate_up_cfg: dict[str, Any]) -> bool:
    """Whether the gate_up launch quantises its output itself (fp8 schemes whose gate_up N-block
    is whole 128-channel groups; the kernel's QUANT_OUT)."""
    return scheme != "bf16" and gate_up_cfg["BLOCK_N"] % GROUP == 0


def gate_up_output(rows, inter, scheme, gate_up_cfg, device):
    """The gate_up output `(act, act_scale)` (uninitialised, one row per sorted position): bf16 and
    None, or with `quant_act`, e4m3 and its fp32 per-row group scales `[rows, inter / 128]`."""
    if quant_act(scheme, gate_up_cfg):
        act = torch.empty((rows, inter), dtype=FP8_DTYPE, device=device)
        return act, torch.empty((rows, inter // GROUP), dtype=torch.float32, device=device)
    return torch.empty((rows, inter), dtype=torch.bfloat16, device=device), None


def gate_up_stage(a1, a1_scale, w13, w13_scale, align, *, inter, num_slots, top_k, scheme, block_m, cfg,
                  zero=None):  # fmt: skip
    """The gate_up GEMM with SiLU*mul, as the down GEMM reads it: `(act, act_scale)`, one row per
    sorted position (padding rows unwritten); for fp8 schemes e4m3 with per-row 128-group scales,
    quantised in the epilogue (`quant_act`) or by one more launch. `zero`: see `_launch_gemm`."""
    act, act_scale = gate_up_output(align[0].shape[0], inter, scheme, cfg, a1.device)
    _launch_gemm(a1, w13, act, a1_scale, w13_scale, None, align, n=inter, k=a1.shape[1], num_slots=num_slots,
                 top_k=top_k, up_offset=inter, scheme=scheme, gate_up=True, mul_weight=False, atomic=False,
                 block_m=block_m, cfg=cfg, zero=zero, c_scale=act_scale)  # fmt: skip
    if scheme == "bf16" or act_scale is not None:
        return act, act_scale
    return per_token_group_quant_fp8(act, GROUP)


def down_output(num_tokens, top_k, hidden, fused_topk_sum, down_cfg, out_dtype, device):
    """The down GEMM's output buffer (uninitialised) and how the launch writes it: `(c, atomic, row_div)`,
    the output row of a slot being `slot // row_div`.
    Fused top-k sum: fp32 `[T, D]`, atomic adds, row_div = K. Unfused: `[T*K, D]`, one row per slot
    (row_div = 1), stored in out_dtype, or, for a split-K down config (`SPLIT_K` > 1), fp32 with the
    splits' partial sums added atomically."""
    if fused_topk_sum:
        return torch.empty((num_tokens, hidden), dtype=torch.float32, device=device), True, top_k
    split = down_cfg.get("SPLIT_K", 1) > 1
    dtype = torch.float32 if split else out_dtype
    return torch.empty((num_tokens * top_k, hidden), dtype=dtype, device=device), split, 1


def _check_weights(name, w, scale, scheme, num_experts, rows, cols, device) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        raise ValueError(f"{name} must be a [L, N, K] tensor, got {getattr(w, 'shape', type(w))}")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but x is on {device}")
    want_cols = cols // 2 if scheme == "w4a8" else cols
    if tuple(w.shape) != (num_experts, rows, want_cols):
        raise ValueError(
            f"{name} shape must be {(num_experts, rows, want_cols)} for scheme {scheme!r}, got {tuple(w.shape)}"
        )
    want_dtype = {"bf16": torch.bfloat16, "fp8_block": FP8_DTYPE, "w4a8": torch.uint8}[scheme]
    if w.dtype != want_dtype:
        raise ValueError(f"{name}.dtype must be {want_dtype} for scheme {scheme!r}, got {w.dtype}")
    if w.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dim")
    if scheme == "bf16":
        if scale is not None:
            raise ValueError(f"{name}_scale must be None for scheme 'bf16'")
        return
    if scale is None:
        raise ValueError(f"{name}_scale is required for scheme {scheme!r}")
    if scheme == "fp8_block":
        want = (num_experts, cdiv(rows, GROUP), cdiv(cols, GROUP))
    else:
        want = (num_experts, rows, cols // GROUP)
    if tuple(scale.shape) != want or scale.dtype != torch.float32:
        raise ValueError(f"{name}_scale must be {want} float32, got {tuple(scale.shape)} {scale.dtype}")
    if scale.device != device:
        raise ValueError(f"{name}_scale is on {scale.device} but x is on {device}")


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    scheme: str = "bf16",
    x_scale: torch.Tensor | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    fused_topk_sum: bool | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Local experts' MLP on the normal layout: `out[t] = sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t)`.

    Args:
        x: `[T, D]` bfloat16, or float8_e4m3fn with `x_scale` `[T, D/128]` float32 (any strides), as
            DeepEP's FP8 normal dispatch delivers it.
        w13: `[L, 2I, D]` (gate rows [0, I), up rows [I, 2I)): bfloat16 ("bf16"), float8_e4m3fn
            ("fp8_block") or uint8 `[L, 2I, D/2]` packed int4 ("w4a8", low nibble = even k).
        w2: `[L, D, I]` likewise (`[L, D, I/2]` uint8 for "w4a8").
        topk_ids: `[T, K]` int64 local expert ids; -1 (or any id outside [0, L)) = the slot's expert
            is elsewhere: it contributes nothing.
        topk_weights: `[T, K]` float32.
        scheme: "bf16" | "fp8_block" | "w4a8". fp8 schemes need D % 128 == 0 and I % 128 == 0.
        w13_scale, w2_scale: "fp8_block": `[L, ceil(N/128), ceil(K/128)]` float32 block scales;
            "w4a8": `[L, N, K/128]` float32 per-(row, group) scales; None for "bf16".
        fused_topk_sum: True: the down GEMM atomically adds each slot's weighted output into an fp32
            `[T, D]` accumulator (one rounding to out_dtype at the end; summation order is not
            deterministic). False: per-slot outputs are rounded to out_dtype in `[T*K, D]`, then summed
            over K in fp32 and rounded once more (with a split-K down config, `config["down"]
            ["SPLIT_K"] > 1`, the per-slot outputs are summed atomically in fp32 instead, and rounded
            once after the sum over K). None: fused when K > 2.
        out_dtype: bfloat16 | float16 | float32.
        config: block config (see `get_config`); None = tuned table / heuristic. `{"MASKED": true}`
            (optionally `"masked": [gate_up config, down config]` for `masked_moe`): decode through
            the masked layout (bf16 and fp8_block; the top-k sum is then the unfused one). A table
            bucket may hold such an entry (with the sorted-layout config it replaced as `"sorted"`,
            used where the masked path cannot serve: fused_topk_sum=True, T*K > MASKED_MAX_SLOTS).
    Returns: `[T, D]` out_dtype. Rows whose slots are all skipped are exactly 0.
    The call never synchronises with the host.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [T, D] tensor, got {getattr(x, 'shape', type(x))}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    dev = x.device
    num_tokens, hidden = x.shape
    if w13 is None or w2 is None or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("w13 must be [L, 2I, D] and w2 [L, D, I]")
    num_experts = w13.shape[0]
    if w13.shape[1] % 2:
        raise ValueError(
            f"w13 must be [L, 2I, D] (gate rows then up rows); its dim 1 ({w13.shape[1]}) is odd"
        )
    inter = w13.shape[1] // 2
    _check_weights("w13", w13, w13_scale, scheme, num_experts, 2 * inter, hidden, dev)
    _check_weights("w2", w2, w2_scale, scheme, num_experts, hidden, inter, dev)
    if scheme != "bf16" and (hidden % GROUP or inter % GROUP):
        raise ValueError(f"scheme {scheme!r} needs D ({hidden}) and I ({inter}) to be multiples of {GROUP}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be [T={num_tokens}, K], got {tuple(topk_ids.shape)}")
    if topk_ids.dtype != torch.int64:
        raise ValueError(f"topk_ids.dtype must be int64, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
        raise ValueError(
            f"topk_weights must be {tuple(topk_ids.shape)} float32, got {tuple(topk_weights.shape)} {topk_weights.dtype}"
        )
    if topk_ids.device != dev or topk_weights.device != dev:
        raise ValueError(f"topk_ids/topk_weights must be on x's device {dev}")
    if x.dtype == FP8_DTYPE:
        if x_scale is None:
            raise ValueError("x is float8_e4m3fn: x_scale [T, D/128] float32 is required")
        if hidden % GROUP:
            raise ValueError(f"fp8 x needs D ({hidden}) to be a multiple of {GROUP}")
        if tuple(x_scale.shape) != (num_tokens, hidden // GROUP) or x_scale.dtype != torch.float32:
            raise ValueError(
                f"x_scale must be [{num_tokens}, {hidden // GROUP}] float32, got {tuple(x_scale.shape)} {x_scale.dtype}"
            )
        if x_scale.device != dev:
            raise ValueError(f"x_scale is on {x_scale.device} but x is on {dev}")
    elif x.dtype == torch.bfloat16:
        if x_scale is not None:
            raise ValueError("x_scale must be None when x is bfloat16")
    else:
        raise ValueError(f"x.dtype must be bfloat16 or float8_e4m3fn, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous along its last dim")

    top_k = topk_ids.shape[1]
    if config is None:
        config = get_config(num_tokens, top_k, num_experts, inter, hidden, scheme, dev)
        if config.get("MASKED") and (fused_topk_sum is True or num_tokens * top_k > MASKED_MAX_SLOTS):
            # a table bucket that decodes through the masked layout keeps the sorted-layout config
            # it replaced, for calls the masked path cannot serve
            config = config.get("sorted") or heuristic_config(num_tokens, top_k, num_experts, scheme)
    explicit_fused = fused_topk_sum
    if fused_topk_sum is None:
        fused_topk_sum = top_k > 2
    _check_config(config, scheme)
    if config.get("MASKED") and explicit_fused and top_k > 1:
        raise ValueError(
            "config MASKED (decode through the masked layout) sums the top-k outputs unfused; "
            "pass fused_topk_sum=False or None with it"
        )
    if num_tokens == 0 or top_k == 0:
        return torch.zeros((num_tokens, hidden), dtype=out_dtype, device=dev)

    # Activations in the scheme's format.
    if scheme == "bf16":
        a1, a1_scale = (
            (per_token_group_dequant_fp8(x, x_scale, GROUP), None) if x.dtype == FP8_DTYPE else (x, None)
        )
    elif x.dtype == FP8_DTYPE:
        a1, a1_scale = x, x_scale
    else:
        a1, a1_scale = per_token_group_quant_fp8(x, GROUP)

    if config.get("MASKED"):
        return _fused_moe_masked(a1, a1_scale, w13, w2, w13_scale, w2_scale, topk_ids, topk_weights, scheme,
                                 out_dtype, tuple(config.get("masked", (None, None))))  # fmt: skip

    # The down GEMM's output starts at zero (slots of other ranks' experts add or store nothing): the
    # gate_up launch zero-fills it (`zero=`), one launch fewer than torch.zeros.
    num_slots = num_tokens * top_k
    c, atomic, row_div = down_output(
        num_tokens, top_k, hidden, fused_topk_sum, config["down"], out_dtype, dev
    )

    block_m = int(config["BLOCK_M"])
    align = moe_align_block_size(topk_ids, block_m, num_experts)

    a2, a2_scale = gate_up_stage(a1, a1_scale, w13, w13_scale, align, inter=inter, num_slots=num_slots,
                                 top_k=top_k, scheme=scheme, block_m=block_m, cfg=config["gate_up"], zero=c)  # fmt: skip

    flat_w = topk_weights.reshape(-1)
    _launch_gemm(
        a2,
        w2,
        c,
        a2_scale,
        w2_scale,
        flat_w,
        align,
        n=hidden,
        k=inter,
        num_slots=num_slots,
        top_k=row_div,
        up_offset=0,
        scheme=scheme,
        gate_up=False,
        mul_weight=True,
        atomic=atomic,
        block_m=block_m,
        cfg=config["down"],
    )
    if fused_topk_sum:
        return c if out_dtype == torch.float32 else c.to(out_dtype)
    if top_k == 1:
        return c.to(out_dtype)
    return _sum_slots(c, num_tokens, top_k, out_dtype)
