"""MoE layer weights: synthetic (deterministic from a seed) or read from a local safetensors checkpoint,
sharded by rank and converted to the expert weights scheme.

Layout everywhere (DESIGN.md): `w13 [L, 2I, D]` (gate rows `[0, I)`, up rows `[I, 2I)`), `w2 [L, D, I]`;
expert MLP = `down(silu(gate x) * up x)`. Schemes:

- `bf16`: `w13`/`w2` bfloat16, no scales.
- `fp8_block`: float8_e4m3fn with one fp32 scale per 128x128 tile: `w13_scale [L, 2I/128, D/128]`,
  `w2_scale [L, D/128, I/128]` (`kernels.quant.quantize_fp8_block`).
- `w4a8`: INT4 packed two per byte along K: `w13 [L, 2I, D/2]` uint8, `w2 [L, D, I/2]` uint8, with
  one fp32 scale per (row, 128 channels of K): `w13_scale [L, 2I, D/128]`, `w2_scale [L, D, I/128]`
  (`kernels.quant.quantize_w4a8`).

Synthetic weights: expert `e` of layer `l` comes from its own `torch.Generator` seeded from
`(model.seed, l, e)`, so any rank (and the reference) can regenerate any expert without the others;
the router weight and correction bias likewise (identical on every rank). Values are drawn on the
target device, so they are identical across ranks of one run (same device type) but CPU and CUDA
runs draw different values. Scales keep activations O(1) through stacked layers: gate/up rows have
std `1/sqrt(D)`, down rows std `1/sqrt(I)`, router rows std `1/sqrt(D)`.

Checkpoints (Hugging Face naming; file or directory of shards, with or without
`model.safetensors.index.json`): only the local experts' tensors and the router are read
(`safe_open` + per-tensor `get_tensor`), so host memory is proportional to `L`, not `E`.
Real DeepSeek-V3 checkpoints store fp8 weights with `*.weight_scale_inv` block scales: those are
dequantised on read and converted to the scheme like any other weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ep_runtime.config import ModelConfig
from ep_runtime.kernels.quant import (
    FP8_DTYPE,
    dequantize_fp8_block,
    dequantize_w4a8,
    quantize_fp8_block,
    quantize_w4a8,
)

SCHEMES = ("bf16", "fp8_block", "w4a8")
CHECKPOINT_FORMATS = ("deepseek_v3", "qwen_moe", "mixtral")

# Tags mixed into the synthetic seeds so expert, router and bias streams never coincide.
_TAG_EXPERT, _TAG_ROUTER, _TAG_BIAS = 1, 2, 3
_MASK63 = (1 << 63) - 1

ExpertProvider = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""`provider(e) -> (w13 [2I, D], w2 [D, I])` float32: global expert `e` with the scheme's dequantised values."""


