"""The Ray launcher on CPU, loopback only: end-to-end runs that verify against the reference (2 and
4 ranks on one shared embedded cluster), joining a pre-started `ray start --head` cluster, a rank
killed mid-run, a rank that hangs, and a placement group that cannot be satisfied.

Process hygiene: every Ray process a test starts inherits a unique marker in its environment;
afterwards no process may still carry it (only those processes are ever signalled)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

# Before Ray is imported anywhere in this process: keep the embedded cluster on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402 - a dependency the README's setup installs: missing is a failure, not a skip

from ep_runtime.config import load_config, parse_config, resolve_plan  # noqa: E402
from ep_runtime.launch.health import FaultSpec, LaunchError  # noqa: E402
from ep_runtime.launch.ray import run_with_ray  # noqa: E402
from ep_runtime.launch.report import summarize  # noqa: E402
from tests.dist_utils import marked_pids, wait_no_marked  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCAL_CPU = REPO / "deploy" / "configs" / "local-cpu.yaml"


def _config(**overrides):
    data = load_config(LOCAL_CPU).model_dump()
    for section, values in overrides.items():
        data[section].update(values)
    return parse_config(data, "local-cpu.yaml (test overrides)")


def _env(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(EP_TEST_MARKER=marker, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    return env


# -- subprocess tests (each with its own cluster), before the shared in-process cluster starts ----


def test_killed_rank_ends_the_job_naming_it_and_leaves_no_process():
    marker = uuid.uuid4().hex
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "ep-launch"), "run", "--fault", "1:decode:kill"],
        cwd=REPO,
        env=_env(marker),
        capture_output=True,
        text=True,
        timeout=150,
    )
    elapsed = time.monotonic() - t0
    left = wait_no_marked(marker)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    report = proc.stderr
    assert "job failed: rank 1 died at stage 'decode'" in report, report
    assert "rank 1 on node 127.0.0.1" in report
    # Bounded: far below the file's step limit (120 s): the death is noticed, not timed out.
    assert elapsed < 60, f"took {elapsed:.1f} s"
    assert not left, f"processes left behind: {left}"


def test_ctrl_c_stops_actors_and_the_embedded_cluster(tmp_path):
    marker = uuid.uuid4().hex
    cfg = tmp_path / "slow.yaml"
    data = yaml.safe_load(LOCAL_CPU.read_text())
    data["timeouts"]["step_s"] = 300  # the hang must outlast the interrupt
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen(
        [str(BIN / "ep-launch"), "run", "--config", str(cfg), "--fault", "1:decode:hang"],
        cwd=REPO,
        env=_env(marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen = ""
        deadline = time.monotonic() + 90
        while "rank 1 hang at stage 'decode'" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert "rank 1 hang at stage 'decode'" in seen, seen
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, seen + out
    assert "interrupted" in out
    left = wait_no_marked(marker)
    assert not left, f"processes left behind: {left}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_join_prestarted_head_on_loopback():
    marker = uuid.uuid4().hex
    env = _env(marker)
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    port = _free_port()
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        run = subprocess.run(
            [str(BIN / "ep-launch"), "run", "--address", f"127.0.0.1:{port}", "--steps", "2"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "PASSED" in run.stdout, run.stdout
    finally:
        # Stop only this head's processes (`ray stop` would stop every Ray cluster on the machine).
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in marked_pids(marker):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if not wait_no_marked(marker, timeout=10):
                break
    assert not marked_pids(marker)


# -- one embedded cluster shared by the in-process tests -----------------------------------------


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.parametrize("ranks", [2, 4])
def test_embedded_cluster_runs_and_verifies(cluster, ranks):
    cfg = _config(parallel={"ep_size": ranks})
    results = run_with_ray(cfg, steps=2, log_to_driver=False)
    assert [r["rank"] for r in results] == list(range(ranks))
    for r in results:
        assert r["verify"]["passed"], r["verify"]
        assert r["verify"]["tokens"] == 96 + 2 * 8
        assert r["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert r["env"]["WORLD_SIZE"] == str(ranks)
        assert r["phases"]["prefill"]["layout"] == "normal"
        assert r["phases"]["decode"]["layout"] == "low_latency"
    assert len({r["pid"] for r in results}) == ranks
    summary = summarize(results, resolve_plan(cfg))
    assert summary["verification"]["passed"]
    assert summary["phases"]["decode"]["steps"] == 2
    # Every (token, expert) pair went somewhere: per-rank counts add up to T * K on every rank.
    tel = results[0]["phases"]["prefill"]["telemetry"][0]
    assert sum(tel["tokens_per_rank"]) == 96 * ranks * cfg.model.top_k


def test_hung_rank_is_ended_within_the_step_limit(cluster):
    cfg = _config(timeouts={"step_s": 4})
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        run_with_ray(cfg, fault=FaultSpec(1, "decode", "hang"), log_to_driver=False)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "rank 1" in msg and "timed out at stage 'decode'" in msg, msg
    assert "exceeded its timeout (4 s" in msg
    assert elapsed < 4 + 30, f"took {elapsed:.1f} s"


def test_rank_killed_during_rendezvous_is_named_and_reaped(cluster):
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        run_with_ray(_config(), fault=FaultSpec(1, "rendezvous", "kill"), log_to_driver=False)
    msg = str(info.value)
    assert "rank 1 died at stage 'rendezvous'" in msg, msg
    assert time.monotonic() - t0 < 60
    # The surviving actor processes were killed too (their pids are in the report).
    pids = [int(p) for p in re.findall(r"pid (\d+)\)", msg)]
    assert pids
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]


def test_raising_rank_names_rank_and_stage(cluster):
    with pytest.raises(LaunchError) as info:
        run_with_ray(_config(), fault=FaultSpec(0, "build_layer", "raise"), log_to_driver=False)
    assert "rank 0" in str(info.value) and "build_layer" in str(info.value)
    assert "injected fault" in str(info.value)


def test_unsatisfiable_placement_names_missing_resources(cluster):
    cfg = _config(parallel={"cpus_per_rank": 64}, timeouts={"placement_s": 1})
    with pytest.raises(LaunchError) as info:
        run_with_ray(cfg, log_to_driver=False)
    msg = str(info.value)
    assert "timeouts.placement_s" in msg and "CPU: need 128" in msg and "Missing: 124 CPU" in msg, msg
