"""Compile Triton kernels for Hopper (sm_90) without a GPU and print a JSON summary per case: the
tensor-core instructions in the PTX and the machine-code op counts (`nvdisasm`). Run by
tests/kernels/test_compile_sm90.py in a fresh process without TRITON_INTERPRET (kernels imported
under the interpreter cannot be compiled)."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ep_runtime.kernels import fused_moe as fm
from ep_runtime.kernels import masked_grouped_gemm as mg
from ep_runtime.kernels import router_gemm as rg
from ep_runtime.kernels import select_experts as se
from ep_runtime.kernels.tables import cdiv, next_pow2

# How Triton's launcher specialises the integer arguments of a real launch (DeepSeek-like shapes,
# contiguous tensors): stride 1 becomes the constant 1, multiples of 16 carry `tt.divisibility`
# (which enables vectorised and asynchronous copies, so software pipelining). Pointers are 16-byte
# aligned. Without this the compiler sees unaligned scalars and neither vectorises nor pipelines.
MASKED_DIV16 = ("M", "N", "K", "up_offset", "stride_al", "stride_am", "stride_bl", "stride_bn", "stride_ol",
                "stride_om", "stride_bsl")  # fmt: skip
SPECIALISED = {
    "_fused_moe_gemm_kernel": dict(
        ones=("stride_ak", "stride_bk", "stride_cn", "stride_ask", "stride_bsk", "stride_csg"),
        div16=(
            "N",
            "K",
            "up_offset",
            "rows_per_expert",
            "stride_am",
            "stride_be",
            "stride_bn",
            "stride_cm",
            "stride_bse",
        ),
    ),
    "_router_gemm_kernel": dict(
        ones=("stride_xd", "stride_wd", "stride_oe"), div16=("D", "stride_xt", "stride_we")
    ),
    "_router_gemv_kernel": dict(
        ones=("stride_xd", "stride_wd", "stride_oe"), div16=("D", "stride_xt", "stride_we")
    ),
    "_select_experts_kernel": dict(ones=("stride_le",), div16=("stride_lt",)),
    "_masked_gemm_kernel": dict(
        ones=("stride_ak", "stride_bk", "stride_on", "stride_bsk", "stride_osn"),
        div16=MASKED_DIV16,
    ),  # fmt: skip
    "_masked_mlp_kernel": dict(
        ones=("stride_xk", "stride_gk", "stride_hk", "stride_dk", "stride_on", "stride_xsk", "stride_hsk"),
        div16=(
            "M",
            "D",
            "I",
            "stride_xl",
            "stride_xm",
            "stride_gl",
            "stride_gn",
            "stride_hl",
            "stride_hm",
            "stride_dl",
            "stride_dn",
            "stride_ol",
            "stride_om",
            "stride_xsm",
            "stride_hsm",
        ),
    ),  # fmt: skip
    "_masked_w4a8_kernel": dict(
        ones=("stride_ak", "stride_bk", "stride_on", "stride_bsk"),
        div16=MASKED_DIV16,
    ),  # fmt: skip
}


def compile_sm90(jit, ptr_types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    spec = SPECIALISED.get(jit.__name__, dict(ones=(), div16=()))
    sig = {
        p.name: "constexpr" if p.is_constexpr or p.name in spec["ones"] else ptr_types.get(p.name, "i32")
        for p in jit.params
    }
    index = jit.arg_names.index
    cex = {(index(k),): v for k, v in constexprs.items()}
    cex.update({(index(k),): 1 for k in spec["ones"]})
    pointers = [k for k, t in ptr_types.items() if t.startswith("*")]  # scalars may be typed here too
    attrs = {(index(k),): [["tt.divisibility", 16]] for k in (*pointers, *spec["div16"])}
    src = ASTSource(fn=jit, signature=sig, constexprs=cex, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def sass_text(kernel) -> str:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout


def sass_ops(kernel, text: str | None = None) -> dict[str, int]:
    text = sass_text(kernel) if text is None else text
    ops: collections.Counter = collections.Counter()
    for line in text.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    return dict(ops)


def mma_loop_ldg(text: str) -> int:
    """Synchronous global loads (LDG) inside the innermost SASS loops that hold a tensor-core
    instruction: the K loops (an outer loop over row blocks holding a K loop is not one). Pipelined
    tile loads are LDGSTS (asynchronous copies); an LDG there is a load each K step waits for."""
    lines = text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:  # a backward branch: the loop body is label..branch
            loops.append((labels[m.group(1)], i))
    count = 0
    for lo, hi in loops:
        if any(lo < lo2 and hi2 <= hi for lo2, hi2 in loops if (lo2, hi2) != (lo, hi)):
            continue  # holds an inner loop
        body = lines[lo:hi]
        if any(re.search(r"\b[A-Z]*MMA\b", b) for b in body):  # HMMA, HGMMA, QGMMA (fp8), ...
            count += sum(1 for b in body if re.search(r"\bLDG\b|\bLDG\.", b))
    return count


MASKED_PTRS = dict(
    a_ptr="*bf16", a_scale_ptr="*fp32", b_ptr="*u8", b_scale_ptr="*fp32", out_ptr="*bf16",
    out_scale_ptr="*fp32", counts_ptr="*i32", ws_ptr="*fp32", counter_ptr="*i32",
)  # fmt: skip
MASKED_W4A8_PTRS = dict(
    a_ptr="*fp16", b_ptr="*u8", b_scale_ptr="*fp32", out_ptr="*bf16", counts_ptr="*i32", amax_in_ptr="*fp32",
    amax_out_ptr="*fp32", ws_ptr="*fp32", counter_ptr="*i32",
)  # fmt: skip


def fused_ptrs(scheme: int, gate_up: bool) -> dict[str, str]:
    a = {0: "*bf16", 2: "*fp8e4nv"}[scheme]
    b = {0: "*bf16", 2: "*u8"}[scheme]
    return dict(a_ptr=a, b_ptr=b, c_ptr="*bf16" if gate_up else "*fp32", a_scale_ptr="*fp32",
                b_scale_ptr="*fp32", topk_w_ptr="*fp32", sorted_ids_ptr="*i32", expert_ids_ptr="*i32",
                num_post_ptr="*i32", zero_ptr="*fp32", c_scale_ptr="*fp32")  # fmt: skip


def fused_ce(**ce) -> dict:
    """Constexprs of one fused MoE GEMM launch. A descriptor the launch does not use (TMA_A / TMA_B
    off) is the constexpr None; a used one is an argument, typed by `tma_ptrs`."""
    out = dict(dict(TMA_A=False, TMA_B=False), **ce)
    out.setdefault("A_SORTED", not out["GATE_UP"] or out["TMA_B"])  # as `_launch_gemm` sets it
    out.setdefault("ZERO", out["GATE_UP"])  # fused_moe's gate_up launch zero-fills the down output
    out.setdefault("ZERO_BLOCK", 1024)
    out.setdefault("N_BAND", 0)  # program order only
    out.setdefault("RESCALE", False)
    out.setdefault("QUANT_OUT", False)
    out.setdefault("PRELOAD", 0)
    out.update({name: None for name, on in (("a_desc", out["TMA_A"]), ("b_desc", out["TMA_B"])) if not on})
    return out


def tma_ptrs(ptrs: dict, scheme: int, block_m: int, block_n: int, block_k: int) -> dict:
    """`ptrs` plus the descriptor types of a TMA launch (weights and activations; gate_up's activations
    are gathered into position order first)."""
    elem = "bf16" if scheme == 0 else "fp8e4nv"
    return dict(
        ptrs,
        a_desc=f"tensordesc<{elem}[{block_m}, {block_k}]>",
        b_desc=f"tensordesc<{elem}[{block_n}, {block_k}]>",
    )


def w4a8_ce(
    gated: bool, block_m: int, block_n: int, warps: int, split_k: int = 1, fold: bool = False
) -> dict:
    return dict(OUT_MODE=mg.OUT_AMAX if gated else mg.OUT_PLAIN, GATED=gated, BLOCK_M=block_m,
                BLOCK_N=block_n, WARPS=warps, UPCAST=False, ASM=True, SPLIT_K=split_k,
                FOLD_SCALE=fold)  # fmt: skip


def cases():
    # the masked w4a8 kernel's tiles: decode (16 token rows), and 64 token rows with 128 weight rows
    for gated in (True, False):
        for bm, bn, warps in ((16, 64, 4), (64, 128, 8)):
            name = f"masked-w4a8-{'gated' if gated else 'plain'}-BM{bm}-BN{bn}-w{warps}"
            yield name, mg._masked_w4a8_kernel, MASKED_W4A8_PTRS, w4a8_ce(gated, bm, bn, warps), warps, 4
        # the group scales folded into the fp16 weights (FOLD_SCALE)
        for bm, bn, warps in ((16, 64, 4), (64, 128, 8)):
            name = f"masked-w4a8-{'gated' if gated else 'plain'}-BM{bm}-BN{bn}-w{warps}-fold"
            yield (
                name,
                mg._masked_w4a8_kernel,
                MASKED_W4A8_PTRS,
                w4a8_ce(gated, bm, bn, warps, fold=True),
                warps,
                4,
            )
        # a SMALL tile with K split across programs (one-launch reduction)
        name = f"masked-w4a8-{'gated' if gated else 'plain'}-BM16-BN64-w4-split4"
        yield name, mg._masked_w4a8_kernel, MASKED_W4A8_PTRS, w4a8_ce(gated, 16, 64, 4, 4), 4, 4
    for gate_up in (True, False):
        for magic in (False, True):
            ce = fused_ce(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SCHEME=2, GATE_UP=gate_up,
                          MUL_WEIGHT=not gate_up, ATOMIC=not gate_up, UPCAST=False, EVEN_K=True,
                          MERGE_GU=gate_up, INT4_MAGIC=magic)  # fmt: skip
            name = f"fused-w4a8-{'gate_up' if gate_up else 'down'}-magic{int(magic)}"
            yield name, fm._fused_moe_gemm_kernel, fused_ptrs(2, gate_up), ce, 4, 4
    # the masked fp8_block GEMM's decode tiles (16 rows: mma.sync; 64 rows: fp8 wgmma), scales loaded
    # per K step or before the K loop (Qwen3's K: 16 tiles)
    for gated in (True, False):
        for bm in (16, 64):
            for preload in (0, 16):
                ce = dict(A_MODE=mg.A_FP8G, B_MODE=mg.B_FP8_BLOCK, OUT_MODE=mg.OUT_FP8G if gated else mg.OUT_PLAIN,
                          GATED=gated, B_SCALE_ROWS=mg.GROUP, BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128,
                          GROUP_K=mg.GROUP, UPCAST=False, SPLIT_K=1, PRELOAD=preload)  # fmt: skip
                ptrs = dict(MASKED_PTRS, a_ptr="*fp8e4nv", b_ptr="*fp8e4nv")
                ptrs["out_ptr"] = "*fp8e4nv" if gated else "*bf16"
                name = f"masked-fp8-{'gated' if gated else 'plain'}-BM{bm}-BN128-preload{preload}"
                yield name, mg._masked_gemm_kernel, ptrs, ce, 8 if gated else 4, 4 if bm == 16 else 3
    # fp8_block decode tiles (16 rows, mma.sync) with the K range's scales loaded before the K loop
    for gate_up in (True, False):
        for preload in (0, 64):
            ce = fused_ce(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, SCHEME=1, GATE_UP=gate_up,
                          MUL_WEIGHT=not gate_up, ATOMIC=not gate_up, UPCAST=False, EVEN_K=True, MERGE_GU=False,
                          INT4_MAGIC=False, PRELOAD=preload)  # fmt: skip
            ptrs = dict(fused_ptrs(2, gate_up), b_ptr="*fp8e4nv")
            name = f"fused-fp8-decode-{'gate_up' if gate_up else 'down'}-preload{preload}"
            yield name, fm._fused_moe_gemm_kernel, ptrs, ce, 4, 4
    ce = fused_ce(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SCHEME=0, GATE_UP=True, MUL_WEIGHT=False,
                  ATOMIC=False, UPCAST=False, EVEN_K=True, MERGE_GU=True, INT4_MAGIC=False)  # fmt: skip
    yield "fused-bf16-gate_up", fm._fused_moe_gemm_kernel, fused_ptrs(0, True), ce, 8, 4
    # TMA tiles (weights; the down GEMM's activations too) for both tensor-core schemes
    # (the bench's prefill TMA candidates)
    tma_tiles = ((0, True, 128, 128, 64, 8), (0, False, 128, 256, 64, 8), (1, True, 64, 64, 128, 4),
                 (1, False, 64, 128, 128, 4))  # fmt: skip
    for scheme, gate_up, bm, bn, bk, warps in tma_tiles:
        ce = fused_ce(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SCHEME=scheme, GATE_UP=gate_up,
                      MUL_WEIGHT=not gate_up, ATOMIC=not gate_up, UPCAST=False, EVEN_K=True,
                      MERGE_GU=False, INT4_MAGIC=False, TMA_A=True, TMA_B=True)  # fmt: skip
        ptrs = fused_ptrs(0 if scheme == 0 else 2, gate_up)
        if scheme == 1:
            ptrs["b_ptr"] = "*fp8e4nv"
        ptrs = tma_ptrs(ptrs, scheme, bm, bn, bk)
        name = f"fused-tma-{'bf16' if scheme == 0 else 'fp8'}-{'gate_up' if gate_up else 'down'}"
        yield name, fm._fused_moe_gemm_kernel, ptrs, ce, warps, 4
    # fp8_block RESCALE tiles (the accumulator rescaled in place): the widths the scaled-product path
    # spills at (the bench's fp8 prefill candidates)
    rescaled = ((True, 64, 128, 4, 3, True, False), (True, 128, 128, 8, 3, True, False),
                (True, 128, 128, 8, 4, False, True), (False, 64, 256, 4, 3, False, False),
                (False, 128, 256, 8, 3, False, False), (False, 128, 256, 8, 3, False, True))  # fmt: skip
    for gate_up, bm, bn, warps, stages, merge, tma in rescaled:
        ce = fused_ce(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, SCHEME=1, GATE_UP=gate_up,
                      MUL_WEIGHT=not gate_up, ATOMIC=not gate_up, UPCAST=False, EVEN_K=True, MERGE_GU=merge,
                      INT4_MAGIC=False, TMA_A=tma, TMA_B=tma, RESCALE=True, QUANT_OUT=gate_up)  # fmt: skip
        ptrs = dict(fused_ptrs(2, gate_up), b_ptr="*fp8e4nv")
        if gate_up:  # whole 128-groups per N-block: the epilogue quantises (as fused_moe launches it)
            ptrs["c_ptr"] = "*fp8e4nv"
        if tma:
            ptrs = tma_ptrs(ptrs, 1, bm, bn, 128)
        stage = ("gate_up-merged" if merge else "gate_up") if gate_up else "down"
        name = f"fused-fp8-rescale-{stage}-{'tma-' if tma else ''}BM{bm}-BN{bn}-w{warps}"
        yield name, fm._fused_moe_gemm_kernel, ptrs, ce, warps, stages
    # the one-launch masked MLP: a bf16 decode tile and an fp8_block one (gate_up = one 128-group)
    yield _mlp_case("any", "bf16", dict(BLOCK_M=16, BLOCK_M_BIG=64, BLOCK_N1=32, BLOCK_N2=64, num_warps=4,
                                        num_stages=4), mg.A_BF16, mg.B_BF16)  # fmt: skip
    yield _mlp_case("any", "fp8-hbf16", dict(BLOCK_M=16, BLOCK_M_BIG=64, BLOCK_N1=32, BLOCK_N2=64, num_warps=4,
                                            num_stages=4, H_BF16=True), mg.A_FP8G, mg.B_FP8_BLOCK)  # fmt: skip
    yield _mlp_case("any", "fp8", dict(BLOCK_M=16, BLOCK_M_BIG=64, BLOCK_N1=128, BLOCK_N2=128, num_warps=8,
                                       num_stages=3), mg.A_FP8G, mg.B_FP8_BLOCK)  # fmt: skip
    # fused_moe's masked decode path: the row scatter (bf16 rows; fp8 rows with their group scales) and
    # the top-k combine, at DeepSeek-V3 decode sizes
    for fp8 in (False, True):
        ptrs = dict(x_ptr="*fp8e4nv" if fp8 else "*bf16", xs_ptr="*fp32", ids_ptr="*i64",
                    xm_ptr="*fp8e4nv" if fp8 else "*bf16", xms_ptr="*fp32", counts_ptr="*i32", pos_ptr="*i32")  # fmt: skip
        ce = dict(E=256, K=8, T_POW2=32, K_POW2=8, E_POW2=256, BLOCK_D=1024, G_POW2=64, HAS_SCALE=fp8)
        yield f"fused-masked-scatter-{'fp8' if fp8 else 'bf16'}", fm._scatter_rows_kernel, ptrs, ce, 4, 1
    ptrs = dict(ym_ptr="*bf16", ids_ptr="*i64", pos_ptr="*i32", w_ptr="*fp32", out_ptr="*bf16")
    yield "fused-masked-combine", fm._combine_rows_kernel, ptrs, dict(E=256, K=8, BLOCK_D=1024), 4, 1
    # the unfused top-k sum (Mixtral-class K=2, bf16 rows)
    yield (
        "fused-sum-slots",
        fm._sum_slots_kernel,
        dict(c_ptr="*bf16", out_ptr="*bf16"),
        dict(K=2, BLOCK_D=1024),
        4,
        1,
    )
    select_ptrs = dict(
        logits_ptr="*fp32", bias_ptr="*fp32", ids_ptr="*i64", weights_ptr="*fp32", scaling="fp32"
    )
    for name, E, K, groups in (
        ("deepseek", 256, 8, (8, 4)),
        ("e128-k8", 128, 8, None),
        ("e8-k2", 8, 2, None),
    ):
        ce = dict(E=E, K=K, N_GROUP=groups[0] if groups else 0, TOPK_GROUP=groups[1] if groups else 0,
                  HAS_BIAS=bool(groups), RENORM=True, LIBDEVICE_EXP=True, K_POW2=triton.next_power_of_2(K),
                  BLOCK_T=se._block_t(E))  # fmt: skip
        yield f"select-{name}", se._select_experts_kernel, select_ptrs, ce, 4, 1


def _preload_width(k: int) -> int:
    """The PRELOAD width the launchers pass for a GEMM of reduction length k without split K (its
    widest): the next power of two of its 128-wide K tiles."""
    return next_pow2(cdiv(k, mg.GROUP))


def _fused_k(skey: str, gate_up: bool) -> int:
    """The reduction length of a fused-MoE GEMM of shape key `L<E>_N<inter>_D<hidden>_<scheme>`:
    hidden for gate_up, inter for down."""
    dims = dict(re.findall(r"([ND])(\d+)", skey))
    return int(dims["D"] if gate_up else dims["N"])


def table_cases():
    """Every distinct block config of the shipped tuned tables (fused MoE, masked GEMM), as the
    launchers would compile it on a Hopper GPU."""
    seen = set()
    fused = json.loads((fm.CONFIG_DIR / "fused_moe.json").read_text())
    for dev, shapes in fused.items():
        if not isinstance(shapes, dict):
            continue
        for skey, buckets in shapes.items():
            scheme = next(s for s in fm.SCHEMES if skey.endswith("_" + s))
            sid = fm._SCHEME_ID[scheme]
            for cfg in buckets.values():
                if cfg.get("MASKED"):  # decode through the masked layout: the sorted config kept beside it
                    cfg = cfg.get("sorted")
                    if cfg is None:
                        continue
                for stage in ("gate_up", "down"):
                    g = cfg[stage]
                    gate_up = stage == "gate_up"
                    tma = bool(g.get("TMA", False))
                    ce = fused_ce(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=g["BLOCK_N"], BLOCK_K=g["BLOCK_K"],
                                  GROUP_M=g["GROUP_M"], SCHEME=sid, GATE_UP=gate_up, MUL_WEIGHT=not gate_up,
                                  ATOMIC=not gate_up, UPCAST=False, EVEN_K=True,
                                  MERGE_GU=bool(gate_up and g.get("MERGE_GU", False)),
                                  INT4_MAGIC=bool(sid == 2 and g.get("INT4_MAGIC", 0)),
                                  TMA_A=tma, TMA_B=tma, N_BAND=g.get("N_BAND", 0),
                                  RESCALE=bool(sid != 0 and g.get("RESCALE", False)),
                                  QUANT_OUT=bool(gate_up and fm.quant_act(scheme, g)),
                                  PRELOAD=_preload_width(_fused_k(skey, gate_up)) if g.get("SCALE_PRELOAD") else 0)  # fmt: skip
                    key = ("fused", sid, g["num_warps"], g["num_stages"], tuple(sorted(ce.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    ptrs = fused_ptrs(0 if sid == 0 else 2, gate_up)
                    if sid == 1:
                        ptrs["b_ptr"] = "*fp8e4nv"
                    if ce["QUANT_OUT"]:
                        ptrs["c_ptr"] = "*fp8e4nv"
                    if tma:
                        ptrs = tma_ptrs(ptrs, sid, cfg["BLOCK_M"], g["BLOCK_N"], g["BLOCK_K"])
                    name = f"table-fused-{dev}-{scheme}-{stage}-BM{ce['BLOCK_M']}-BN{ce['BLOCK_N']}-BK{ce['BLOCK_K']}-w{g['num_warps']}-s{g['num_stages']}"
                    yield name, fm._fused_moe_gemm_kernel, ptrs, ce, g["num_warps"], g["num_stages"]
    router = json.loads(Path(rg.CONFIG_PATH).read_text()).get("devices", {})
    for dev, shapes in router.items():
        for shape, buckets in shapes.items():
            D = int(shape.split(",")[0])
            for b in buckets:
                cfg = b.get("config")
                if b.get("impl") != "triton" or not cfg:
                    continue
                bt, be, bk = cfg["BLOCK_T"], cfg["BLOCK_E"], cfg["BLOCK_K"]
                warps, stages = (
                    cfg.get("num_warps", 4),
                    cfg.get("num_stages", 1 if cfg.get("KERNEL") == "gemv" else 3),
                )
                ptrs = dict(x_ptr="*bf16", w_ptr="*bf16", out_ptr="*fp32")
                name = f"table-router-{dev}-{shape}-T{b.get('max_t')}"
                if cfg.get("KERNEL", "splitk") == "gemv":
                    ce = dict(BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk)
                    key = ("gemv", warps, stages, tuple(sorted(ce.items())))
                    jit = rg._router_gemv_kernel
                else:  # the split the launcher derives
                    split, _, reduce = rg._split_plan(D, cfg)
                    ce = dict(BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk, REDUCE=reduce, UPCAST=False,
                              NUM_SPLITS=split if reduce >= 2 else 1)  # fmt: skip
                    ptrs.update(ws_ptr="*fp32", counter_ptr="*i32")
                    key = ("splitk", warps, stages, tuple(sorted(ce.items())))
                    jit = rg._router_gemm_kernel
                if key in seen:
                    continue
                seen.add(key)
                yield name, jit, ptrs, ce, warps, stages
    masked = json.loads(mg.CONFIG_PATH.read_text()).get("devices", {})
    for dev, kinds in masked.items():
        for kind, cfg in kinds.items():
            a_mode, b_mode, gated = mg.parse_kind(kind)
            if a_mode not in (mg.A_BF16, mg.A_FP8G_DEQ, mg.A_FP8G, mg.A_FP16_QT):
                continue  # a retired mode's entry: nothing launches it
            out_mode = (
                {mg.B_BF16: mg.OUT_PLAIN, mg.B_FP8_BLOCK: mg.OUT_FP8G, mg.B_INT4: mg.OUT_AMAX}[b_mode]
                if gated
                else mg.OUT_PLAIN
            )
            if "MLP" in cfg and a_mode != mg.A_FP16_QT:  # the one-launch MLP the entry selects
                yield _mlp_case(dev, kind, cfg["MLP"], a_mode, b_mode)
            for regime, (rcfg, _, _) in enumerate(
                mg._row_regimes(cfg, 1 << 20)
            ):  # each launch `_launch` makes
                yield _masked_case(dev, kind, regime, rcfg, a_mode, b_mode, gated, out_mode)


def _mlp_case(dev, kind, mlp, a_mode, b_mode):
    """The one-launch MLP of a table entry (`masked_grouped_gemm._launch_mlp`)."""
    fp8 = b_mode == mg.B_FP8_BLOCK
    requant = fp8 and not mlp.get("H_BF16", False)  # else h stays bf16 (quantised as the down GEMM loads it)
    ce = dict(A_MODE=a_mode, H_MODE=mg.OUT_FP8G if requant else mg.OUT_PLAIN,
              B_MODE=b_mode, B_SCALE_ROWS=mg.GROUP if fp8 else 1, BLOCK_M=mlp["BLOCK_M"],
              BLOCK_M_BIG=mlp.get("BLOCK_M_BIG", mlp["BLOCK_M"]),
              BLOCK_N1=mg.GROUP if requant else mlp["BLOCK_N1"], BLOCK_N2=mlp["BLOCK_N2"], BLOCK_K=mg.GROUP,
              GROUP_K=mg.GROUP, L_POW2=32, UPCAST=False)  # fmt: skip
    w = "*fp8e4nv" if fp8 else "*bf16"
    ptrs = dict(x_ptr="*fp8e4nv" if a_mode in (mg.A_FP8G_DEQ, mg.A_FP8G) else "*bf16", x_scale_ptr="*fp32",
                w13_ptr=w, w13_scale_ptr="*fp32", h_ptr=w if requant else "*bf16", h_scale_ptr="*fp32",
                w2_ptr=w, w2_scale_ptr="*fp32", out_ptr="*bf16", counts_ptr="*i32", sched_ptr="*i32")  # fmt: skip
    warps = mlp["num_warps"]
    return f"table-mlp-{dev}-{kind}", mg._masked_mlp_kernel, ptrs, ce, warps, mlp.get("num_stages", 3)


def _masked_case(dev, kind, regime, cfg, a_mode, b_mode, gated, out_mode):
    """One masked-GEMM launch of the tables, as `_launch_one` would compile it."""
    cfg = mg._effective_config(cfg, a_mode, b_mode, out_mode)  # as `_launch` runs it
    warps = cfg.get("num_warps", 4)
    name = f"table-masked-{dev}-{kind}-launch{regime}"
    if a_mode == mg.A_FP16_QT:
        ce = w4a8_ce(gated, cfg["BLOCK_M"], cfg["BLOCK_N"], warps, int(cfg.get("SPLIT_K", 1)),
                     bool(cfg.get("FOLD_SCALE", False)))  # fmt: skip
        return name, mg._masked_w4a8_kernel, MASKED_W4A8_PTRS, ce, warps, cfg.get("num_stages", 3)
    k = int(kind.split("@")[1].split("x")[1]) if "@" in kind else 7168  # general entries: the longest K
    ce = dict(A_MODE=a_mode, B_MODE=b_mode, OUT_MODE=out_mode, GATED=gated,
              B_SCALE_ROWS=mg.GROUP if b_mode == mg.B_FP8_BLOCK else 1, BLOCK_M=cfg["BLOCK_M"],
              BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_K=mg.GROUP,
              UPCAST=False, SPLIT_K=int(cfg.get("SPLIT_K", 1)),
              PRELOAD=_preload_width(k) if cfg.get("SCALE_PRELOAD") else 0)  # fmt: skip
    fp8_in = a_mode in (mg.A_FP8G_DEQ, mg.A_FP8G)
    ptrs = dict(MASKED_PTRS, a_ptr="*fp8e4nv" if fp8_in else "*bf16",
                b_ptr={mg.B_BF16: "*bf16", mg.B_FP8_BLOCK: "*fp8e4nv", mg.B_INT4: "*u8"}[b_mode],
                out_ptr="*fp8e4nv" if out_mode == mg.OUT_FP8G else "*bf16")  # fmt: skip
    return (
        name,
        mg._masked_gemm_kernel,
        ptrs,
        ce,
        warps,
        cfg.get("num_stages", 3),
    )


def preload_candidate_cases():
    """The fp8_block prefill tiles the fused-MoE tuner tries with SCALE_PRELOAD
    (`benchmarks.bench_fused_moe.candidates`), at DeepSeek-V3's K (gate_up K 7168: PRELOAD 64;
    down K 2048: 16), the widest preload a shipped shape asks of them."""
    from benchmarks.bench_fused_moe import candidates

    seen = set()
    for rows in (300, 2000):
        for bm, gus, dns in candidates(rows, "fp8_block"):
            for gate_up, cands in ((True, gus), (False, dns)):
                for c in cands:
                    if not c.get("SCALE_PRELOAD"):
                        continue
                    tma = bool(c.get("TMA", False))
                    key = (gate_up, bm, c["BLOCK_N"], c["num_warps"], c["num_stages"], tma)
                    if key in seen:
                        continue
                    seen.add(key)
                    ce = fused_ce(BLOCK_M=bm, BLOCK_N=c["BLOCK_N"], BLOCK_K=128, GROUP_M=8, SCHEME=1, GATE_UP=gate_up,
                                  MUL_WEIGHT=not gate_up, ATOMIC=not gate_up, UPCAST=False, EVEN_K=True,
                                  MERGE_GU=False, INT4_MAGIC=False, TMA_A=tma, TMA_B=tma,
                                  QUANT_OUT=gate_up and fm.quant_act("fp8_block", c),
                                  PRELOAD=_preload_width(7168 if gate_up else 2048))  # fmt: skip
                    ptrs = dict(fused_ptrs(2, gate_up), b_ptr="*fp8e4nv")
                    if ce["QUANT_OUT"]:
                        ptrs["c_ptr"] = "*fp8e4nv"
                    if tma:
                        ptrs = tma_ptrs(ptrs, 1, bm, c["BLOCK_N"], 128)
                    name = "preload-cand-{}-BM{}-BN{}-w{}-s{}{}".format(
                        "gate_up" if gate_up else "down",
                        bm,
                        c["BLOCK_N"],
                        c["num_warps"],
                        c["num_stages"],
                        "-tma" if tma else "",
                    )
                    yield name, fm._fused_moe_gemm_kernel, ptrs, ce, c["num_warps"], c["num_stages"]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET", file=sys.stderr)
        return 2
    out = {}
    for name, jit, ptrs, ce, warps, stages in (*cases(), *table_cases(), *preload_candidate_cases()):
        try:
            k = compile_sm90(jit, ptrs, ce, warps, stages)
        except Exception as exc:  # noqa: BLE001 - reported per case
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
            continue
        text = sass_text(k)
        out[name] = {
            "mma": sorted(set(re.findall(r"(wgmma\.mma_async\S*|mma\.sync\S*)", k.asm["ptx"]))),
            # wgmma with its left operand in registers: `{accumulators}, {a registers}, b descriptor`
            "wgmma_reg_a": len(re.findall(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*\{", k.asm["ptx"])),
            # sub-word shared-memory loads (a layout built byte by byte)
            "lds_narrow": len(re.findall(r"\bLDS\.[US](?:8|16)\b", text)),
            "ops": sass_ops(k, text),
            "mma_loop_ldg": mma_loop_ldg(text),
            "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", k.asm["ptx"])),
            # wgmma.wait_group N: how many groups of asynchronous dots each wait leaves in flight
            "wgmma_waits": sorted(
                int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", k.asm["ptx"])
            ),
            "shared": k.metadata.shared,  # bytes of shared memory a program needs
        }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
