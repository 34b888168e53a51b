"""Fused MoE (normal layout) benchmark: Triton fused_moe vs a torch per-expert loop, with rooflines.

    python benchmarks/bench_fused_moe.py [--quick] [--tune] [--out DIR] [--budget-s S]

Per (model shape, T): bf16 and fp8_block fused_moe (fused top-k sum on at K > 2; at K = 8, T >= 512
the unfused bf16 path too), a w4a8 row at one shape, and the baseline (bf16 torch.mm per expert).
Our rows are timed as CUDA-graph replays (the call never syncs with the host, so it captures); decode
rows also give the eager time. Rooflines measured in the same run: weight bytes actually touched
(distinct experts hit x bytes per expert) over the device-to-device copy bandwidth, and FLOPs over
the measured bf16 (fp8) matmul rate. `--tune` sweeps a few block configs per shape bucket first (each
GEMM timed alone) and writes the winners as a config table next to the results.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    bench_us,
    graph_us,
    measure_copy_bandwidth,
    measure_matmul_flops,
    print_table,
    write_results,
)
from ep_runtime.kernels import fused_moe as fm  # noqa: E402
from ep_runtime.kernels.quant import (  # noqa: E402
    per_token_group_quant_fp8,
    quantize_fp8_block,
    quantize_w4a8,
)

SHAPES = {
    "dsv3_e128": dict(L=128, D=7168, I=2048, K=8, Ts=[1, 16, 128, 512, 2048, 8192]),
    "dsv3_e32": dict(L=32, D=7168, I=2048, K=8, Ts=[1, 128, 2048, 8192]),
    "qwen3_30b": dict(L=128, D=2048, I=768, K=8, Ts=[1, 128, 2048, 8192]),
    "mixtral": dict(L=8, D=4096, I=14336, K=2, Ts=[1, 128, 2048, 8192]),
}
QUICK_TS = {"dsv3_e128": [1, 128, 2048], "dsv3_e32": [2048], "qwen3_30b": [128, 2048], "mixtral": [128]}
W4A8_AT = ("dsv3_e32", 2048)
MASKED_MARGIN = 0.97
"""--masked-decode makes the masked layout a bucket's decode path only when it is at least 3% faster
(run-to-run spread of these graph timings is about 1-2%)."""
TUNE_AT = {
    ("dsv3_e128", "bf16"): (1, 128, 512, 2048, 8192),
    ("dsv3_e128", "fp8_block"): (128, 512, 2048, 8192),
    ("dsv3_e32", "bf16"): (128, 2048, 8192),
    ("dsv3_e32", "fp8_block"): (2048, 8192),
    ("dsv3_e32", "w4a8"): (2048,),  # W4A8_AT; both int4 unpacks compete
    ("qwen3_30b", "bf16"): (128, 2048, 8192),
    ("qwen3_30b", "fp8_block"): (2048, 8192),
    ("mixtral", "bf16"): (128, 2048, 8192),
    ("mixtral", "fp8_block"): (2048, 8192),
}
"""(shape, scheme) -> T values swept under --tune (other T use the nearest tuned bucket)."""
STEP_MAX_T = 32
"""Rows up to this T also get the step timing (`--step-layers`)."""
SMOKE = {"tiny": dict(L=8, D=256, I=128, K=8, Ts=[2, 64])}
"""--smoke: CPU under TRITON_INTERPRET=1, tiny shape, dummy ceilings: checks the script, not speed."""


# ------------------------------------------------------------------------------------------------
# Inputs and baseline
# ------------------------------------------------------------------------------------------------


def routing(T, K, L, device="cuda"):
    ids = torch.rand(T, L, device=device).argsort(dim=1)[:, :K].contiguous()
    w = torch.rand(T, K, device=device) + 0.1
    return ids, (w / w.sum(1, keepdim=True)).float()


def make_bf16_weights(L, D, inter, device="cuda"):
    w13 = torch.randn(L, 2 * inter, D, device=device, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(L, D, inter, device=device, dtype=torch.bfloat16) * 0.02
    return w13, w2


def quantize_per_expert(fn, w):
    qs, ss = zip(*(fn(w[e]) for e in range(w.shape[0])), strict=True)
    return torch.stack(qs), torch.stack(ss)


def torch_loop(x, w13, w2, ids, w):
    """Baseline: bf16 torch.mm per expert (host syncs to find each expert's rows)."""
    T, D = x.shape
    inter = w2.shape[2]
    out = torch.zeros(T, D, device=x.device, dtype=torch.float32)
    for e in range(w13.shape[0]):
        t, k = torch.nonzero(ids == e, as_tuple=True)
        if t.numel() == 0:
            continue
        h = x[t] @ w13[e].t()
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = act @ w2[e].t()
        out.index_add_(0, t, y.float() * w[t, k, None])
    return out.to(torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Tuning: each GEMM timed alone through the launcher, per BLOCK_M
# ------------------------------------------------------------------------------------------------


def candidates(rows_per_expert: float, scheme: str):
    """(BLOCK_M, [gate_up candidates], [down candidates]) lists for one bucket. For w4a8 each block
    config is tried with both in-kernel int4 -> e4m3 unpacks (`quant.int4_to_e4m3`), side by side
    so that a tuning deadline cuts neither; TMA tiles are left out (the launcher refuses TMA for
    packed int4 weights). fp8_block tiles likewise come with and without SCALE_PRELOAD."""
    sets = _block_candidates(rows_per_expert, scheme)
    if scheme == "fp8_block":
        # each tile with and without its K range's scales loaded before the K loop (`fused_moe.
        # PRELOAD_NOTE`), side by side; not tiles wider than one block scale or merged gate|up tiles,
        # nor at prefill the gate_up tiles whose sm_90 compile spills with it (4-warp 64 x 128 and
        # 128 x 128: 2-4 words at K 2048, 121 at K 7168; 8-warp 64 x 128 and 128 x 64 do not)
        def pairs(cands, gate_up, bm):
            def ok(c):
                if c["BLOCK_N"] > 128 or c.get("MERGE_GU"):
                    return False
                return (
                    rows_per_expert <= 12
                    or not gate_up
                    or (c["num_warps"] == 8 and bm * c["BLOCK_N"] <= 8192)
                )

            return [v for c in cands for v in ((c, dict(c, SCALE_PRELOAD=True)) if ok(c) else (c,))]

        return [(bm, pairs(gu, True, bm), pairs(dn, False, bm)) for bm, gu, dn in sets]
    if scheme != "w4a8":
        return sets

    def both(cands):
        return [v for c in cands if not c.get("TMA") for v in (c, dict(c, INT4_MAGIC=1))]

    return [(bm, both(gu), both(dn)) for bm, gu, dn in sets]


def _block_candidates(rows_per_expert: float, scheme: str):

    def c(bn, bk, w, s, g=8, m=False, tma=False, split=1):
        d = dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=s)
        if m:
            d["MERGE_GU"] = True
        if tma:
            d["TMA"] = True
        if split > 1:
            d["SPLIT_K"] = split
        return d

    fp8 = scheme != "bf16"
    if rows_per_expert <= 12:
        # Decode: one 16-row block per touched expert, so the grid is (experts hit) x N blocks and
        # can leave SMs idle or run a ragged last wave. Narrow gate_up tiles and a split-K down GEMM
        # (its partial sums added atomically) put more programs on the weight stream.
        gu = [c(64, 128, 4, 4, 1), c(32, 128, 4, 4, 1), c(16, 128, 4, 4, 1), c(32, 128, 4, 6, 1)]
        dn = [c(64, 128, 4, 4, 1), c(128, 128, 4, 4, 1)]
        dn += [c(bn, 128, 4, 4, 1, split=sp) for sp in (2, 4) for bn in (64, 128)]
        if not fp8:
            gu += [c(64, 256, 4, 3, 1), c(32, 256, 4, 3, 1), c(16, 256, 4, 4, 1)]
            dn += [c(64, 256, 4, 3, 1), c(64, 256, 4, 3, 1, split=2)]
        return [(16, gu, dn)]
    if rows_per_expert <= 96:
        gu = [c(64, 128, 4, 4), c(128, 64, 8, 4)] if not fp8 else [c(64, 128, 4, 4), c(64, 128, 4, 3)]
        dn = [c(128, 128, 4, 4), c(256, 64, 8, 3)] if not fp8 else [c(128, 128, 4, 4), c(64, 128, 4, 4)]
        return [(64, gu, dn)]
    # Prefill. MERGE_GU = one [BLOCK_K, 2*BLOCK_N] gate|up tile per K step (one wider dot). Registers
    # (ptxas sm_90, checked on the CPU): fp8 keeps a dot temporary as large as the accumulator, so its
    # gate|up tile stays at 128 columns per warpgroup row block (128x(2*64) or 64x(2*128) with 8 warps).
    # TMA = weight tiles (and the down GEMM's activation tiles) through tensor descriptors. A TMA
    # gate_up loads gate and up tiles apart (two accumulators): the sm_90 compile of fp8 64x(2x128)
    # with 4 warps spills, so fp8 TMA gate_up tiles stay at 64 columns per 4 warps.
    if fp8:
        # First H200 sweep: BLOCK_M=64 with 4 warps won every fp8 prefill bucket (more programs per
        # SM hide the per-K-block scale readout). H100 sweep (2026-12-07, DeepSeek-V3 T 2048/8192):
        # gate_up TMA tiles of 128 columns with 8 warps won every bucket (their epilogue quantises the
        # output, QUANT_OUT, where 64-column tiles pay a separate quantisation launch), and the down
        # GEMM's banded order (N_BAND, added by `banded`). The sm_90 compile of the 128 x 128 TMA
        # gate_up tile spills 3 words with 8 warps and 16 with 4. RESCALE tiles are not candidates:
        # the fp8 tensor cores accumulate across K blocks with limited precision (H100, DeepSeek-V3
        # sizes: 1.7 % normwise error against 0.44 % for the scaled-product path), so opt-in only.
        # Hopper warp specialisation (`tl.range(warp_specialize=True)`: a TMA producer warp group, two
        # consumer groups) was tried on 2026-12-08 and is not a candidate: with Triton 3.6 on the
        # H100 a plain block-scaled fp8 GEMM (8192 x 4096 x 7168, 128 x 128 tiles, 4 warps a group)
        # ran at 0.52-0.61 of the fp8 matmul rate (0.33-0.39 without) but returned wrong results
        # (normwise error 0.75-1.2 against 0.0017); in the fused kernel the pass failed to compile
        # the gate_up GEMM (and, with Triton 3.9, any atomic-add epilogue), and the down GEMM that
        # compiled was no faster (1293 us against 1213 us, DeepSeek-V3 E128 T 2048).
        gu64 = [
            c(128, 128, 8, 4, tma=True),
            c(64, 128, 4, 4, tma=True),
            c(128, 128, 4, 4, tma=True),
            c(128, 128, 8, 3, tma=True),
            c(64, 128, 4, 4, m=True),
        ]
        dn64 = [
            c(128, 128, 4, 4, tma=True),
            c(128, 128, 4, 4),
            c(128, 128, 4, 3),
            c(128, 128, 8, 4, tma=True),
        ]
        gu = [c(128, 128, 8, 4, tma=True), c(64, 128, 8, 4, tma=True), c(64, 128, 8, 4, m=True)]
        dn = [c(128, 128, 8, 3), c(128, 128, 8, 4, tma=True)]
        return [(64, gu64, dn64), (128, gu, dn)]
    gu = [
        c(128, 64, 8, 4),
        c(128, 64, 8, 4, m=True),
        c(128, 64, 8, 3, m=True),
        c(128, 64, 8, 4, tma=True),
        c(128, 64, 8, 3, tma=True),
    ]
    dn = [
        c(256, 64, 8, 3),
        c(256, 64, 8, 4),
        c(128, 128, 8, 3),
        c(256, 64, 8, 4, tma=True),
        c(256, 64, 8, 3, tma=True),
        c(128, 64, 8, 4, tma=True),
    ]
    gu64 = [c(128, 64, 4, 4, m=True), c(128, 64, 8, 4, m=True), c(128, 64, 8, 4, tma=True)]
    dn64 = [c(256, 64, 8, 4), c(128, 64, 4, 4), c(256, 64, 8, 4, tma=True)]
    if rows_per_expert <= 512:
        # Each expert pads to a multiple of BLOCK_M: at a few hundred rows per expert BLOCK_M=128
        # wastes a share of the tiles and fills fewer SMs, so BLOCK_M=64 competes.
        return [(128, gu, dn), (64, gu64, dn64)]
    return [(128, gu, dn)]


def tune_decode_bucket(x, w13, s13, w2, s2, ids, w, scheme, deadline, time_call, start=None, limit=None):
    """Decode buckets (at most 12 rows per expert): whole fused_moe calls timed by `time_call` (CUDA-graph
    replay), coordinate descent from `start` (the config in use): each gate_up candidate with the
    current down config, then each down candidate with the best gate_up. Kernel-alone eager timings
    mislead here: at T=1 on an H100 they picked a config 20% slower as a graph-replayed call (48.6 vs
    40.6 us for Qwen3-30B-A3B), where the align, fill and cast launches and the GEMM tails all count."""
    T, K = ids.shape
    L = w13.shape[0]
    (bm, gus, dns), *_ = candidates(T * K / L, scheme)
    if limit is not None:
        gus, dns = gus[:limit], dns[:limit]
    cur = start if start and start.get("BLOCK_M") == bm and not start.get("MASKED") else None
    gu, dn = (cur["gate_up"], cur["down"]) if cur else (gus[0], dns[0])
    log = []

    def run(g, d):
        cfg = dict(BLOCK_M=bm, gate_up=g, down=d)
        fn = functools.partial(
            fm.fused_moe, x, w13, w2, ids, w, scheme=scheme, w13_scale=s13, w2_scale=s2, config=cfg
        )
        try:
            t = time_call(fn)
        except Exception as exc:  # a config the compiler rejects (shared memory) just loses
            log.append(f"config {cfg} failed: {type(exc).__name__}")
            return float("inf")
        log.append(
            f"call {t:.1f} us gate_up {json.dumps(g, sort_keys=True)} down {json.dumps(d, sort_keys=True)}"
        )
        return t

    best = run(gu, dn)
    for name, cands in (("gate_up", gus), ("down", dns)):
        for c in cands:
            if time.time() > deadline:
                break
            if c == (gu if name == "gate_up" else dn):
                continue
            t = run(c, dn) if name == "gate_up" else run(gu, c)
            if t < best:
                best = t
                gu, dn = (c, dn) if name == "gate_up" else (gu, c)
    log.append(f"BM={bm}: call {best:.1f} us")
    return dict(BLOCK_M=bm, gate_up=gu, down=dn), log


BAND_BYTES = 16 << 20
"""Prefill tuning with the fused top-k sum also tries the down GEMM in N bands (`N_BAND`) whose fp32
accumulator columns, T x band width x 4 bytes, take about this much L2 (H100/H200: 50 MB)."""


def banded(cands, T: int, D: int):
    """`N_BAND` variants of the down candidates `cands` where the whole fp32 accumulator `T x D` is
    over twice BAND_BYTES (the banded order then keeps a band's columns in L2 while every slot adds
    into them, at the price of one more read of the intermediate per band); none otherwise."""
    if T * D * 4 <= 2 * BAND_BYTES:
        return []
    return [dict(c, N_BAND=max(1, BAND_BYTES // (T * 4 * c["BLOCK_N"]))) for c in cands]


def tune_bucket(x, w13, s13, w2, s2, ids, w, scheme, deadline):
    T, D = x.shape
    K = ids.shape[1]
    L, inter = w13.shape[0], w13.shape[1] // 2
    a1, a1s = (x, None) if scheme == "bf16" else per_token_group_quant_fp8(x)
    flat_w = w.reshape(-1)
    best = None
    log = []
    fused = K > 2  # fused top-k sum, as fused_moe's default
    for bm, gus, dns in candidates(T * K / L, scheme):
        if fused:  # banded only where the accumulator is large (never at decode sizes)
            dns = dns + banded(dns[:2], T, D)
        align = fm.moe_align_block_size(ids, bm, L)
        act = torch.randn(align[0].shape[0], inter, device=x.device, dtype=torch.bfloat16)
        a2, a2s = (act, None) if scheme == "bf16" else per_token_group_quant_fp8(act)

        def time_one(cfg, gate_up, bm=bm, align=align, a2=a2, a2s=a2s):
            if gate_up:  # as fused_moe runs it: the quantisation launch counts where the epilogue does not
                fn = functools.partial(fm.gate_up_stage, a1, a1s, w13, s13, align, inter=inter, num_slots=T * K,
                                       top_k=K, scheme=scheme, block_m=bm, cfg=cfg)  # fmt: skip
            else:
                # the down output as fused_moe allocates and writes it for this config
                out, atomic, row_div = fm.down_output(T, K, D, fused, cfg, torch.bfloat16, x.device)
                out.zero_()
                fn = functools.partial(
                    fm._launch_gemm,
                    a2,
                    w2,
                    out,
                    a2s,
                    s2,
                    flat_w,
                    align,
                    n=D,
                    k=inter,
                    num_slots=T * K,
                    top_k=row_div,
                    up_offset=0,
                    scheme=scheme,
                    gate_up=False,
                    mul_weight=True,
                    atomic=atomic,
                    block_m=bm,
                    cfg=cfg,
                )
            try:
                return bench_us(fn, warmup=3, rep=15)
            except Exception as exc:  # a config the compiler rejects (shared memory) just loses
                log.append(f"config {cfg} failed: {type(exc).__name__}")
                return float("inf")

        res = {}
        for name, cands in (("gate_up", gus), ("down", dns)):
            scored = []
            for cfg in cands:
                if time.time() > deadline and scored:
                    break
                scored.append((time_one(cfg, name == "gate_up"), cfg))
            res[name] = min(scored, key=lambda s: s[0])
            log.extend(f"BM={bm} {name} {t:.1f} us {json.dumps(cfg, sort_keys=True)}" for t, cfg in scored)
        total = res["gate_up"][0] + res["down"][0]
        log.append(f"BM={bm}: gate_up {res['gate_up'][0]:.1f} us, down {res['down'][0]:.1f} us")
        if best is None or total < best[0]:
            best = (total, dict(BLOCK_M=bm, gate_up=res["gate_up"][1], down=res["down"][1]))
        if time.time() > deadline:
            break
    return best[1], log


# ------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------


def nearest(entries, T):
    """The tuned entry whose bucket is nearest T in log scale (as fm.get_config picks), or None."""
    if not entries:
        return None
    return entries[fm.nearest_bucket(entries, T)]


def same_traffic_copy_us(touched: int, layers: int) -> tuple[float, float | None]:
    """A device-to-device copy of `touched // 2` bytes (so `touched` bytes of HBM traffic, as the copy
    bandwidth counts it) replayed from a CUDA graph: `(one copy us, us per copy of a graph of `layers`
    copies from separate buffers)` (the second None when they do not fit in half the free memory or
    layers < 2). Small transfers pay a launch, a ramp and a tail the bandwidth figure does not show."""
    src = torch.empty(touched // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    one = graph_us(lambda: dst.copy_(src), tries=3)
    step = None
    if layers >= 2 and touched * layers < 0.5 * torch.cuda.mem_get_info()[0]:
        n = touched // 2
        pairs = [tuple(torch.empty(n, dtype=torch.uint8, device="cuda") for _ in "sd") for _ in range(layers)]
        step = graph_us(lambda: [d.copy_(s) for s, d in pairs], tries=3) / layers
    return one, step


def bytes_per_expert(D, inter, scheme):
    n = 3 * D * inter
    if scheme == "bf16":
        return 2 * n
    if scheme == "fp8_block":
        return n + 4 * 3 * (D // 128) * (inter // 128)
    return n // 2 + 4 * 3 * n // 128


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes and T only")
    ap.add_argument("--tune", action="store_true", help="sweep block configs per bucket first")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new rows after this")
    ap.add_argument("--tune-budget-s", type=float, default=120.0, help="stop tuning after this")
    ap.add_argument(
        "--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES)
    )
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument(
        "--tune-schemes",
        default=None,
        help="with --tune: comma-separated schemes to sweep (default: every scheme of the run; the others "
        "are timed with their table entries)",
    )
    ap.add_argument(
        "--masked-decode",
        action="store_true",
        help="also time decode (T <= 32) through the masked layout and make it the bucket's entry where it wins",
    )
    ap.add_argument("--ts", default=None, help="comma-separated T values (overrides the per-shape lists)")
    ap.add_argument(
        "--tune-all", action="store_true", help="with --tune: sweep every T of the run, not only TUNE_AT's"
    )
    ap.add_argument(
        "--step-layers",
        type=int,
        default=4,
        help="bf16 decode rows (T <= 32) also timed as a graph of this many consecutive calls, each on its "
        "own weight copy (fewer where GPU memory is short; 0 = off)",
    )
    ap.add_argument("--smoke", action="store_true", help="CPU + interpreter dry run of the script")
    args = ap.parse_args(argv)
    # CUDA-graph replay timing on GPU; the CPU smoke run times the call itself
    time_graph = functools.partial(bench_us, warmup=1, rep=10) if args.smoke else graph_us
    if args.smoke:
        SHAPES.clear()
        SHAPES.update(SMOKE)
        args.shapes = "tiny"
        globals()["W4A8_AT"] = ("tiny", 64)
    elif not torch.cuda.is_available():
        print("bench_fused_moe needs a CUDA GPU")
        return 1
    t_start = time.time()
    deadline = t_start + args.budget_s
    tune_deadline = t_start + args.tune_budget_s
    torch.manual_seed(0)
    dev = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        copy_bw, mm_bf16, mm_fp8 = 1e12, 1e12, 1e12
    else:
        copy_bw = measure_copy_bandwidth()
        mm_bf16 = measure_matmul_flops(torch.bfloat16)
        mm_fp8 = measure_matmul_flops(torch.float8_e4m3fn)
    print(
        f"copy {copy_bw / 1e12:.2f} TB/s, bf16 mm {mm_bf16 / 1e12:.0f} TFLOP/s, fp8 mm {mm_fp8 / 1e12:.0f} TFLOP/s"
    )
    dkey = fm.device_key(dev)
    table_path = fm.CONFIG_DIR / "fused_moe.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    tuned = table.setdefault(dkey, {})
    rows, tune_log = [], []
    out_dir = args.out

    def flush():
        payload = dict(
            ceilings=dict(copy_bytes_per_s=copy_bw, bf16_flops=mm_bf16, fp8_flops=mm_fp8),
            timing="our rows: CUDA-graph replay medians (triton do_bench); torch loop: eager",
            rows=rows,
            tune_log=tune_log,
        )
        write_results("fused_moe", payload, out_dir)
        cfg_out = (out_dir or fm.CONFIG_DIR) / "fused_moe.json"
        cfg_out.parent.mkdir(parents=True, exist_ok=True)
        cfg_out.write_text(json.dumps(table, indent=1, sort_keys=True))

    schemes = ["bf16"] if args.no_fp8 else ["bf16", "fp8_block"]
    tune_schemes = None if args.tune_schemes is None else args.tune_schemes.split(",")
    bad = sorted(set(tune_schemes or ()) - set(fm.SCHEMES))
    if bad:
        ap.error(f"--tune-schemes: unknown {bad}; allowed: {','.join(fm.SCHEMES)}")
    for sname in args.shapes.split(","):
        sh = SHAPES[sname]
        L, D, inter, K = sh["L"], sh["D"], sh["I"], sh["K"]
        Ts = QUICK_TS.get(sname, []) if args.quick else sh["Ts"]
        if args.ts:
            Ts = [int(t) for t in args.ts.split(",")]
        if not Ts or time.time() > deadline:
            continue
        w13, w2 = make_bf16_weights(L, D, inter, dev)
        q = {"bf16": (w13, None, w2, None)}
        # decode rows are also timed as a step: one graph of consecutive calls, each on its own copy of
        # the bf16 weights (a layer each), so every call reads cold weights and no call pays a graph
        # launch of its own (as in a captured decode step of many MoE layers)
        layers = [] if args.smoke or not args.step_layers else [(w13, w2)]
        if layers and min(Ts) <= STEP_MAX_T:
            free, _ = torch.cuda.mem_get_info()
            per_layer = (w13.numel() + w2.numel()) * w13.element_size()
            n = min(args.step_layers, int(0.5 * free // per_layer) + 1)
            layers += [(w13.clone(), w2.clone()) for _ in range(n - 1)]
        if len(layers) < 2:
            layers = []
        if "fp8_block" in schemes:
            a, b = quantize_per_expert(quantize_fp8_block, w13)
            c, d = quantize_per_expert(quantize_fp8_block, w2)
            q["fp8_block"] = (a, b, c, d)
        for T in Ts:
            if time.time() > deadline:
                rows.append(dict(shape=sname, T=T, skipped="time budget"))
                continue
            ids, w = routing(T, K, L, dev)
            x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
            n_touched = int(torch.unique(ids).numel())
            flops = 2.0 * T * K * 3 * D * inter
            ref = torch_loop(x, w13, w2, ids, w)
            t_torch = bench_us(functools.partial(torch_loop, x, w13, w2, ids, w), warmup=2, rep=20)
            align_us = {
                name: round(bench_us(functools.partial(f, ids, 16 if T * K / L <= 12 else 128, L), 3, 10), 2)
                for name, f in (("triton", fm.moe_align_block_size), ("torch", fm._moe_align_torch))
            }
            rows.append(dict(shape=sname, T=T, align_us=align_us))
            print(f"{sname} T={T} align (eager) {align_us}")
            variants = [(s, None) for s in schemes]
            if K == 8 and (T >= 512 or args.smoke):
                variants.append(("bf16", False))
            if (sname, T) == W4A8_AT:
                variants.append(("w4a8", None))
            if args.masked_decode and T * K <= fm.MASKED_MAX_SLOTS and T <= 32:
                variants += [(s, "masked") for s in schemes]
            sorted_us, same_copy = {}, {}
            for scheme, fused in variants:
                if scheme == "w4a8":
                    a, b = quantize_per_expert(quantize_w4a8, w13)
                    c, d = quantize_per_expert(quantize_w4a8, w2)
                    ws = (a, b, c, d)
                else:
                    ws = q[scheme]
                skey = fm.shape_key(L, inter, D, scheme)
                bucket = str(fm.t_bucket(T))
                want_tune = args.smoke or args.tune_all or T in TUNE_AT.get((sname, scheme), ())
                want_tune = want_tune and (tune_schemes is None or scheme in tune_schemes)
                if args.tune and want_tune and fused is None and time.time() < tune_deadline:
                    if T * K / L <= 12 and scheme != "w4a8":
                        in_use = tuned.get(skey, {}).get(bucket) or fm.get_config(
                            T, K, L, inter, D, scheme, dev
                        )
                        cfg, lg = tune_decode_bucket(x, ws[0], ws[1], ws[2], ws[3], ids, w, scheme, tune_deadline,
                                                     time_graph, in_use.get("sorted", in_use),
                                                     limit=2 if args.smoke else None)  # fmt: skip
                    else:
                        cfg, lg = tune_bucket(x, ws[0], ws[1], ws[2], ws[3], ids, w, scheme, tune_deadline)
                    tuned.setdefault(skey, {})[bucket] = cfg
                    tune_log.append(dict(shape=sname, T=T, scheme=scheme, chosen=cfg, log=lg))
                cfg = (
                    tuned.get(skey, {}).get(bucket)
                    or nearest(tuned.get(skey), T)
                    or fm.get_config(T, K, L, inter, D, scheme, dev)
                )
                if cfg.get("MASKED"):  # this run compares the two paths itself
                    cfg = cfg.get("sorted") or fm.heuristic_config(T, K, L, scheme)
                path = "sorted"
                if fused == "masked":
                    cfg, fused, path = {"MASKED": True}, False, "masked"
                fn = functools.partial(
                    fm.fused_moe,
                    x,
                    ws[0],
                    ws[2],
                    ids,
                    w,
                    scheme=scheme,
                    w13_scale=ws[1],
                    w2_scale=ws[3],
                    fused_topk_sum=fused,
                    config=cfg,
                )
                try:
                    out = fn()
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    t_us = time_graph(fn)
                    t_eager = bench_us(fn, warmup=3, rep=20) if T <= 128 else None
                    t_step = None
                    if layers and scheme == "bf16" and T <= STEP_MAX_T:
                        calls = [
                            functools.partial(fn.func, x, a, b, *fn.args[3:], **fn.keywords)
                            for a, b in layers
                        ]
                        t_step = graph_us(lambda calls=calls: [c() for c in calls]) / len(calls)
                except Exception as exc:
                    rows.append(
                        dict(shape=sname, T=T, scheme=scheme, error=f"{type(exc).__name__}: {exc}"[:300])
                    )
                    print(rows[-1])
                    continue
                touched = n_touched * bytes_per_expert(D, inter, scheme)
                if T <= STEP_MAX_T and not args.smoke and touched not in same_copy:
                    same_copy[touched] = same_traffic_copy_us(touched, len(layers))
                rate = mm_bf16 if scheme == "bf16" else mm_fp8
                floor_us = max(touched / copy_bw, flops / rate) * 1e6
                rows.append(
                    dict(
                        shape=sname,
                        L=L,
                        D=D,
                        I=inter,
                        K=K,
                        T=T,
                        scheme=scheme,
                        topk_sum="fused" if (fused if fused is not None else K > 2) else "unfused",
                        path=path,
                        us=round(t_us, 2),
                        eager_us=None if t_eager is None else round(t_eager, 2),
                        torch_us=round(t_torch, 2),
                        speedup_vs_torch=round(t_torch / t_us, 2),
                        weight_GBps=round(touched / t_us / 1e3, 1),
                        frac_copy_bw=round(touched / copy_bw * 1e6 / t_us, 3),
                        tflops=round(flops / t_us / 1e6, 1),
                        frac_mm=round(flops / rate * 1e6 / t_us, 3),
                        frac_roofline=round(floor_us / t_us, 3),
                        rel_err_vs_torch=round(err, 4),
                        config=cfg,
                    )
                )
                if touched in same_copy:
                    # the copy of the same traffic (touched/2 bytes read + written) from a graph, as
                    # one call and as a step of per-layer copies: the ceiling at this transfer size
                    c1, cs = same_copy[touched]
                    rows[-1].update(copy_same_us=round(c1, 2), frac_same_copy=round(c1 / t_us, 3))
                    if cs is not None and t_step is not None:
                        rows[-1].update(
                            copy_same_step_us=round(cs, 2), frac_same_copy_step=round(cs / t_step, 3)
                        )
                if t_step is not None:
                    rows[-1].update(
                        step_us=round(t_step, 2),
                        step_layers=len(layers),
                        frac_copy_bw_step=round(touched / copy_bw * 1e6 / t_step, 3),
                    )
                r = rows[-1]
                if path == "sorted" and fused is None:
                    sorted_us[scheme] = (t_us, cfg)
                elif path == "masked" and scheme in sorted_us:
                    # the decode path for this bucket: the masked layout where it beat the sorted one
                    # (the sorted config kept beside it for calls the masked path cannot serve)
                    t_sorted, cfg_sorted = sorted_us[scheme]
                    r["vs_sorted"] = round(t_sorted / t_us, 3)
                    if t_us < MASKED_MARGIN * t_sorted and T == fm.t_bucket(T):
                        tuned.setdefault(skey, {})[bucket] = {"MASKED": True, "sorted": cfg_sorted}
                print(
                    f"{sname} T={T} {scheme} {r['topk_sum']}: {t_us:.1f} us (eager {r['eager_us']}), "
                    f"torch {t_torch:.1f}, {r['tflops']} TFLOP/s, {r['weight_GBps']} GB/s, "
                    f"roofline {r['frac_roofline']:.2f}, err {err:.3g}",
                    flush=True,
                )
            flush()
        del w13, w2, q, layers
        if not args.smoke:
            torch.cuda.empty_cache()
    flush()
    cols = [
        "shape",
        "T",
        "scheme",
        "topk_sum",
        "us",
        "eager_us",
        "torch_us",
        "speedup_vs_torch",
        "tflops",
        "weight_GBps",
        "frac_copy_bw",
        "frac_mm",
        "frac_roofline",
    ]
    print_table("fused_moe", [r for r in rows if "us" in r], cols)
    print(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
