"""`ep-launch check` / `explain` / `--version`: exit codes and what they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ep_runtime import __version__
from ep_runtime.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"


def test_check_ok_for_all_examples(capsys):
    files = [str(p) for p in sorted(CONFIGS.glob("*.yaml"))]
    assert main(["check", *files]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok (") == len(files)


def test_check_lists_all_errors_and_fails(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {hidden_size: 256, num_experts: 8, top_k: 2, moe_intermediate_size: 128, weights: w4a8, colour: red}\n"
        "parallel: {ep_size: 2, device: cpu}\n"
    )
    assert main(["check", str(bad), str(CONFIGS / "local-cpu.yaml")]) == 1
    captured = capsys.readouterr()
    assert "model.colour: unknown key" in captured.err
    assert "local-cpu.yaml: ok" in captured.out


def test_check_policy_violation_names_rule(tmp_path, capsys):
    bad = tmp_path / "w4a8.yaml"
    text = (CONFIGS / "w4a8-lowlatency.yaml").read_text().replace("low_latency: auto", "low_latency: fp8")
    bad.write_text(text)
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert (
        "dispatch.precision.low_latency: 'fp8' breaks the rule: w4a8 weights, low-latency mode: bf16 forced"
        in err
    )


def test_explain_shows_each_mode_and_rule(capsys):
    assert main(["explain", str(CONFIGS / "h200x2-deepep.yaml")]) == 0
    out = capsys.readouterr().out
    assert "normal" in out and "low_latency" in out and "deepep" in out
    assert "triton fused MoE" in out and "triton masked grouped GEMM" in out
    assert "precision (normal, policy default): bf16 weights" in out


def test_explain_w4a8_shows_forced_bf16(capsys):
    assert main(["explain", str(CONFIGS / "w4a8-lowlatency.yaml")]) == 0
    out = capsys.readouterr().out
    assert "precision (low_latency, policy default): w4a8 weights, low-latency mode: bf16 forced" in out


def test_explain_bad_file_exits_nonzero(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "missing.yaml")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_version_and_help_via_console_script():
    exe = Path(sys.executable).with_name("ep-launch")
    if not exe.exists():
        pytest.fail(f"console script ep-launch not installed next to {sys.executable}")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"ep-launch {__version__}"
    for args in (["--help"], ["check", "--help"], ["explain", "--help"]):
        res = subprocess.run([str(exe), *args], capture_output=True, text=True)
        assert res.returncode == 0 and "usage: ep-launch" in res.stdout
