"""Masked grouped GEMM / low-latency expert MLP vs the HBM roofline and a torch per-expert loop.

    python benchmarks/bench_masked_gemm.py [--tune] [--quick] [--out-dir DIR]

Shapes per rank: DeepSeek-V3 (L 32, D 7168, I 2048), Qwen3-30B-A3B (L 16, D 2048, I 768), Mixtral
(L 2, D 4096, I 14336); capacity M = C*R = 1024 rows per expert; decode sizes of n valid rows per
expert. Roofline: bytes of the expert weights (and scales) touched plus the valid activation rows
read and written, over the device-to-device copy bandwidth measured in the same run. Baseline: a
torch loop of bf16 `torch.mm` per expert over the valid rows (counts known on the host). A second
table shows that time follows the valid rows, not the capacity M. With `--tune` a small sweep of
block configs per kernel kind runs at a decode shape and the winners are written to
`kernels/configs/masked_grouped_gemm.json` for this device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    bench_us,
    graph_us,
    measure_copy_bandwidth,
    print_table,
    write_results,
)
from ep_runtime.kernels import masked_grouped_gemm as mg  # noqa: E402
from ep_runtime.kernels import tables  # noqa: E402
from ep_runtime.kernels.quant import per_token_group_quant_fp8, quantize_fp8_block, quantize_w4a8  # noqa: E402

MODELS = [("DeepSeek-V3", 32, 7168, 2048), ("Qwen3-30B-A3B", 16, 2048, 768), ("Mixtral-8x7B", 2, 4096, 14336)]
CAPACITY = 1024
ROWS = [1, 8, 32, 128]
SCALING_M = (256, 1024, 4096)
SCALING_ROWS = (0, 8, 64, 256)
# fp8_block: fp8 x as DeepEP's FP8 dispatch delivers it; fp8_block_bf16x: bf16 x behind a BF16
# dispatch, quantised per token group (valid rows) before the same GEMMs (the fp8_block kinds: it
# has no KINDS entry of its own, so `tune` skips it)
SCHEMES = ["bf16", "bf16_fp8x", "fp8_block", "fp8_block_bf16x", "w4a8"]

# (scheme, gated) -> kernel kind used by masked_moe (see masked_grouped_gemm._kind)
KINDS = {
    ("bf16", True): mg._kind(mg.A_BF16, mg.B_BF16, True),
    ("bf16", False): mg._kind(mg.A_BF16, mg.B_BF16, False),
    ("bf16_fp8x", True): mg._kind(mg.A_FP8G_DEQ, mg.B_BF16, True),
    ("fp8_block", True): mg._kind(mg.A_FP8G, mg.B_FP8_BLOCK, True),
    ("fp8_block", False): mg._kind(mg.A_FP8G, mg.B_FP8_BLOCK, False),
    ("w4a8", True): mg._kind(mg.A_FP16_QT, mg.B_INT4, True),
    ("w4a8", False): mg._kind(mg.A_FP16_QT, mg.B_INT4, False),
}


def make_weights(L: int, D: int, I: int, scheme: str, dev) -> dict:  # noqa: E741
    w13 = (torch.randn(L, 2 * I, D, device=dev) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(L, D, I, device=dev) * 0.02).to(torch.bfloat16)
    if scheme in ("bf16", "bf16_fp8x"):
        return dict(w13=w13, w2=w2, scheme="bf16")
    if scheme.startswith("fp8_block"):
        q13, s13 = quantize_fp8_block(w13)
        q2, s2 = quantize_fp8_block(w2)
        return dict(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2, scheme="fp8_block")
    p13, s13 = quantize_w4a8(w13)
    p2, s2 = quantize_w4a8(w2)
    return dict(w13=p13, w2=p2, w13_scale=s13, w2_scale=s2, scheme="w4a8")


def weight_bytes(w: dict) -> int:
    return sum(t.numel() * t.element_size() for k, t in w.items() if k != "scheme")


def make_input(L: int, M: int, D: int, scheme: str, dev):
    x = torch.randn(L, M, D, device=dev).to(torch.bfloat16)
    if scheme in ("bf16_fp8x", "fp8_block"):
        return per_token_group_quant_fp8(x, 128, column_major_scales=True)
    return x, None


def run_moe(x, x_scale, counts, w: dict, configs=(None, None)):
    kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}
    return mg.masked_moe(x, counts, w["w13"], w["w2"], x_scale=x_scale, configs=configs, **kw)


def torch_loop(x_bf16, n: int, w13, w2, I: int):  # noqa: E741
    outs = []
    for e in range(x_bf16.shape[0]):  # per-expert host loop: the baseline, not a hot path
        gu = torch.mm(x_bf16[e, :n], w13[e].t())
        outs.append(torch.mm(torch.nn.functional.silu(gu[:, :I]) * gu[:, I:], w2[e].t()))
    return outs


SMALL_MAX_ROWS = (16, 32)
"""The SMALL tile's `MAX_ROWS` choices the tuner tries: experts with at most that many valid rows run
it (32: the rows per expert of a DeepSeek-V3 decode step at EP8, 128 tokens per rank)."""


# The w4a8 kernel's tiles (`masked_grouped_gemm._masked_w4a8_kernel`): BLOCK_M token rows by BLOCK_N
# weight rows (64 per warpgroup's wgmma), 4 or 8 warps
W4A8_MAIN = [
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3),  # 65-128 rows: one unpack
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4),
]
W4A8_SMALL = [
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=6),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, GRID_M=1),
]


def _mlp(n1: int, n2: int, warps: int, stages: int, per_sm: int = 2) -> dict:
    """A one-launch MLP config: 16-row tiles for experts of at most 16 rows, 64-row tiles above."""
    return dict(BLOCK_M=16, BLOCK_M_BIG=64, BLOCK_N1=n1, BLOCK_N2=n2, num_warps=warps, num_stages=stages,
                PROGRAMS_PER_SM=per_sm)  # fmt: skip


MLP_CANDIDATES = {
    "bf16": [_mlp(32, 64, 4, 4), _mlp(64, 64, 4, 4), _mlp(64, 128, 8, 3), _mlp(32, 64, 4, 4, per_sm=4)],
    # gate_up columns are one 128-group (the intermediate is requantised per group), or, with H_BF16,
    # narrow tiles of a bf16 intermediate that the down GEMM quantises per group as it loads it
    "fp8_block": [
        _mlp(128, 128, 8, 3),
        dict(_mlp(32, 64, 4, 4), H_BF16=True),
        dict(_mlp(64, 128, 4, 4), H_BF16=True),
    ],
}
"""Configs of the one-launch expert MLP (`masked_grouped_gemm._masked_mlp_kernel`) the tuner tries
as the gated kind's `MLP` entry."""


