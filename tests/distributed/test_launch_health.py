"""Bounded waiting and launch security inside one rank (no Ray, no MPI): the rendezvous names the
ranks that never arrived, an unreachable rank 0 is reported within the limit, the watchdog names
the overrunning stage and the peers behind, the store listens on the plan's interface only, rank
environment defaults never override the user's, and no launcher code hands strings to a shell."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest

from ep_runtime.config import TimeoutsConfig, load_config, parse_config, resolve_plan
from ep_runtime.launch.health import RankFailure, StageTracker, Watchdog, stage_limit
from ep_runtime.launch.worker import (
    RankInfo,
    RankWorker,
    Rendezvous,
    apply_environment,
    bind_rendezvous,
    library_environment,
)

REPO = Path(__file__).resolve().parents[2]


def _plan(**overrides):
    data = load_config(REPO / "deploy" / "configs" / "local-cpu.yaml").model_dump()
    for section, values in overrides.items():
        data[section].update(values)
    return resolve_plan(parse_config(data))


def test_rendezvous_names_ranks_that_never_arrive():
    plan = _plan(timeouts={"rendezvous_s": 1.5})
    sock = bind_rendezvous("127.0.0.1")
    port = sock.getsockname()[1]
    worker = RankWorker(
        plan, RankInfo(0, 2, 0, 2, "127.0.0.1"), Rendezvous("127.0.0.1", port), listen_socket=sock,
        on_expire=lambda msg: None,
    )  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        worker.run()
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert info.value.stage == "rendezvous" and info.value.rank == 0
    assert "timeouts.rendezvous_s" in msg and "ranks not heard from: 1" in msg, msg


def test_unreachable_rank0_is_reported_within_the_limit():
    plan = _plan(timeouts={"rendezvous_s": 1.5})
    with socket.socket() as s:  # a port nobody serves
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = RankWorker(
        plan, RankInfo(1, 2, 1, 2, "127.0.0.1"), Rendezvous("127.0.0.1", port), on_expire=lambda msg: None
    )
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        worker.run()
    assert time.monotonic() - t0 < 20
    assert f"could not reach rank 0's rendezvous store at 127.0.0.1:{port}" in str(info.value)


def test_watchdog_names_stage_and_peers():
    tracker = StageTracker(3, "node-a", TimeoutsConfig(step_s=0.3))  # fires at 0.3 s + 5 s slack
    fired = threading.Event()
    got: list[str] = []

    def on_expire(msg: str) -> None:
        got.append(msg)
        fired.set()

    dog = Watchdog(tracker, peers=lambda: "peers not heard from: rank 1", on_expire=on_expire, poll_s=0.05)
    dog.start()
    tracker.enter("decode", steps=4)
    tracker.step(2)
    assert fired.wait(10)
    dog.stop()
    assert "rank 3 on node-a: stage 'decode' exceeded its timeout (0.3 s; step 2/4)" in got[0]
    assert "peers not heard from: rank 1" in got[0]
    assert tracker.snapshot()["expired"] == got[0]


def test_stage_limits_come_from_the_file():
    t = TimeoutsConfig(placement_s=1, rendezvous_s=2, collective_s=3, step_s=4)
    stages = ("rendezvous", "process_group", "build_layer", "decode", "teardown", "done")
    assert [stage_limit(s, t) for s in stages] == [2, 2, 3, 4, 3, None]


def test_rendezvous_listens_on_the_named_interface_only():
    sock = bind_rendezvous("127.0.0.1")
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
    with pytest.raises(OSError, match="parallel.rendezvous_host '192.0.2.254'"):
        bind_rendezvous("192.0.2.254")  # TEST-NET: not an address of this machine


def test_environment_defaults_never_override_the_user(monkeypatch):
    plan = _plan()
    rdv = Rendezvous("127.0.0.1", 12345)
    assert library_environment(plan, rdv)["GLOO_SOCKET_IFNAME"] == "lo"
    cuda = _plan(parallel={"device": "cuda"}, kernels={"experts": "auto"})
    env = library_environment(cuda, Rendezvous("10.0.0.1", 1))
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert "GLOO_SOCKET_IFNAME" not in env  # not loopback: the user's interface choice
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    applied = apply_environment(plan, RankInfo(1, 2, 1, 2, "127.0.0.1", device_index=0), rdv)
    import os

    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7" and "GLOO_SOCKET_IFNAME" not in applied
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["MASTER_PORT"]) == ("1", "0", "12345")


def test_launchers_never_use_a_shell():
    sources = [*sorted((REPO / "launch").glob("*.py")), REPO / "ep_runtime" / "cli.py"]
    for path in sources:
        text = path.read_text()
        assert not re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(", text), path


_BACKSTOP_CHILD = """
import time
from ep_runtime.config import TimeoutsConfig
from ep_runtime.launch.health import StageTracker, Watchdog
import ep_runtime.launch.health as health

