"""Which tuned table a GPU uses: its own, else a same-architecture GPU's (with a one-time warning),
else none (the kernels' heuristics). Also: the shipped tables resolve this way for an H100."""

from __future__ import annotations

import json
import warnings

import pytest

from ep_runtime.kernels import fused_moe as fm
from ep_runtime.kernels import masked_grouped_gemm as mg
from ep_runtime.kernels import router_gemm as rg
from ep_runtime.kernels import tables

H100 = "NVIDIA H100 80GB HBM3"


def test_own_table_wins_in_either_name_form():
    t = {"NVIDIA H200": "h200-cfg", "NVIDIA H100 80GB HBM3": "h100-cfg"}
    assert tables.device_table(t, H100, (9, 0), "x") == ("NVIDIA H100 80GB HBM3", "h100-cfg")
    assert tables.device_table({"h100-80gb-hbm3": 1}, H100, (9, 0), "x") == ("h100-80gb-hbm3", 1)


def test_same_architecture_fallback_warns_once():
    t = {"NVIDIA H200": "h200-cfg", "NVIDIA A100-SXM4-80GB": "a100-cfg"}
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        assert tables.device_table(t, "NVIDIA H800", (9, 0), "test table") == ("NVIDIA H200", "h200-cfg")
        assert tables.device_table(t, "NVIDIA H800", (9, 0), "test table") == ("NVIDIA H200", "h200-cfg")
    msgs = [str(w.message) for w in got]
    assert (
        len(msgs) == 1 and "no tuned test table table for NVIDIA H800; using the NVIDIA H200 table" in msgs[0]
    )


def test_no_fallback_across_architectures():
    t = {"NVIDIA H200": "h200-cfg"}
    assert tables.device_table(t, "NVIDIA A100-SXM4-80GB", (8, 0), "x") == (None, None)
    assert tables.device_table(t, "NVIDIA B200", (10, 0), "x") == (None, None)
    assert tables.device_table({}, H100, (9, 0), "x") == (None, None)
    # "h20" is a Hopper family of its own: a fallback (with its warning), matched by name, not prefix
    with pytest.warns(UserWarning, match="using the NVIDIA H20 table"):
        assert tables.device_table({"NVIDIA H20": 1}, H100, (9, 0), "h20 test") == ("NVIDIA H20", 1)
    assert tables.device_table({"NVIDIA H20": 1}, "NVIDIA H200", (8, 0), "x") == (None, None)


@pytest.mark.parametrize(
    ("what", "shipped"),
    [
        ("fused MoE", json.loads((fm.CONFIG_DIR / "fused_moe.json").read_text())),
        ("masked GEMM", json.loads(mg.CONFIG_PATH.read_text())["devices"]),
        ("router GEMM", json.loads(rg.CONFIG_PATH.read_text())["devices"]),
    ],
)
def test_shipped_tables_serve_an_h100(what, shipped):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key, table = tables.device_table(shipped, H100, (9, 0), what)
    assert key is not None and tables.normalise(key).startswith(("h100", "h200")) and table


def test_for_device_reads_the_device_once_and_falls_back(monkeypatch, tmp_path):
    """The kernels' lookup: name and capability come from the device, the answer is cached."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: calls.append(i) or H100)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"NVIDIA H200": {"7168,256": "cfg"}}))
    tables.for_device.cache_clear()

    def load(p):
        return json.loads(open(p).read())

    with pytest.warns(UserWarning, match="using the NVIDIA H200 table"):
        first = tables.for_device("for_device test", load, str(path), 0)
    again = tables.for_device("for_device test", load, str(path), 0)
    assert first == {"7168,256": "cfg"} and again is first and calls == [0]
    tables.for_device.cache_clear()


def test_own_table_borrows_only_the_entries_it_lacks():
    t = {
        "NVIDIA H200": {"shape-a": "h200-a", "shape-b": "h200-b"},
        "h100-80gb-hbm3": {"shape-a": "h100-a"},
        "NVIDIA A100-SXM4-80GB": {"shape-c": "a100-c"},
    }
    with pytest.warns(UserWarning, match=r"no entry for shape-b; using the NVIDIA H200 entries"):
        got = tables.device_entries(t, H100, (9, 0), "borrow test")
    assert got == {"shape-a": "h100-a", "shape-b": "h200-b"}  # own wins; no cross-architecture entry
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing borrowed: no warning
        assert tables.device_entries(t, "NVIDIA H200", (9, 0), "borrow test") == t["NVIDIA H200"]
        assert tables.device_entries({"h100-80gb-hbm3": {"s": 1}}, H100, (9, 0), "borrow test 2") == {"s": 1}
    assert tables.device_entries(t, "NVIDIA B200", (10, 0), "x") == {}


def test_arrival_counters_grow_without_freeing_the_old_buffer(monkeypatch):
    """Counters start at zero and are shared per (device, stream); a larger launch gets a larger
    buffer, and the outgrown one stays referenced (a captured CUDA graph may still use it)."""
    import torch

    monkeypatch.setattr(tables, "_ZEROED", {})
    monkeypatch.setattr(tables, "_RETIRED", [])
    dev = torch.device("cpu")
    a = tables.arrival_counters(dev, 10)
    assert a.dtype == torch.int32 and a.numel() == 1024 and int(a.abs().sum()) == 0
    assert tables.arrival_counters(dev, 1024) is a
    b = tables.arrival_counters(dev, 5000)
    assert b is not a and b.numel() == 5000 and int(b.abs().sum()) == 0
    assert any(r is a for r in tables._RETIRED)
    assert tables.arrival_counters(dev, 7) is b
    ws = tables.zeroed_workspace(dev, 100)
    assert ws.dtype == torch.float32 and ws.numel() == 1 << 16 and int(ws.abs().sum()) == 0
    assert tables.zeroed_workspace(dev, 200) is ws and tables.arrival_counters(dev, 7) is b