def tune(dev, best: dict, small_rows=(1, 8, 32), main_rows=(64, 128), schemes=SCHEMES, models=None) -> None:
    """Sweep configs per kernel kind at the DeepSeek-V3 and Qwen3 decode shapes (score: the sum
    over shapes and row counts of time / best time), timed as CUDA-graph replays; fills `best`
    {kind: config}. With `models` (entries of MODELS), one model at a time instead, and `best`
    gets that model's shape entries {kind@NxK: config} (`masked_grouped_gemm._shape_key`), which
    its launches take before the kind's general entry. Two tiles per kind, as the launcher runs them
    (`masked_grouped_gemm._row_regimes`): the main tile, picked over `main_rows` valid rows per
    expert (a tile picked at one row count alone made the other slower), then the whole entry over
    `small_rows`: the main tile alone, or with a `SMALL` tile for experts with at most MAX_ROWS
    rows (each small candidate with each of SMALL_MAX_ROWS), so an entry gets a SMALL tile only
    where one beats the main tile there."""
    base = [
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    ]
    # (64, 64) with 8 warps: the gated w4a8 tile that does not spill (sm_90 compile)
    main = (
        base
        + [dict(c, GRID_M=1) for c in base]
        + [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3)]
    )
    # BLOCK_M < 64: Triton uses mma.sync (operands from registers) instead of wgmma, so an in-register
    # int4 unpack needs no shared-memory round trip, and a decode-sized block wastes less of the tile
    small = [
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
        dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
    ]
    if models is not None:  # one shape at a time: finer tiles and explicit K splits for few, short GEMMs
        small += [
            dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=2, num_stages=4),
            dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, SPLIT_K=2),
            dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, SPLIT_K=2),
        ]
    groups = [MODELS[:2]] if models is None else [[m] for m in models]
    rows_all = tuple(sorted(set(small_rows) | set(main_rows)))  # the decode and the main row counts
    for group in groups:
        for scheme in schemes:
            for stage, gated in ((0, True), (1, False)):
                kind = KINDS.get((scheme, gated))
                if kind is None:
                    continue
                other = KINDS.get((scheme, not gated))
                if models is not None:  # shape entries: (N, K) of gate_up = (I, D), of down = (D, I)
                    _, _, D, I = group[0]  # noqa: E741
                    kind = mg._shape_key(kind, *((I, D) if gated else (D, I)))
                    other = other and mg._shape_key(other, *((D, I) if gated else (I, D)))
                if kind in best:
                    continue
                main_cands, small_cands = (W4A8_MAIN, W4A8_SMALL) if scheme == "w4a8" else (main, small)
                other_cfg = best.get(other) if other else None
                if other_cfg is not None and "MLP" in other_cfg:
                    # a gate_up entry with the one-launch MLP would run the whole MLP and ignore the
                    # down candidates: time them behind the two-launch gate_up
                    other_cfg = {k: v for k, v in other_cfg.items() if k != "MLP"}
                main_cfg = _select(dev, kind, scheme, stage, main_cands, main_rows, other_cfg, group)
                if main_cfg is None:
                    continue
                entries = [main_cfg] + [
                    dict(main_cfg, SMALL=dict(c, MAX_ROWS=rows))
                    for c in small_cands
                    for rows in SMALL_MAX_ROWS
                ]
                best[kind] = (
                    _select(dev, kind, scheme, stage, entries, small_rows, other_cfg, group) or main_cfg
                )
                flag = {"w4a8": "FOLD_SCALE", "fp8_block": "SCALE_PRELOAD"}.get(scheme)
                if flag is not None:
                    # the same entry with the flag on in both tiles, scored over every row count: w4a8's
                    # group scales folded into the fp16 weights (`masked_grouped_gemm.W4A8_FOLD_NOTE`),
                    # fp8_block's scales loaded before the K loop (`fused_moe.PRELOAD_NOTE`)
                    entries = [best[kind], _with_flag(best[kind], flag)]
                    best[kind] = (
                        _select(dev, kind, scheme, stage, entries, rows_all, other_cfg, group) or best[kind]
                    )
                if gated and scheme in MLP_CANDIDATES:
                    # the one-launch MLP replaces both GEMMs at every row count: scored against the
                    # entry just picked over the decode and the main row counts together
                    entries = [best[kind]] + [dict(best[kind], MLP=m) for m in MLP_CANDIDATES[scheme]]
                    best[kind] = (
                        _select(dev, kind, scheme, stage, entries, rows_all, None, group) or best[kind]
                    )


