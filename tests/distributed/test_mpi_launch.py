"""The MPI launcher on CPU with the pip MPICH `mpiexec`: 2 and 4 ranks run the job and verify; a
rank killed mid-run or hanging ends the job non-zero in bounded time, with no process left."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.dist_utils import wait_no_marked

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
LOCAL_CPU = REPO / "deploy" / "configs" / "local-cpu.yaml"


@pytest.fixture(autouse=True)
def _mpiexec_installed():
    # The README's setup installs MPICH into the venv; a missing mpiexec is a broken setup, not a skip.
    if not MPIEXEC.exists():
        pytest.fail(f"{MPIEXEC} not installed: run `bash deploy/setup-local.sh` (pip install mpich)")


def _mpiexec(
    n: int, *args: str, timeout: float = 120
) -> tuple[subprocess.CompletedProcess, float, list[int]]:
    marker = uuid.uuid4().hex
    env = dict(os.environ, EP_TEST_MARKER=marker, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(MPIEXEC), "-n", str(n), str(BIN / "ep-launch"), "worker", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.monotonic() - t0
    return proc, elapsed, wait_no_marked(marker, timeout=10, poll=0.25)


@pytest.mark.parametrize("n", [2, 4])
def test_mpiexec_runs_and_verifies(n, tmp_path):
    report = tmp_path / "report.json"
    proc, _, left = _mpiexec(n, "--config", str(LOCAL_CPU), "--steps", "2", "--report", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED" in proc.stdout
    doc = json.loads(report.read_text())
    assert doc["launcher"] == "mpi"
    assert [r["rank"] for r in doc["ranks"]] == list(range(n))
    assert all(r["verify"]["passed"] for r in doc["ranks"])
    assert doc["summary"]["verification"]["tokens"] == n * (96 + 2 * 8)
    assert {r["env"]["MASTER_ADDR"] for r in doc["ranks"]} == {"127.0.0.1"}
    assert not left


@pytest.mark.parametrize("stage", ["rendezvous", "build_layer", "decode"])
def test_killed_mpi_rank_ends_the_job(stage):
    proc, elapsed, left = _mpiexec(2, "--config", str(LOCAL_CPU), "--fault", f"1:{stage}:kill")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"rank 1 kill at stage '{stage}'" in out
    # Hydra names a dead process by pid and the launcher's rank map turns it into a rank. Which one
    # it names is a race: rank 1 (killed), or rank 0 when Hydra's clean-up SIGKILL of the survivors
    # is what it notices first (exit code 9 for either).
    dead = re.search(r"PID (\d+) RUNNING AT", out)
    if dead is not None:
        assert re.search(rf"rank [01] pid {dead.group(1)} on", out), out
    else:  # the peer noticed first and aborted the job naming its stage
        assert "failed at stage" in out, out
    assert elapsed < 60, f"took {elapsed:.1f} s"
    assert not left, f"processes left behind: {left}"


def test_hung_mpi_rank_is_aborted_by_its_watchdog(tmp_path):
    cfg = tmp_path / "fast.yaml"
    data = yaml.safe_load(LOCAL_CPU.read_text())
    data.setdefault("timeouts", {})["step_s"] = 4
    cfg.write_text(yaml.safe_dump(data))
    proc, elapsed, left = _mpiexec(2, "--config", str(cfg), "--fault", "1:decode:hang")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "stage 'decode' exceeded its timeout (4 s" in out, out
    assert "aborting the MPI job" in out
    assert elapsed < 45, f"took {elapsed:.1f} s"
    assert not left, f"processes left behind: {left}"
