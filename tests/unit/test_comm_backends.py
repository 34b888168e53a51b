"""Backend registry, `supports` reasons and DeepEP buffer sizing (no processes, no GPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import ep_runtime.comm as comm
from ep_runtime.comm.deepep import INSTALL_HINT, DeepEPDispatcher
from ep_runtime.comm.torch_backend import TorchDispatcher
from ep_runtime.config import deepep_low_latency_rdma_bytes, parse_config, resolve_plan
from ep_runtime.types import Layout

HAS_DEEP_EP = importlib.util.find_spec("deep_ep") is not None


def _plan(backend: str = "torch", device: str = "cpu", mode: str = "auto", **dispatch):
    cfg = parse_config(
        {
            "model": {"hidden_size": 7168, "num_experts": 32, "top_k": 8, "moe_intermediate_size": 2048},
            "parallel": {"ep_size": 2, "device": device},
            "dispatch": {"backend": backend, "mode": mode, **dispatch},
        }
    )
    return resolve_plan(cfg)


def test_registry_names_and_unknown_backend() -> None:
    assert comm.available_backends() == ["deepep", "torch"]
    assert comm.get_backend("torch") is TorchDispatcher
    assert comm.get_backend("deepep") is DeepEPDispatcher
    with pytest.raises(ValueError, match=r"dispatch.backend 'nccl' is unknown; allowed: deepep, torch"):
        comm.get_backend("nccl")


def test_import_comm_does_not_import_deep_ep() -> None:
    code = "import sys, ep_runtime.comm; assert 'deep_ep' not in sys.modules, 'deep_ep imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_supports_cpu_and_reasons() -> None:
    plan = _plan()
    for layout in (Layout.NORMAL, Layout.LOW_LATENCY):
        assert TorchDispatcher.supports(plan, plan.for_layout(layout)) == (True, "ok")
    cuda_plan = _plan(device="cuda")
    ok, reason = TorchDispatcher.supports(cuda_plan, cuda_plan.for_layout(Layout.NORMAL))
    import torch

    if not torch.cuda.is_available():
        assert not ok and "no CUDA device is visible; use parallel.device: cpu" in reason


def test_deepep_supports_on_cpu_plan() -> None:
    plan = _plan()  # torch backend on cpu, asked of the deepep class
    ok, reason = DeepEPDispatcher.supports(plan, plan.for_layout(Layout.NORMAL))
    assert not ok
    assert "DeepEP needs parallel.device 'cuda'" in reason and "dispatch.backend: torch" in reason


@pytest.mark.skipif(HAS_DEEP_EP, reason="deep_ep is installed here")
def test_deepep_supports_when_not_installed() -> None:
    plan = _plan(backend="deepep", device="cuda")
    for layout in (Layout.NORMAL, Layout.LOW_LATENCY):
        ok, reason = DeepEPDispatcher.supports(plan, plan.for_layout(layout))
        assert not ok
        assert "`import deep_ep` failed" in reason
        assert reason.endswith(INSTALL_HINT)
    assert "revision 567632d" in INSTALL_HINT and "deep_ep and deep_ep_cpp on PYTHONPATH" in INSTALL_HINT
    with pytest.raises(
        ValueError, match=r"dispatch.backend 'deepep' cannot serve the normal mode: `import deep_ep` failed"
    ):
        comm.build_dispatchers(plan)


def test_build_dispatchers_reports_unsupported_mode() -> None:
    plan = _plan(device="cuda")
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(
        ValueError, match=r"dispatch.backend 'torch' cannot serve the normal mode: parallel.device"
    ):
        comm.build_dispatchers(plan)


def _ll_hint_reference(c: int, hidden: int, experts: int) -> int:
    """DeepEP 567632d `LowLatencyLayout` restated step by step (csrc/config.hpp)."""
    scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + scales * 4)
    combine_msg = scales * 4 + hidden * 2
    send = max(c * dispatch_msg, experts * c * combine_msg)
    recv = max(experts * c * dispatch_msg, experts * c * combine_msg)
    signal = -(-(experts * 4) // 128) * 128
    total = 2 * send + 2 * recv + 2 * signal
    return (total + 128) // 128 * 128


@pytest.mark.parametrize(
    ("c", "hidden", "experts"), [(128, 7168, 256), (128, 7168, 32), (16, 5120, 288), (1, 2048, 3)]
)
def test_low_latency_rdma_bytes_follow_deepep(c: int, hidden: int, experts: int) -> None:
    assert deepep_low_latency_rdma_bytes(c, hidden, 2, experts) == _ll_hint_reference(c, hidden, experts)
    assert deepep_low_latency_rdma_bytes(c, hidden, 2, experts) % 128 == 0


def test_plan_buffer_bytes_for_deepep_auto() -> None:
    plan = _plan(backend="deepep", device="cuda")
    ll = plan.for_layout(Layout.LOW_LATENCY)
    assert ll.num_rdma_bytes == deepep_low_latency_rdma_bytes(128, 7168, 2, 32)
    normal = plan.for_layout(Layout.NORMAL)
    assert 0 < normal.num_nvl_bytes < 2**31 - 1  # DeepEP needs NVL bytes <= INT_MAX next to RDMA bytes