def _with_flag(cfg: dict, flag: str) -> dict:
    """A table entry with `flag` on in its main tile and in its SMALL tile, if any."""
    out = dict(cfg, **{flag: True})
    if "SMALL" in out:
        out["SMALL"] = dict(out["SMALL"], **{flag: True})
    return out


def _select(dev, kind, scheme, stage, cands, rows_list, other_cfg, models):
    """The candidate with the lowest summed time / best time over `models` and the row counts
    `rows_list`, or None."""
    scores: dict[int, float] = {}
    seen: dict[int, int] = {}
    shapes_done = 0
    for _, L, D, I in models:  # noqa: E741
        w = make_weights(L, D, I, scheme, dev)
        x, xs = make_input(L, CAPACITY, D, scheme, dev)
        for num_rows in rows_list:
            counts = torch.full((L,), num_rows, dtype=torch.int32, device=dev)
            times = {}
            for ci, c in enumerate(cands):
                cfgs = [None, None]
                cfgs[stage] = c
                cfgs[1 - stage] = other_cfg
                fn = lambda cfgs=cfgs, counts=counts, x=x, xs=xs, w=w: run_moe(x, xs, counts, w, tuple(cfgs))  # noqa: E731
                try:  # CUDA-graph replays: eager times of decode shapes are mostly the host's launch cost
                    t = graph_us(fn, replays=2, warmup=3, rep=15)
                except Exception as exc:  # a config that fails to compile is skipped
                    print(f"skip {kind} {c}: {type(exc).__name__}: {exc}"[:200])
                    continue
                times[ci] = t
                print(f"tune {kind} D={D} rows={num_rows} {c}: {t:.1f} us")
            if times:
                shapes_done += 1
                t_min = min(times.values())
                for ci, t in times.items():
                    scores[ci] = scores.get(ci, 0.0) + t / t_min
                    seen[ci] = seen.get(ci, 0) + 1
        del w, x, xs
        torch.cuda.empty_cache()
    complete = {ci: sc for ci, sc in scores.items() if seen[ci] == shapes_done}
    return cands[min(complete, key=complete.get)] if complete else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--quick", action="store_true", help="DeepSeek-V3 only, fewer row counts")
    ap.add_argument(
        "--schemes",
        default=",".join(SCHEMES),
        help=f"comma-separated subset of {SCHEMES} to tune and measure (tuned kinds are merged into "
        "the device's table; the others keep their entries)",
    )
    ap.add_argument(
        "--shape-models",
        default=None,
        help="with --tune: tune these models' GEMM shapes one model at a time (comma-separated, from "
        f"{[m[0] for m in MODELS]}) and write shape entries (kind@NxK) instead of the general kinds",
    )
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    shape_models = None
    if args.shape_models:
        by_name = {m[0]: m for m in MODELS}
        unknown = [n for n in args.shape_models.split(",") if n not in by_name]
        if unknown:
            sys.exit(f"--shape-models: unknown {unknown}; allowed: {list(by_name)}")
        shape_models = [by_name[n] for n in args.shape_models.split(",")]
    schemes = [s for s in args.schemes.split(",") if s]
    bad = [s for s in schemes if s not in SCHEMES]
    if bad:
        sys.exit(f"--schemes: unknown {bad}; allowed: {SCHEMES}")
    if not torch.cuda.is_available():
        sys.exit("bench_masked_gemm needs a CUDA GPU")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    bw = measure_copy_bandwidth()
    print(f"{name}: copy bandwidth {bw / 1e12:.2f} TB/s")

    tuned = None
    if args.tune:
        tuned = {}
        try:
            tune(dev, tuned, schemes=schemes, models=shape_models)
        except KeyboardInterrupt:
            print("tuning interrupted: keeping the kinds tuned so far")
        if tuned:
            path = mg.CONFIG_PATH
            doc = json.loads(path.read_text()) if path.exists() else {}
            doc.setdefault(
                "doc",
                "masked_grouped_gemm block configs: devices -> kernel kind (a<mode>-b<mode>-gated|plain), "
                "or kind@NxK for one GEMM shape",
            )
            doc.setdefault("devices", {}).setdefault(name, {}).update(tuned)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1) + "\n")
            mg.load_table.cache_clear()
            tables.for_device.cache_clear()  # the launchers' per-device lookup: rows below use the new table
            print(f"wrote {path}")

    models = MODELS[:1] if args.quick else MODELS
    rows_list = [1, 8, 128] if args.quick else ROWS
    rows: list[dict] = []
    scaling: list[dict] = []
    try:
        for model, L, D, I in models:  # noqa: E741
            for scheme in schemes:
                try:
                    _bench_scheme(rows, model, L, D, I, scheme, rows_list, bw, dev)
                except Exception as exc:  # record and go on
                    print(f"{model} {scheme}: FAILED {type(exc).__name__}: {exc}"[:300])
                    rows.append(dict(model=model, scheme=scheme, error=f"{type(exc).__name__}: {exc}"[:300]))
                torch.cuda.empty_cache()
        # time follows the valid rows, not the capacity M
        model, L, D, I = MODELS[1]  # noqa: E741
        w = make_weights(L, D, I, "bf16", dev)
        for M in SCALING_M:
            x, _ = make_input(L, M, D, "bf16", dev)
            for n in SCALING_ROWS:
                counts = torch.full((L,), n, dtype=torch.int32, device=dev)
                t = bench_us(lambda counts=counts, x=x: run_moe(x, None, counts, w))
                scaling.append(dict(model=model, M=M, rows_per_expert=n, us=t))
            del x
    except KeyboardInterrupt:
        print("interrupted: writing what was measured")
    cols = ["model", "scheme", "rows_per_expert", "us", "eager_us", "roofline_us", "frac_hbm", "weight_GBps"]
    cols += ["torch_loop_us", "speedup_vs_loop"]
    ok = [r for r in rows if "error" not in r]
    print_table(f"masked expert MLP on {name} (copy bw {bw / 1e12:.2f} TB/s, M={CAPACITY})", ok, cols)
    print_table("masked MLP time vs capacity M and valid rows (bf16)", scaling)
    write_results(
        "masked_gemm",
        {
            "copy_bandwidth_Bps": bw,
            "capacity": CAPACITY,
            "timing": "us: CUDA-graph replay (4 calls per graph) median; eager_us and the torch loop: eager "
            "do_bench medians; scaling: eager",
            "rows": rows,
            "scaling": scaling,
            "tuned": tuned,
        },
        Path(args.out_dir) if args.out_dir else None,
    )


