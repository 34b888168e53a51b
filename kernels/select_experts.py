"""Sigmoid-scored expert selection (DeepSeek-V3/R1) in one launch: router logits `[T, E]` fp32 ->
`topk_ids [T, K]` int64, `topk_weights [T, K]` float32.

The torch path (`ep_runtime.router.select_experts`) is about fifteen small kernels per step for
grouped sigmoid routing (scores, correction bias, per-group top-2, group sort, scatter, mask, sort,
gather, renormalise, scale); at decode sizes each costs a few microseconds of GPU time and, eagerly,
more of host time. This kernel does all of it on one `[BLOCK_T, E]` tile in registers, one program
per `BLOCK_T` tokens.

Selection is the torch path's, bit for bit on the GPU:
- the scores are computed as torch's CUDA sigmoid computes them, `1 / (1 + expf(-x))` with the
  accurate `expf` (libdevice) and an IEEE division (`div_rn`), so they are the same floats; the
  bias is added the same way, and a group's score is the same two-term sum;
- every top-k is `K` rounds of "take the maximum, lowest index among equals, then mask it", which
  is the order of torch's stable descending sort.
The weights are the same scores, renormalised over `K` (a sum in another order: equal to fp32
rounding) and scaled. Under Triton's CPU interpreter `exp` is numpy's, which can differ from torch's
CPU `exp` in the last bit, so CPU tests use logits without near-ties.

Softmax-scored models (Qwen3, Mixtral) keep the torch path: their selection runs on softmax values
whose rounding depends on torch's reduction order, and they need only a handful of kernels.

Supported: `E` a power of two up to 1024 (and `E / n_group` one when grouped), `K <= 64`;
`supports()` says so, and callers use the torch path otherwise.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .launch import FastLaunch
from .tables import cdiv, next_pow2

MAX_EXPERTS = 1024
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""The interpreter has no libdevice: it takes `tl.exp` (numpy's), accurate as well."""


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(scoring: str, num_experts: int, n_group: int | None, top_k: int) -> tuple[bool, str]:
    """Whether the kernel serves this routing; the reason if not."""
    if scoring != "sigmoid":
        return False, f"scoring must be 'sigmoid' (softmax keeps the torch path), got {scoring!r}"
    if not _is_pow2(num_experts) or num_experts > MAX_EXPERTS:
        return False, f"num_experts ({num_experts}) must be a power of two <= {MAX_EXPERTS}"
    if n_group is not None and (num_experts % n_group or not _is_pow2(num_experts // n_group)):
        return False, f"num_experts / n_group ({num_experts} / {n_group}) must be a power of two"
    if top_k > 64:
        return False, f"top_k ({top_k}) must be <= 64"
    return True, "ok"


@triton.jit
def _select_experts_kernel(
    # pointers
    logits_ptr,
    bias_ptr,
    ids_ptr,
    weights_ptr,
    # sizes
    T,
    scaling,
    # strides
    stride_lt,
    stride_le,
    # meta
    E: tl.constexpr,
    K: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr,
    LIBDEVICE_EXP: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Program `pid` selects for tokens `[pid*BLOCK_T, (pid+1)*BLOCK_T)`; `N_GROUP == 0`: no groups."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E)
    is_row = offs_t < T
    logits = tl.load(
        logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :] * stride_le,
        mask=is_row[:, None],
        other=0.0,
    )
    if LIBDEVICE_EXP:
        e = libdevice.exp(-logits)
    else:
        e = tl.exp(-logits)
    scores = tl.math.div_rn(tl.full(e.shape, 1.0, tl.float32), 1.0 + e)  # torch's CUDA sigmoid
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + offs_e)[None, :]

    if N_GROUP > 0:
        G: tl.constexpr = E // N_GROUP
        grouped = tl.reshape(choice, (BLOCK_T, N_GROUP, G))
        best = tl.max(grouped, axis=2)
        if G >= 2:  # sum of the group's two best (the second may equal the first)
            first = tl.argmax(grouped, axis=2, tie_break_left=True)
            in_group = tl.arange(0, G)[None, None, :]
            rest = tl.where(in_group == first[:, :, None], float("-inf"), grouped)
            group_score = best + tl.max(rest, axis=2)
        else:
            group_score = best
        groups = tl.arange(0, N_GROUP)[None, :]
        is_kept = tl.zeros((BLOCK_T, N_GROUP), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            g = tl.argmax(group_score, axis=1, tie_break_left=True)
            hit = groups == g[:, None]
            is_kept = is_kept | hit
            group_score = tl.where(hit, float("-inf"), group_score)
        keep = tl.reshape(tl.broadcast_to(is_kept[:, :, None], (BLOCK_T, N_GROUP, G)), (BLOCK_T, E))
        choice = tl.where(keep, choice, float("-inf"))

    # The K picks collect in registers ([BLOCK_T, K_POW2] tiles), then one store each.
    k_cols = tl.arange(0, K_POW2)[None, :]
    ids = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int64)
    weights = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    for k in tl.static_range(K):
        pick = tl.argmax(choice, axis=1, tie_break_left=True)
        hit = offs_e[None, :] == pick[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        choice = tl.where(hit, float("-inf"), choice)
        ids = tl.where(k_cols == k, pick.to(tl.int64)[:, None], ids)
        weights = tl.where(k_cols == k, w[:, None], weights)
    if RENORM:
        weights = weights / tl.maximum(tl.sum(weights, axis=1), 1e-20)[:, None]
    weights = weights * scaling
    out_offs = offs_t[:, None] * K + k_cols
    is_out = is_row[:, None] & (k_cols < K)
    tl.store(ids_ptr + out_offs, ids, mask=is_out)
    tl.store(weights_ptr + out_offs, weights, mask=is_out)


_select_experts_launch = FastLaunch(_select_experts_kernel)


def _block_t(num_experts: int) -> int:
    """Tokens per program: a `[BLOCK_T, E]` fp32 tile of at most 4096 values (16 KB of registers
    across a 4-warp program), at least one token."""
    return max(1, min(16, 4096 // num_experts))


def select_experts_sigmoid(
    logits: torch.Tensor,
    *,
    top_k: int,
    correction_bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-launch sigmoid-scored expert selection (see the module docstring).

    Args:
        logits: `[T, E]` float32 router logits (any strides).
        top_k: experts per token `K`.
        correction_bias: `[E]` float32, added to the scores for selection only (DeepSeek-V3), or None.
        n_group, topk_group: grouped top-k (both or neither): keep the best `topk_group` of `n_group`
            groups, scored by the sum of their two best (their best when a group has one expert).
        norm_topk_prob: renormalise the `K` weights to sum to one.
        routed_scaling_factor: multiplies the weights last.
    Returns: `topk_ids [T, K]` int64 (best first), `topk_weights [T, K]` float32.
    """
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be [T, E] float32, got {tuple(logits.shape)} {logits.dtype}")
    if not logits.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"logits must be a CUDA tensor (or run under TRITON_INTERPRET=1), got {logits.device}"
        )
    T, E = logits.shape
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group must be given together (or both None)")
    if not 0 < top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
    if n_group is not None and not (0 < topk_group <= n_group and topk_group * (E // n_group) >= top_k):
        raise ValueError(
            f"topk_group ({topk_group}) must be in [1, n_group ({n_group})] and its groups must hold top_k ({top_k})"
        )
    ok, why = supports("sigmoid", E, n_group, top_k)
    if not ok:
        raise ValueError(f"select_experts_sigmoid does not serve this shape: {why}")
    if correction_bias is not None and (
        tuple(correction_bias.shape) != (E,)
        or correction_bias.dtype != torch.float32
        or correction_bias.device != logits.device
    ):
        raise ValueError(
            f"correction_bias must be [{E}] float32 on {logits.device}, got {tuple(correction_bias.shape)} "
            f"{correction_bias.dtype} on {correction_bias.device}"
        )
    ids = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    weights = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, weights
    bias = correction_bias.contiguous() if correction_bias is not None else logits  # dummy pointer
    block_t = _block_t(E)
    _select_experts_launch(
        (cdiv(T, block_t),),
        logits,
        bias,
        ids,
        weights,
        T,
        float(routed_scaling_factor),
        logits.stride(0),
        logits.stride(1),
        E=E,
        K=top_k,
        N_GROUP=n_group or 0,
        TOPK_GROUP=topk_group or 0,
        HAS_BIAS=correction_bias is not None,
        RENORM=norm_topk_prob,
        LIBDEVICE_EXP=not _INTERPRETED,
        K_POW2=next_pow2(top_k),
        BLOCK_T=block_t,
        num_warps=4,
    )
    return ids, weights
