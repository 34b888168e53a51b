"""The dispatch-mode file: examples load, each policy rule holds, each class of bad input is named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from ep_runtime.config import (
    PRECISION_POLICY,
    ConfigError,
    deepep_low_latency_rdma_bytes,
    load_config,
    parse_config,
    resolve_plan,
)
from ep_runtime.types import Layout, Precision

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.yaml"))


def base(**overrides) -> dict:
    doc = {
        "model": {"hidden_size": 256, "num_experts": 8, "top_k": 2, "moe_intermediate_size": 128},
        "parallel": {"ep_size": 2, "device": "cpu"},
        "dispatch": {"backend": "torch"},
    }
    for path, value in overrides.items():
        node = doc
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return doc


def gpu_doc(**overrides) -> dict:
    doc = base(**overrides)
    doc["model"].update({k: v for k, v in {"hidden_size": 7168}.items() if f"model.{k}" not in overrides})
    doc["parallel"]["device"] = overrides.get("parallel.device", "cuda")
    doc["dispatch"]["backend"] = overrides.get("dispatch.backend", "deepep")
    return doc


def errors_of(doc: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    return info.value.errors


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"local-cpu.yaml", "h200x2-deepep.yaml", "multinode-deepep.yaml", "w4a8-lowlatency.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads_and_resolves(path):
    plan = resolve_plan(load_config(path))
    assert plan.ep_size * plan.num_local_experts == plan.config.model.num_experts
    assert plan.modes, "a plan must use at least one mode"


def test_json_is_accepted(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(yaml.safe_load((CONFIGS / "local-cpu.yaml").read_text())))
    assert load_config(path) == load_config(CONFIGS / "local-cpu.yaml")


def test_local_default_is_cpu_torch():
    plan = resolve_plan(load_config(CONFIGS / "local-cpu.yaml"))
    assert (plan.device, plan.dist_backend, plan.config.dispatch.backend, plan.ep_size) == (
        "cpu",
        "gloo",
        "torch",
        2,
    )
    assert plan.fp8_bytes_transport


# ------------------------------------------------------------------ precision policy


def test_policy_table_covers_every_scheme_and_mode():
    for scheme in ("bf16", "fp8_block", "w4a8"):
        for layout in Layout:
            rule = PRECISION_POLICY[(scheme, layout)]
            assert rule.default in rule.allowed


@pytest.mark.parametrize(
    "scheme,normal,low_latency",
    [("bf16", "bf16", "bf16"), ("fp8_block", "fp8", "fp8"), ("w4a8", "fp8", "bf16")],
)
def test_policy_defaults(scheme, normal, low_latency):
    plan = resolve_plan(parse_config(base(**{"model.weights": scheme})))
    assert plan.modes[Layout.NORMAL].precision == Precision(normal)
    assert plan.modes[Layout.LOW_LATENCY].precision == Precision(low_latency)
    assert all(m.precision_source == "policy default" for m in plan.modes.values())


def test_w4a8_low_latency_resolves_to_bf16_from_the_example():
    plan = resolve_plan(load_config(CONFIGS / "w4a8-lowlatency.yaml"))
    mp = plan.modes[Layout.LOW_LATENCY]
    assert mp.precision == Precision.BF16
    assert "bf16 forced" in mp.precision_rule


def test_w4a8_low_latency_explicit_fp8_is_an_error_naming_the_rule():
    errs = errors_of(base(**{"model.weights": "w4a8", "dispatch.precision.low_latency": "fp8"}))
    assert errs == [
        (
            "dispatch.precision.low_latency",
            "'fp8' breaks the rule: w4a8 weights, low-latency mode: bf16 forced (the masked W4A8 experts "
            "quantise per-tensor themselves); allowed: auto, bf16",
        )
    ]


def test_w4a8_normal_fp8_and_bf16_allowed():
    for p in ("fp8", "bf16"):
        plan = resolve_plan(
            parse_config(
                base(**{"model.weights": "w4a8", "dispatch.mode": "normal", "dispatch.precision.normal": p})
            )
        )
        assert plan.modes[Layout.NORMAL].precision == Precision(p)
        assert plan.modes[Layout.NORMAL].precision_source == "explicit"
        assert Layout.LOW_LATENCY not in plan.modes


def test_explicit_fp8_for_bf16_weights_allowed():
    plan = resolve_plan(parse_config(base(**{"dispatch.precision.normal": "fp8"})))
    assert plan.modes[Layout.NORMAL].precision == Precision.FP8


def test_fp8_bytes_over_gloo_and_native_rejected():
    errs = errors_of(base(**{"dispatch.precision.normal": "fp8", "dispatch.fp8_transport": "native"}))
    assert errs[0][0] == "dispatch.fp8_transport" and "allowed with gloo: auto, bytes" in errs[0][1]


def test_fp8_needs_hidden_multiple_of_128():
    errs = errors_of(
        base(**{"model.hidden_size": 200, "dispatch.precision.normal": "fp8", "dispatch.mode": "normal"})
    )
    assert errs[0][0] == "dispatch.precision.normal" and "multiple of 128" in errs[0][1]


# ------------------------------------------------------------------ invalid input


def test_unknown_key_named():
    errs = errors_of(base(**{"model.hiden_size": 3}))
    assert ("model.hiden_size", "unknown key") in errs


def test_unknown_section_named():
    doc = base()
    doc["dispach"] = {}
    assert ("dispach", "unknown key") in errors_of(doc)


def test_wrong_type_named():
    errs = errors_of(base(**{"model.top_k": "eight"}))
    assert errs[0][0] == "model.top_k" and "'eight'" in errs[0][1]


def test_out_of_range_named():
    errs = errors_of(base(**{"dispatch.num_max_dispatch_tokens_per_rank": 0}))
    assert errs[0][0] == "dispatch.num_max_dispatch_tokens_per_rank" and "greater than 0" in errs[0][1]


def test_bad_choice_lists_allowed_values():
    errs = errors_of(base(**{"dispatch.backend": "nccl"}))
    assert errs[0][0] == "dispatch.backend" and "'torch'" in errs[0][1] and "'deepep'" in errs[0][1]


def test_missing_required_named():
    doc = base()
    del doc["model"]["hidden_size"]
    assert errors_of(doc)[0][0] == "model.hidden_size"


def test_experts_not_divisible_by_ep_size():
    errs = errors_of(base(**{"parallel.ep_size": 3}))
    assert ("model.num_experts", "(8) is not divisible by parallel.ep_size (3)") in errs


def test_deepep_on_cpu_rejected():
    errs = errors_of(base(**{"dispatch.backend": "deepep", "dispatch.mode": "normal"}))
    assert errs[0] == ("dispatch.backend", "'deepep' needs parallel.device 'cuda'; allowed on cpu: torch")


def test_deepep_low_latency_hidden_size_rejected():
    doc = gpu_doc(**{"model.hidden_size": 1000, "dispatch.mode": "low_latency"})
    errs = errors_of(doc)
    assert errs[0][0] == "model.hidden_size" and "allowed: 2048" in errs[0][1] and "7168" in errs[0][1]


def test_deepep_normal_mode_accepts_any_aligned_hidden_size():
    plan = resolve_plan(parse_config(gpu_doc(**{"model.hidden_size": 1024, "dispatch.mode": "normal"})))
    assert plan.modes[Layout.NORMAL].num_nvl_bytes > 0


def test_deepep_multinode_needs_8_per_node():
    doc = gpu_doc(**{"parallel.ep_size": 8, "parallel.nodes": 2, "model.num_experts": 16})
    assert any(p == "parallel.ranks_per_node" for p, _ in errors_of(doc))


def test_grouped_topk_needs_both_fields():
    errs = errors_of(base(**{"model.n_group": 2}))
    assert errs[0][0] == "model" and "n_group and topk_group" in errs[0][1]


def test_top_k_above_experts_rejected():
    assert "top_k (9) must be <= num_experts (8)" in errors_of(base(**{"model.top_k": 9}))[0][1]


def test_triton_experts_on_cpu_rejected():
    errs = errors_of(base(**{"kernels.experts": "triton"}))
    assert errs[0][0] == "kernels.experts"


def test_nodes_times_ranks_per_node():
    errs = errors_of(base(**{"parallel.nodes": 2, "parallel.ranks_per_node": 3}))
    assert "must equal ep_size" in errs[0][1]


def test_all_errors_listed_at_once():
    doc = base(**{"model.foo": 1, "dispatch.bar": 2, "model.top_k": 0})
    paths = {p for p, _ in errors_of(doc)}
    assert {"model.foo", "dispatch.bar", "model.top_k"} <= paths


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst)


def test_config_is_immutable():
    cfg = parse_config(base())
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen models
        cfg.model.top_k = 3  # type: ignore[misc]
    plan = resolve_plan(cfg)
    with pytest.raises(TypeError):
        plan.modes[Layout.NORMAL] = None  # type: ignore[index]


def test_plan_for_layout_rejects_unused_mode():
    plan = resolve_plan(parse_config(base(**{"dispatch.mode": "normal"})))
    with pytest.raises(ValueError, match="does not use the low_latency layout; allowed: normal"):
        plan.for_layout(Layout.LOW_LATENCY)


def test_low_latency_buffer_grows_with_capacity_experts_and_hidden():
    small = deepep_low_latency_rdma_bytes(64, 7168, 2, 256)
    assert deepep_low_latency_rdma_bytes(128, 7168, 2, 256) > small
    assert deepep_low_latency_rdma_bytes(64, 7168, 2, 288) > small
    assert deepep_low_latency_rdma_bytes(64, 8192, 2, 256) > small


def test_buffer_override_wins():
    doc = gpu_doc(**{"dispatch.buffer": {"num_rdma_bytes": 1 << 30, "num_nvl_bytes": 1 << 20}})
    plan = resolve_plan(parse_config(doc))
    assert plan.modes[Layout.LOW_LATENCY].num_rdma_bytes == 1 << 30
    assert plan.modes[Layout.NORMAL].num_nvl_bytes == 1 << 20


def test_mutating_examples_never_crashes_with_another_exception():
    """Every single-field type corruption of an example is either accepted or a ConfigError."""
    doc = yaml.safe_load((CONFIGS / "h200x2-deepep.yaml").read_text())
    for section, fields in doc.items():
        for key in fields:
            for bad in (None, -1, "x", [1], {"a": 1}, 1.5, True):
                mutated = copy.deepcopy(doc)
                mutated[section][key] = bad
                try:
                    resolve_plan(parse_config(mutated))
                except ConfigError as exc:
                    assert exc.errors and all(isinstance(p, str) and p for p, _ in exc.errors)


def test_docs_config_reference_is_current():
    from ep_runtime.config import schema_markdown

    doc = (CONFIGS.parents[1] / "docs" / "config.md").read_text()
    assert doc == schema_markdown(), (
        "docs/config.md is stale: run `python -m ep_runtime.config > docs/config.md`"
    )


def test_infinite_or_nan_numbers_rejected():
    for bad in (float("inf"), float("nan")):
        errs = errors_of(base(**{"timeouts.step_s": bad}))
        assert errs[0][0] == "timeouts.step_s"


def test_deepep_normal_mode_rank_counts():
    errs = errors_of(gpu_doc(**{"parallel.ep_size": 1, "model.num_experts": 8}))
    assert errs[0][0] == "parallel.ep_size" and "allowed: 2, 4, 8" in errs[0][1]
    plan = resolve_plan(parse_config(gpu_doc(**{"parallel.ep_size": 1, "dispatch.mode": "low_latency"})))
    assert list(plan.modes) == [Layout.LOW_LATENCY]


def test_deepep_chunk_config_rules_match_deepep_asserts():
    ok = {"num_max_nvl_chunked_send_tokens": 24, "num_max_nvl_chunked_recv_tokens": 256}
    plan = resolve_plan(parse_config(gpu_doc(**{"dispatch.deepep": {"normal_dispatch": ok}})))
    assert plan.config.dispatch.deepep.normal_dispatch.num_max_nvl_chunked_recv_tokens == 256
    equal = {"num_max_nvl_chunked_send_tokens": 256, "num_max_nvl_chunked_recv_tokens": 256}
    errs = errors_of(gpu_doc(**{"dispatch.deepep": {"normal_dispatch": equal}}))
    assert errs[0][0] == "dispatch.deepep.normal_dispatch" and "must be <" in errs[0][1]
    rdma = dict(ok, num_max_rdma_chunked_send_tokens=128, num_max_rdma_chunked_recv_tokens=128)
    errs = errors_of(gpu_doc(**{"dispatch.deepep": {"normal_combine": rdma}}))
    assert errs[0][0] == "dispatch.deepep.normal_combine" and "half of" in errs[0][1]


def test_nvl_buffer_int_max_with_low_latency():
    errs = errors_of(gpu_doc(**{"dispatch.buffer": {"num_nvl_bytes": 2**31}}))
    assert errs[0][0] == "dispatch.buffer.num_nvl_bytes"


# DeepEP kernel limits (revision 567632d) that would otherwise trap on the GPU mid-run.


def test_deepep_normal_mode_local_expert_and_topk_limits():
    errs = errors_of(gpu_doc(**{"model.num_experts": 288, "model.top_k": 8}))  # 144 per rank
    assert any(p == "model.num_experts" and "at most 128 per rank" in m for p, m in errs), errs
    ll_only = gpu_doc(**{"model.num_experts": 288, "model.top_k": 8, "dispatch.mode": "low_latency"})
    assert resolve_plan(parse_config(ll_only)).num_local_experts == 144
    errs = errors_of(gpu_doc(**{"model.num_experts": 64, "model.top_k": 33, "dispatch.mode": "normal"}))
    assert ("model.top_k", "(33) exceeds DeepEP normal mode's maximum of 32") in errs


@pytest.mark.parametrize(
    ("hidden", "precision", "ok"),
    [
        (7168, "bf16", True),
        (8192, "bf16", False),
        (8192, "fp8", True),
        (8176, "bf16", True),
        (1000, "bf16", False),
    ],
)
def test_deepep_intranode_row_limit(hidden, precision, ok):
    doc = gpu_doc(
        **{"model.hidden_size": hidden, "dispatch.mode": "normal", "dispatch.precision.normal": precision}
    )
    if ok:
        assert parse_config(doc).model.hidden_size == hidden
    else:
        errs = errors_of(doc)
        assert any(p == "model.hidden_size" and "intranode dispatch" in m for p, m in errs), errs


def test_deepep_queue_pair_rules():
    ll = {"dispatch.mode": "low_latency", "model.num_experts": 64}  # 32 local experts
    errs = errors_of(gpu_doc(**ll, **{"dispatch.deepep": {"num_qps_per_rank": 8}}))
    assert any(p == "dispatch.deepep.num_qps_per_rank" and ">= 32" in m for p, m in errs), errs
    assert parse_config(gpu_doc(**ll, **{"dispatch.deepep": {"num_qps_per_rank": 32}}))
    internode = {
        "parallel.ep_size": 16,
        "parallel.nodes": 2,
        "model.num_experts": 256,
        "dispatch.mode": "normal",
    }
    errs = errors_of(gpu_doc(**internode, **{"dispatch.deepep": {"num_sms": 24, "num_qps_per_rank": 16}}))
    assert any(p == "dispatch.deepep.num_qps_per_rank" and "num_sms / 2 (12)" in m for p, m in errs), errs
    for qps in (12, 24, 32):
        assert parse_config(
            gpu_doc(**internode, **{"dispatch.deepep": {"num_sms": 24, "num_qps_per_rank": qps}})
        )


def test_deepep_low_latency_capacity_limits(monkeypatch):
    monkeypatch.delenv("NVSHMEM_QP_DEPTH", raising=False)
    errs = errors_of(gpu_doc(**{"dispatch.num_max_dispatch_tokens_per_rank": 7}))  # 2 ranks x 7
    assert any(p == "dispatch.num_max_dispatch_tokens_per_rank" and "multiple of 4" in m for p, m in errs)
    errs = errors_of(gpu_doc(**{"dispatch.num_max_dispatch_tokens_per_rank": 512}))
    assert any("NVSHMEM_QP_DEPTH >= 2 * (C + 1) = 1026" in m and "C <= 511" in m for _, m in errs), errs
    assert parse_config(gpu_doc(**{"dispatch.num_max_dispatch_tokens_per_rank": 510}))
    monkeypatch.setenv("NVSHMEM_QP_DEPTH", "2048")
    assert parse_config(gpu_doc(**{"dispatch.num_max_dispatch_tokens_per_rank": 512}))
    # The torch backend has neither limit.
    assert parse_config(base(**{"dispatch.num_max_dispatch_tokens_per_rank": 4095}))


def test_graph_decode_and_a_lower_normal_threshold_disagree():
    doc = gpu_doc(
        **{
            "dispatch.num_max_dispatch_tokens_per_rank": 128,
            "dispatch.auto": {"normal_above_tokens": 64},
            "execution.cuda_graph_decode": True,
        }
    )
    errs = errors_of(doc)
    assert any(p == "execution.cuda_graph_decode" and "normal_above_tokens (64)" in m for p, m in errs), errs
    doc["dispatch"]["auto"]["normal_above_tokens"] = 128
    assert parse_config(doc).execution.cuda_graph_decode


def test_graph_decode_auto_resolves_by_backend_device_and_mode():
    """`execution.cuda_graph_decode: auto` (the default): on for DeepEP on cuda where low-latency steps
    run and stay low-latency; off on cpu, with the torch backend, in normal mode, or where auto mode
    sends some T <= C to normal mode. An explicit value is kept (and checked)."""
    base = {"model": {"hidden_size": 2048, "num_experts": 8, "top_k": 2, "moe_intermediate_size": 256},
            "parallel": {"ep_size": 2, "device": "cuda"},
            "dispatch": {"backend": "deepep", "num_max_dispatch_tokens_per_rank": 64}}  # fmt: skip

    def graphs(**changes) -> bool:
        doc = copy.deepcopy(base)
        for section, values in changes.items():
            doc[section] = {**doc.get(section, {}), **values}
        plan = resolve_plan(parse_config(doc))
        assert plan.config.execution.cuda_graph_decode == doc.get("execution", {}).get(
            "cuda_graph_decode", "auto"
        )
        return plan.execution.cuda_graph_decode

    assert graphs() is True
    assert graphs(dispatch={"mode": "low_latency"}) is True
    assert graphs(dispatch={"mode": "normal"}) is False
    assert graphs(dispatch={"backend": "torch"}) is False
    assert graphs(parallel={"device": "cpu"}, dispatch={"backend": "torch"}) is False
    assert graphs(dispatch={"auto": {"normal_above_tokens": 32}}) is False  # T in (32, 64] goes normal
    assert graphs(dispatch={"check_conservation": True}) is False  # debug runs keep their checks
    assert graphs(dispatch={"backend": "torch"}, execution={"cuda_graph_decode": True}) is True
    assert graphs(execution={"cuda_graph_decode": False}) is False
    with pytest.raises(ConfigError, match="execution.cuda_graph_decode"):
        graphs(dispatch={"mode": "normal"}, execution={"cuda_graph_decode": True})
