"""Property-based tests of the config loader: any document either resolves to a plan or raises
`ConfigError` whose every error names a field path, never another exception."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ep_runtime.config import ConfigError, EPConfig, parse_config, resolve_plan

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"
EXAMPLES = [yaml.safe_load(p.read_text()) for p in sorted(CONFIGS.glob("*.yaml"))]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "auto",
            "bf16",
            "fp8",
            "normal",
            "low_latency",
            "deepep",
            "torch",
            "cuda",
            "cpu",
            "w4a8",
            "fp8_block",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
FIELD_NAMES = sorted(
    {
        name
        for section in EPConfig.model_fields.values()
        for name in getattr(section.annotation, "model_fields", {})
    }
)


def _check(doc) -> None:
    try:
        resolve_plan(parse_config(doc))
    except ConfigError as exc:
        assert exc.errors, "a ConfigError must list at least one error"
        for path, msg in exc.errors:
            assert isinstance(path, str) and path, f"error without a field path: {msg!r}"
            assert isinstance(msg, str) and msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=st.dictionaries(
        st.sampled_from(["model", "parallel", "dispatch", "kernels", "workload", "timeouts", "x"]),
        values,
        max_size=6,
    )
)
def test_random_documents(doc):
    _check(doc)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    example=st.sampled_from(EXAMPLES),
    section=st.sampled_from(["model", "parallel", "dispatch", "kernels", "workload", "timeouts"]),
    field=st.sampled_from(FIELD_NAMES + ["unknown_field"]),
    value=values,
    drop=st.booleans(),
)
def test_mutated_examples(example, section, field, value, drop):
    doc = copy.deepcopy(example)
    target = doc.setdefault(section, {})
    if not isinstance(target, dict):
        target = doc[section] = {}
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    _check(doc)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_random_yaml_text(tmp_path_factory, text):
    from ep_runtime.config import load_config

    path = tmp_path_factory.mktemp("fuzz") / "f.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.errors
