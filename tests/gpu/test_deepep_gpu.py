"""DeepEP dispatcher vs the torch dispatcher (NCCL) on 2 GPUs: both layouts, both precisions.

Launches 2 processes itself (torch.multiprocessing, NCCL). Every case records its result instead of
stopping the run, so one failure still shows the others; the test fails if any case failed. Needs
`deep_ep` importable (see `ep_runtime.comm.deepep.INSTALL_HINT`).
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_ranks
from tests.gpu import require_deep_ep

WORLD = 2
HIDDEN = 2048  # one of DeepEP's low-latency hidden sizes
NUM_EXPERTS = 16
TOP_K = 4
CAPACITY = 64
NORMAL_TOKENS = 512


def _plan(precision: str, world: int):
    from ep_runtime.config import parse_config, resolve_plan

    cfg = parse_config(
        {
            "model": {
                "hidden_size": HIDDEN,
                "num_experts": NUM_EXPERTS,
                "top_k": TOP_K,
                "moe_intermediate_size": 256,
            },
            "parallel": {"ep_size": world, "device": "cuda"},
            "dispatch": {
                "backend": "deepep",
                "mode": "auto",
                "precision": {"normal": precision, "low_latency": precision},
                "num_max_dispatch_tokens_per_rank": CAPACITY,
            },
        }
    )
    return resolve_plan(cfg)


def _routing(num_tokens: int, gen: torch.Generator):
    from ep_runtime.types import Routing

    scores = torch.rand(num_tokens, NUM_EXPERTS, generator=gen, device="cuda")
    ids = torch.topk(scores, TOP_K, dim=-1).indices
    ids[torch.rand(ids.shape, generator=gen, device="cuda") < 0.1] = -1
    w = torch.rand(num_tokens, TOP_K, generator=gen, device="cuda") + 0.1
    return Routing(ids.to(torch.int64), w)


def _dequant(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return x.float()
    return (x.float().view(*x.shape[:-1], x.shape[-1] // 128, 128) * scale.unsqueeze(-1)).view(x.shape)


def _identity_experts(d):
    from ep_runtime.types import Layout

    xs = _dequant(d.x, d.x_scale)
    if d.layout == Layout.NORMAL:
        wsum = torch.where(d.recv_topk_ids >= 0, d.recv_topk_weights, 0.0).sum(1)
        return (xs * wsum.unsqueeze(1)).to(torch.bfloat16)
    return xs.to(torch.bfloat16)


def _reference(x, routing):
    w = torch.where(routing.topk_ids >= 0, routing.topk_weights, 0.0)
    return x.float() * w.sum(1, keepdim=True)


def _sorted_rows(rows: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    return rows[torch.argsort(rows.float() @ proj)]


def _compare_normal(dt, dd, ot, od, fp8: bool) -> str:
    assert dt.x.shape == dd.x.shape, f"recv rows: torch {tuple(dt.x.shape)} vs deepep {tuple(dd.x.shape)}"
    assert torch.equal(dt.num_recv_per_expert, dd.num_recv_per_expert), (
        f"counts {dt.num_recv_per_expert.tolist()} vs {dd.num_recv_per_expert.tolist()}"
    )
    same_order = torch.equal(dt.x.view(torch.uint8), dd.x.view(torch.uint8))
    if not same_order:
        proj = torch.randn(HIDDEN, device="cuda", dtype=torch.float32)
        assert torch.equal(
            _sorted_rows(_dequant(dt.x, dt.x_scale), proj), _sorted_rows(_dequant(dd.x, dd.x_scale), proj)
        )
        return "received rows equal as multisets (order differs)"
    assert torch.equal(dt.recv_topk_ids, dd.recv_topk_ids), "recv_topk_ids differ"
    assert torch.equal(dt.recv_topk_weights, dd.recv_topk_weights), "recv_topk_weights differ"
    if fp8:
        assert torch.equal(dt.x_scale, dd.x_scale.contiguous()), "scales differ"
    bitwise = torch.equal(ot, od)
    if not bitwise:
        diff = (ot.float() - od.float()).abs().max().item()
        assert torch.allclose(ot.float(), od.float(), rtol=1e-2, atol=1e-2), f"combined max diff {diff}"
        return f"received rows bitwise equal, same order; combined outputs within tolerance (max diff {diff:.3g})"
    return "received rows and combined outputs bitwise equal"


def _compare_low_latency(dt, dd, ot, od, fp8: bool) -> str:
    assert dt.x.shape == dd.x.shape, f"recv_x: torch {tuple(dt.x.shape)} vs deepep {tuple(dd.x.shape)}"
    assert torch.equal(dt.num_recv_per_expert, dd.num_recv_per_expert.to(torch.int32)), (
        f"counts {dt.num_recv_per_expert.tolist()} vs {dd.num_recv_per_expert.tolist()}"
    )
    proj = torch.randn(HIDDEN, device="cuda", dtype=torch.float32)
    max_err = 0.0
    for e, n in enumerate(dt.num_recv_per_expert.tolist()):
        rt = _dequant(dt.x[e, :n], None if dt.x_scale is None else dt.x_scale[e, :n])
        rd = _dequant(dd.x[e, :n], None if dd.x_scale is None else dd.x_scale[e, :n])
        if fp8:
            # Pair each torch row with its nearest DeepEP row (sorting by a projection is not stable
            # under fp8 rounding); the pairing must be one-to-one.
            match = torch.cdist(rt, rd).argmin(1) if n else torch.empty(0, dtype=torch.long, device=rt.device)
            assert match.unique().numel() == n, f"expert {e}: received rows do not pair up one-to-one"
            rd = rd[match]
        else:
            rt, rd = _sorted_rows(rt, proj), _sorted_rows(rd, proj)
        if fp8:
            # DeepEP quantises inside its kernel (its own scale rounding): one e4m3 step apart at most.
            amax = rt.abs().amax(1, keepdim=True).clamp(min=1e-6)
            err = ((rt - rd).abs() / amax).max().item() if n else 0.0
            max_err = max(max_err, err)
            # (x * (448/amax) vs x / (amax/448): rare elements round one e4m3 step apart, <= 1/14 of amax)
            assert err <= 0.1, f"expert {e}: fp8 rows differ by {err:.3g} of the row max"
        else:
            assert torch.equal(rt, rd), f"expert {e}: received rows differ as multisets"
    diff = (ot.float() - od.float()).abs().max().item() if ot.numel() else 0.0
    # fp8: an element that rounded one e4m3 step apart (<= 1/8 of its value) stays that far apart.
    rtol, atol = (0.15, 5e-2) if fp8 else (1e-2, 1e-2)
    assert torch.allclose(ot.float(), od.float(), rtol=rtol, atol=atol), f"combined max diff {diff}"
    fp8_note = f" (fp8 max rel diff {max_err:.3g})" if fp8 else ""
    return f"received multisets equal{fp8_note}; combined max diff {diff:.3g}"


def _worker(rank: int, world: int) -> list[tuple[str, str, str]]:
    reports: list[tuple[str, str, str]] = []

    def record(name: str, fn) -> None:
        # Printed as each case ends, so a hang later still leaves the earlier results in the log.
        try:
            status, msg = "ok", fn() or ""
        except Exception:  # noqa: BLE001 - reported with the traceback
            status, msg = "FAIL", traceback.format_exc(limit=4)
        reports.append((name, status, msg))
        last = msg.strip().splitlines()[-1] if msg.strip() else ""
        print(f"[rank {rank}] {status:4} {name}: {last}", flush=True)

    try:
        import deep_ep

        from ep_runtime.comm import check_combined_once, check_conservation
        from ep_runtime.comm.deepep import DeepEPBufferOwner, DeepEPDispatcher
        from ep_runtime.comm.torch_backend import TorchDispatcher
        from ep_runtime.config import deepep_low_latency_rdma_bytes, deepep_normal_nvl_bytes
        from ep_runtime.types import Layout, Routing

        gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
        plans = {p: _plan(p, world) for p in ("bf16", "fp8")}
        owner = DeepEPBufferOwner(plans["bf16"], dist.group.WORLD)
        deepep = {
            p: {
                lay: DeepEPDispatcher(plan, plan.for_layout(lay), dist.group.WORLD, owner=owner)
                for lay in plan.modes
            }
            for p, plan in plans.items()
        }
        # The torch backend on the same plans (it serves every mode whatever the plan's backend name).
        torch_disp = {
            p: {lay: TorchDispatcher(plan, plan.for_layout(lay), dist.group.WORLD) for lay in plan.modes}
            for p, plan in plans.items()
        }

        def case(precision: str, layout: Layout, num_tokens: int):
            def run() -> str:
                fp8 = precision == "fp8"
                x = torch.randn(num_tokens, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
                routing = _routing(num_tokens, gen)
                dt, ht = torch_disp[precision][layout].dispatch(x, routing)
                ot = torch_disp[precision][layout].combine(_identity_experts(dt), ht)
                dd, hd = deepep[precision][layout].dispatch(x, routing)
                od = deepep[precision][layout].combine(_identity_experts(dd), hd)
                check_conservation(routing, dd, hd)
                check_combined_once(deepep[precision][layout], routing, dd, hd)
                torch.cuda.synchronize()
                ref = _reference(x, routing)
                tol = 0.1 if fp8 else 2e-2
                assert torch.allclose(od.float(), ref, rtol=tol, atol=tol), "deepep combine != sum_k w_k x"
                if layout == Layout.NORMAL:
                    return _compare_normal(dt, dd, ot, od, fp8)
                return _compare_low_latency(dt, dd, ot, od, fp8)

            return run

        for precision in ("bf16", "fp8"):
            for layout, n in ((Layout.NORMAL, NORMAL_TOKENS), (Layout.LOW_LATENCY, CAPACITY - 5 * rank)):
                record(f"{precision}/{layout.value}", case(precision, layout, n))
        # Mode switches back and forth (the owner cleans the low-latency buffer after normal use).
        record("bf16/normal again", case("bf16", Layout.NORMAL, 300))
        record("bf16/low_latency after normal", case("bf16", Layout.LOW_LATENCY, CAPACITY))

        def cached_handle() -> str:
            disp = deepep["bf16"][Layout.NORMAL]
            x = torch.randn(256, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
            routing = _routing(256, gen)
            d1, h1 = disp.dispatch(x, routing)
            x2 = torch.randn_like(x)
            d2, h2 = disp.dispatch(x2, routing)  # same Routing object: DeepEP's cached layout
            o2 = disp.combine(_identity_experts(d2), h2)
            fresh = Routing(routing.topk_ids.clone(), routing.topk_weights.clone())
            d3, h3 = disp.dispatch(x2, fresh)
            o3 = disp.combine(_identity_experts(d3), h3)
            torch.cuda.synchronize()
            assert torch.equal(d2.x, d3.x) and torch.equal(o2, o3), "cached dispatch differs from a fresh one"
            return "cached-layout dispatch equals a fresh dispatch"

        record("deepep normal handle reuse", cached_handle)

        def sizing() -> str:
            C, E, R = CAPACITY, NUM_EXPERTS, world
            msgs = []
            for c, h, e in ((C, HIDDEN, E), (128, 7168, 256), (128, 7168, 32)):
                ours = deepep_low_latency_rdma_bytes(c, h, R, e)
                theirs = deep_ep.Buffer.get_low_latency_rdma_size_hint(c, h, R, e)
                assert ours == theirs, f"LL rdma bytes C={c} D={h} E={e}: ours {ours} vs DeepEP {theirs}"
                msgs.append(f"LL({c},{h},{e})={theirs}")
            for sms, recv in ((24, 256), (20, 512)):
                ours = deepep_normal_nvl_bytes(7168, R, sms, recv)
                theirs = deep_ep.Config(sms, 8, recv).get_nvl_buffer_size_hint(7168 * 2, R)
                assert ours == theirs, f"NVL bytes sms={sms} recv={recv}: ours {ours} vs DeepEP {theirs}"
                msgs.append(f"NVL({sms},{recv})={theirs}")
            return ", ".join(msgs)

        record("config sizing == DeepEP hints", sizing)

        def graph(backend: str):
            def run() -> str:
                disp = (deepep if backend == "deepep" else torch_disp)["bf16"][Layout.LOW_LATENCY]
                num_tokens = CAPACITY - 3 * rank
                x = torch.randn(num_tokens, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
                routing = _routing(num_tokens, gen)
                d, h = disp.dispatch(x, routing)  # eager warm-up (and mode entry) before capture
                disp.combine(d.x, h)
                torch.cuda.synchronize()
                dist.barrier()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    d, h = disp.dispatch(x, routing)
                    out = disp.combine(d.x, h)
                dist.barrier()
                for _ in range(2):
                    x.copy_(torch.randn(num_tokens, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16))
                    g.replay()
                    torch.cuda.synchronize()
                    ref = _reference(x, routing)
                    assert torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2), (
                        f"replayed output max err {(out.float() - ref).abs().max().item():.3g}"
                    )
                dist.barrier()
                return "captured one low-latency dispatch+combine; 2 replays on new inputs match sum_k w_k x"

            return run

        record("deepep low_latency CUDA graph", graph("deepep"))
        # A rank with no tokens takes part in everything (rank 1 sends nothing).
        for precision in ("bf16", "fp8"):
            for layout in (Layout.NORMAL, Layout.LOW_LATENCY):
                n = 0 if rank == 1 else (200 if layout == Layout.NORMAL else CAPACITY)
                record(f"{precision}/{layout.value} with an empty rank", case(precision, layout, n))
        record("torch low_latency CUDA graph (NCCL)", graph("torch"))
        dist.barrier()
        for group in (*deepep.values(), *torch_disp.values()):
            for disp in group.values():
                disp.close()
    except Exception:  # noqa: BLE001 - reported with the cases before it
        reports.append(("setup", "FAIL", traceback.format_exc()))
    return reports


@pytest.mark.gpu(count=2)
def test_deepep_matches_torch_backend() -> None:
    require_deep_ep()
    timeout = float(os.environ.get("EP_GPU_TEST_TIMEOUT", "240"))
    reports = run_ranks(_worker, WORLD, timeout=timeout, backend="nccl")
    failures = [
        f"rank {rank} {name}:\n{msg}"
        for rank, cases in enumerate(reports)
        for name, status, msg in cases
        if status != "ok"
    ]
    assert not failures, "\n".join(failures)
