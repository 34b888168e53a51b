"""The plans the 2-GPU layer and execution tests build resolve here too (no GPU needed to resolve a
plan), so a schema change that would break them shows in CI, not first on a GPU machine."""

from __future__ import annotations

import pytest

from ep_runtime.types import Layout
from tests.gpu import CAPACITY, small_layer_plan
from tests.gpu.test_execution_gpu import CONFIGS


@pytest.mark.parametrize("backend", ["torch", "deepep"])
@pytest.mark.parametrize("scheme", ["bf16", "fp8_block", "w4a8"])
@pytest.mark.parametrize("experts", ["triton", "torch"])
def test_layer_test_plans_resolve(backend, scheme, experts):
    plan = small_layer_plan(
        backend,
        scheme,
        dispatch={"auto": {"normal_above_tokens": 96}, "check_conservation": backend == "torch"},
        kernels={"experts": experts},
    )
    assert plan.mode == "auto" and set(plan.modes) == {Layout.NORMAL, Layout.LOW_LATENCY}
    assert plan.modes[Layout.LOW_LATENCY].capacity == CAPACITY
    assert all(m.backend == backend for m in plan.modes.values())
    assert plan.config.dispatch.auto.normal_above_tokens == 96
    assert plan.config.kernels.experts == experts


@pytest.mark.parametrize("backend", ["torch", "deepep"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_execution_test_plans_resolve(backend, name):
    plan = small_layer_plan(backend, "bf16", execution=CONFIGS[name])
    for key, value in CONFIGS[name].items():
        assert getattr(plan.config.execution, key) == value
