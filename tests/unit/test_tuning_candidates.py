"""The fused-MoE tuner's candidate lists: w4a8 tries every block config with both int4 unpacks,
side by side; the other schemes never carry the w4a8-only key."""

from __future__ import annotations

import pytest

from benchmarks import bench_fused_moe


@pytest.mark.parametrize("rows", [4, 40, 300, 2000])
def test_w4a8_candidates_pair_both_unpacks(rows):
    plain = bench_fused_moe._block_candidates(rows, "w4a8")
    paired = bench_fused_moe.candidates(rows, "w4a8")
    assert [bm for bm, _, _ in paired] == [bm for bm, _, _ in plain]
    for (_, gu, dn), (_, gu0, dn0) in zip(paired, plain, strict=True):
        for got, base in ((gu, gu0), (dn, dn0)):
            assert got[0::2] == base
            assert got[1::2] == [dict(c, INT4_MAGIC=1) for c in base]


@pytest.mark.parametrize("scheme", ["bf16", "fp8_block"])
@pytest.mark.parametrize("rows", [4, 40, 300, 2000])
def test_other_schemes_do_not_get_the_int4_key(scheme, rows):
    sets = bench_fused_moe.candidates(rows, scheme)
    assert sets == bench_fused_moe._block_candidates(rows, scheme)
    assert all("INT4_MAGIC" not in c for _, gu, dn in sets for c in (*gu, *dn))
