"""Per-step telemetry of the EP MoE layer: expert load, load imbalance, stage times.

Recording never synchronises with the host: stage boundaries are CUDA events on GPU
(`time.perf_counter` on CPU, where every op is synchronous anyway) and counts stay device tensors.
The `StepTelemetry` dataclass is materialised when first read (`EPMoE.last_telemetry`), which waits
for the step's events and copies the counts to the host once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

STAGES = ("mode", "router", "dispatch", "experts", "combine", "checks")
"""Stage names in step order. `mode` is the per-step mode decision (one all-reduce; ~0 in normal
mode); `checks` the debug conservation checks (`dispatch.check_conservation`, 0 when off)."""


@dataclass(frozen=True)
class StepTelemetry:
    """What one `EPMoE.forward` did on this rank.

    Attributes:
        layout: `normal` or `low_latency`.
        num_rounds: low-latency rounds run (1 for normal; `ceil(max_T / C)` when chunked).
        num_tokens: `T` of this rank.
        max_tokens_any_rank: the all-reduced max `T` (None when the mode needed no all-reduce).
        tokens_per_local_expert: `[L]` (token, expert) pairs each local expert received.
        imbalance_local: max / mean of `tokens_per_local_expert` (1.0 = balanced; 0 when idle).
        tokens_per_rank: pairs received by every rank (None when not gathered).
        imbalance_ranks: max / mean of `tokens_per_rank` (None when not gathered).
        stage_ms: milliseconds per stage (`STAGES`), summed over rounds.
        total_ms: first to last stage boundary of the step.
    """

    layout: str
    num_rounds: int
    num_tokens: int
    max_tokens_any_rank: int | None
    tokens_per_local_expert: list[int]
    imbalance_local: float
    tokens_per_rank: list[int] | None
    imbalance_ranks: float | None
    stage_ms: dict[str, float] = field(default_factory=dict)
    total_ms: float = 0.0

    @property
    def stages_sum_ms(self) -> float:
        return float(sum(self.stage_ms.values()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages_sum_ms"] = self.stages_sum_ms
        return d


def _imbalance(values: list[int]) -> float:
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 0.0


class StageTimer:
    """Stage boundaries of one step: `lap(stage)` closes the stage that ran since the previous lap."""

    def __init__(self, device: torch.device):
        self.is_cuda = device.type == "cuda"
        self._marks: list[tuple[str | None, Any]] = [(None, self._now())]

    def _now(self) -> Any:
        if self.is_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        self._marks.append((stage, self._now()))

    def resolve(self) -> tuple[dict[str, float], float]:
        """Per-stage milliseconds and the total; waits for the last CUDA event."""
        stage_ms = dict.fromkeys(STAGES, 0.0)
        if self.is_cuda:
            self._marks[-1][1].synchronize()
            elapsed = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            elapsed = lambda a, b: (b - a) * 1e3  # noqa: E731
        for (_, prev), (stage, cur) in zip(self._marks, self._marks[1:], strict=False):
            stage_ms[stage] = stage_ms.get(stage, 0.0) + float(elapsed(prev, cur))
        total = float(elapsed(self._marks[0][1], self._marks[-1][1])) if len(self._marks) > 1 else 0.0
        return stage_ms, total


@dataclass
class PendingTelemetry:
    """Device-side record of a step, turned into `StepTelemetry` on first read."""

    layout: str
    num_rounds: int
    num_tokens: int
    max_tokens_any_rank: int | None
    tokens_per_local_expert: torch.Tensor
    tokens_per_rank: torch.Tensor | None
    timer: StageTimer

    def resolve(self) -> StepTelemetry:
        stage_ms, total = self.timer.resolve()
        local = [int(v) for v in self.tokens_per_local_expert.tolist()]
        ranks = None if self.tokens_per_rank is None else [int(v) for v in self.tokens_per_rank.tolist()]
        return StepTelemetry(
            layout=self.layout,
            num_rounds=self.num_rounds,
            num_tokens=self.num_tokens,
            max_tokens_any_rank=self.max_tokens_any_rank,
            tokens_per_local_expert=local,
            imbalance_local=_imbalance(local),
            tokens_per_rank=ranks,
            imbalance_ranks=None if ranks is None else _imbalance(ranks),
            stage_ms=stage_ms,
            total_ms=total,
        )
