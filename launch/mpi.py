"""The MPI launcher: `mpirun -n N ep-launch worker --config FILE` (or `mpiexec`).

Every process is one rank: rank and world size from `MPI.COMM_WORLD`, the node-local rank from
`Split_type(COMM_TYPE_SHARED)`. Rank 0 binds the rendezvous socket (on the plan's interface:
loopback when every rank shares its node) and broadcasts its port over MPI; then every rank runs
the same `RankWorker` as under Ray, with the MPI communicator handed to the layer (DeepEP may build
its buffer from it). Results are gathered to rank 0, which prints the summary and writes the
report. A rank that fails calls `MPI.Abort` after printing which rank, node and stage failed, so
the job ends non-zero instead of hanging; a rank killed outright is reaped by the MPI runtime
(Hydra ends the remaining ranks), and peers blocked on it fail their collective or their
watchdog fires.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from typing import Any

from ep_runtime.config import EPConfig, parse_config, resolve_plan
from ep_runtime.launch.health import BACKSTOP_S, EXIT_WATCHDOG, FaultSpec, RankFailure, StageTracker
from ep_runtime.launch.worker import LOOPBACK, RankInfo, RankWorker, Rendezvous, bind_rendezvous

EXIT_RANK_FAILED = 3


def _err(msg: str) -> None:
    print(f"[ep-launch] {msg}", file=sys.stderr, flush=True)


# Seconds between printing why the job ends and calling `MPI.Abort`. The MPI runtime forwards each
# rank's output through its process manager, which may tear the job down on the abort before it has
# forwarded what the rank wrote last; the pause lets that output reach the user's terminal first.
ABORT_GRACE_S = 1.5


def _abort_job(comm, code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)
    comm.Abort(code)


def _node_address(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def run_with_mpi(
    config: EPConfig,
    *,
    fault: FaultSpec | None = None,
    steps: int | None = None,
    verify: bool | None = None,
    on_results=None,
) -> int:
    """Run this process's rank; on rank 0 call `on_results(plan, results, wall_s)` with every rank's
    result and return its exit status (other ranks return 0). Aborts the whole job on failure."""
    from mpi4py import MPI

    t0 = time.perf_counter()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    hostname = socket.gethostname()
    procs = comm.allgather((hostname, os.getpid()))
    hosts = [h for h, _ in procs]
    if rank == 0:
        # The MPI runtime reports a killed process by pid and host only: this maps them to ranks.
        _err(
            f"MPI job of {size} ranks: "
            + ", ".join(f"rank {r} pid {p} on {h}" for r, (h, p) in enumerate(procs))
        )

    if size != config.parallel.ep_size:
        if rank == 0:
            _err(
                f"the MPI job has {size} ranks but parallel.ep_size is {config.parallel.ep_size}: "
                f"running with ep_size {size} (the MPI world size)"
            )
        data = config.model_dump()
        data["parallel"].update(ep_size=size, nodes=len(set(hosts)), ranks_per_node=None)
        config = parse_config(data)
    plan = resolve_plan(config)

    # Rank 0 binds first, then tells everyone the port: no free-port race.
    host = config.parallel.rendezvous_host
    if host == "auto":
        host = LOOPBACK if len(set(hosts)) == 1 else _node_address(hosts[0])
    sock, port, error = None, 0, None
    if rank == 0:
        try:
            sock = bind_rendezvous(host)
            port = sock.getsockname()[1]
        except OSError as exc:
            error = str(exc)
    port, error = comm.bcast((port, error), root=0)
    if error is not None:
        if rank == 0:
            _err(f"rank 0 could not bind the rendezvous: {error}")
        return 2

    node = hostname if len(set(hosts)) > 1 else _node_address(hostname) if host != LOOPBACK else LOOPBACK
    info = RankInfo(rank, size, local_rank, local_size, node)
    tracker = StageTracker(rank, node, config.timeouts)

    def abort(msg: str) -> None:
        _err(f"aborting the MPI job: {msg}")
        _abort_job(comm, EXIT_WATCHDOG)

    worker = RankWorker(
        plan,
        info,
        Rendezvous(host, port),
        listen_socket=sock,
        mpi_comm=comm,
        fault=fault,
        tracker=tracker,
        on_expire=abort,
        steps=steps,
        verify=verify,
        backstop_s=BACKSTOP_S,
    )
    display = _ProgressThread(worker, size) if rank == 0 else None
    try:
        if display is not None:
            display.start()
        result = worker.run()
    except RankFailure as exc:
        if display is not None:
            display.stop()
        _err(f"{exc}\n{traceback.format_exc()}")
        _err(f"rank {rank} on {node} failed at stage '{exc.stage}'; aborting the MPI job")
        _abort_job(comm, EXIT_RANK_FAILED)
        return EXIT_RANK_FAILED  # not reached
    finally:
        if display is not None:
            display.stop()
    results = comm.gather(result, root=0)
    if rank != 0:
        return 0
    return on_results(plan, results, time.perf_counter() - t0) if on_results else 0


class _ProgressThread:
    """Rank 0's live display of every rank's stage, read from the progress store."""

    def __init__(self, worker: RankWorker, world_size: int):
        from ep_runtime.launch.report import RankProgress

        self.worker = worker
        self.view = RankProgress(world_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ep-progress", daemon=True)

    def start(self) -> None:
        if self.view.enabled:
            self.view.__enter__()
            self._thread.start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self.view.enabled:
            self.view.__exit__(None, None, None)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                status: dict[int, dict[str, Any]] = self.worker.progress_snapshots()
            except Exception:  # noqa: BLE001 - display only
                continue
            self.view.update(status)
