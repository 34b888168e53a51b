"""The Triton kernels compile for Hopper (sm_90) on this CPU-only machine: Triton's front end, its
NVIDIA passes and the bundled `ptxas` run without a GPU (tests/kernels/sm90_compile.py, in its own
process without the interpreter). This catches what the interpreter cannot (types only the
compiler checks, register and shared-memory limits) and checks the code's shape: the fused w4a8
path uses the fp8 tensor cores (`wgmma ... e4m3`) and its bit-built int4 unpack (`INT4_MAGIC`) drops
the integer-to-float conversions (`I2F`); the masked w4a8 kernel feeds the unpacked weights to
wgmma from registers; bf16 prefill uses the bf16 tensor cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.sm90_compile"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = {name: r["error"] for name, r in out.items() if "error" in r}
    assert not errors, errors
    return out


def _uses(result: dict, pattern: str) -> bool:
    return any(pattern in m for m in result["mma"])


@pytest.mark.parametrize("kernel", ["fused-w4a8-gate_up", "fused-w4a8-down"])
def test_w4a8_uses_fp8_tensor_cores_and_magic_drops_the_conversions(compiled, kernel):
    plain, magic = compiled[f"{kernel}-magic0"], compiled[f"{kernel}-magic1"]
    for r in (plain, magic):
        assert _uses(r, "wgmma.mma_async") and _uses(r, "e4m3.e4m3"), r["mma"]
    i2f_plain, i2f_magic = plain["ops"].get("I2F", 0), magic["ops"].get("I2F", 0)
    # The unpack's conversions go (a few may remain for index arithmetic outside the K loop).
    assert i2f_plain >= 64 and i2f_magic <= i2f_plain // 8, (i2f_plain, i2f_magic)
    assert sum(magic["ops"].values()) < sum(plain["ops"].values())


W4A8_MASKED = [
    f"masked-w4a8-{g}-{tile}" for g in ("gated", "plain") for tile in ("BM16-BN64-w4", "BM64-BN128-w8")
]


@pytest.mark.parametrize("kernel", W4A8_MASKED)
def test_masked_w4a8_feeds_unpacked_weights_to_wgmma_from_registers(compiled, kernel):
    """The masked w4a8 kernel's shape: every wgmma takes the unpacked int4 tile as its register
    operand (fp16), the tile's bytes reach the registers as whole 16-byte loads (no sub-word shared
    loads: the K and row orders of `_w4a8_tile` match the fragment), and nothing spills."""
    r = compiled[kernel]
    assert r["mma"] and all("wgmma.mma_async" in m and m.endswith("f16.f16") for m in r["mma"]), r["mma"]
    assert r["wgmma_reg_a"] >= 8, r["wgmma_reg_a"]
    assert r["lds_narrow"] == 0, r["lds_narrow"]
    assert r["ops"].get("STL", 0) == 0 and r["ops"].get("I2F", 0) == 0, r["ops"]


@pytest.mark.parametrize("tile", ["BM16-BN64-w4", "BM64-BN128-w8"])
@pytest.mark.parametrize("gated", ["gated", "plain"])
def test_masked_w4a8_fold_scale_keeps_dots_in_flight(compiled, gated, tile):
    """FOLD_SCALE's point (`masked_grouped_gemm.W4A8_FOLD_NOTE`): with the group scale applied to
    each dot's fp32 result, every wait for the dots drains them all (`wgmma.wait_group 0`); with it
    folded into the weights the K loop waits with groups still in flight. Both keep the register
    operand, 16-byte loads and no spills."""
    plain, fold = compiled[f"masked-w4a8-{gated}-{tile}"], compiled[f"masked-w4a8-{gated}-{tile}-fold"]
    assert plain["wgmma_waits"] and set(plain["wgmma_waits"]) == {0}, plain["wgmma_waits"]
    assert max(fold["wgmma_waits"]) >= 1, fold["wgmma_waits"]
    for r in (plain, fold):
        assert r["wgmma_reg_a"] >= 8 and r["lds_narrow"] == 0, r
        assert r["ops"].get("STL", 0) == 0, r["ops"]


@pytest.mark.parametrize("stage", ["gate_up", "down"])
def test_fp8_scale_preload_leaves_no_load_in_the_k_loop(compiled, stage):
    """`fused_moe.PRELOAD_NOTE`: per-step scale loads are synchronous LDGs in the fp8 decode tile's
    K loop; with PRELOAD the loop has none (its tiles come as asynchronous copies) and nothing
    spills."""
    plain, pre = (
        compiled[f"fused-fp8-decode-{stage}-preload0"],
        compiled[f"fused-fp8-decode-{stage}-preload64"],
    )
    assert plain["mma_loop_ldg"] >= 2, plain["mma_loop_ldg"]
    assert pre["mma_loop_ldg"] == 0, pre["mma_loop_ldg"]
    for r in (plain, pre):
        assert r["mma"] and r["ops"].get("STL", 0) == 0, r["ops"]


@pytest.mark.parametrize("bm", [16, 64])
@pytest.mark.parametrize("gated", ["gated", "plain"])
def test_masked_fp8_scale_preload_leaves_no_load_in_the_k_loop(compiled, gated, bm):
    """The masked fp8_block GEMM likewise (`masked_grouped_gemm._masked_acc`'s PRELOAD), for the
    16-row (mma.sync) and the 64-row (fp8 wgmma: a scale load per row in every K step) tiles."""
    plain = compiled[f"masked-fp8-{gated}-BM{bm}-BN128-preload0"]
    pre = compiled[f"masked-fp8-{gated}-BM{bm}-BN128-preload16"]
    assert plain["mma_loop_ldg"] >= 2 and pre["mma_loop_ldg"] == 0, (
        plain["mma_loop_ldg"],
        pre["mma_loop_ldg"],
    )
    for r in (plain, pre):
        assert r["mma"] and r["ops"].get("STL", 0) == 0, r["ops"]


def test_fp8_prefill_preload_candidates_compile_without_spills(compiled):
    """Every fp8_block prefill tile the tuner tries with SCALE_PRELOAD compiles for Hopper without
    local-memory spills and without a synchronous load in its K loop (the tuner's candidate filter
    leaves out the gate_up tiles that spill with it)."""
    cands = {name: r for name, r in compiled.items() if name.startswith("preload-cand-")}
    assert any("gate_up" in n for n in cands) and any("down" in n for n in cands), sorted(cands)
    for name, r in cands.items():
        assert r["ops"].get("STL", 0) == 0 and r["mma_loop_ldg"] == 0, (
            name,
            r["ops"].get("STL"),
            r["mma_loop_ldg"],
        )


def test_bf16_prefill_uses_bf16_tensor_cores(compiled):
    r = compiled["fused-bf16-gate_up"]
    assert _uses(r, "wgmma.mma_async") and _uses(r, "bf16.bf16"), r["mma"]


@pytest.mark.parametrize("kernel", ["fused-tma-bf16-gate_up", "fused-tma-bf16-down", "fused-tma-fp8-gate_up",
                                    "fused-tma-fp8-down"])  # fmt: skip
def test_tma_tiles_load_through_tma_without_spills(compiled, kernel):
    r = compiled[kernel]
    assert r["tma_loads"] > 0 and any("wgmma.mma_async" in m for m in r["mma"]), r
    assert r["ops"].get("STL", 0) == 0, (kernel, r["ops"].get("STL"))


def test_fp8_rescaled_wide_tiles_use_fp8_tensor_cores_without_spills(compiled):
    """RESCALE keeps one accumulator per tile (no scaled dot temporary beside it), so the bf16
    winners' widths fit fp8_block too: 64 x 256 and 64 x (2 x 128) with 4 warps, 128 x 256 and
    128 x (2 x 128) with 8 (the scaled-product path spills at each of these, sm_90 compile)."""
    tiles = {name: r for name, r in compiled.items() if name.startswith("fused-fp8-rescale-")}
    assert len(tiles) == 6
    for name, r in tiles.items():
        assert _uses(r, "wgmma.mma_async") and _uses(r, "e4m3.e4m3"), (name, r["mma"])
        assert r["ops"].get("STL", 0) == 0 and r["ops"].get("LDL", 0) == 0, (name, r["ops"])
        assert r["shared"] <= H100_SHARED, (name, r["shared"])


def test_every_shipped_table_config_compiles_for_hopper(compiled):
    """A tuned-table entry that does not compile would only fail on a GPU, mid-run."""
    table = {name: r for name, r in compiled.items() if name.startswith("table-")}
    assert len([n for n in table if n.startswith("table-fused-")]) >= 10
    assert len([n for n in table if n.startswith("table-masked-")]) >= 5
    assert len([n for n in table if n.startswith("table-router-")]) >= 3
    for name, r in table.items():
        if name.startswith("table-router-"):
            continue  # GEMV-style kernels: CUDA-core FMAs by design
        bm = int(name.split("-BM")[1].split("-")[0]) if "-BM" in name else None
        if bm is not None and bm >= 64:
            assert any("wgmma.mma_async" in m for m in r["mma"]), (name, r["mma"])
        assert r["mma"], (name, "no tensor-core instruction")


def test_select_experts_compiles_without_spills(compiled):
    """The one-kernel routing keeps its [BLOCK_T, E] tile in registers: no local-memory traffic."""
    select = {name: r for name, r in compiled.items() if name.startswith("select-")}
    assert len(select) == 3
    for name, r in select.items():
        assert r["ops"].get("STL", 0) == 0 and r["ops"].get("LDL", 0) == 0, (name, r["ops"])


@pytest.mark.parametrize("kernel", ["table-mlp-any-bf16", "table-mlp-any-fp8", "table-mlp-any-fp8-hbf16"])
def test_one_launch_mlp_pipelines_its_k_loops_without_spills(compiled, kernel):
    """The persistent MLP's K loops sit inside its work-queue loop and a branch: they must still be
    software-pipelined (asynchronous copies) and the tile must fit in registers."""
    r = compiled[kernel]
    assert r["ops"].get("LDGSTS", 0) > 0, r["ops"]
    assert r["ops"].get("STL", 0) == 0, r["ops"].get("STL")
    assert r["mma"], r


H100_SHARED = 232448  # bytes of shared memory one program may use on sm_90 (227 KiB)


def test_table_mlp_entries_fit_in_shared_memory(compiled):
    """Every one-launch MLP of the tuned tables fits an SM's shared memory (its gate_up and down tile
    paths, in both row regimes, sit in one kernel)."""
    mlp = {name: r for name, r in compiled.items() if name.startswith("table-mlp-")}
    assert mlp, "no MLP entries compiled"
    too_big = {name: r["shared"] for name, r in mlp.items() if r["shared"] > H100_SHARED}
    assert not too_big, too_big
