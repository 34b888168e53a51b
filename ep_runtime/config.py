"""The dispatch-mode file: schema, loading, the precision policy and the resolved runtime plan.

One YAML (or JSON) file configures a run. `load_config(path)` validates it into `EPConfig`
(pydantic v2; every unknown key, wrong type, out-of-range value or incompatible combination is a
`ConfigError` naming the field path and the allowed values), and `resolve_plan(config)` turns it
into an immutable `RuntimePlan`: per dispatch mode, the backend, the precision with the rule that
decided it, the layout, the low-latency capacity and the communication buffer sizes.

The precision policy is data: `PRECISION_POLICY` below, one row per (weights scheme, mode).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ep_runtime.types import FP8_GROUP, Layout, Precision


class ConfigError(ValueError):
    """A dispatch-mode file that cannot run. `errors` lists `(field path, message)` pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"{where}{len(errors)} error(s) in the dispatch-mode file:"]
        lines += [f"  {path}: {msg}" for path, msg in errors]
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

WeightsScheme = Literal["bf16", "fp8_block", "w4a8"]
PrecisionChoice = Literal["auto", "bf16", "fp8"]

# Hidden sizes DeepEP's low-latency kernels are compiled for (its SWITCH_HIDDEN list).
DEEPEP_LOW_LATENCY_HIDDEN_SIZES = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
# DeepEP's low-latency kernels take at most this many top-k slots per token.
DEEPEP_LOW_LATENCY_MAX_TOPK = 11
# NVLink peers per node that DeepEP's intranode kernels address.
DEEPEP_MAX_NVL_PEERS = 8
# DeepEP normal-mode kernel limits (revision 567632d): local experts per rank (its layout kernels
# run one thread per expert in a 128-thread block), top-k slots per token, and the per-warp TMA
# staging of the intranode dispatch (half a row plus an 8-byte barrier in 8 KiB; rows of a multiple
# of 32 bytes).
DEEPEP_NORMAL_MAX_LOCAL_EXPERTS = 128
DEEPEP_NORMAL_MAX_TOPK = 32
DEEPEP_INTRANODE_TMA_BYTES = 8192
# NVSHMEM's queue-pair depth DeepEP starts with unless NVSHMEM_QP_DEPTH says otherwise; a
# low-latency dispatch asserts depth >= 2 * (C + 1).
DEEPEP_DEFAULT_QP_DEPTH = 1024


def deepep_qp_depth() -> int:
    """The NVSHMEM queue-pair depth DeepEP will use in this environment."""
    import os

    raw = os.environ.get("NVSHMEM_QP_DEPTH", "")
    return int(raw) if raw.strip().isdigit() else DEEPEP_DEFAULT_QP_DEPTH


