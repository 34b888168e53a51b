"""The torch dispatcher over gloo on 2 and 4 CPU ranks: both layouts, both precisions.

Every rank builds all ranks' inputs from one shared seed, so the reference (what each rank must
receive, what combine must return) is computed locally with plain loops, no communication.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from ep_runtime.comm import ConservationError, build_dispatchers, check_combined_once, check_conservation
from ep_runtime.config import parse_config, resolve_plan
from ep_runtime.types import FP8_DTYPE, Layout, Routing
from tests.dist_utils import run_ranks

HIDDEN = 256  # two fp8 groups of 128
TOP_K = 3
LOCAL_EXPERTS = 2
CAPACITY = 6


def _plan(world: int, precision: str):
    cfg = parse_config(
        {
            "model": {
                "hidden_size": HIDDEN,
                "num_experts": LOCAL_EXPERTS * world,
                "top_k": TOP_K,
                "moe_intermediate_size": 128,
            },
            "parallel": {"ep_size": world, "device": "cpu"},
            "dispatch": {
                "backend": "torch",
                "mode": "auto",
                "precision": {"normal": precision, "low_latency": precision},
                "num_max_dispatch_tokens_per_rank": CAPACITY,
            },
        }
    )
    return resolve_plan(cfg)


def _scenario(name: str, world: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per rank: x `[T, D]` bf16, ids `[T, K]` int64, weights `[T, K]` fp32 (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    E = LOCAL_EXPERTS * world
    out = []
    for r in range(world):
        if name == "random":
            num_tokens = 0 if r == world - 1 else int(torch.randint(1, CAPACITY + 1, (1,), generator=g))
        elif name == "uneven":
            num_tokens = CAPACITY if r == 0 else 1
        else:
            num_tokens = CAPACITY - r % 2
        x = torch.randn(num_tokens, HIDDEN, generator=g).to(torch.bfloat16)
        ids = (
            torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(num_tokens)])
            if num_tokens
            else (torch.empty(0, TOP_K, dtype=torch.int64))
        )
        if name == "random":
            ids[torch.rand(ids.shape, generator=g) < 0.2] = -1
        elif name == "one_expert":
            ids[:, 0] = E - 1  # every token to the last rank's last expert ...
            ids[:, 1:] = -1  # ... and nowhere else
        elif name == "uneven":
            # Mostly rank 0's experts: ids drawn from a skewed distribution, distinct per token.
            probs = torch.tensor([8.0 if e < LOCAL_EXPERTS else 1.0 for e in range(E)])
            ids = torch.stack([torch.multinomial(probs, TOP_K, generator=g) for _ in range(num_tokens)])
            ids[-1, :] = -1  # a token with no expert at all
        w = torch.rand(num_tokens, TOP_K, generator=g) + 0.1
        out.append((x, ids.to(torch.int64), w))
    return out


def _dequant(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return x.float()
    return (x.float().view(*x.shape[:-1], x.shape[-1] // 128, 128) * scale.unsqueeze(-1)).view(x.shape)


def _source_rows(inputs, fp8: bool):
    """Per source rank: the bytes each token travels as (fp8 quantised exactly as the backend does)."""
    from ep_runtime.kernels.quant import per_token_group_quant_fp8

    rows = []
    for x, _, _ in inputs:
        if fp8 and x.shape[0]:
            q, s = per_token_group_quant_fp8(x, group_size=128)
            rows.append((q, s))
        else:
            rows.append((x, None))
    return rows


def _check_normal(rank, world, inputs, rows, dispatched, fp8):
    L = LOCAL_EXPERTS
    exp_x, exp_s, exp_ids, exp_w = [], [], [], []
    for s, (_, ids, w) in enumerate(inputs):
        for t in range(ids.shape[0]):
            is_mine = (ids[t] >= 0) & (ids[t] // L == rank)
            if not is_mine.any():
                continue
            exp_x.append(rows[s][0][t])
            if fp8:
                exp_s.append(rows[s][1][t])
            exp_ids.append(torch.where(is_mine, ids[t] - rank * L, -1))
            exp_w.append(torch.where(is_mine, w[t], 0.0))
    n = len(exp_x)
    assert dispatched.layout == Layout.NORMAL
    assert dispatched.x.shape == (n, HIDDEN), (dispatched.x.shape, n)
    assert dispatched.x.dtype == (FP8_DTYPE if fp8 else torch.bfloat16)
    if n:
        # Order: source rank, then source token (DeepEP's intranode order), so equal as lists.
        assert torch.equal(dispatched.x.view(torch.uint8), torch.stack(exp_x).view(torch.uint8))
        assert torch.equal(dispatched.recv_topk_ids, torch.stack(exp_ids))
        assert torch.equal(dispatched.recv_topk_weights, torch.stack(exp_w))
        if fp8:
            assert torch.equal(dispatched.x_scale, torch.stack(exp_s))
    else:
        assert dispatched.recv_topk_ids.shape == (0, TOP_K)
    assert (dispatched.x_scale is not None) == fp8
    counts = torch.zeros(L, dtype=torch.int32)
    for ids in exp_ids:
        for i in ids[ids >= 0]:
            counts[i] += 1
    assert torch.equal(dispatched.num_recv_per_expert, counts)


def _check_low_latency(rank, world, inputs, rows, dispatched, fp8):
    L, C = LOCAL_EXPERTS, CAPACITY
    assert dispatched.layout == Layout.LOW_LATENCY
    assert dispatched.x.shape == (L, C * world, HIDDEN)
    if fp8:
        assert dispatched.x_scale.shape == (L, C * world, HIDDEN // 128)
    for e in range(L):
        g = rank * L + e
        exp_x, exp_s = [], []
        for s, (_, ids, _) in enumerate(inputs):
            for t in range(ids.shape[0]):
                for _k in range(int((ids[t] == g).sum())):
                    exp_x.append(rows[s][0][t])
                    if fp8:
                        exp_s.append(rows[s][1][t])
        n = len(exp_x)
        assert int(dispatched.num_recv_per_expert[e]) == n, (e, dispatched.num_recv_per_expert, n)
        got = dispatched.x[e].view(torch.uint8)
        if n:
            # Packed contiguously in source-rank order, source token order within a rank.
            assert torch.equal(got[:n], torch.stack(exp_x).view(torch.uint8)), f"expert {e} rows differ"
            if fp8:
                assert torch.equal(dispatched.x_scale[e, :n], torch.stack(exp_s))
        assert not got[n:].any(), f"expert {e}: rows past the count must be zero"


def _reference_out(x, ids, w, rows_x, rows_s):
    """sum_k w_k * x (dequantised rows for fp8), fp32 `[T, D]`."""
    xs = _dequant(rows_x, rows_s) if rows_s is not None else x.float()
    return (xs.unsqueeze(1) * torch.where(ids >= 0, w, 0.0).unsqueeze(2)).sum(1)


def _identity_experts(dispatched):
    """Normal: top-k weighted sum of the row over its local slots; low-latency: the row itself."""
    xs = _dequant(dispatched.x, dispatched.x_scale)
    if dispatched.layout == Layout.NORMAL:
        wsum = torch.where(dispatched.recv_topk_ids >= 0, dispatched.recv_topk_weights, 0.0).sum(1)
        return (xs * wsum.unsqueeze(1)).to(torch.bfloat16)
    return xs.to(torch.bfloat16)


def _run_cases(rank: int, world: int, seed: int) -> int:
    checks = 0
    for precision in ("bf16", "fp8"):
        fp8 = precision == "fp8"
        plan = _plan(world, precision)
        dispatchers = build_dispatchers(plan, None)
        for scenario in ("random", "one_expert", "uneven", "full"):
            inputs = _scenario(scenario, world, seed)
            rows = _source_rows(inputs, fp8)
            x, ids, w = inputs[rank]
            routing = Routing(ids, w)
            for layout, disp in dispatchers.items():
                tag = f"{precision}/{scenario}/{layout.value}"
                dispatched, handle = disp.dispatch(x, routing)
                try:
                    if layout == Layout.NORMAL:
                        _check_normal(rank, world, inputs, rows, dispatched, fp8)
                    else:
                        _check_low_latency(rank, world, inputs, rows, dispatched, fp8)
                except AssertionError as exc:
                    raise AssertionError(f"rank {rank} {tag}: dispatch: {exc}") from exc
                check_conservation(routing, dispatched, handle)
                out = disp.combine(_identity_experts(dispatched), handle)
                ref = _reference_out(x, ids, w, rows[rank][0], rows[rank][1])
                assert out.dtype == torch.bfloat16 and out.shape == x.shape, (tag, out.shape)
                err = (out.float() - ref).abs()
                tol = 2e-2 * ref.abs() + 2e-2
                assert bool((err <= tol).all()), f"rank {rank} {tag}: combine max err {err.max():.4g}"
                if fp8 and x.shape[0]:
                    # Against the unquantised input: within e4m3 quantisation error (2^-4 relative).
                    exact = _reference_out(x, ids, w, x, None)
                    q_err = (out.float() - exact).abs().max()
                    q_tol = 0.1 * exact.abs().max() + 2e-2
                    assert q_err <= q_tol, f"rank {rank} {tag}: fp8 error {q_err:.4g} > {q_tol:.4g}"
                check_combined_once(disp, routing, dispatched, handle)
                checks += 1
        for disp in dispatchers.values():
            disp.close()
    return checks


def _run_errors(rank: int, world: int, seed: int) -> str:
    plan = _plan(world, "bf16")
    dispatchers = build_dispatchers(plan, None)
    ll = dispatchers[Layout.LOW_LATENCY]
    too_many = CAPACITY + 1
    x = torch.randn(too_many, HIDDEN).to(torch.bfloat16)
    ids = torch.zeros(too_many, TOP_K, dtype=torch.int64) - 1
    with pytest.raises(
        ValueError, match=r"more than the capacity C = dispatch.num_max_dispatch_tokens_per_rank \(6\)"
    ):
        ll.dispatch(x, Routing(ids, torch.ones(too_many, TOP_K)))
    # A tampered count is caught on every rank, naming the expert and the owning rank.
    inputs = _scenario("full", world, seed)
    x, ids, w = inputs[rank]
    routing = Routing(ids, w)
    dispatched, handle = ll.dispatch(x, routing)
    counts = dispatched.num_recv_per_expert.clone()
    if rank == 0:
        counts[0] += 1
    tampered = type(dispatched)(
        layout=dispatched.layout, x=dispatched.x, x_scale=None, num_recv_per_expert=counts
    )
    with pytest.raises(
        ConservationError, match=r"expert 0 \(on rank 0\): \d+ \(token, expert\) pair\(s\) sent, \d+ received"
    ):
        check_conservation(routing, tampered, handle)
    ll.combine(dispatched.x, handle)
    # A backend that alternates buffers per low-latency call (DeepEP) gets the probe combine twice,
    # keeping the step's call count even, and both probes must pass.
    calls: list[int] = []
    combine = ll.combine

    def counted(out, h, scale=1.0):
        calls.append(1)
        return combine(out, h) * scale

    ll.call_parity = True
    ll.combine = counted
    dispatched, handle = ll.dispatch(x, routing)
    check_combined_once(ll, routing, dispatched, handle)
    assert len(calls) == 2
    ll.combine = lambda out, h: counted(out, h, scale=2.0 if len(calls) % 2 else 1.0)  # 2nd probe off
    with pytest.raises(ConservationError, match=r"not combined exactly once"):
        check_combined_once(ll, routing, dispatched, handle)
    dist.barrier()
    for disp in dispatchers.values():
        disp.close()
    return "ok"


@pytest.mark.parametrize("world", [2, 4])
def test_torch_dispatcher(world: int, rng_seed: int) -> None:
    results = run_ranks(_run_cases, world, rng_seed)
    assert results == [results[0]] * world and results[0] == 2 * 4 * 2


def test_torch_dispatcher_errors(rng_seed: int) -> None:
    assert run_ranks(_run_errors, 2, rng_seed) == ["ok", "ok"]


if __name__ == "__main__":  # pragma: no cover - quick manual run
    os.environ.setdefault("TRITON_INTERPRET", "1")
    print(run_ranks(_run_cases, 2, 0))


def test_bench_dispatch_cpu_smoke(tmp_path) -> None:
    """The dispatch benchmark runs end to end (torch backend, gloo, tiny shapes) and writes JSON."""
    import json

    from benchmarks.bench_dispatch import main

    argv = ["--device", "cpu", "--no-deepep", "--normal-tokens", "8", "--ll-tokens", "4"]
    assert main([*argv, "--iters", "1", "--warmup", "1", "--out-dir", str(tmp_path), "--timeout", "120"]) == 0
    (path,) = tmp_path.glob("*dispatch-cpu-smoke.json")
    doc = json.loads(path.read_text())
    rows = doc["rows_by_rank"]["0"]
    assert {(r["mode"], r["precision"]) for r in rows} == {
        (m, p) for m in ("normal", "low_latency") for p in ("bf16", "fp8")
    }
    assert all(r["impl"] == "runtime torch" and r["dispatch_us"] > 0 for r in rows)
