"""GPU tests (marker `gpu`): run on the GPU machine with `pytest -m gpu` (docs/gpu-runbook.md)."""

import pytest

# The 2-GPU layer tests' model: DeepSeek-V3 routing (sigmoid, grouped top-k, correction bias,
# scaling) at a small size; 2048 is one of DeepEP's low-latency hidden sizes.
WORLD = 2
HIDDEN = 2048
INTER = 256
NUM_EXPERTS = 16
TOP_K = 4
CAPACITY = 32


def require_deep_ep() -> None:
    """Fail (not skip) a DeepEP test when `deep_ep` is missing: on a GPU machine a skipped DeepEP
    check would read as a pass. The message says how to install it."""
    from ep_runtime.comm.deepep import import_deep_ep

    deep_ep, why = import_deep_ep()
    if deep_ep is None:
        pytest.fail(f"deep_ep is not importable on this GPU machine: {why}")


def small_layer_plan(backend: str, scheme: str, world: int = WORLD, **sections):
    """The resolved plan of the 2-GPU layer tests' model on `world` ranks: `backend`, auto mode,
    capacity `CAPACITY`; `sections` extends the file (`dispatch` entries are merged, any other
    section is set whole, e.g. `execution={...}` or `kernels={...}`)."""
    from ep_runtime.config import parse_config, resolve_plan

    dispatch = {"backend": backend, "mode": "auto", "num_max_dispatch_tokens_per_rank": CAPACITY}
    dispatch.update(sections.pop("dispatch", {}))
    doc = {
        "model": {
            "hidden_size": HIDDEN,
            "num_experts": NUM_EXPERTS,
            "top_k": TOP_K,
            "moe_intermediate_size": INTER,
            "scoring": "sigmoid",
            "n_group": 4,
            "topk_group": 2,
            "use_correction_bias": True,
            "routed_scaling_factor": 2.5,
            "weights": scheme,
            "seed": 3,
        },
        "parallel": {"ep_size": world, "device": "cuda"},
        "dispatch": dispatch,
        **sections,
    }
    return resolve_plan(parse_config(doc))
