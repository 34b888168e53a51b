"""The fused-MoE tuner's candidate lists: w4a8 tries every block config but TMA ones (which packed int4
weights cannot use) with both int4 unpacks, side by side; the other schemes never carry the w4a8-only
key; fp8 prefill tries gate_up tiles that quantise their output and never RESCALE; every candidate
passes the launcher's config check."""

from __future__ import annotations

import pytest

from benchmarks import bench_fused_moe
from ep_runtime.kernels import fused_moe as fm


@pytest.mark.parametrize("rows", [4, 40, 300, 2000])
def test_w4a8_candidates_pair_both_unpacks(rows):
    plain = bench_fused_moe._block_candidates(rows, "w4a8")
    paired = bench_fused_moe.candidates(rows, "w4a8")
    assert [bm for bm, _, _ in paired] == [bm for bm, _, _ in plain]
    for (_, gu, dn), (_, gu0, dn0) in zip(paired, plain, strict=True):
        for got, base in ((gu, gu0), (dn, dn0)):
            base = [c for c in base if not c.get("TMA")]
            assert got[0::2] == base
            assert got[1::2] == [dict(c, INT4_MAGIC=1) for c in base]


@pytest.mark.parametrize("scheme", ["bf16", "fp8_block"])
@pytest.mark.parametrize("rows", [4, 40, 300, 2000])
def test_other_schemes_do_not_get_the_int4_key(scheme, rows):
    sets = bench_fused_moe.candidates(rows, scheme)
    if scheme == "bf16":
        assert sets == bench_fused_moe._block_candidates(rows, scheme)
        assert all("SCALE_PRELOAD" not in c for _, gu, dn in sets for c in (*gu, *dn))
    assert all("INT4_MAGIC" not in c for _, gu, dn in sets for c in (*gu, *dn))


@pytest.mark.parametrize("rows", [4, 40, 300, 2000])
def test_fp8_candidates_pair_scale_preload(rows):
    """fp8_block: tiles of one block scale's width (no merged gate|up) with and without
    SCALE_PRELOAD, side by side (a deadline cuts neither); at prefill not the gate_up tiles whose
    compile spills with it; the plain tile stays first (the H100 winners lead the lists)."""
    plain = bench_fused_moe._block_candidates(rows, "fp8_block")
    paired = bench_fused_moe.candidates(rows, "fp8_block")
    for (bm, gu, dn), (_, gu0, dn0) in zip(paired, plain, strict=True):
        for got, base, gate_up in ((gu, gu0, True), (dn, dn0, False)):
            assert [c for c in got if not c.get("SCALE_PRELOAD")] == base
            pre = [c for c in got if c.get("SCALE_PRELOAD")]
            assert all(c["BLOCK_N"] <= 128 and not c.get("MERGE_GU") for c in pre)
            if not gate_up or rows <= 12:
                assert pre
            for c in pre:
                assert got[got.index(c) - 1] == {k: v for k, v in c.items() if k != "SCALE_PRELOAD"}
                if gate_up and rows > 12:
                    assert c["num_warps"] == 8 and bm * c["BLOCK_N"] <= 8192, c


@pytest.mark.parametrize("scheme", ["bf16", "fp8_block", "w4a8"])
@pytest.mark.parametrize("rows", [4, 40, 300, 2000])
def test_every_candidate_passes_the_config_check(scheme, rows):
    for bm, gu, dn in bench_fused_moe.candidates(rows, scheme):
        for g in gu:
            fm._check_config(dict(BLOCK_M=bm, gate_up=g, down=dn[0]), scheme)
        for d in dn:
            fm._check_config(dict(BLOCK_M=bm, gate_up=gu[0], down=d), scheme)


def test_fp8_prefill_tries_quantising_gate_up_tiles_and_never_rescale():
    """fp8 prefill: gate_up tiles of whole 128-groups (their epilogue quantises, `quant_act`) at both
    BLOCK_M, first in the list (the H100 winners); RESCALE (less accurate on Hopper) never."""
    for rows in (300, 2000):
        for _, gu, dn in bench_fused_moe.candidates(rows, "fp8_block"):
            assert fm.quant_act("fp8_block", gu[0]) and gu[0].get("TMA")
            assert not any(c.get("RESCALE") for c in gu + dn)


@pytest.mark.parametrize(
    "T, D, block_n, band",
    [
        (8192, 2048, 256, 2),  # Qwen3: 67 MB of fp32 accumulator; bands of 512 columns = 16.8 MB
        (8192, 7168, 128, 4),
        (2048, 7168, 256, 8),  # 58.7 MB: bands of 2048 columns
        (100000, 7168, 256, 1),  # a band is never narrower than one N-block
    ],
)
def test_banded_down_candidates_keep_a_band_near_16_mb(T, D, block_n, band):
    base = [dict(BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)]
    (got,) = bench_fused_moe.banded(base, T, D)
    assert got == dict(base[0], N_BAND=band)
    if band > 1:
        assert T * band * block_n * 4 <= bench_fused_moe.BAND_BYTES < T * (band + 1) * block_n * 4


@pytest.mark.parametrize("T, D", [(512, 7168), (2048, 2048), (4096, 2048)])
def test_no_bands_where_the_accumulator_fits(T, D):
    """At most 32 MB of accumulator (the L2 holds 50 MB): the plain order, no banded candidates."""
    assert T * D * 4 <= 2 * bench_fused_moe.BAND_BYTES
    assert bench_fused_moe.banded([dict(BLOCK_N=256)], T, D) == []


@pytest.mark.parametrize("scheme", ["bf16", "fp8_block", "w4a8"])
@pytest.mark.parametrize("T", [1, 40, 300, 8192])
def test_heuristic_configs_pass_the_config_check(scheme, T):
    fm._check_config(fm.heuristic_config(T, 8, 16, scheme), scheme)