def deepep_default_num_qps(
    num_local_experts: int, num_sms: int, *, low_latency: bool, normal_internode: bool
) -> int:
    """DeepEP queue pairs per rank when the file leaves `dispatch.deepep.num_qps_per_rank` unset:
    low-latency kernels need at least one per local expert; internode normal kernels need
    num_sms / 2 or at least num_sms (DeepEP's own internode test uses max(num_sms, L))."""
    qps = num_local_experts if low_latency else 1
    if normal_internode:
        qps = max(qps, num_sms)
    return qps


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """The MoE layer's shape, routing and weights."""

    name: str = "synthetic"
    """A label for reports."""
    hidden_size: int = Field(gt=0, le=65536)
    """`D`: the model's hidden size."""
    num_experts: int = Field(gt=0, le=4096)
    """`E`: routed experts in the layer (global)."""
    top_k: int = Field(gt=0, le=64)
    """`K`: experts each token is sent to."""
    moe_intermediate_size: int = Field(gt=0, le=65536)
    """`I`: each expert's intermediate size (gate and up projections are `[I, D]`, down `[D, I]`)."""
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    """How router logits become scores: `softmax` (Mixtral, Qwen) or `sigmoid` (DeepSeek-V3)."""
    n_group: int | None = Field(default=None, gt=0)
    """Grouped top-k: experts are split into `n_group` groups (DeepSeek-V3: 8); None disables it."""
    topk_group: int | None = Field(default=None, gt=0)
    """Grouped top-k: tokens pick experts from their best `topk_group` groups (DeepSeek-V3: 4)."""
    use_correction_bias: bool = False
    """Add the score-correction bias (`e_score_correction_bias`) for selection only."""
    norm_topk_prob: bool = True
    """Renormalise the selected top-k scores to sum to 1 before scaling."""
    routed_scaling_factor: float = Field(default=1.0, gt=0)
    """Multiplies the combine weights (DeepSeek-V3: 2.5)."""
    weights: WeightsScheme = "bf16"
    """Expert weight scheme: `bf16`, `fp8_block` (e4m3, 128x128 block scales) or `w4a8`
    (int4 weights with per-128 group scales along K, fp8 activations)."""
    checkpoint: str | None = None
    """Path of a local safetensors checkpoint (file or directory); None = synthetic weights."""
    checkpoint_format: Literal["auto", "deepseek_v3", "qwen_moe", "mixtral"] = "auto"
    """Tensor naming of the checkpoint; `auto` detects it from the keys."""
    layer_index: int = Field(default=0, ge=0)
    """Which decoder layer's MoE block to load from the checkpoint."""
    seed: int = 0
    """Seed of synthetic weights (identical on every rank) and of the synthetic workload."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        errs = []
        if self.top_k > self.num_experts:
            errs.append(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if (self.n_group is None) != (self.topk_group is None):
            errs.append("n_group and topk_group must be given together (or both left out)")
        if self.n_group is not None and self.topk_group is not None:
            if self.num_experts % self.n_group:
                errs.append(f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                errs.append(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
            elif (
                self.num_experts % self.n_group == 0
                and self.topk_group * (self.num_experts // self.n_group) < self.top_k
            ):
                errs.append(
                    f"topk_group ({self.topk_group}) groups of {self.num_experts // self.n_group} experts "
                    f"hold fewer than top_k ({self.top_k}) experts"
                )
        if self.weights in ("fp8_block", "w4a8") and self.hidden_size % FP8_GROUP:
            errs.append(
                f"hidden_size ({self.hidden_size}) must be a multiple of 128 for weights '{self.weights}'"
            )
        if self.weights in ("fp8_block", "w4a8") and self.moe_intermediate_size % FP8_GROUP:
            errs.append(
                f"moe_intermediate_size ({self.moe_intermediate_size}) must be a multiple of 128 "
                f"for weights '{self.weights}'"
            )
        if errs:
            raise ValueError("; ".join(errs))
        return self


class ParallelConfig(_Section):
    """How many ranks, where they run, and how they talk."""

    ep_size: int = Field(gt=0, le=1024)
    """`R`: expert-parallel ranks (one process per GPU, or per CPU slot)."""
    nodes: int = Field(default=1, gt=0)
    """Nodes the ranks span."""
    ranks_per_node: int | None = Field(default=None, gt=0)
    """Ranks on each node; default `ep_size / nodes`."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where tensors live: `cuda` (one GPU per rank) or `cpu`."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; `auto` = nccl on cuda, gloo on cpu."""
    placement_strategy: Literal["auto", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "auto"
    """Ray placement-group strategy; `auto` = PACK on one node, SPREAD across nodes."""
    cpus_per_rank: float = Field(default=1, gt=0)
    """CPUs reserved for each rank's Ray actor."""
    rendezvous_host: str = "auto"
    """Address rank 0 listens on for the torch.distributed rendezvous; `auto` = loopback on one
    node, the node's IP across nodes."""

    @property
    def resolved_ranks_per_node(self) -> int:
        return self.ranks_per_node if self.ranks_per_node is not None else self.ep_size // self.nodes

    @property
    def resolved_dist_backend(self) -> str:
        if self.dist_backend != "auto":
            return self.dist_backend
        return "nccl" if self.device == "cuda" else "gloo"

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        errs = []
        if self.ranks_per_node is None and self.ep_size % self.nodes:
            errs.append(
                f"ep_size ({self.ep_size}) is not divisible by nodes ({self.nodes}); set ranks_per_node"
            )
        elif self.resolved_ranks_per_node * self.nodes != self.ep_size:
            errs.append(
                f"nodes ({self.nodes}) x ranks_per_node ({self.resolved_ranks_per_node}) must equal ep_size ({self.ep_size})"
            )
        if self.device == "cpu" and self.dist_backend == "nccl":
            errs.append("dist_backend 'nccl' needs device 'cuda'; allowed with device 'cpu': auto, gloo")
        if errs:
            raise ValueError("; ".join(errs))
        return self


class PerModePrecision(_Section):
    """Dispatch precision per mode: `auto` (the policy's default), `bf16` or `fp8`."""

    normal: PrecisionChoice = "auto"
    """Precision of normal-mode dispatch."""
    low_latency: PrecisionChoice = "auto"
    """Precision of low-latency dispatch."""


class AutoModeConfig(_Section):
    """How `mode: auto` picks a mode per step."""

    normal_above_tokens: int | None = Field(default=None, gt=0)
    """A decode step with more than this many tokens on any rank runs in normal mode; default `C`."""
    prefill_uses_normal: bool = True
    """Steps that carry prefill always run in normal mode."""


