"""benchmarks/merge_results.py: a partial re-run replaces the rows it measured, keeps the others, and
records where each came from; mismatched files are refused with a clear error."""

from __future__ import annotations

import json

import pytest

from benchmarks import merge_results


def _doc(date: str, rows: list[dict], device: str = "NVIDIA H200", what: str = "fused_moe") -> dict:
    return {
        "what": what,
        "date": date,
        "device": {"device": device},
        "ceilings": {"copy": date},
        "rows": rows,
    }


OLD = _doc(
    "2026-11-23",
    [
        {"shape": "qwen3", "T": 1, "scheme": "bf16", "us": 50.0},
        {"shape": "qwen3", "T": 1, "scheme": "fp8_block", "us": 45.0},
        {"shape": "qwen3", "T": 2048, "scheme": "bf16", "us": 530.0},
        {"shape": "qwen3", "T": 4096, "skipped": "time budget"},
        {"shape": "qwen3", "T": 1, "align_us": 5.0},  # a per-(shape, T) side row: T 1 is re-run
        {"shape": "qwen3", "T": 2048, "align_us": 9.0},  # T 2048 is not
        {"shape": "qwen3", "T": 8192, "us": 700.0},  # from before `scheme` existed: not re-run
        {"shape": "qwen3", "T": 2, "us": 70.0},  # from before `scheme` existed: re-run
    ],
)
NEW = _doc(
    "2026-12-08",
    [
        {"shape": "qwen3", "T": 1, "scheme": "bf16", "us": 41.0},
        {"shape": "qwen3", "T": 2, "scheme": "bf16", "us": 60.0},
    ],
)


def test_new_rows_replace_old_ones_with_the_same_key(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(OLD))
    new.write_text(json.dumps(NEW))
    assert (
        merge_results.main([str(old), str(new), "--key", "shape,T,scheme", "--why", "decode re-tuned"]) == 0
    )
    doc = json.loads(new.read_text())
    got = {(r["shape"], r["T"], r.get("scheme")): r["us"] for r in doc["rows"] if "us" in r}
    assert got == {
        ("qwen3", 1, "bf16"): 41.0,  # replaced
        ("qwen3", 2, "bf16"): 60.0,  # new (and replaces the scheme-less T 2 row)
        ("qwen3", 1, "fp8_block"): 45.0,  # another scheme: kept
        ("qwen3", 2048, "bf16"): 530.0,  # not re-run: kept
        ("qwen3", 8192, None): 700.0,  # scheme-less, not re-run: kept
    }
    assert [r["T"] for r in doc["rows"] if "skipped" in r] == [4096]  # not re-run: its note stays
    assert [r["T"] for r in doc["rows"] if "align_us" in r] == [2048]  # T 1's went with the re-run
    assert doc["date"] == "2026-12-08" and doc["ceilings"] == {"copy": "2026-12-08"}
    assert "decode re-tuned" in doc["merged"] and "2026-11-23" in doc["merged"] and "5 rows" in doc["merged"]


@pytest.mark.parametrize(
    "old, new, key, match",
    [
        (OLD, _doc("x", NEW["rows"], device="NVIDIA H100 80GB HBM3"), ["shape", "T"], "different devices"),
        (OLD, _doc("x", NEW["rows"], what="masked_gemm"), ["shape", "T"], "different benchmarks"),
        (OLD, NEW, ["shape", "L"], "no row of the new file has every key field"),
        (OLD, NEW, [], "--key"),
    ],
)
def test_refuses_what_cannot_be_merged(old, new, key, match):
    with pytest.raises(ValueError, match=match):
        merge_results.merge(old, new, key, "why")