health.watchdog_slack = lambda limit: 0.2  # keep the test short
tracker = StageTracker(0, "node-a", TimeoutsConfig(step_s=0.3))
tracker.enter("decode")
Watchdog(tracker, on_expire=lambda msg: None, poll_s=0.05, grace_s=0.1, backstop_s=0.5).start()
time.sleep(0.3)
{block}
print("still alive", flush=True)
"""


@pytest.mark.parametrize("held", [True, False])
def test_backstop_ends_a_rank_whose_watchdog_cannot_act(held):
    """The watchdog thread's own action did nothing here (on_expire returns); the C-level backstop
    still ends the process about 0.3 + 0.2 + 0.1 + 0.5 s after the stage began, with every thread's
    stack, even while the main thread holds the GIL in one long native call. A rank whose stage ends
    in time disarms it."""
    import subprocess
    import sys

    if held:  # a native call that never releases the GIL (as DeepEP's buffer set-up can)
        block = "import re; re.match(r'(a+)+$', 'a' * 40 + 'b')"
    else:
        block = "tracker.enter('done'); time.sleep(2.5)"
    child = _BACKSTOP_CHILD.replace("{block}", block)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    if held:
        assert proc.returncode != 0 and "still alive" not in proc.stdout, proc.stdout + proc.stderr
        assert "Timeout" in proc.stderr and "Thread" in proc.stderr, proc.stderr
        assert took < 20, took
    else:
        assert proc.returncode == 0 and "still alive" in proc.stdout, proc.stdout + proc.stderr


def test_fault_kill_delivers_pending_stage_reports_first(monkeypatch, capsys):
    """A `kill` fault flushes the rank's stage reports before the SIGKILL (the Ray board gets them
    asynchronously; under load a report could otherwise die with the process and the driver would
    name the stage before). A flusher that fails is reported, not raised."""
    import ep_runtime.launch.health as health

    calls: list[str] = []
    monkeypatch.setattr(health.time, "sleep", lambda s: calls.append("sleep"))
    monkeypatch.setattr(health.os, "kill", lambda pid, sig: calls.append(f"kill {sig}"))
    tracker = StageTracker(1, "node-a", TimeoutsConfig())
    tracker.flushers.append(lambda timeout_s: calls.append(f"flush {timeout_s:g}"))

    def broken(timeout_s):
        raise TimeoutError("board gone")

    tracker.flushers.append(broken)
    fault = health.FaultSpec.parse("1:decode:kill")
    fault.maybe_trigger(0, "decode", flush=tracker.flush)  # another rank: nothing
    fault.maybe_trigger(1, "prefill", flush=tracker.flush)  # another stage: nothing
    assert calls == []
    fault.maybe_trigger(1, "decode", flush=tracker.flush)
    assert calls == ["flush 5", "sleep", f"kill {health.signal.SIGKILL}"]
    assert "stage report flush failed: board gone" in capsys.readouterr().err
