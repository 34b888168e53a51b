"""fused_moe and moe_align_block_size on CUDA at real shapes, against float64 torch references.

Tolerances as in tests/kernels/test_fused_moe.py: bf16 1e-2, fp8_block and w4a8 3e-2 (normwise).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import capture_graph
from ep_runtime.kernels import fused_moe as fm
from ep_runtime.kernels.quant import per_token_group_quant_fp8
from tests.kernels.test_fused_moe import (
    TOL,
    _gate_up,
    _rescaled,
    make_weights,
    random_routing,
    ref_moe,
    rel_err,
)
from tests.kernels.test_moe_align import check_align

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _case(T, K, L, D, inter, scheme, fused=None, skip_frac=0.1, config=None, with_err=False):
    w13, s13, w2, s2, w13_f, w2_f = make_weights(L, inter, D, scheme, device=DEV, std=0.02)
    ids, w = random_routing(T, K, L, device=DEV, skip_frac=skip_frac)
    if T > 1:
        ids[T // 2] = -1
    x = torch.randn(T, D, device=DEV).bfloat16()
    out = fm.fused_moe(
        x, w13, w2, ids, w, scheme=scheme, w13_scale=s13, w2_scale=s2, fused_topk_sum=fused, config=config
    )
    ref = ref_moe(x, None, w13_f, w2_f, ids, w, scheme)
    assert out.shape == (T, D) and torch.isfinite(out).all()
    if T:
        err = rel_err(out, ref)
        assert err < TOL[scheme], f"{scheme} T={T} rel err {err}"
    assert (out[(ids < 0).all(1)] == 0).all()
    return (out, rel_err(out, ref)) if with_err else out


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_align_gpu_matches_reference(impl):
    torch.manual_seed(1)
    check_align(torch.randint(-1, 128, (4096, 8), device=DEV), 64, 128, impl=impl)
    check_align(torch.randint(-1, 7, (1, 8), device=DEV), 16, 7, impl=impl)
    check_align(torch.empty(0, 8, dtype=torch.long, device=DEV), 16, 7, impl=impl)
    check_align(torch.full((3000, 1), 5, device=DEV), 128, 8, impl=impl)
    emap = torch.full((256,), -1, dtype=torch.int32, device=DEV)
    emap[32:64] = torch.arange(32, dtype=torch.int32, device=DEV)
    check_align(torch.randint(0, 256, (333, 8), device=DEV), 16, 256, emap, impl=impl)


@pytest.mark.parametrize("scheme", ["bf16", "fp8_block", "w4a8"])
@pytest.mark.parametrize("fused", [True, False])
def test_dsv3_like(scheme, fused):
    torch.manual_seed(2)
    _case(T=256, K=8, L=16, D=7168, inter=2048, scheme=scheme, fused=fused)


@pytest.mark.parametrize("T", [8, 2048])
def test_w4a8_unpacks_agree(T):
    """Compiled, both int4 -> e4m3 unpacks (`INT4_MAGIC` 0/1) give the same bits unfused under the
    same block config, and each matches the reference."""
    cfg = fm.heuristic_config(T, 8, 16, "w4a8")
    magic = {k: (dict(v, INT4_MAGIC=1) if isinstance(v, dict) else v) for k, v in cfg.items()}
    outs = []
    for c in (cfg, magic):
        torch.manual_seed(5)
        outs.append(_case(T=T, K=8, L=16, D=7168, inter=2048, scheme="w4a8", fused=False, config=c))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("T", [0, 1, 4, 96])
def test_qwen_decode_and_small(T):
    torch.manual_seed(3)
    _case(T=T, K=8, L=128, D=2048, inter=768, scheme="bf16")


@pytest.mark.parametrize("scheme", ["bf16", "fp8_block", "w4a8"])
@pytest.mark.parametrize("shape, K, fused", [((32, 7168, 2048), 8, None), ((8, 4096, 1792), 2, None),
                                             ((128, 2048, 768), 8, False)])  # fmt: skip
@pytest.mark.parametrize("split", [2, 4, 7])
def test_split_k_down_decode(scheme, shape, K, fused, split):
    """Compiled split-K down GEMM at decode sizes (fused and unfused top-k sums, narrow gate_up
    tiles): matches the reference, and the one-split result up to fp32 summation order."""
    L, D, inter = shape
    one = dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    cfg = dict(BLOCK_M=16, gate_up=dict(one, BLOCK_N=16), down=dict(one, SPLIT_K=split))
    outs = []
    for c in (cfg, dict(cfg, down=one)):
        torch.manual_seed(6)
        outs.append(_case(T=3, K=K, L=L, D=D, inter=inter, scheme=scheme, fused=fused, config=c).float())
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2 * outs[1].abs().max().item())


def test_bf16_odd_sizes():
    torch.manual_seed(4)
    _case(T=33, K=3, L=5, D=1000, inter=300, scheme="bf16")
    _case(T=700, K=2, L=6, D=520, inter=200, scheme="bf16")


_SPLIT_DECODE = dict(
    BLOCK_M=16,
    gate_up=dict(BLOCK_N=16, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
    down=dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4, SPLIT_K=4),
)


@pytest.mark.parametrize("config, K", [(None, 8), (_SPLIT_DECODE, 8), (_SPLIT_DECODE, 2)])
def test_cuda_graph_capture_no_host_sync(config, K):
    torch.manual_seed(5)
    L, D, inter, T = 8, 1024, 512, 64
    w13, _, w2, _, _, _ = make_weights(L, inter, D, "bf16", device=DEV, std=0.02)
    ids, w = random_routing(T, K, L, device=DEV, skip_frac=0.1)
    x = torch.randn(T, D, device=DEV).bfloat16()
    fn = lambda: fm.fused_moe(x, w13, w2, ids, w, config=config)  # noqa: E731
    eager = fn()
    g, out = capture_graph(fn)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), eager.float(), rtol=2e-2, atol=1e-3)


def _prefill_cfg(scheme, block_m, gu_n, dn_n, warps, stages, merge, tma=False):
    bk = 64 if scheme == "bf16" else 128
    gu = dict(BLOCK_N=gu_n, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages, MERGE_GU=merge)
    dn = dict(BLOCK_N=dn_n, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    if tma:
        gu["TMA"] = dn["TMA"] = True
    return dict(BLOCK_M=block_m, gate_up=gu, down=dn)


@pytest.mark.parametrize(
    "scheme, cfg",
    [
        ("bf16", _prefill_cfg("bf16", 128, 128, 256, 8, 3, True)),
        ("bf16", _prefill_cfg("bf16", 64, 128, 128, 4, 4, True)),
        ("fp8_block", _prefill_cfg("fp8_block", 128, 64, 128, 8, 3, True)),
        ("fp8_block", _prefill_cfg("fp8_block", 64, 128, 128, 8, 3, True)),
        ("w4a8", _prefill_cfg("w4a8", 128, 64, 128, 8, 3, True)),
        ("bf16", _prefill_cfg("bf16", 128, 128, 256, 8, 3, False, tma=True)),
        ("bf16", _prefill_cfg("bf16", 64, 128, 256, 8, 4, False, tma=True)),
        ("fp8_block", _prefill_cfg("fp8_block", 64, 64, 128, 4, 4, False, tma=True)),
        ("fp8_block", _prefill_cfg("fp8_block", 128, 64, 128, 8, 4, False, tma=True)),
    ],
)
def test_prefill_tiles_merged_gate_up(scheme, cfg):
    """Prefill-size tiles with the merged gate|up weight tile, or TMA tiles (the tuned table may pick
    either)."""
    torch.manual_seed(6)
    _case(T=1024, K=8, L=16, D=7168, inter=2048, scheme=scheme, fused=True, config=cfg)


@pytest.mark.parametrize(
    "scheme, cfg",
    [
        ("fp8_block", _prefill_cfg("fp8_block", 64, 128, 256, 4, 3, True)),
        ("fp8_block", _prefill_cfg("fp8_block", 128, 128, 256, 8, 3, True)),
        ("fp8_block", _prefill_cfg("fp8_block", 128, 128, 256, 8, 3, False, tma=True)),
        ("w4a8", _prefill_cfg("w4a8", 64, 128, 256, 4, 3, True)),
    ],
    ids=["fp8-64-merged", "fp8-128-merged", "fp8-128-tma", "w4a8-64-merged"],
)
def test_prefill_rescaled_accumulator_wide_tiles(scheme, cfg):
    """RESCALE's wide tiles (opt-in) compiled: within the reference tolerance. They are less accurate
    than the scaled-product path on Hopper (the fp8 tensor cores accumulate across K blocks with
    limited precision); the errors print for the record (`-s`)."""
    torch.manual_seed(7)
    _, err_rescale = _case(T=1024, K=8, L=16, D=7168, inter=2048, scheme=scheme, fused=True,
                           config=_rescaled(cfg), with_err=True)  # fmt: skip
    torch.manual_seed(7)
    _, err_plain = _case(T=1024, K=8, L=16, D=7168, inter=2048, scheme=scheme, fused=True,
                         config=_prefill_cfg(scheme, 64, 64, 128, 4, 4, True), with_err=True)  # fmt: skip
    print(f"{scheme} RESCALE rel err {err_rescale:.4f}, scaled-product path {err_plain:.4f}")


@pytest.mark.parametrize("scheme", ["bf16", "fp8_block"])
@pytest.mark.parametrize(
    "shape", [(32, 7168, 2048, 8), (8, 4096, 14336, 2), (128, 2048, 768, 8)], ids=["dsv3", "mixtral", "qwen3"]
)
@pytest.mark.parametrize("T", [1, 5, 32])
def test_masked_decode_path_gpu(rng_seed, scheme, shape, T):
    """Decode through the masked layout (scatter, masked expert MLP with the device's table, combine)
    against the reference, -1 slots and a dead row included; then replayed from a CUDA graph with new
    routing written into the captured buffers. One weight set per case (the float32 reference copies
    of DeepSeek-V3's experts are large: 128 of them ran an H100 out of memory)."""
    L, D, inter, K = shape
    w13, s13, w2, s2, w13_f, w2_f = make_weights(L, inter, D, scheme, device=DEV, std=0.02)
    ids, w = random_routing(T, K, L, device=DEV, skip_frac=0.1)
    if T > 1:
        ids[T // 2] = -1
    x = torch.randn(T, D, device=DEV).bfloat16()

    def call():
        return fm.fused_moe(
            x, w13, w2, ids, w, scheme=scheme, w13_scale=s13, w2_scale=s2, config={"MASKED": True}
        )

    out = call()
    assert out.shape == (T, D) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref_moe(x, None, w13_f, w2_f, ids, w, scheme)) < TOL[scheme]
    assert (out[(ids < 0).all(1)] == 0).all()
    graph, out = capture_graph(call)
    for _ in range(2):
        new_ids, new_w = random_routing(T, K, L, device=DEV, skip_frac=0.1)
        ids.copy_(new_ids)
        w.copy_(new_w)
        x.copy_(torch.randn(T, D, device=DEV).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref_moe(x, None, w13_f, w2_f, ids, w, scheme)) < TOL[scheme]


@pytest.mark.parametrize("scheme", ["fp8_block", "w4a8"])
@pytest.mark.parametrize("block_n, merge", [(128, True), (256, False)])
def test_gate_up_quantised_output_bits(scheme, block_n, merge):
    """Compiled, the gate_up epilogue's e4m3 output and group scales (QUANT_OUT) equal the bf16
    epilogue followed by `per_token_group_quant_fp8`, bit for bit, at DeepSeek-V3 sizes."""
    torch.manual_seed(8)
    L, D, inter, T, K = 16, 7168, 2048, 512, 8
    w13, s13, _, _, _, _ = make_weights(L, inter, D, scheme, device=DEV, std=0.02)
    ids, _ = random_routing(T, K, L, device=DEV)
    xq, xs = per_token_group_quant_fp8(torch.randn(T, D, device=DEV).bfloat16())
    gu = dict(
        BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3, MERGE_GU=merge, RESCALE=True
    )
    cfg = dict(BLOCK_M=64, gate_up=gu)
    align = fm.moe_align_block_size(ids, 64, L)
    rows = align[0].shape[0]
    act_bf16 = torch.empty((rows, inter), dtype=torch.bfloat16, device=DEV)
    _gate_up(
        xq, xs, w13, s13, align, scheme, dict(cfg, gate_up=dict(gu, BLOCK_N=64)), act_bf16, None, T, K, inter
    )
    act, act_s = fm.gate_up_output(rows, inter, scheme, gu, DEV)
    _gate_up(xq, xs, w13, s13, align, scheme, cfg, act, act_s, T, K, inter)
    pos = align[0].long() < T * K
    want_q, want_s = per_token_group_quant_fp8(act_bf16[pos])
    assert torch.equal(act[pos].view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(act_s[pos], want_s)
