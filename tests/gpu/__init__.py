"""GPU tests (marker `gpu`): run on the GPU machine with `pytest -m gpu` (docs/gpu-runbook.md)."""

import pytest


def require_deep_ep() -> None:
    """Fail (not skip) a DeepEP test when `deep_ep` is missing: on a GPU machine a skipped DeepEP
    check would read as a pass. The message says how to install it."""
    from ep_runtime.comm.deepep import import_deep_ep

    deep_ep, why = import_deep_ep()
    if deep_ep is None:
        pytest.fail(f"deep_ep is not importable on this GPU machine: {why}")