# ---------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterWeights:
    """The router of one layer, identical on every rank.

    Attributes:
        weight: `[E, D]` bfloat16 router (gate) weight.
        correction_bias: `[E]` float32 score-correction bias (selection only), or None.
    """

    weight: torch.Tensor
    correction_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class LocalExperts:
    """This rank's `L` experts in the chosen scheme (see the module docstring for shapes).

    Attributes:
        scheme: `bf16`, `fp8_block` or `w4a8`.
        expert_ids: the global expert id of each local slot, length `L`.
        w13, w2: stacked weights; w13_scale, w2_scale: float32 scales (None for bf16).
        hidden_size, intermediate_size: `D`, `I`.
    """

    scheme: str
    expert_ids: tuple[int, ...]
    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor | None
    w2_scale: torch.Tensor | None
    hidden_size: int
    intermediate_size: int

    @property
    def num_local_experts(self) -> int:
        return len(self.expert_ids)

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def dequantized(
        self, start: int = 0, end: int | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local experts `[start, end)` with the scheme's dequantised values:
        `w13 [n, 2I, D]`, `w2 [n, D, I]` in `dtype`."""
        end = self.num_local_experts if end is None else end
        return dequantize_scheme(
            self.scheme,
            self.w13[start:end],
            self.w2[start:end],
            None if self.w13_scale is None else self.w13_scale[start:end],
            None if self.w2_scale is None else self.w2_scale[start:end],
            dtype,
        )


@dataclass(frozen=True)
class MoEWeights:
    """Everything one rank's MoE layer holds."""

    router: RouterWeights
    experts: LocalExperts


# ---------------------------------------------------------------------------------------------
# Scheme conversion
# ---------------------------------------------------------------------------------------------


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme '{scheme}' is unknown; allowed: {', '.join(SCHEMES)}")


def convert_to_scheme(
    scheme: str, w13: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Convert float weights `w13 [..., 2I, D]`, `w2 [..., D, I]` to `scheme`:
    returns `(w13, w2, w13_scale, w2_scale)` as described in the module docstring."""
    _check_scheme(scheme)
    if scheme == "bf16":
        return w13.to(torch.bfloat16), w2.to(torch.bfloat16), None, None
    if scheme == "fp8_block":
        w13_q, s13 = quantize_fp8_block(w13, 128)
        w2_q, s2 = quantize_fp8_block(w2, 128)
        return w13_q, w2_q, s13, s2
    w13_q, s13 = quantize_w4a8(w13, 128)
    w2_q, s2 = quantize_w4a8(w2, 128)
    return w13_q, w2_q, s13, s2


def dequantize_scheme(
    scheme: str,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `convert_to_scheme`: the values the scheme's experts compute with, in `dtype`."""
    _check_scheme(scheme)
    if scheme == "bf16":
        return w13.to(dtype), w2.to(dtype)
    if scheme == "fp8_block":
        return (
            dequantize_fp8_block(w13, w13_scale, 128, out_dtype=dtype),
            dequantize_fp8_block(w2, w2_scale, 128, out_dtype=dtype),
        )
    return (
        dequantize_w4a8(w13, w13_scale, 128, out_dtype=dtype),
        dequantize_w4a8(w2, w2_scale, 128, out_dtype=dtype),
    )


def _empty_scheme_tensors(
    scheme: str, num: int, d: int, i: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if scheme == "bf16":
        return (
            torch.empty(num, 2 * i, d, dtype=torch.bfloat16, device=device),
            torch.empty(num, d, i, dtype=torch.bfloat16, device=device),
            None,
            None,
        )
    if scheme == "fp8_block":
        return (
            torch.empty(num, 2 * i, d, dtype=FP8_DTYPE, device=device),
            torch.empty(num, d, i, dtype=FP8_DTYPE, device=device),
            torch.empty(num, math.ceil(2 * i / 128), math.ceil(d / 128), device=device),
            torch.empty(num, math.ceil(d / 128), math.ceil(i / 128), device=device),
        )
    return (
        torch.empty(num, 2 * i, d // 2, dtype=torch.uint8, device=device),
        torch.empty(num, d, i // 2, dtype=torch.uint8, device=device),
        torch.empty(num, 2 * i, d // 128, device=device),
        torch.empty(num, d, i // 128, device=device),
    )


def _stack_local(
    scheme: str,
    expert_ids: Sequence[int],
    d: int,
    i: int,
    device: torch.device,
    fetch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
) -> LocalExperts:
    """Fill the stacked scheme tensors one expert at a time (peak extra memory: one float expert)."""
    w13, w2, s13, s2 = _empty_scheme_tensors(scheme, len(expert_ids), d, i, device)
    for slot, e in enumerate(expert_ids):
        f13, f2 = fetch(e)
        c13, c2, cs13, cs2 = convert_to_scheme(scheme, f13, f2)
        w13[slot].copy_(c13)
        w2[slot].copy_(c2)
        if s13 is not None:
            s13[slot].copy_(cs13)
            s2[slot].copy_(cs2)
    return LocalExperts(
        scheme=scheme,
        expert_ids=tuple(int(e) for e in expert_ids),
        w13=w13,
        w2=w2,
        w13_scale=s13,
        w2_scale=s2,
        hidden_size=d,
        intermediate_size=i,
    )


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


def local_expert_ids(
    num_experts: int, ep_size: int, rank: int, placement: Sequence[Sequence[int]] | None = None
) -> tuple[int, ...]:
    """Global ids of `rank`'s local experts: `[rank*L, (rank+1)*L)` by default, or `placement[rank]`.

    `placement`, when given, is `[R][L]`: every rank's list of global expert ids; together they
    must be a permutation of `range(E)`.
    """
    if ep_size <= 0 or num_experts % ep_size:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
    if not 0 <= rank < ep_size:
        raise ValueError(f"rank ({rank}) must be in [0, {ep_size})")
    n_local = num_experts // ep_size
    if placement is None:
        return tuple(range(rank * n_local, (rank + 1) * n_local))
    if len(placement) != ep_size or any(len(p) != n_local for p in placement):
        raise ValueError(f"placement must be [{ep_size}][{n_local}] (ranks x local experts)")
    flat = sorted(int(e) for p in placement for e in p)
    if flat != list(range(num_experts)):
        raise ValueError(f"placement must be a permutation of range({num_experts})")
    return tuple(int(e) for e in placement[rank])


# ---------------------------------------------------------------------------------------------
# Synthetic weights
# ---------------------------------------------------------------------------------------------


def _seed(seed: int, layer: int, tag: int, index: int) -> int:
    h = (seed & _MASK63) * 0x9E3779B1 + layer * 0x85EBCA77 + tag * 0xC2B2AE3D + (index + 1) * 0x27D4EB2F
    h ^= h >> 29
    return (h * 0x165667B1) & _MASK63


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def synthetic_expert(
    model: ModelConfig, layer: int, expert_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 master weights of global expert `expert_id`: `w13 [2I, D]`, `w2 [D, I]`."""
    if not 0 <= expert_id < model.num_experts:
        raise ValueError(f"expert_id ({expert_id}) must be in [0, {model.num_experts})")
    device = torch.device(device)
    d, i = model.hidden_size, model.moe_intermediate_size
    g = _generator(device, _seed(model.seed, layer, _TAG_EXPERT, expert_id))
    w13 = torch.randn(2 * i, d, generator=g, device=device) * (1.0 / math.sqrt(d))
    w2 = torch.randn(d, i, generator=g, device=device) * (1.0 / math.sqrt(i))
    return w13, w2


def synthetic_router(model: ModelConfig, layer: int, device: torch.device | str = "cpu") -> RouterWeights:
    """Router weight `[E, D]` bfloat16 (std 1/sqrt(D)) and, when the model uses it, a correction
    bias `[E]` float32 (std 0.1, mixed in by selection only)."""
    device = torch.device(device)
    e, d = model.num_experts, model.hidden_size
    g = _generator(device, _seed(model.seed, layer, _TAG_ROUTER, 0))
    weight = (torch.randn(e, d, generator=g, device=device) * (1.0 / math.sqrt(d))).to(torch.bfloat16)
    bias = None
    if model.use_correction_bias:
        gb = _generator(device, _seed(model.seed, layer, _TAG_BIAS, 0))
        bias = torch.randn(e, generator=gb, device=device) * 0.1
    return RouterWeights(weight=weight, correction_bias=bias)


def synthetic_local_weights(
    model: ModelConfig,
    expert_ids: Sequence[int],
    *,
    layer: int = 0,
    device: torch.device | str = "cpu",
    scheme: str | None = None,
) -> MoEWeights:
    """Router plus the synthetic experts `expert_ids`, converted to `scheme` (default `model.weights`)."""
    device = torch.device(device)
    scheme = scheme or model.weights
    experts = _stack_local(
        scheme,
        expert_ids,
        model.hidden_size,
        model.moe_intermediate_size,
        device,
        lambda e: synthetic_expert(model, layer, e, device),
    )
    return MoEWeights(router=synthetic_router(model, layer, device), experts=experts)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that cannot serve this layer (missing tensor, wrong shape, unknown naming)."""


class CheckpointReader:
    """Reads single tensors from a safetensors file or a directory of shards.

    Only headers are read up front (to map keys to files); `get(key)` reads one tensor.
    `read_keys` records every tensor read, so tests can check that only local experts were touched.
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        p = Path(path)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = []
            index = p / "model.safetensors.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as exc:
                    raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
                self._key_file = {k: p / f for k, f in weight_map.items()}
                self.path = p
                self.read_keys: list[str] = []
                return
            files = sorted(p.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"model.checkpoint: no *.safetensors files in {p}")
        else:
            raise CheckpointError(f"model.checkpoint: no such file or directory: {p}")
        self._key_file: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for k in h.keys():
                    self._key_file[k] = f
        self.path = p
        self.read_keys = []

    def keys(self) -> list[str]:
        return list(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def get(self, key: str) -> torch.Tensor:
        f = self._key_file.get(key)
        if f is None:
            raise CheckpointError(f"checkpoint {self.path}: tensor '{key}' is missing")
        if not f.is_file():
            raise CheckpointError(f"checkpoint {self.path}: shard {f.name} (holding '{key}') is missing")
        with self._safe_open(str(f), framework="pt", device="cpu") as h:
            t = h.get_tensor(key)
        self.read_keys.append(key)
        return t


@dataclass(frozen=True)
class _Naming:
    gate: str
    up: str
    down: str
    router: str
    bias: str | None


def _naming(fmt: str, layer: int) -> _Naming:
    if fmt == "mixtral":
        b = f"model.layers.{layer}.block_sparse_moe"
        return _Naming(
            gate=b + ".experts.{e}.w1.weight",
            up=b + ".experts.{e}.w3.weight",
            down=b + ".experts.{e}.w2.weight",
            router=f"{b}.gate.weight",
            bias=None,
        )
    b = f"model.layers.{layer}.mlp"
    return _Naming(
        gate=b + ".experts.{e}.gate_proj.weight",
        up=b + ".experts.{e}.up_proj.weight",
        down=b + ".experts.{e}.down_proj.weight",
        router=f"{b}.gate.weight",
        bias=f"{b}.gate.e_score_correction_bias" if fmt == "deepseek_v3" else None,
    )


def detect_checkpoint_format(reader: CheckpointReader, layer: int) -> str:
    """`mixtral` if the layer has `block_sparse_moe` tensors; `deepseek_v3` if it has
    `mlp.gate.e_score_correction_bias`; `qwen_moe` if it has `mlp.experts.*`."""
    keys = reader.keys()
    if any(k.startswith(f"model.layers.{layer}.block_sparse_moe.") for k in keys):
        return "mixtral"
    if f"model.layers.{layer}.mlp.gate.e_score_correction_bias" in reader:
        return "deepseek_v3"
    if any(k.startswith(f"model.layers.{layer}.mlp.experts.") for k in keys):
        return "qwen_moe"
    raise CheckpointError(
        f"checkpoint {reader.path}: cannot detect model.checkpoint_format for layer {layer}: no "
        f"'model.layers.{layer}.block_sparse_moe.*' or 'model.layers.{layer}.mlp.experts.*' tensors; "
        f"allowed formats: {', '.join(CHECKPOINT_FORMATS)}"
    )


class CheckpointExperts:
    """Reads one layer's router and experts from a checkpoint, one expert at a time."""

    def __init__(self, model: ModelConfig, layer: int | None = None, reader: CheckpointReader | None = None):
        if model.checkpoint is None and reader is None:
            raise ValueError("model.checkpoint is not set")
        self.model = model
        self.layer = model.layer_index if layer is None else layer
        self.reader = reader or CheckpointReader(model.checkpoint)
        fmt = model.checkpoint_format
        if fmt == "auto":
            fmt = detect_checkpoint_format(self.reader, self.layer)
        elif fmt not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"model.checkpoint_format '{fmt}' is unknown; allowed: auto, {', '.join(CHECKPOINT_FORMATS)}"
            )
        self.format = fmt
        self.names = _naming(fmt, self.layer)

    def _read(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.reader.get(key)
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"checkpoint {self.reader.path}: tensor '{key}' has shape {tuple(t.shape)}, expected {shape}"
            )
        if t.dtype == FP8_DTYPE:
            scale_key = key.removesuffix(".weight") + ".weight_scale_inv"
            if scale_key not in self.reader:
                raise CheckpointError(
                    f"checkpoint {self.reader.path}: fp8 tensor '{key}' has no block scales '{scale_key}'"
                )
            scale = self.reader.get(scale_key).float()
            expect = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
            if tuple(scale.shape) != expect:
                raise CheckpointError(
                    f"checkpoint {self.reader.path}: tensor '{scale_key}' has shape {tuple(scale.shape)}, "
                    f"expected {expect}"
                )
            return dequantize_fp8_block(t, scale, 128, out_dtype=torch.float32)
        if not t.is_floating_point():
            raise CheckpointError(f"checkpoint {self.reader.path}: tensor '{key}' has dtype {t.dtype}")
        return t.float()

    def expert(self, e: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 `w13 [2I, D]` (gate rows then up rows) and `w2 [D, I]` of global expert `e`."""
        m = self.model
        if not 0 <= e < m.num_experts:
            raise ValueError(f"expert_id ({e}) must be in [0, {m.num_experts})")
        d, i = m.hidden_size, m.moe_intermediate_size
        gate = self._read(self.names.gate.format(e=e), (i, d))
        up = self._read(self.names.up.format(e=e), (i, d))
        down = self._read(self.names.down.format(e=e), (d, i))
        return torch.cat([gate, up], 0).to(device), down.to(device)

    def router(self, device: torch.device | str = "cpu") -> RouterWeights:
        m = self.model
        weight = self._read(self.names.router, (m.num_experts, m.hidden_size)).to(torch.bfloat16)
        bias = None
        if m.use_correction_bias:
            if self.names.bias is None:
                raise CheckpointError(
                    f"model.use_correction_bias is set but checkpoint format '{self.format}' has no "
                    "score-correction bias (only deepseek_v3 does)"
                )
            bias = self._read(self.names.bias, (m.num_experts,))
            bias = bias.to(device)
        return RouterWeights(weight=weight.to(device), correction_bias=bias)


def checkpoint_local_weights(
    model: ModelConfig,
    expert_ids: Sequence[int],
    *,
    layer: int | None = None,
    device: torch.device | str = "cpu",
    scheme: str | None = None,
    reader: CheckpointReader | None = None,
) -> MoEWeights:
    """Router plus experts `expert_ids` read from `model.checkpoint`, converted to `scheme`."""
    device = torch.device(device)
    ck = CheckpointExperts(model, layer, reader)
    experts = _stack_local(
        scheme or model.weights,
        expert_ids,
        model.hidden_size,
        model.moe_intermediate_size,
        device,
        lambda e: tuple(t.to(device) for t in ck.expert(e)),
    )
    return MoEWeights(router=ck.router(device), experts=experts)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def build_local_weights(
    model: ModelConfig,
    *,
    rank: int,
    ep_size: int,
    device: torch.device | str = "cpu",
    layer: int | None = None,
    placement: Sequence[Sequence[int]] | None = None,
) -> MoEWeights:
    """This rank's weights: from `model.checkpoint` when set, else synthetic from `model.seed`."""
    ids = local_expert_ids(model.num_experts, ep_size, rank, placement)
    layer = model.layer_index if layer is None else layer
    if model.checkpoint is not None:
        return checkpoint_local_weights(model, ids, layer=layer, device=device)
    return synthetic_local_weights(model, ids, layer=layer, device=device)


def reference_router(model: ModelConfig, *, device: torch.device | str = "cpu", layer: int | None = None):
    """The router of the layer (same values every rank builds)."""
    layer = model.layer_index if layer is None else layer
    if model.checkpoint is not None:
        return CheckpointExperts(model, layer).router(device)
    return synthetic_router(model, layer, device)


def expert_provider(
    model: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    layer: int | None = None,
    scheme: str | None = None,
) -> ExpertProvider:
    """A function `e -> (w13 [2I, D], w2 [D, I])` float32 on `device` holding global expert `e`'s
    values as the scheme's experts see them (converted to the scheme, then dequantised). It
    rebuilds one expert per call, so a verifier never holds all `E` experts at once."""
    device = torch.device(device)
    layer = model.layer_index if layer is None else layer
    scheme = scheme or model.weights
    _check_scheme(scheme)
    ck = CheckpointExperts(model, layer) if model.checkpoint is not None else None

    def provide(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if ck is not None:
            f13, f2 = (t.to(device) for t in ck.expert(e))
        else:
            f13, f2 = synthetic_expert(model, layer, e, device)
        return dequantize_scheme(scheme, *convert_to_scheme(scheme, f13, f2), torch.float32)

    return provide
