"""Backend registry, `supports` reasons and DeepEP buffer sizing (no processes, no GPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

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


# ---------------------------------------------------------------------------------------------
# The DeepEP wrapper's own logic against a recording stand-in for `deep_ep` (no GPU, no DeepEP):
# one shared buffer, its sizes, cleaning on a normal -> low-latency switch, destroy on last close.
# ---------------------------------------------------------------------------------------------


class _FakeConfig:
    def __init__(self, num_sms, nvl_send, nvl_recv, rdma_send=6, rdma_recv=256):
        self.num_sms, self.nvl_recv = num_sms, nvl_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        return 1000 * self.nvl_recv  # recognisable, and not a multiple of 128


class _FakeBuffer:
    num_sms = 20
    calls: list = []

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False,
                 explicitly_destroy=False, enable_shrink=False, comm=None):  # fmt: skip
        self.rank = 0
        _FakeBuffer.calls.append(("init", num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank))

    @staticmethod
    def set_num_sms(n):
        _FakeBuffer.num_sms = n

    @staticmethod
    def get_dispatch_config(num_ranks):
        return _FakeConfig(_FakeBuffer.num_sms, 24, 256)

    @staticmethod
    def get_combine_config(num_ranks):
        return _FakeConfig(_FakeBuffer.num_sms, 10, 256)

    @staticmethod
    def get_low_latency_rdma_size_hint(c, hidden, num_ranks, num_experts):
        return 128 * c

    @staticmethod
    def is_sm90_compiled():
        return True

    def destroy(self):
        _FakeBuffer.calls.append(("destroy",))

    def clean_low_latency_buffer(self, c, hidden, num_experts):
        _FakeBuffer.calls.append(("clean", c, hidden, num_experts))

    def get_dispatch_layout(self, ids, num_experts):
        return "per-rank", "per-rdma-rank", "per-expert", "in-rank", None

    def dispatch(self, x, handle=None, **kwargs):
        _FakeBuffer.calls.append(("dispatch", handle is not None))
        assert x.is_contiguous(), "DeepEP asserts a contiguous x"
        if handle is None:  # the layout goes through whole, the RDMA counts included
            assert (kwargs["num_tokens_per_rank"], kwargs["num_tokens_per_rdma_rank"]) == (
                "per-rank",
                "per-rdma-rank",
            )
        k = 2
        return x, torch.zeros(x.shape[0], k, dtype=torch.int64), torch.zeros(x.shape[0], k), [0, 0], "h", None

    def combine(self, x, handle, config=None):
        _FakeBuffer.calls.append(("combine",))
        return x, None, None

    def low_latency_dispatch(
        self, x, ids, c, num_experts, use_fp8=True, async_finish=False, return_recv_hook=False
    ):
        _FakeBuffer.calls.append(("ll_dispatch", use_fp8))
        return (
            torch.zeros(2, 2 * c, x.shape[1], dtype=torch.bfloat16),
            torch.zeros(2, dtype=torch.int32),
            "llh",
            None,
            None,
        )

    def low_latency_combine(self, x, ids, weights, handle):
        _FakeBuffer.calls.append(("ll_combine",))
        return torch.zeros(ids.shape[0], x.shape[-1], dtype=torch.bfloat16), None, None


@pytest.fixture
def fake_deep_ep(monkeypatch):
    import types

    mod = types.ModuleType("deep_ep")
    mod.Buffer, mod.Config, mod.topk_idx_t = _FakeBuffer, _FakeConfig, torch.int64
    monkeypatch.setitem(sys.modules, "deep_ep", mod)
    monkeypatch.setattr(DeepEPDispatcher, "supports", classmethod(lambda cls, plan, mode_plan: (True, "ok")))
    _FakeBuffer.calls = []
    return _FakeBuffer


def _small_deepep_plan(**deepep):
    cfg = parse_config(
        {
            "model": {"hidden_size": 2048, "num_experts": 4, "top_k": 2, "moe_intermediate_size": 256},
            "parallel": {"ep_size": 2, "device": "cuda"},
            "dispatch": {"backend": "deepep", "num_max_dispatch_tokens_per_rank": 8, "deepep": deepep},
        }
    )
    return resolve_plan(cfg)


def test_deepep_shared_buffer_sizes_clean_and_close(fake_deep_ep) -> None:
    from ep_runtime.types import Routing

    plan = _small_deepep_plan(num_sms=20)
    disp = DeepEPDispatcher.build_all(plan, None)
    inits = [c for c in fake_deep_ep.calls if c[0] == "init"]
    assert len(inits) == 1, "both modes must share one deep_ep.Buffer"
    _, nvl, rdma, ll_mode, qps = inits[0]
    plan_nvl = plan.for_layout(Layout.NORMAL).num_nvl_bytes
    assert nvl == -(-max(plan_nvl, 1000 * 256) // 128) * 128 and nvl % 128 == 0
    assert rdma == max(plan.for_layout(Layout.LOW_LATENCY).num_rdma_bytes, 128 * 8)
    assert ll_mode is True and qps == 2  # local experts
    x = torch.zeros(2048, 3, dtype=torch.bfloat16).t()  # a non-contiguous view: made contiguous
    routing = Routing(torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2))
    normal, ll = disp[Layout.NORMAL], disp[Layout.LOW_LATENCY]
    d, h = normal.dispatch(x, routing)
    normal.dispatch(x, routing)  # the same Routing object: DeepEP's cached layout
    assert fake_deep_ep.calls[-2:] == [("dispatch", False), ("dispatch", True)]
    routing.topk_ids[0, 0] = 1  # edited in place: the cached layout is stale, a fresh one is made
    normal.dispatch(x, routing)
    normal.dispatch(x, routing)
    assert fake_deep_ep.calls[-2:] == [("dispatch", False), ("dispatch", True)]
    assert d.num_recv_per_expert.dtype == torch.int32
    normal.combine(d.x, h)
    fake_deep_ep.calls.clear()
    d, h = ll.dispatch(x, routing)
    ll.combine(d.x, h)
    ll.dispatch(x, routing)
    assert fake_deep_ep.calls == [
        ("clean", 8, 2048, 4),
        ("ll_dispatch", False),
        ("ll_combine",),
        ("ll_dispatch", False),
    ]
    with pytest.raises(
        ValueError, match=r"more than the capacity C = dispatch.num_max_dispatch_tokens_per_rank \(8\)"
    ):
        ll.dispatch(
            torch.zeros(9, 2048, dtype=torch.bfloat16),
            Routing(torch.zeros(9, 2, dtype=torch.int64), torch.ones(9, 2)),
        )
    fake_deep_ep.calls.clear()
    normal.close()
    assert fake_deep_ep.calls == []
    ll.close()
    assert fake_deep_ep.calls == [("destroy",)]


def test_deepep_rejects_configs_deepep_would_assert_on(fake_deep_ep) -> None:
    from ep_runtime.comm.deepep import DeepEPBufferOwner

    chunk = {"num_max_nvl_chunked_send_tokens": 64, "num_max_nvl_chunked_recv_tokens": 64}
    # The file is rejected when loaded (the owner keeps its own check for plans built in code).
    with pytest.raises(ValueError, match=r"num_max_nvl_chunked_send_tokens \(64\) must be < num_max_nvl"):
        _small_deepep_plan(normal_dispatch=chunk)
    plan = _small_deepep_plan()
    owner = DeepEPBufferOwner(plan)
    other = resolve_plan(
        plan.config.model_copy(
            update={
                "dispatch": plan.config.dispatch.model_copy(update={"num_max_dispatch_tokens_per_rank": 16})
            }
        )
    )
    with pytest.raises(ValueError, match=r"sized for capacity 8, this low-latency dispatcher needs 16"):
        DeepEPDispatcher(other, other.for_layout(Layout.LOW_LATENCY), None, owner=owner)


def test_deepep_queue_pairs_default_and_depth(fake_deep_ep, monkeypatch) -> None:
    from ep_runtime.comm.deepep import DeepEPBufferOwner
    from ep_runtime.config import deepep_default_num_qps

    # Low-latency: one queue pair per local expert; internode normal: at least num_sms.
    assert deepep_default_num_qps(16, 24, low_latency=True, normal_internode=True) == 24
    assert deepep_default_num_qps(32, 24, low_latency=True, normal_internode=True) == 32
    assert deepep_default_num_qps(16, 24, low_latency=False, normal_internode=False) == 1
    assert deepep_default_num_qps(16, 24, low_latency=True, normal_internode=False) == 16
    plan = _small_deepep_plan()
    monkeypatch.setenv("NVSHMEM_QP_DEPTH", "16")  # < 2 * (C + 1) = 18 for C = 8
    with pytest.raises(ValueError, match=r"C = 8 .* needs NVSHMEM_QP_DEPTH >= 18 in this rank's environment"):
        DeepEPBufferOwner(plan)
    monkeypatch.setenv("NVSHMEM_QP_DEPTH", "18")
    DeepEPBufferOwner(plan).acquire().release()


def test_deepep_layers_of_one_process_share_one_buffer(fake_deep_ep) -> None:
    plan = _small_deepep_plan()
    shared = comm.build_shared_state(plan, None)
    layers = [comm.build_dispatchers(plan, None, shared=shared) for _ in range(3)]
    assert [c[0] for c in fake_deep_ep.calls] == ["init"], "one deep_ep.Buffer for every layer"
    assert all(d.owner is shared for disp in layers for d in disp.values())
    for disp in layers:
        for d in disp.values():
            d.close()
    assert ("destroy",) not in fake_deep_ep.calls  # the process still holds its reference
    shared.release()
    assert fake_deep_ep.calls[-1] == ("destroy",)


def test_torch_backend_shares_nothing() -> None:
    assert comm.build_shared_state(_plan(backend="torch", device="cpu")) is None
