"""Synthetic weights (determinism, sharding, schemes) and safetensors checkpoint loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ep_runtime.config import ModelConfig
from ep_runtime.kernels.quant import FP8_DTYPE, quantize_fp8_block
from ep_runtime.weights import (
    CheckpointError,
    CheckpointReader,
    build_local_weights,
    checkpoint_local_weights,
    dequantize_scheme,
    expert_provider,
    local_expert_ids,
    synthetic_expert,
    synthetic_local_weights,
    synthetic_router,
)

D, I, E = 128, 128, 4  # noqa: E741 - the design doc's names


def _model(**kw) -> ModelConfig:
    base = dict(hidden_size=D, num_experts=E, top_k=2, moe_intermediate_size=I, seed=7)
    base.update(kw)
    return ModelConfig(**base)


# ---------------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_expert_and_rank_independent():
    m = _model(num_experts=8, use_correction_bias=True)
    full = synthetic_local_weights(m, range(8))
    for rank in range(4):
        ids = local_expert_ids(8, 4, rank)
        assert ids == (2 * rank, 2 * rank + 1)
        part = synthetic_local_weights(m, ids)
        assert torch.equal(part.experts.w13, full.experts.w13[2 * rank : 2 * rank + 2])
        assert torch.equal(part.experts.w2, full.experts.w2[2 * rank : 2 * rank + 2])
        assert torch.equal(part.router.weight, full.router.weight)
        assert torch.equal(part.router.correction_bias, full.router.correction_bias)
    a13, _ = synthetic_expert(m, 0, 3)
    b13, _ = synthetic_expert(m, 0, 3)
    assert torch.equal(a13, b13)
    assert not torch.equal(a13, synthetic_expert(m, 0, 4)[0])  # experts differ
    assert not torch.equal(a13, synthetic_expert(m, 1, 3)[0])  # layers differ
    assert not torch.equal(a13, synthetic_expert(_model(seed=8), 0, 3)[0])  # seeds differ
    assert synthetic_router(_model(), 0).correction_bias is None
    # Scale: rows of std ~ 1/sqrt(D) (gate/up) and 1/sqrt(I) (down).
    w13, w2 = synthetic_expert(_model(hidden_size=512, moe_intermediate_size=256), 0, 0)
    assert abs(w13.std().item() * 512**0.5 - 1) < 0.05 and abs(w2.std().item() * 256**0.5 - 1) < 0.05


def test_placement_and_errors():
    placement = [[3, 0], [1, 2]]
    assert local_expert_ids(4, 2, 0, placement) == (3, 0)
    w = synthetic_local_weights(_model(), local_expert_ids(4, 2, 0, placement))
    assert torch.equal(w.experts.w13[0], synthetic_expert(_model(), 0, 3)[0].bfloat16())
    with pytest.raises(ValueError, match="permutation"):
        local_expert_ids(4, 2, 0, [[0, 0], [1, 2]])
    with pytest.raises(ValueError, match=r"placement must be \[2\]\[2\]"):
        local_expert_ids(4, 2, 0, [[0, 1, 2], [3]])
    with pytest.raises(ValueError, match="divisible"):
        local_expert_ids(5, 2, 0)
    with pytest.raises(ValueError, match=r"rank \(2\)"):
        local_expert_ids(4, 2, 2)


@pytest.mark.parametrize(
    "scheme,dtype,shape13,scale13,tol",
    [
        ("bf16", torch.bfloat16, (2, 2 * I, D), None, 0.01),
        ("fp8_block", FP8_DTYPE, (2, 2 * I, D), (2, 2, 1), 0.06),
        ("w4a8", torch.uint8, (2, 2 * I, D // 2), (2, 2 * I, 1), 0.2),
    ],
)
def test_schemes(scheme, dtype, shape13, scale13, tol):
    m = _model(weights=scheme)
    w = build_local_weights(m, rank=1, ep_size=2)
    ex = w.experts
    assert ex.expert_ids == (2, 3) and ex.scheme == scheme
    assert ex.w13.dtype == dtype and tuple(ex.w13.shape) == shape13
    assert (ex.w13_scale is None) == (scale13 is None)
    if scale13:
        assert tuple(ex.w13_scale.shape) == scale13
    d13, d2 = ex.dequantized()
    m13, m2 = synthetic_expert(m, 0, 3)
    assert ((d13[1] - m13).norm() / m13.norm()).item() < tol
    assert ((d2[1] - m2).norm() / m2.norm()).item() < tol
    # The reference provider reproduces exactly what the rank holds.
    p13, p2 = expert_provider(m)(3)
    assert torch.equal(p13, d13[1]) and torch.equal(p2, d2[1])
    with pytest.raises(ValueError, match="scheme 'int3' is unknown"):
        dequantize_scheme("int3", ex.w13, ex.w2, None, None)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _names(fmt: str, layer: int, e: int) -> tuple[str, str, str]:
    if fmt == "mixtral":
        b = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
        return f"{b}.w1.weight", f"{b}.w3.weight", f"{b}.w2.weight"
    b = f"model.layers.{layer}.mlp.experts.{e}"
    return f"{b}.gate_proj.weight", f"{b}.up_proj.weight", f"{b}.down_proj.weight"


def _router_key(fmt: str, layer: int) -> str:
    return f"model.layers.{layer}.{'block_sparse_moe' if fmt == 'mixtral' else 'mlp'}.gate.weight"


def _write_checkpoint(path, fmt: str, *, layer: int = 1, experts=range(E), layout: str = "file", fp8=False):
    """A tiny HF-named checkpoint with random weights; returns {key: tensor} of what it holds."""
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for e in experts:
        gate, up, down = _names(fmt, layer, e)
        tensors[gate] = torch.randn(I, D, generator=g) / D**0.5
        tensors[up] = torch.randn(I, D, generator=g) / D**0.5
        tensors[down] = torch.randn(D, I, generator=g) / I**0.5
    tensors[_router_key(fmt, layer)] = torch.randn(E, D, generator=g) / D**0.5
    if fmt == "deepseek_v3":
        tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = torch.randn(E, generator=g) * 0.1
    tensors["model.embed_tokens.weight"] = torch.randn(8, D, generator=g)  # unrelated tensor
    stored = {k: v.bfloat16() for k, v in tensors.items()}
    if fp8:
        for k in list(stored):
            if ".experts." in k:
                q, s = quantize_fp8_block(tensors[k])
                stored[k] = q
                stored[k.removesuffix(".weight") + ".weight_scale_inv"] = s
    if layout == "file":
        save_file(stored, str(path / "model.safetensors"))
        return path / "model.safetensors", stored
    keys = sorted(stored)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: stored[k] for k in ks}, str(path / name))
    if layout == "index":
        weight_map = {k: name for name, ks in shards.items() for k in ks}
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return path, stored


@pytest.mark.parametrize(
    "fmt,layout",
    [("deepseek_v3", "index"), ("qwen_moe", "dir"), ("mixtral", "file")],
)
def test_checkpoint_formats_read_only_local_tensors(tmp_path, fmt, layout):
    path, stored = _write_checkpoint(tmp_path, fmt, layout=layout)
    m = _model(checkpoint=str(path), layer_index=1, use_correction_bias=fmt == "deepseek_v3")
    reader = CheckpointReader(path)
    w = checkpoint_local_weights(m, local_expert_ids(E, 2, 1), reader=reader)
    # Only rank 1's experts (2, 3) and the router were read.
    local = {k for e in (2, 3) for k in _names(fmt, 1, e)}
    extra = {_router_key(fmt, 1)} | (
        {"model.layers.1.mlp.gate.e_score_correction_bias"} if fmt == "deepseek_v3" else set()
    )
    assert set(reader.read_keys) == local | extra
    gate, up, down = _names(fmt, 1, 3)
    torch.testing.assert_close(w.experts.w13[1], torch.cat([stored[gate], stored[up]]), rtol=0, atol=0)
    torch.testing.assert_close(w.experts.w2[1], stored[down], rtol=0, atol=0)
    torch.testing.assert_close(w.router.weight, stored[_router_key(fmt, 1)], rtol=0, atol=0)
    if fmt == "deepseek_v3":
        torch.testing.assert_close(
            w.router.correction_bias, stored["model.layers.1.mlp.gate.e_score_correction_bias"].float()
        )
    # The provider (for the reference) reads the same values; build_local_weights uses the checkpoint.
    p13, p2 = expert_provider(m)(3)
    torch.testing.assert_close(p13, w.experts.w13[1].float(), rtol=0, atol=0)
    b = build_local_weights(m, rank=1, ep_size=2)
    assert torch.equal(b.experts.w13, w.experts.w13)


def test_checkpoint_with_only_local_experts_and_missing_tensor_errors(tmp_path):
    path, _ = _write_checkpoint(tmp_path, "qwen_moe", experts=[0, 1])
    m = _model(checkpoint=str(path), layer_index=1, weights="fp8_block")
    w = build_local_weights(m, rank=0, ep_size=2)  # rank 0 only needs experts 0 and 1
    assert w.experts.w13.dtype == FP8_DTYPE
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.2\.gate_proj\.weight' is missing"
    ):
        build_local_weights(m, rank=1, ep_size=2)


def test_checkpoint_errors(tmp_path):
    path, stored = _write_checkpoint(tmp_path, "mixtral", layout="file")
    with pytest.raises(CheckpointError, match="cannot detect"):
        build_local_weights(_model(checkpoint=str(path), layer_index=0), rank=0, ep_size=1)
    with pytest.raises(CheckpointError, match="no score-correction bias"):
        build_local_weights(
            _model(checkpoint=str(path), layer_index=1, use_correction_bias=True), rank=0, ep_size=1
        )
    bad = dict(stored)
    bad[_names("mixtral", 1, 0)[2]] = torch.zeros(D, I // 2, dtype=torch.bfloat16)
    save_file(bad, str(path))
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.1\.block_sparse_moe\.experts\.0\.w2\.weight' has shape \(128, 64\), expected \(128, 128\)",
    ):
        build_local_weights(_model(checkpoint=str(path), layer_index=1), rank=0, ep_size=2)
    with pytest.raises(CheckpointError, match="no such file"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        CheckpointReader(tmp_path / "empty")
    with pytest.raises(ValueError, match="checkpoint_format"):
        _model(checkpoint=str(path), checkpoint_format="llama")


def test_fp8_checkpoint_with_block_scales(tmp_path):
    path, _ = _write_checkpoint(tmp_path, "deepseek_v3", fp8=True)
    m = _model(checkpoint=str(path), layer_index=1, use_correction_bias=True, checkpoint_format="deepseek_v3")
    w = build_local_weights(m, rank=0, ep_size=1)
    g = torch.Generator().manual_seed(11)
    gate = torch.randn(I, D, generator=g) / D**0.5
    rel = ((w.experts.w13[0, :I].float() - gate).norm() / gate.norm()).item()
    assert rel < 0.06
