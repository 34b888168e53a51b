"""EPMoE over gloo (1, 2 and 4 ranks) against the single-process float32 reference.

Each spawned run executes many cases (spawning costs seconds on this machine). A case builds a
layer from a tiny config, feeds every rank its own tokens (possibly none), and compares each rank's
output with `reference_moe` over the same tokens: relative Frobenius error under the scheme's
tolerance. It also checks the layout chosen, the number of low-latency rounds and the telemetry.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.dist_utils import run_ranks

D, I = 128, 128  # noqa: E741 - the design doc's names

# Relative Frobenius error allowed per (scheme, layout). The torch experts compute in float32 on
# CPU with the kernels' activation quantisation, so what remains is the bf16 rounding of the expert
# output and of combine; w4a8 low-latency quantises per tensor where the reference uses
# per-token-group scales (see ep_runtime/reference.py), hence its wider bound.
TOL = {
    ("bf16", "normal"): 1.5e-2,
    ("bf16", "low_latency"): 1.5e-2,
    ("fp8_block", "normal"): 2e-2,
    ("fp8_block", "low_latency"): 2e-2,
    ("w4a8", "normal"): 2e-2,
    ("w4a8", "low_latency"): 0.15,
}
# The Triton kernels compute in bf16 (and, interpreted, round in-kernel fp8 slightly differently).
TRITON_TOL = 4e-2


def _config(world: int, case: dict):
    from ep_runtime.config import parse_config, resolve_plan

    model = dict(hidden_size=D, num_experts=8, top_k=3, moe_intermediate_size=I, seed=case.get("seed", 5))
    model.update(case.get("model", {}))
    dispatch = dict(backend="torch", mode=case["mode"], num_max_dispatch_tokens_per_rank=case.get("C", 4))
    dispatch.update(case.get("dispatch", {}))
    cfg = parse_config(dict(model=model, parallel=dict(ep_size=world, device="cpu"), dispatch=dispatch))
    plan = resolve_plan(cfg)
    if case.get("experts") == "triton":
        # The file validator keeps `triton` to CUDA; under TRITON_INTERPRET the kernels run on CPU.
        plan = dataclasses.replace(plan, experts_impl="triton")
    return plan


def _hidden(case: dict, step: int, rank: int, num_tokens: int, router_weight: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * case.get("seed", 5) + 10 * step + rank)
    h = torch.randn(num_tokens, D, generator=g)
    if case.get("skew"):
        # Align every token with expert 0's router row: all tokens pick expert 0 (rank 0).
        w0 = router_weight[0].float()
        h = h + 3.0 * w0 / w0.norm() * math.sqrt(D)
    return h.to(case.get("dtype", torch.bfloat16))


def _run_cases(rank: int, world: int, cases: list[dict]) -> list[dict]:
    from ep_runtime.layer import EPMoE
    from ep_runtime.reference import reference_router_logits, reference_routing

    results = []
    for case in cases:
        plan = _config(world, case)
        num_layers = case.get("layers", 1)
        layers = [
            EPMoE(plan, rank=rank, layer_index=i, **case.get("layer_kw", {})) for i in range(num_layers)
        ]
        for step, spec in enumerate(case["steps"]):
            tokens, is_prefill = spec["tokens"], spec.get("prefill", False)
            h = _hidden(case, step, rank, tokens[rank], layers[0].weights.router.weight)
            if num_layers == 1:
                y = layers[0](h, is_prefill=is_prefill)
                tel = layers[0].last_telemetry
                ref = layers[0].reference_forward(h, layout=tel.layout)
                out, ref_out = y.float(), ref
            else:
                # A stack with residual adds (bf16 state, as an engine keeps it); the reference carries
                # its own float32 state. Small differences can flip a near-tie top-k choice in a
                # later layer; such tokens are counted and excluded from the error.
                x, xr = h, h.float()
                same = torch.ones(tokens[rank], dtype=torch.bool)
                for layer in layers:
                    y = layer(x, is_prefill=is_prefill)
                    tel = layer.last_telemetry
                    ref_ids, _ = reference_routing(
                        reference_router_logits(xr.bfloat16(), layer.weights.router.weight),
                        layer.model_cfg,
                        layer.weights.router.correction_bias,
                    )
                    same &= (ref_ids.sort(-1).values == layer.last_routing.topk_ids.sort(-1).values).all(-1)
                    x = x + y
                    xr = xr + layer.reference_forward(xr, layout=tel.layout)
                flipped = int((~same).sum())
                assert flipped <= max(1, tokens[rank] // 4), (
                    f"{flipped} of {tokens[rank]} tokens changed experts"
                )
                out, ref_out = x.float()[same], xr[same]
            assert y.dtype == h.dtype if num_layers == 1 else True
            assert out.shape[1] == D and (num_layers > 1 or out.shape[0] == tokens[rank])
            err = (out - ref_out).norm().item()
            norm = ref_out.norm().item()
            results.append(
                dict(
                    name=f"{case['name']}[{step}]",
                    scheme=plan.config.model.weights,
                    experts=plan.experts_impl,
                    rel=err / norm if norm > 0 else err,
                    layout=tel.layout,
                    rounds=tel.num_rounds,
                    expect=spec,
                    local_sum=sum(tel.tokens_per_local_expert),
                    tokens_per_rank=tel.tokens_per_rank,
                    imbalance_ranks=tel.imbalance_ranks,
                    stage_ms=tel.stage_ms,
                    total_ms=tel.total_ms,
                    top_k=plan.config.model.top_k,
                )
            )
        for layer in layers:
            layer.close()
    return results


def _check(all_results: list[list[dict]], world: int) -> None:
    for rank, results in enumerate(all_results):
        for r in results:
            spec = r["expect"]
            where = f"rank {rank} {r['name']}"
            tol = TRITON_TOL if r["experts"] == "triton" else TOL[(r["scheme"], r["layout"])]
            tol *= spec.get("tol_scale", 1.0)
            assert r["rel"] < tol, (
                f"{where}: relative error {r['rel']:.3g} >= {tol} ({r['scheme']}, {r['layout']})"
            )
            if "layout" in spec:
                assert r["layout"] == spec["layout"], (
                    f"{where}: layout {r['layout']}, expected {spec['layout']}"
                )
            if "rounds" in spec:
                assert r["rounds"] == spec["rounds"], (
                    f"{where}: {r['rounds']} rounds, expected {spec['rounds']}"
                )
            assert set(r["stage_ms"]) == {"mode", "router", "dispatch", "experts", "combine", "checks"}
            assert abs(sum(r["stage_ms"].values()) - r["total_ms"]) < 1e-3 * max(1.0, r["total_ms"]), where
            if r["tokens_per_rank"] is not None and spec.get("layers", 1) == 1:
                # Every (token, expert) pair of every rank was received exactly once somewhere.
                assert sum(r["tokens_per_rank"]) == r["top_k"] * sum(spec["tokens"]), where
                assert r["tokens_per_rank"][rank] == r["local_sum"], where
            if spec.get("skewed"):
                assert r["imbalance_ranks"] is not None and r["imbalance_ranks"] > 1.3, where


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

CASES_2 = [
    dict(name="bf16-normal", mode="normal", steps=[dict(tokens=[6, 5], layout="normal", rounds=1)]),
    dict(
        name="bf16-ll-chunked",
        mode="low_latency",
        steps=[dict(tokens=[9, 2], layout="low_latency", rounds=3), dict(tokens=[0, 4], rounds=1)],
    ),
    dict(
        name="bf16-auto",
        mode="auto",
        dispatch=dict(check_conservation=True),
        steps=[
            dict(tokens=[3, 0], layout="low_latency", rounds=1),  # zero-token rank
            dict(tokens=[7, 1], layout="normal", rounds=1),  # 7 > C on one rank
            dict(tokens=[2, 2], prefill=True, layout="normal"),
            dict(tokens=[0, 0], layout="low_latency", rounds=1),  # nobody has tokens
        ],
    ),
    dict(
        name="auto-chunked",
        mode="auto",
        dispatch=dict(auto=dict(normal_above_tokens=10)),
        steps=[
            dict(tokens=[9, 2], layout="low_latency", rounds=3),  # 9 > C but <= normal_above_tokens
            dict(tokens=[11, 0], layout="normal", rounds=1),
            dict(tokens=[1, 3], layout="low_latency", rounds=1),
        ],
    ),
    dict(
        name="fp8-block",
        mode="auto",
        model=dict(weights="fp8_block"),
        steps=[dict(tokens=[6, 6], layout="normal"), dict(tokens=[4, 3], layout="low_latency", rounds=1)],
    ),
    dict(
        name="fp8-block-bf16-dispatch",
        mode="low_latency",
        C=3,
        model=dict(weights="fp8_block"),
        dispatch=dict(precision=dict(low_latency="bf16")),
        steps=[dict(tokens=[5, 3], rounds=2)],
    ),
    dict(
        name="w4a8",
        mode="auto",
        dispatch=dict(check_conservation=True),
        model=dict(weights="w4a8"),
        steps=[dict(tokens=[6, 2], prefill=True, layout="normal"), dict(tokens=[3, 4], layout="low_latency")],
    ),
    dict(
        name="w4a8-ll-chunked",
        mode="low_latency",
        C=2,
        model=dict(weights="w4a8"),
        steps=[dict(tokens=[5, 1], rounds=3)],
    ),
    dict(
        name="bf16-fp8-dispatch",
        mode="auto",
        dispatch=dict(precision=dict(normal="fp8", low_latency="fp8")),
        steps=[dict(tokens=[6, 3], layout="normal"), dict(tokens=[2, 4], layout="low_latency")],
    ),
    dict(
        name="deepseek-style-skewed",
        mode="auto",
        skew=True,
        model=dict(
            scoring="sigmoid", n_group=4, topk_group=2, use_correction_bias=True, routed_scaling_factor=2.5
        ),
        steps=[
            dict(tokens=[8, 8], prefill=True, layout="normal", skewed=True),
            dict(tokens=[4, 4], layout="low_latency", skewed=True),
        ],
    ),
    dict(
        name="stack-3-layers",
        mode="auto",
        layers=3,
        model=dict(scoring="sigmoid", use_correction_bias=True),
        steps=[
            dict(tokens=[6, 6], prefill=True, layers=3, tol_scale=2.0),
            dict(tokens=[3, 1], layers=3, tol_scale=2.0),
        ],
    ),
    dict(
        name="placement",
        mode="auto",
        layer_kw=dict(placement=[[7, 0, 5, 2], [1, 3, 4, 6]]),
        steps=[dict(tokens=[5, 3], layout="normal"), dict(tokens=[2, 3], layout="low_latency")],
    ),
    dict(
        name="triton-normal-fp8",
        mode="normal",
        experts="triton",
        model=dict(weights="fp8_block", num_experts=4, top_k=2),
        steps=[dict(tokens=[3, 2], layout="normal")],
    ),
    dict(
        name="triton-ll-bf16",
        mode="low_latency",
        experts="triton",
        C=3,
        model=dict(num_experts=4, top_k=2),
        steps=[dict(tokens=[2, 1], rounds=1)],
    ),
]

CASES_1 = [
    dict(name="single-normal", mode="normal", steps=[dict(tokens=[7], layout="normal")]),
    dict(name="single-ll", mode="low_latency", C=3, steps=[dict(tokens=[7], rounds=3)]),
    dict(
        name="single-fp32-input",
        mode="auto",
        dtype=torch.float32,
        steps=[dict(tokens=[5], layout="normal"), dict(tokens=[2], layout="low_latency")],
    ),
]

CASES_4 = [
    dict(
        name="auto-4",
        mode="auto",
        steps=[dict(tokens=[5, 0, 2, 1], layout="normal"), dict(tokens=[1, 0, 2, 4], layout="low_latency")],
    ),
    dict(
        name="ll-4-chunked-fp8",
        mode="low_latency",
        C=3,
        dispatch=dict(check_conservation=True),
        model=dict(weights="fp8_block"),
        steps=[dict(tokens=[7, 0, 3, 1], rounds=3)],
    ),
    dict(
        name="skewed-4",
        mode="normal",
        skew=True,
        steps=[dict(tokens=[4, 4, 4, 4], skewed=True)],
    ),
]


def _write_qwen_checkpoint(path, num_experts: int = 8) -> str:
    """A Qwen-MoE-named checkpoint of layer 0, sharded in two files with an index."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(21)
    tensors = {"model.layers.0.mlp.gate.weight": torch.randn(num_experts, D, generator=g) / D**0.5}
    for e in range(num_experts):
        b = f"model.layers.0.mlp.experts.{e}"
        tensors[f"{b}.gate_proj.weight"] = torch.randn(I, D, generator=g) / D**0.5
        tensors[f"{b}.up_proj.weight"] = torch.randn(I, D, generator=g) / D**0.5
        tensors[f"{b}.down_proj.weight"] = torch.randn(D, I, generator=g) / I**0.5
    keys = sorted(tensors)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, ks in shards.items():
        save_file({k: tensors[k].bfloat16() for k in ks}, str(path / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(path)


def test_epmoe_two_ranks(tmp_path):
    checkpoint = dict(
        name="checkpoint-fp8",
        mode="auto",
        model=dict(checkpoint=_write_qwen_checkpoint(tmp_path), weights="fp8_block"),
        steps=[dict(tokens=[6, 5], prefill=True, layout="normal"), dict(tokens=[3, 2], layout="low_latency")],
    )
    _check(run_ranks(_run_cases, 2, [*CASES_2, checkpoint], timeout=240), 2)


def test_epmoe_one_rank():
    _check(run_ranks(_run_cases, 1, CASES_1), 1)


def test_epmoe_four_ranks():
    _check(run_ranks(_run_cases, 4, CASES_4, timeout=240), 4)


# ---------------------------------------------------------------------------------------------
# Input validation and construction errors (one rank)
# ---------------------------------------------------------------------------------------------


def _errors(rank: int, world: int) -> list[str]:
    from ep_runtime.layer import EPMoE

    plan = _config(world, dict(mode="auto"))
    layer = EPMoE(plan, rank=rank, check_finite=True, debug=True)
    msgs = []
    bad_inputs = [
        (torch.randn(3, D // 2).bfloat16(), {}),
        (torch.randn(3, D).half(), {}),
        (torch.randn(D).bfloat16(), {}),
        ([[0.0] * D], {}),
        (torch.full((2, D), float("nan")).bfloat16(), {}),
        (torch.randn(2, D).bfloat16(), {"is_prefill": 1}),
    ]
    for x, kw in bad_inputs:
        try:
            layer(x, **kw)
            msgs.append("no error")
        except ValueError as exc:
            msgs.append(str(exc))
    layer.close()
    try:
        layer(torch.randn(2, D).bfloat16())
    except RuntimeError as exc:
        msgs.append(str(exc))
    for kw in (dict(rank=3), dict(rank=0, device="cuda")):
        try:
            EPMoE(plan, **kw)
            msgs.append("no error")
        except ValueError as exc:
            msgs.append(str(exc))
    try:
        EPMoE(plan, rank=0, weights="nope")
        msgs.append("no error")
    except ValueError as exc:
        msgs.append(str(exc))
    return msgs


def test_input_and_construction_errors():
    (msgs,) = run_ranks(_errors, 1)
    expected = [
        r"hidden must be \[T, 128\]",
        r"hidden.dtype must be one of bfloat16, float32 on cpu",
        r"hidden must be \[T, 128\]",
        r"hidden must be a torch.Tensor",
        r"hidden holds non-finite values",
        r"is_prefill must be a bool",
        r"after close",
        r"rank \(3\) must be an int in \[0, 1\)",
        r"device \(cuda\) does not match parallel.device 'cpu'",
        r"weights must be MoEWeights",
    ]
    import re

    assert len(msgs) == len(expected), msgs
    for m, e in zip(msgs, expected, strict=True):
        assert re.search(e, m), (e, m)


# ---------------------------------------------------------------------------------------------
# Expert implementations on identical dispatched tokens (no communication)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme,fp8_in",
    [("bf16", False), ("bf16", True), ("fp8_block", True), ("fp8_block", False), ("w4a8", False)],
)
def test_experts_implementations_agree(scheme, fp8_in, rng_seed):
    """torch and triton (interpreted) experts vs float32 references on the same inputs, both
    layouts: the low-latency one against the kernels' own masked reference (per-tensor w4a8)."""
    from ep_runtime.experts import get_experts
    from ep_runtime.kernels.masked_grouped_gemm import masked_moe_reference
    from ep_runtime.kernels.quant import per_token_group_quant_fp8
    from ep_runtime.reference import qdq_per_token_group, reference_expert
    from ep_runtime.types import DispatchedTokens, Layout
    from ep_runtime.weights import build_local_weights

    plan = _config(1, dict(mode="auto", model=dict(weights=scheme, num_experts=4, top_k=2)))
    ex = build_local_weights(plan.config.model, rank=0, ep_size=1).experts
    impls = {
        "torch": get_experts("torch")(plan),
        "triton": get_experts("triton")(dataclasses.replace(plan, experts_impl="triton")),
    }

    # Low-latency layout: [L, M, D] with garbage past each expert's count.
    counts = torch.tensor([3, 0, 6, 1], dtype=torch.int32)
    x = torch.randn(4, 6, D)
    is_valid = (torch.arange(6) < counts[:, None].long()).unsqueeze(-1)
    x = torch.where(is_valid, x, 1e3).bfloat16()
    if fp8_in:
        xq, xs = per_token_group_quant_fp8(x, 128, column_major_scales=True)
        ll = DispatchedTokens(Layout.LOW_LATENCY, xq, xs, counts)
        ref = masked_moe_reference(
            xq, counts, ex.w13, ex.w2, scheme=scheme, x_scale=xs, w13_scale=ex.w13_scale, w2_scale=ex.w2_scale
        )
    else:
        ll = DispatchedTokens(Layout.LOW_LATENCY, x, None, counts)
        ref = masked_moe_reference(
            x, counts, ex.w13, ex.w2, scheme=scheme, w13_scale=ex.w13_scale, w2_scale=ex.w2_scale
        )
    ref = torch.where(is_valid, ref, 0)
    for name, impl in impls.items():
        out = torch.where(is_valid, impl.forward(ll, ex).float(), 0)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < (1e-2 if name == "torch" else TRITON_TOL), (name, "low_latency", rel)

    # Normal layout: [N, D] rows with local top-k ids (-1 = elsewhere) and weights.
    xn = torch.randn(5, D).bfloat16()
    ids = torch.tensor([[0, 2], [-1, 3], [2, -1], [1, 0], [-1, -1]])
    w = torch.rand(5, 2)
    w13f, w2f = ex.dequantized()
    xin = qdq_per_token_group(xn.float()) if scheme != "bf16" or fp8_in else xn.float()
    ref = torch.zeros(5, D)
    for t in range(5):
        for k in range(2):
            e = int(ids[t, k])
            if e >= 0:
                y = reference_expert(xin[t : t + 1], w13f[e], w2f[e], quantize_activations=scheme != "bf16")
                ref[t] += w[t, k] * y[0]
    if fp8_in:
        xq, xs = per_token_group_quant_fp8(xn, 128)
        nd = DispatchedTokens(Layout.NORMAL, xq, xs, torch.tensor([2, 1, 2, 1], dtype=torch.int32), ids, w)
    else:
        nd = DispatchedTokens(Layout.NORMAL, xn, None, torch.tensor([2, 1, 2, 1], dtype=torch.int32), ids, w)
    for name, impl in impls.items():
        out = impl.forward(nd, ex).float()
        assert out.shape == (5, D) and torch.all(out[4] == 0)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < (1e-2 if name == "torch" else TRITON_TOL), (name, "normal", rel)


def test_experts_supports_is_checked_at_construction(monkeypatch):
    from ep_runtime.experts import available_experts, get_experts
    from ep_runtime.layer import EPMoE
    from ep_runtime.types import Layout

    assert available_experts() == ["torch", "triton"]
    plan = dataclasses.replace(_config(1, dict(mode="auto")), experts_impl="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = get_experts("triton").supports(plan, Layout.NORMAL)
    assert not ok and "parallel.device 'cuda'" in reason
    with pytest.raises(ValueError, match="kernels.experts 'triton' cannot serve the normal layout"):
        EPMoE(plan, rank=0)
    with pytest.raises(ValueError, match="kernels.experts 'cuda' is unknown; allowed: torch, triton"):
        get_experts("cuda")


def test_bench_layer_cpu_smoke(tmp_path):
    """The layer benchmark's whole flow on 2 CPU ranks at a tiny shape (timings, isolation, verify)."""
    import json

    from benchmarks import bench_layer

    rc = bench_layer.main(
        "--device cpu --backend torch --hidden 128 --num-experts 8 --inter 128 --topk 2 --n-group 4 "
        f"--topk-group 2 --prefill-tokens 24 --decode-tokens 6 --iters 2 --warmup 1 --weights fp8_block "
        f"--out-dir {tmp_path}".split()
    )
    (path,) = tmp_path.glob("*layer-torch.json")
    doc = json.loads(path.read_text())
    assert rc == 0 and doc["passed"], doc
    rows = doc["rows"]
    assert {(r["rank"], r["phase"], r["layout"]) for r in rows} == {
        (0, "prefill", "normal"),
        (1, "prefill", "normal"),
        (0, "decode", "low_latency"),
        (1, "decode", "low_latency"),
    }
    for r in rows:
        assert r["verify"]["passed"] and r["isolated_ms"]["sum"] > 0 and r["stages_sum_ms"] > 0
