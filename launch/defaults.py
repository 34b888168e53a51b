"""Where `ep-launch run` finds its default dispatch-mode file.

The default is `deploy/configs/local-cpu.yaml` of the checkout (the current directory's, else the
one this package was installed from in editable mode). A non-editable install has no `deploy/`
folder, so a copy of that file is embedded here; `tests/unit/test_cli_run.py` keeps it identical.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG_RELPATH = "deploy/configs/local-cpu.yaml"

EMBEDDED_LOCAL_CPU_YAML = """\
# The embedded default of `ep-launch run`: 2 CPU ranks over gloo, the torch dispatch backend,
# a small DeepSeek-style layer (sigmoid scoring, grouped top-k, score-correction bias).
# Runs in well under a minute on 2 CPU cores and verifies every rank against the reference.
model:
  name: tiny-deepseek-style
  hidden_size: 256
  num_experts: 16
  top_k: 4
  moe_intermediate_size: 128
  scoring: sigmoid
  n_group: 4
  topk_group: 2
  use_correction_bias: true
  norm_topk_prob: true
  routed_scaling_factor: 2.5
  weights: bf16
  seed: 1234
parallel:
  ep_size: 2
  device: cpu
dispatch:
  backend: torch
  mode: auto
  num_max_dispatch_tokens_per_rank: 32
  check_conservation: true
kernels:
  experts: torch
workload:
  prefill_tokens_per_rank: 96
  decode_steps: 4
  decode_tokens_per_rank: 8
  warmup_steps: 1
  verify: true
timeouts:
  placement_s: 60
  rendezvous_s: 60
  collective_s: 60
  step_s: 120
"""


def default_config_path() -> Path | None:
    """The checkout's default file, or None when no checkout is found (use the embedded copy)."""
    package_root = Path(__file__).resolve().parent.parent  # the repo root for an editable install
    for base in (Path.cwd(), package_root):
        candidate = base / DEFAULT_CONFIG_RELPATH
        if candidate.is_file():
            return candidate
    return None
