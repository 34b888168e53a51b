"""The per-kernel breakdown benchmark's trace handling (benchmarks/bench_breakdown.py): the GPU
part runs on the GPU machine; what it computes from a trace is checked here on synthetic traces."""

from __future__ import annotations

import pytest

from benchmarks import bench_breakdown as bd


def _trace(calls: list[list[tuple[str, float, float]]], extra=()) -> dict:
    """A Chrome trace as torch.profiler exports it: GPU kernels (and a memset) of each replay, plus
    host-side events that must be ignored."""
    events = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 500.0}]
    for call in calls:
        for name, ts, dur in call:
            cat = "gpu_memset" if name == "Memset (Device)" else "kernel"
            events.append({"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur})
    events.extend(extra)
    return {"traceEvents": events[::-1]}  # unsorted on purpose


def _call(t0: float, durs: list[float], gaps: list[float]) -> list[tuple[str, float, float]]:
    names = [
        "Memset (Device)",
        "_masked_w4a8_kernel",
        "void at::native::vectorized_elementwise_kernel<4, X>(int)",
    ]
    out, t = [], t0
    for name, dur, gap in zip(names, durs, gaps, strict=True):
        t += gap
        out.append((name, t, dur))
        t += dur
    return out


def test_breakdown_medians_gaps_and_span():
    calls = [
        _call(1000.0, [1.0, 10.0, 2.0], [0.0, 3.0, 1.0]),
        _call(2000.0, [1.0, 12.0, 2.0], [0.0, 5.0, 1.0]),
        _call(3000.0, [1.0, 11.0, 4.0], [0.0, 4.0, 3.0]),
    ]
    b = bd.breakdown(bd.gpu_events(_trace(calls)), 3)
    assert [k["kernel"] for k in b["kernels"]] == [
        "Memset",
        "_masked_w4a8_kernel",
        "vectorized_elementwise_kernel",
    ]
    assert [k["us"] for k in b["kernels"]] == [1.0, 11.0, 2.0]
    assert [k["gap_before_us"] for k in b["kernels"]] == [0.0, 4.0, 1.0]
    # spans 17, 21, 23 us; busy 13, 15, 16; gaps 4, 6, 7
    assert b["span_us"] == 21.0 and b["kernels_us"] == 15.0 and b["gaps_us"] == 6.0


def test_breakdown_rejects_traces_that_are_not_the_replays():
    calls = [
        _call(1000.0, [1.0, 10.0, 2.0], [0.0, 3.0, 1.0]),
        _call(2000.0, [1.0, 12.0, 2.0], [0.0, 5.0, 1.0]),
    ]
    events = bd.gpu_events(_trace(calls))
    with pytest.raises(ValueError, match="do not split into 4"):
        bd.breakdown(events, 4)
    with pytest.raises(ValueError, match="0 GPU events"):
        bd.breakdown([], 1)
    swapped = events[:3] + [events[4], events[3], events[5]]
    with pytest.raises(ValueError, match="replay 1 ran"):
        bd.breakdown(swapped, 2)


def test_short_names_and_case_names():
    assert bd.short_name("void cutlass::Kernel2<cutlass_80_tensorop>(Params)") == "Kernel2"
    assert bd.short_name("_fused_moe_gemm_kernel") == "_fused_moe_gemm_kernel"
    assert bd.parse_case("masked-qwen3-r8-w4a8") == dict(
        layout="masked", shape="Qwen3-30B-A3B", n=8, scheme="w4a8"
    )
    assert bd.parse_case("fused-dsv3_e128-T1-bf16") == dict(
        layout="fused", shape="dsv3_e128", n=1, scheme="bf16"
    )
    for c in bd.CASES:
        bd.parse_case(c)
    for bad, what in (("fused-qwen3-T1-bf16", "shape must be one of"), ("masked-qwen3-T1-bf16", "expected"),
                      ("masked-llama-r1-bf16", "model must be one of"), ("fused-qwen3_30b-T1-int8", "scheme")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            bd.parse_case(bad)


def test_bad_case_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bd.main(["--cases", "fused-nope-T1-bf16"])
    assert exc.value.code == 2
    assert "--cases" in capsys.readouterr().err