def _bench_scheme(rows, model, L, D, I, scheme, rows_list, bw, dev) -> None:  # noqa: E741
    w = make_weights(L, D, I, scheme, dev)
    wb = weight_bytes(w)
    x, xs = make_input(L, CAPACITY, D, scheme, dev)
    for n in rows_list:
        counts = torch.full((L,), n, dtype=torch.int32, device=dev)
        # the kernels' own time: CUDA-graph replay, as the low-latency decode step runs them (the
        # eager time of a small shape is the host's launch cost, kept as eager_us)
        t = graph_us(lambda counts=counts: run_moe(x, xs, counts, w), replays=4, tries=2)
        t_eager = bench_us(lambda counts=counts: run_moe(x, xs, counts, w))
        act_bytes = L * n * D * (x.element_size() + 2)
        roof = (wb + act_bytes) / bw * 1e6
        row = dict(model=model, scheme=scheme, L=L, D=D, I=I, rows_per_expert=n, us=t, eager_us=t_eager,
                   roofline_us=roof)  # fmt: skip
        row["frac_hbm"] = roof / t
        row["weight_GBps"] = wb / (t * 1e-6) / 1e9
        if scheme == "bf16":
            row["torch_loop_us"] = bench_us(
                lambda n=n: torch_loop(x, n, w["w13"], w["w2"], I), warmup=3, rep=20
            )
            row["speedup_vs_loop"] = row["torch_loop_us"] / t_eager  # both eager
        rows.append(row)
        print(row)


if __name__ == "__main__":
    main()