class DeepEPChunkConfig(_Section):
    """DeepEP normal-mode `Config` values for one direction (None = DeepEP's tuned default)."""

    num_max_nvl_chunked_send_tokens: int = Field(gt=0)
    """Tokens per NVLink send chunk."""
    num_max_nvl_chunked_recv_tokens: int = Field(gt=0)
    """Tokens the NVLink receive ring holds per channel (sizes the NVL buffer)."""
    num_max_rdma_chunked_send_tokens: int = Field(default=6, gt=0)
    """Tokens per RDMA send chunk (internode)."""
    num_max_rdma_chunked_recv_tokens: int = Field(default=256, gt=0)
    """Tokens the RDMA receive ring holds per channel (internode)."""

    @model_validator(mode="after")
    def _check(self) -> DeepEPChunkConfig:
        # DeepEP's own asserts (csrc/config.hpp), checked when the file is loaded instead.
        if self.num_max_nvl_chunked_send_tokens >= self.num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                f"num_max_nvl_chunked_send_tokens ({self.num_max_nvl_chunked_send_tokens}) must be < "
                f"num_max_nvl_chunked_recv_tokens ({self.num_max_nvl_chunked_recv_tokens})"
            )
        send, recv = self.num_max_rdma_chunked_send_tokens, self.num_max_rdma_chunked_recv_tokens
        recv_rounded = -(-recv // send) * send
        if send > recv_rounded // 2:
            raise ValueError(
                f"num_max_rdma_chunked_send_tokens ({send}) must be <= half of num_max_rdma_chunked_recv_tokens "
                f"rounded up to a multiple of it ({recv_rounded})"
            )
        return self


class DeepEPConfig(_Section):
    """DeepEP tuning (used by `backend: deepep`)."""

    num_sms: int = Field(default=24, gt=0, le=132)
    """SMs DeepEP's normal-mode kernels use (even; DeepEP's default is 20-24)."""
    normal_dispatch: DeepEPChunkConfig | None = None
    """Normal dispatch `Config`; None = DeepEP's default for the rank count."""
    normal_combine: DeepEPChunkConfig | None = None
    """Normal combine `Config`; None = DeepEP's default for the rank count."""
    num_qps_per_rank: int | None = Field(default=None, gt=0)
    """RDMA queue pairs per rank; default: local experts per rank for low-latency mode, and at least
    num_sms for normal mode across nodes (DeepEP needs >= local experts for low-latency, and
    num_sms / 2 or >= num_sms for internode normal kernels)."""
    allow_nvlink_for_low_latency_mode: bool = True
    """Let low-latency kernels use NVLink for intranode peers."""
    allow_mnnvl: bool = False
    """Allow multi-node NVLink (GB200 NVL72-class systems)."""
    explicitly_destroy: bool = True
    """Free buffers through `Buffer.destroy()` on close, not at garbage collection."""

    @model_validator(mode="after")
    def _check(self) -> DeepEPConfig:
        if self.num_sms % 2:
            raise ValueError(f"num_sms ({self.num_sms}) must be even (DeepEP runs two SMs per channel)")
        return self


class BufferConfig(_Section):
    """Communication buffer sizes; None = derived from the model and the capacity."""

    num_nvl_bytes: int | None = Field(default=None, ge=0)
    """DeepEP intranode (NVLink) buffer bytes."""
    num_rdma_bytes: int | None = Field(default=None, ge=0)
    """DeepEP RDMA / low-latency buffer bytes."""


class DispatchConfig(_Section):
    """Moving tokens to their experts and back."""

    backend: Literal["torch", "deepep"] = "torch"
    """`torch` (all-to-all over torch.distributed: NCCL or gloo) or `deepep` (DeepEP buffers)."""
    mode: Literal["auto", "normal", "low_latency"] = "auto"
    """`normal` (prefill, large batches), `low_latency` (decode), or `auto` (per step)."""
    precision: PerModePrecision = PerModePrecision()
    """Dispatch precision per mode; combine is always bf16."""
    num_max_dispatch_tokens_per_rank: int = Field(default=128, gt=0, le=8192)
    """`C`: most tokens one rank sends in one low-latency dispatch; larger steps are chunked."""
    fp8_transport: Literal["auto", "native", "bytes"] = "auto"
    """How the torch backend moves fp8 tensors: `native` fp8, or `bytes` (uint8 views, needed on
    gloo); `auto` picks bytes on gloo."""
    check_conservation: bool = False
    """Debug: verify every step that each token-expert pair is received once and each token is
    combined once (costs collectives and host syncs)."""
    auto: AutoModeConfig = AutoModeConfig()
    """How `mode: auto` picks a mode per step."""
    deepep: DeepEPConfig = DeepEPConfig()
    """DeepEP tuning."""
    buffer: BufferConfig = BufferConfig()
    """Communication buffer sizes."""


class KernelsConfig(_Section):
    """Per-rank compute choices."""

    experts: Literal["auto", "triton", "torch"] = "auto"
    """Expert compute: `triton` (fused MoE / masked grouped GEMM) or `torch`; `auto` = triton on
    cuda, torch on cpu."""
    fused_topk_sum: Literal["auto", "on", "off"] = "auto"
    """Sum each token's top-k expert outputs in the down GEMM's epilogue (atomic add); `auto` =
    on when top_k > 2 and the scheme allows it."""
    router_gemm: Literal["auto", "cublas", "triton"] = "auto"
    """Router GEMM: `auto` picks per shape from the tuned table."""
    router_topk: Literal["auto", "torch", "triton"] = "auto"
    """Expert selection after the router GEMM: `torch` (scores, bias, grouped top-k, renormalise and
    scale as separate torch operations) or `triton` (all of it in one kernel, for sigmoid scoring
    with a power-of-two expert count; the same experts as `torch`, bit for bit on the GPU). `auto` =
    `triton` on cuda where it serves the model, else `torch` (measured on an H100: 3.6-15x faster
    than `torch`, eager and in CUDA graphs; `benchmarks/bench_router_topk.py`)."""


class ExecutionConfig(_Section):
    """How a step is scheduled on the device: CUDA graphs and communication/compute overlap.
    Each switch keeps the numerics of the plain path; defaults are chosen by measurement."""

    cuda_graph_decode: bool | Literal["auto"] = "auto"
    """Capture the whole low-latency step (router, dispatch, experts, combine) in a CUDA graph per
    token count and replay it (cuda only; needs a low-latency path without host syncs). `auto` = on
    for the `deepep` backend on cuda whenever low-latency steps can run, unless
    `dispatch.check_conservation` is on (a graph step runs no conservation check); off otherwise.
    Why: DeepEP's low-latency kernels are built for graph capture, and on one H200 (DeepSeek-V3
    layer, 16 and 128 tokens, bf16 and fp8_block) graph steps were 1.03-1.19x faster than eager;
    the torch backend's NCCL all-to-all inside graphs is not verified on several GPUs yet."""
    decode_two_batch: bool = False
    """Split each low-latency step into two micro-batches and overlap the communication of one with
    the expert compute of the other (DeepEP `return_recv_hook`)."""
    prefill_chunks: int = Field(default=1, ge=1, le=16)
    """Split normal-mode steps into this many chunks and overlap the dispatch/combine of one chunk
    with the expert compute of another on separate streams (1 = no overlap)."""


class WorkloadConfig(_Section):
    """What `ep-launch run` executes on every rank."""

    prefill_tokens_per_rank: int = Field(default=256, ge=0)
    """Tokens per rank in the prefill phase (0 skips it)."""
    decode_steps: int = Field(default=8, ge=0)
    """Decode steps after prefill."""
    decode_tokens_per_rank: int = Field(default=16, ge=0)
    """Tokens per rank in each decode step."""
    warmup_steps: int = Field(default=1, ge=0)
    """Untimed steps before each phase."""
    verify: bool = True
    """Compare every rank's output with the single-process reference."""
    num_layers: int = Field(default=1, gt=0, le=64)
    """MoE layers stacked with residual adds in each step."""


class TimeoutsConfig(_Section):
    """Bounded waiting: every wait in the runtime has one of these limits (seconds)."""

    placement_s: float = Field(default=120, gt=0)
    """Ray placement group readiness."""
    rendezvous_s: float = Field(default=60, gt=0)
    """torch.distributed rendezvous and process-group init."""
    collective_s: float = Field(default=60, gt=0)
    """One collective or DeepEP buffer init."""
    step_s: float = Field(default=300, gt=0)
    """One phase of the workload on one rank (the launcher's watchdog)."""


class EPConfig(_Section):
    """A whole dispatch-mode file."""

    model: ModelConfig
    parallel: ParallelConfig
    dispatch: DispatchConfig = DispatchConfig()
    kernels: KernelsConfig = KernelsConfig()
    execution: ExecutionConfig = ExecutionConfig()
    workload: WorkloadConfig = WorkloadConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()


# ---------------------------------------------------------------------------------------------
# Precision policy (data: one row per weights scheme and mode)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionRule:
    default: Precision
    allowed: frozenset[Precision]
    rule: str


_BOTH = frozenset({Precision.BF16, Precision.FP8})
PRECISION_POLICY: Mapping[tuple[str, Layout], PrecisionRule] = MappingProxyType(
    {
        ("bf16", Layout.NORMAL): PrecisionRule(
            Precision.BF16,
            _BOTH,
            "bf16 weights: bf16 dispatch; fp8 allowed (group-128 scales, dequantised before bf16 experts)",
        ),
        ("bf16", Layout.LOW_LATENCY): PrecisionRule(
            Precision.BF16,
            _BOTH,
            "bf16 weights: bf16 dispatch; fp8 allowed (group-128 scales, dequantised before bf16 experts)",
        ),
        ("fp8_block", Layout.NORMAL): PrecisionRule(
            Precision.FP8, _BOTH, "fp8_block weights: fp8 dispatch by default (w8a8), bf16 allowed"
        ),
        ("fp8_block", Layout.LOW_LATENCY): PrecisionRule(
            Precision.FP8, _BOTH, "fp8_block weights: fp8 dispatch by default (w8a8), bf16 allowed"
        ),
        ("w4a8", Layout.NORMAL): PrecisionRule(
            Precision.FP8, _BOTH, "w4a8 weights, normal mode: fp8 dispatch by default, bf16 allowed"
        ),
        ("w4a8", Layout.LOW_LATENCY): PrecisionRule(
            Precision.BF16,
            frozenset({Precision.BF16}),
            "w4a8 weights, low-latency mode: bf16 forced (the masked W4A8 experts quantise per-tensor themselves)",
        ),
    }
)


# ---------------------------------------------------------------------------------------------
# The resolved plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModePlan:
    """How one dispatch mode runs."""

    layout: Layout
    backend: str
    precision: Precision
    precision_source: Literal["policy default", "explicit"]
    precision_rule: str
    capacity: int | None
    """`C` for low-latency (tokens per rank per round); None for normal."""
    num_nvl_bytes: int
    num_rdma_bytes: int


@dataclass(frozen=True)
class RuntimePlan:
    """Everything a rank needs to build its layer, resolved once from an `EPConfig`."""

    config: EPConfig
    ep_size: int
    num_local_experts: int
    device: str
    dist_backend: str
    mode: str
    """`normal`, `low_latency` or `auto` (as in the file)."""
    modes: Mapping[Layout, ModePlan]
    """The modes this run can use (both under auto)."""
    experts_impl: str
    fused_topk_sum: bool
    router_gemm: str
    router_topk: str
    """Resolved expert selection: `torch` or `triton` (`auto` decided by device and model)."""
    fp8_bytes_transport: bool
    normal_above_tokens: int
    execution: ExecutionConfig
    """The execution switches with `auto` resolved (the layer's starting switches)."""

    def for_layout(self, layout: Layout) -> ModePlan:
        try:
            return self.modes[layout]
        except KeyError:
            raise ValueError(
                f"dispatch.mode '{self.mode}' does not use the {layout.value} layout; allowed: "
                f"{', '.join(m.value for m in self.modes)}"
            ) from None


# ---------------------------------------------------------------------------------------------
# Loading and resolving
# ---------------------------------------------------------------------------------------------


def _path_of(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _format_pydantic(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in exc.errors(include_url=False):
        path = _path_of(e["loc"])
        kind = e["type"]
        msg = e["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "literal_error":
            msg = f"got {e.get('input')!r}; {msg.lower()}"
        elif "input" in e and kind not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        out.append((path, msg))
    return out


def parse_config(data: Any, source: str | None = None) -> EPConfig:
    """Validate a mapping (a parsed file) into `EPConfig`, then check cross-section rules."""
    if not isinstance(data, dict):
        raise ConfigError([("<root>", f"the file must hold a mapping, got {type(data).__name__}")], source)
    try:
        cfg = EPConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_pydantic(exc), source) from None
    errs = _cross_checks(cfg)
    if errs:
        raise ConfigError(errs, source)
    return cfg


def load_config(path: str | Path) -> EPConfig:
    """Read a YAML or JSON dispatch-mode file and validate it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([("<file>", f"no such file: {p}")], str(p))
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(
            [("<file>", f"not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}")], str(p)
        ) from None
    return parse_config(data, str(p))


def _cross_checks(cfg: EPConfig) -> list[tuple[str, str]]:
    errs: list[tuple[str, str]] = []
    m, par, d = cfg.model, cfg.parallel, cfg.dispatch
    if m.num_experts % par.ep_size:
        errs.append(
            ("model.num_experts", f"({m.num_experts}) is not divisible by parallel.ep_size ({par.ep_size})")
        )
    if d.backend == "deepep":
        if par.device != "cuda":
            errs.append(("dispatch.backend", "'deepep' needs parallel.device 'cuda'; allowed on cpu: torch"))
        if par.resolved_dist_backend != "nccl":
            errs.append(("parallel.dist_backend", "backend 'deepep' needs 'nccl' (or auto)"))
        rpn = par.resolved_ranks_per_node
        if par.nodes > 1 and rpn != DEEPEP_MAX_NVL_PEERS:
            errs.append(
                (
                    "parallel.ranks_per_node",
                    f"({rpn}) DeepEP internode mode needs {DEEPEP_MAX_NVL_PEERS} ranks per node",
                )
            )
        layouts = _layouts_for(d.mode)
        has_normal, has_ll = Layout.NORMAL in layouts, Layout.LOW_LATENCY in layouts
        if has_normal and par.nodes == 1 and par.ep_size not in (2, 4, 8):
            errs.append(
                (
                    "parallel.ep_size",
                    f"({par.ep_size}) DeepEP normal mode on one node runs 2, 4 or 8 ranks; allowed: 2, 4, 8 "
                    "(or dispatch.mode 'low_latency', or dispatch.backend 'torch')",
                )
            )
        if (m.hidden_size * 2) % 16:
            errs.append(
                ("model.hidden_size", f"({m.hidden_size}) DeepEP needs rows of a multiple of 16 bytes")
            )
        local = m.num_experts // par.ep_size if m.num_experts % par.ep_size == 0 else 0
        if has_normal:
            if local > DEEPEP_NORMAL_MAX_LOCAL_EXPERTS:
                errs.append(
                    (
                        "model.num_experts",
                        f"({m.num_experts}) gives {local} experts per rank; DeepEP normal mode handles at "
                        f"most {DEEPEP_NORMAL_MAX_LOCAL_EXPERTS} per rank (more ranks, or dispatch.mode "
                        "'low_latency', or dispatch.backend 'torch')",
                    )
                )
            if m.top_k > DEEPEP_NORMAL_MAX_TOPK:
                errs.append(
                    (
                        "model.top_k",
                        f"({m.top_k}) exceeds DeepEP normal mode's maximum of {DEEPEP_NORMAL_MAX_TOPK}",
                    )
                )
        qps = d.deepep.num_qps_per_rank
        if qps is not None and has_ll and local and qps < local:
            errs.append(
                (
                    "dispatch.deepep.num_qps_per_rank",
                    f"({qps}) DeepEP low-latency mode needs at least one queue pair per local expert "
                    f"(>= {local}), or leave it unset",
                )
            )
        sms = d.deepep.num_sms
        if qps is not None and has_normal and par.nodes > 1 and not (qps == sms // 2 or qps >= sms):
            errs.append(
                (
                    "dispatch.deepep.num_qps_per_rank",
                    f"({qps}) DeepEP internode normal mode needs num_sms / 2 ({sms // 2}) or >= num_sms "
                    f"({sms}) queue pairs per rank, or leave it unset",
                )
            )
        if has_ll:
            C = d.num_max_dispatch_tokens_per_rank
            if (par.ep_size * C) % 4:
                errs.append(
                    (
                        "dispatch.num_max_dispatch_tokens_per_rank",
                        f"({C}) DeepEP low-latency needs ep_size x C ({par.ep_size * C}) to be a multiple "
                        "of 4 (its TMA copies); allowed: a C that makes it one",
                    )
                )
            depth = deepep_qp_depth()
            if 2 * (C + 1) > depth:
                errs.append(
                    (
                        "dispatch.num_max_dispatch_tokens_per_rank",
                        f"({C}) DeepEP low-latency needs NVSHMEM_QP_DEPTH >= 2 * (C + 1) = {2 * (C + 1)}, "
                        f"and it is {depth}; allowed: C <= {depth // 2 - 1}, or raise NVSHMEM_QP_DEPTH "
                        "in the ranks' environment",
                    )
                )
        if has_ll:
            if m.hidden_size not in DEEPEP_LOW_LATENCY_HIDDEN_SIZES:
                errs.append(
                    (
                        "model.hidden_size",
                        f"({m.hidden_size}) is not supported by DeepEP low-latency mode; allowed: "
                        f"{', '.join(map(str, DEEPEP_LOW_LATENCY_HIDDEN_SIZES))} (or dispatch.mode 'normal')",
                    )
                )
            if m.top_k > DEEPEP_LOW_LATENCY_MAX_TOPK:
                errs.append(
                    (
                        "model.top_k",
                        f"({m.top_k}) exceeds DeepEP low-latency's maximum of {DEEPEP_LOW_LATENCY_MAX_TOPK}",
                    )
                )
    if par.device == "cpu" and cfg.kernels.experts == "triton":
        errs.append(
            (
                "kernels.experts",
                "'triton' needs parallel.device 'cuda' (CPU runs use 'torch'); allowed on cpu: auto, torch",
            )
        )
    if par.device == "cpu" and cfg.kernels.router_gemm == "cublas":
        errs.append(("kernels.router_gemm", "'cublas' needs parallel.device 'cuda'; allowed on cpu: auto"))
    if cfg.kernels.router_topk == "triton":
        if par.device == "cpu":
            errs.append(
                ("kernels.router_topk", "'triton' needs parallel.device 'cuda'; allowed on cpu: torch")
            )
        ok, why = _router_topk_kernel_serves(m)
        if not ok:
            errs.append(("kernels.router_topk", f"'triton' does not serve this model: {why}; allowed: torch"))
    # Explicit precisions against the policy.
    for layout in _layouts_for(d.mode):
        choice = getattr(d.precision, layout.value)
        rule = PRECISION_POLICY[(m.weights, layout)]
        if choice != "auto" and Precision(choice) not in rule.allowed:
            allowed = ", ".join(["auto"] + sorted(p.value for p in rule.allowed))
            errs.append(
                (
                    f"dispatch.precision.{layout.value}",
                    f"'{choice}' breaks the rule: {rule.rule}; allowed: {allowed}",
                )
            )
        precision = rule.default if choice == "auto" else Precision(choice)
        if d.backend == "deepep" and layout == Layout.NORMAL and par.nodes == 1:
            row = m.hidden_size * (1 if precision == Precision.FP8 else 2)
            if row % 32 or row // 2 + 8 > DEEPEP_INTRANODE_TMA_BYTES:
                errs.append(
                    (
                        "model.hidden_size",
                        f"({m.hidden_size}) a {precision.value} row of {row} bytes does not fit DeepEP's "
                        f"intranode dispatch (rows of a multiple of 32 bytes, at most "
                        f"{2 * (DEEPEP_INTRANODE_TMA_BYTES - 8)} bytes); allowed: fp8 normal dispatch "
                        "(dispatch.precision.normal), or dispatch.backend 'torch'",
                    )
                )
        if precision == Precision.FP8:
            if m.hidden_size % FP8_GROUP:
                errs.append(
                    (
                        f"dispatch.precision.{layout.value}",
                        f"fp8 dispatch needs model.hidden_size ({m.hidden_size}) to be a multiple of 128",
                    )
                )
            if d.backend == "torch" and par.resolved_dist_backend == "gloo" and d.fp8_transport == "native":
                errs.append(
                    (
                        "dispatch.fp8_transport",
                        "'native' fp8 cannot travel over gloo; allowed with gloo: auto, bytes",
                    )
                )
    ex = cfg.execution
    if ex.cuda_graph_decode is True:  # `auto` resolves to off where these would fail
        errs.extend(_graph_decode_blockers(cfg))
    elif ex.decode_two_batch and d.mode == "normal":
        errs.append(
            (
                "execution.decode_two_batch",
                "applies to low-latency steps; dispatch.mode is 'normal' (allowed: auto, low_latency)",
            )
        )
    if ex.prefill_chunks > 1 and d.mode == "low_latency":
        errs.append(
            (
                "execution.prefill_chunks",
                "applies to normal-mode steps; dispatch.mode is 'low_latency' (allowed: 1)",
            )
        )
    if d.backend == "deepep" and d.buffer.num_nvl_bytes is not None and d.buffer.num_nvl_bytes > 2**31 - 1:
        if d.mode in ("low_latency", "auto") or par.nodes > 1:
            errs.append(
                (
                    "dispatch.buffer.num_nvl_bytes",
                    f"({d.buffer.num_nvl_bytes}) must be <= 2^31 - 1 when DeepEP also allocates an RDMA/low-latency buffer",
                )
            )
    if d.auto.normal_above_tokens is not None and d.mode != "auto":
        errs.append(
            (
                "dispatch.auto.normal_above_tokens",
                f"only applies with dispatch.mode 'auto' (mode is '{d.mode}')",
            )
        )
    return errs


def _layouts_for(mode: str) -> tuple[Layout, ...]:
    if mode == "auto":
        return (Layout.NORMAL, Layout.LOW_LATENCY)
    return (Layout(mode),)


def deepep_low_latency_rdma_bytes(capacity: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes DeepEP's low-latency mode needs (mirrors `Buffer.get_low_latency_rdma_size_hint`, DeepEP
    567632d `LowLatencyLayout`): two (odd/even) copies of a send area, a receive area and a signalling
    area. A dispatch message is a 16-byte header plus the larger of a bf16 row and an fp8 row with its
    fp32 scales; a combine message is a bf16 row plus one bf16x2 min/max pair per 128 channels. The
    send area holds `C` dispatch messages or `E * C` combine messages, the receive area `E * C` of
    either, the signalling area one int per expert (aligned to 128 bytes)."""
    num_scales = hidden // FP8_GROUP
    dispatch_msg = 16 + max(hidden * 2, hidden + num_scales * 4)
    combine_msg = num_scales * 4 + hidden * 2
    send = max(capacity * dispatch_msg, num_experts * capacity * combine_msg)
    recv = num_experts * capacity * max(dispatch_msg, combine_msg)
    signal = (num_experts * 4 + 127) // 128 * 128
    total = (send + recv + signal) * 2
    align = 128
    # DeepEP rounds with `(n + align) / align * align`: one extra block when `n` is already aligned.
    return (total + align) // align * align


def deepep_normal_nvl_bytes(
    hidden: int, num_ranks: int, num_sms: int, num_max_nvl_chunked_recv_tokens: int
) -> int:
    """Bytes of DeepEP's intranode buffer (mirrors `Config.get_nvl_buffer_size_hint` for bf16 rows)."""
    max_topk, max_scales, source_meta = 128, 128, 8
    num_rdma_ranks = max(num_ranks // DEEPEP_MAX_NVL_PEERS, 1)
    num_nvl_ranks = min(num_ranks, DEEPEP_MAX_NVL_PEERS)
    channels = num_sms // 2
    per_token = hidden * 2 + source_meta + max_topk * 8 + max_topk * 4 + max_scales * 4
    n = channels * num_nvl_ranks * (2 * num_rdma_ranks + 3) * 4
    n += channels * num_nvl_ranks * num_max_nvl_chunked_recv_tokens * per_token
    return (n + 127) // 128 * 128


# `num_max_nvl_chunked_recv_tokens` of DeepEP's default normal-mode configs by rank count (its
# `get_dispatch_config` / `get_combine_config`, the same for both), for sizing the NVL buffer.
_DEEPEP_DEFAULT_NVL_RECV_TOKENS = {2: 256, 4: 256, 8: 256, 16: 288, 24: 288, 32: 288, 48: 288, 64: 288,
                                   96: 480, 128: 560, 144: 720, 160: 720}  # fmt: skip


def _graph_decode_blockers(cfg: EPConfig) -> list[tuple[str, str]]:
    """Why graph decode steps cannot run with this file (field, message); empty if they can."""
    d, par = cfg.dispatch, cfg.parallel
    out = []
    above = d.auto.normal_above_tokens
    if d.mode == "auto" and above is not None and above < d.num_max_dispatch_tokens_per_rank:
        out.append(
            (
                "execution.cuda_graph_decode",
                f"graph decode steps run every T <= C ({d.num_max_dispatch_tokens_per_rank}) in low-latency "
                f"mode, while dispatch.auto.normal_above_tokens ({above}) sends T > {above} to normal mode: "
                "the same step would take a different path with graphs on; set normal_above_tokens >= C "
                "or leave it unset",
            )
        )
    if par.device != "cuda":
        out.append(("execution.cuda_graph_decode", "needs parallel.device 'cuda'; allowed on cpu: false"))
    if d.mode == "normal":
        out.append(
            (
                "execution.cuda_graph_decode",
                "applies to low-latency steps; dispatch.mode is 'normal' (allowed: auto, low_latency)",
            )
        )
    return out


def resolve_execution(cfg: EPConfig, execution: ExecutionConfig | None = None) -> ExecutionConfig:
    """`execution` (default: the file's) with `auto` resolved: `cuda_graph_decode: auto` is on for
    DeepEP where graph decode can run (no `_graph_decode_blockers`) and conservation checks are off
    (a graph step runs none: debug runs stay eager)."""
    ex = cfg.execution if execution is None else execution
    if ex.cuda_graph_decode != "auto":
        return ex
    d = cfg.dispatch
    on = d.backend == "deepep" and not d.check_conservation and not _graph_decode_blockers(cfg)
    return ex.model_copy(update=dict(cuda_graph_decode=on))


def _router_topk_kernel_serves(m: ModelConfig) -> tuple[bool, str]:
    from ep_runtime.kernels.select_experts import supports

    return supports(m.scoring, m.num_experts, m.n_group, m.top_k)


def _resolve_router_topk(choice: str, device: str, m: ModelConfig) -> str:
    """`auto`: the one-kernel selection on cuda where it serves the model, else torch."""
    if choice != "auto":
        return choice
    return "triton" if device == "cuda" and _router_topk_kernel_serves(m)[0] else "torch"


def resolve_plan(cfg: EPConfig) -> RuntimePlan:
    """Resolve a validated config into the immutable plan every rank builds from."""
    m, par, d = cfg.model, cfg.parallel, cfg.dispatch
    modes: dict[Layout, ModePlan] = {}
    for layout in _layouts_for(d.mode):
        choice = getattr(d.precision, layout.value)
        rule = PRECISION_POLICY[(m.weights, layout)]
        precision = rule.default if choice == "auto" else Precision(choice)
        nvl = rdma = 0
        if d.backend == "deepep":
            if layout == Layout.NORMAL:
                recv_tokens = max(
                    [
                        c.num_max_nvl_chunked_recv_tokens
                        for c in (d.deepep.normal_dispatch, d.deepep.normal_combine)
                        if c
                    ]
                    or [_DEEPEP_DEFAULT_NVL_RECV_TOKENS.get(par.ep_size, 720)]
                )
                nvl = deepep_normal_nvl_bytes(m.hidden_size, par.ep_size, d.deepep.num_sms, recv_tokens)
            else:
                rdma = deepep_low_latency_rdma_bytes(
                    d.num_max_dispatch_tokens_per_rank, m.hidden_size, par.ep_size, m.num_experts
                )
            nvl = d.buffer.num_nvl_bytes if d.buffer.num_nvl_bytes is not None else nvl
            rdma = d.buffer.num_rdma_bytes if d.buffer.num_rdma_bytes is not None else rdma
        modes[layout] = ModePlan(
            layout=layout,
            backend=d.backend,
            precision=precision,
            precision_source="policy default" if choice == "auto" else "explicit",
            precision_rule=rule.rule,
            capacity=d.num_max_dispatch_tokens_per_rank if layout == Layout.LOW_LATENCY else None,
            num_nvl_bytes=nvl,
            num_rdma_bytes=rdma,
        )
    experts = cfg.kernels.experts
    if experts == "auto":
        experts = "triton" if par.device == "cuda" else "torch"
    fused = cfg.kernels.fused_topk_sum
    fused_on = fused == "on" or (fused == "auto" and m.top_k > 2)
    return RuntimePlan(
        config=cfg,
        ep_size=par.ep_size,
        num_local_experts=m.num_experts // par.ep_size,
        device=par.device,
        dist_backend=par.resolved_dist_backend,
        mode=d.mode,
        modes=MappingProxyType(modes),
        experts_impl=experts,
        fused_topk_sum=fused_on,
        router_gemm=cfg.kernels.router_gemm,
        router_topk=_resolve_router_topk(cfg.kernels.router_topk, par.device, m),
        fp8_bytes_transport=d.fp8_transport == "bytes"
        or (d.fp8_transport == "auto" and par.resolved_dist_backend == "gloo"),
        normal_above_tokens=d.auto.normal_above_tokens or d.num_max_dispatch_tokens_per_rank,
        execution=resolve_execution(cfg),
    )


def max_buffer_bytes(plan: RuntimePlan) -> tuple[int, int]:
    """The (NVL, RDMA) bytes one DeepEP buffer must hold to serve every mode of the plan."""
    nvl = max((mp.num_nvl_bytes for mp in plan.modes.values()), default=0)
    rdma = max((mp.num_rdma_bytes for mp in plan.modes.values()), default=0)
    return nvl, rdma


def human_bytes(n: int) -> str:
    if n == 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**i:.1f} {units[i]}"


def schema_markdown() -> str:
    """The file reference (docs/config.md), generated from the models so it cannot drift."""
    lines = [
        "# The dispatch-mode file",
        "",
        "Generated by `python -m ep_runtime.config` from `ep_runtime/config.py`; a test keeps it current.",
        "Validate a file with `ep-launch check FILE`; see what it resolves to with `ep-launch explain FILE`.",
        "",
        "## Precision policy",
        "",
        "| weights | mode | default | allowed | rule |",
        "|---|---|---|---|---|",
    ]
    for (scheme, layout), rule in PRECISION_POLICY.items():
        allowed = ", ".join(sorted(p.value for p in rule.allowed))
        lines.append(f"| `{scheme}` | {layout.value} | {rule.default.value} | {allowed} | {rule.rule} |")
    lines.append("")

    def walk(model: type[BaseModel], prefix: str) -> None:
        lines.extend([f"## `{prefix or 'top level'}`", "", (model.__doc__ or "").strip(), ""])
        lines.extend(["| field | type | default | meaning |", "|---|---|---|---|"])
        nested: list[tuple[type[BaseModel], str]] = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = next(
                (
                    a
                    for a in (ann, *getattr(ann, "__args__", ()))
                    if isinstance(a, type) and issubclass(a, BaseModel)
                ),
                None,
            )
            path = f"{prefix}.{name}" if prefix else name
            if sub is not None:
                nested.append((sub, path))
                type_s = f"section `{path}`"
            else:
                type_s = (
                    str(ann)
                    .replace("typing.", "")
                    .replace("<class '", "")
                    .replace("'>", "")
                    .replace(" | ", " or ")
                )
            default = (
                "required" if field.is_required() else ("section defaults" if sub else repr(field.default))
            )
            doc = field.description or (sub.__doc__ if sub is not None else "") or ""
            lines.append(f"| `{name}` | {type_s} | {default} | {' '.join(doc.split())} |")
        lines.append("")
        for sub, path in nested:
            walk(sub, path)

    walk(EPConfig, "")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(schema_markdown(), end="")
