"""Property-based tests of `EPMoE` inputs: random shapes, routing, schemes, modes, dtypes, strides,
NaN/Inf. Every case either matches the single-process reference within the scheme's tolerance or
raises the documented `ValueError` naming the argument.

One-rank cases run in this process (a world-size-1 gloo group); multi-rank cases are drawn by
hypothesis and run together in one spawn of 2 gloo ranks.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dist_utils import run_ranks
from tests.distributed.test_layer import TOL

SCHEMES = ["bf16", "fp8_block", "w4a8"]
MODES = ["normal", "low_latency", "auto"]


@st.composite
def cases(draw, world: int):
    scheme = draw(st.sampled_from(SCHEMES))
    d = draw(st.sampled_from([128, 256] if scheme != "bf16" else [64, 128, 200, 256]))
    i = draw(st.sampled_from([128, 256] if scheme != "bf16" else [32, 96, 128]))
    e = world * draw(st.sampled_from([1, 2, 3, 4, 6]))
    k = draw(st.integers(1, min(e, 4)))
    grouped = e % 2 == 0 and k <= e // 2 and draw(st.booleans())
    return dict(
        scheme=scheme,
        d=d,
        i=i,
        e=e,
        k=k,
        scoring=draw(st.sampled_from(["softmax", "sigmoid"])),
        grouped=grouped,
        bias=draw(st.booleans()),
        mode=draw(st.sampled_from(MODES)),
        capacity=draw(st.integers(1, 8)),
        tokens=[draw(st.integers(0, 20)) for _ in range(world)],
        prefill=draw(st.booleans()),
        dtype=draw(st.sampled_from(["bf16", "fp32"])),
        strided=draw(st.booleans()),
        poison=draw(st.sampled_from([None, None, None, "nan", "inf"])),
        skew=draw(st.floats(0.0, 4.0)),
        seed=draw(st.integers(0, 2**16)),
    )


def _plan(world: int, c: dict):
    from ep_runtime.config import parse_config, resolve_plan

    model = dict(
        hidden_size=c["d"],
        num_experts=c["e"],
        top_k=c["k"],
        moe_intermediate_size=c["i"],
        scoring=c["scoring"],
        use_correction_bias=c["bias"],
        weights=c["scheme"],
        seed=c["seed"],
        routed_scaling_factor=1.5,
    )
    if c["grouped"]:
        model.update(n_group=2, topk_group=1)
    doc = dict(
        model=model,
        parallel=dict(ep_size=world, device="cpu"),
        dispatch=dict(
            backend="torch",
            mode=c["mode"],
            num_max_dispatch_tokens_per_rank=c["capacity"],
            check_conservation=True,
        ),
        kernels=dict(experts="torch"),
    )
    return resolve_plan(parse_config(doc))


def _run_case(rank: int, world: int, c: dict) -> dict:
    """Build the layer, feed it the case's input; return what happened (never raises)."""
    from ep_runtime.layer import EPMoE

    plan = _plan(world, c)
    layer = EPMoE(plan, rank=rank, group=dist.group.WORLD if world > 1 else None, check_finite=True)
    try:
        g = torch.Generator().manual_seed(c["seed"] * 31 + rank)
        t = c["tokens"][rank]
        dtype = torch.bfloat16 if c["dtype"] == "bf16" else torch.float32
        base = torch.randn(t, c["d"] * (2 if c["strided"] else 1), generator=g)
        # A skewed input: a shared direction added to every token concentrates routing.
        base[:, : c["d"]] += c["skew"] * torch.randn(
            c["d"], generator=torch.Generator().manual_seed(c["seed"])
        )
        x = (base[:, ::2] if c["strided"] else base).to(dtype)
        poisoned = bool(c["poison"] and t > 0 and rank == 0)
        if poisoned:
            x = x.clone()
            x[t // 2, c["d"] // 3] = float("nan") if c["poison"] == "nan" else float("inf")
        try:
            y = layer(x, is_prefill=c["prefill"])
        except ValueError as exc:
            return dict(outcome="error", message=str(exc), poisoned=poisoned)
        ref = layer.reference_forward(x)
        err = (y.float() - ref).norm().item()
        norm = ref.norm().item()
        layout = layer.last_telemetry.layout
        return dict(
            outcome="ok",
            poisoned=poisoned,
            rel=err / norm if norm > 0 else err,
            layout=layout,
            shape_ok=tuple(y.shape) == (t, c["d"]) and y.dtype == dtype,
            finite=bool(torch.isfinite(y).all()),
        )
    finally:
        layer.close()


def _judge(c: dict, r: dict, world: int) -> None:
    if c["poison"] and c["tokens"][0] > 0:  # rank 0's input is poisoned: every rank stops
        assert r["outcome"] == "error" and "non-finite" in r["message"], (c, r)
        assert r["poisoned"] == ("another rank" not in r["message"]), (c, r)
        return
    assert r["outcome"] == "ok", (c, r)
    assert r["shape_ok"] and r["finite"], (c, r)
    assert r["rel"] < TOL[(c["scheme"], r["layout"])], (c, r)


@pytest.fixture(scope="module")
def single_rank_group():
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(tmp, 'rdv')}", rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(c=cases(world=1))
def test_one_rank_inputs(single_rank_group, c):
    _judge(c, _run_case(0, 1, c), 1)


def _two_rank_batch(rank: int, world: int, batch: list[dict]) -> list[dict]:
    torch.set_num_threads(1)
    return [_run_case(rank, world, c) for c in batch]


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(cases(world=2), min_size=12, max_size=12))
def test_two_rank_inputs(batch):
    # Poison goes into rank 0's input: the verdict is all-reduced, so rank 1 stops too.
    results = run_ranks(_two_rank_batch, 2, batch, timeout=300)
    for rank_results in results:
        for c, r in zip(batch, rank_results, strict=True):
            _judge(c, r, 2)


def test_wrong_inputs_named(single_rank_group):
    from ep_runtime.layer import EPMoE

    c = dict(
        scheme="bf16", d=64, i=32, e=4, k=2, scoring="softmax", grouped=False, bias=False, mode="normal",
        capacity=4, tokens=[3], prefill=True, dtype="bf16", strided=False, poison=None, skew=0.0, seed=1,
    )  # fmt: skip
    layer = EPMoE(_plan(1, c), rank=0, check_finite=True)
    try:
        with pytest.raises(ValueError, match=r"hidden must be \[T, 64\]"):
            layer(torch.randn(3, 65).bfloat16())
        with pytest.raises(ValueError, match="hidden.dtype must be one of bfloat16, float32"):
            layer(torch.randn(3, 64).half())
        with pytest.raises(ValueError, match="is_prefill must be a bool"):
            layer(torch.randn(3, 64).bfloat16(), is_prefill=1)
        with pytest.raises(ValueError, match="hidden must be a torch.Tensor"):
            layer([[0.0] * 64])
    finally:
        layer.close()
