"""Bounded waiting and failure reports for one rank: stages, the step watchdog, fault injection.

Every rank walks through the same named stages (`STAGES`). A `StageTracker` records the stage it
is in, since when, and the limit that applies (from the file's `timeouts` section); the launchers
read it to name the last stage a failed rank reached. A `Watchdog` thread enforces those limits
inside the rank: when a stage overruns it writes a message naming the rank, the stage and the peers
not heard from (read from the shared progress store), then calls the launcher's `on_expire` (MPI:
`Abort`; default: exit the process), so a rank blocked in a collective cannot hang the job.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ep_runtime.config import TimeoutsConfig

STAGES = (
    "start",
    "rendezvous",
    "process_group",
    "build_layer",
    "warmup",
    "prefill",
    "decode",
    "verify",
    "finish",
    "teardown",
    "done",
)
"""The stages of one rank, in order (also the names fault injection accepts)."""

BACKSTOP_S = 30.0
"""Seconds past a rank watchdog's own deadline after which the C-level backstop timer ends the
process (for waits inside native calls that hold the GIL, where the watchdog thread cannot run)."""

EXIT_WATCHDOG = 3
"""Exit status of a rank process ended by its watchdog."""


def watchdog_slack(limit_s: float) -> float:
    """Seconds the watchdog waits past a stage's limit before ending the rank. The operations in a
    stage carry their own timeouts (store connect, process-group init, gloo/NCCL collectives) and
    raise clearer errors; the watchdog is the backstop for waits that have none."""
    return max(5.0, 0.1 * limit_s)


class LaunchError(RuntimeError):
    """The job failed; the message names the rank(s), node(s) and last stage(s)."""


class RankFailure(RuntimeError):
    """An error inside one rank, annotated with the rank, node and stage it happened in."""

    def __init__(self, rank: int, node: str, stage: str, message: str):
        self.rank, self.node, self.stage = rank, node, stage
        super().__init__(f"rank {rank} on {node} failed at stage '{stage}': {message}")

    def __reduce__(self):  # keep the fields through pickling (Ray, MPI)
        return (_rebuild_rank_failure, (self.rank, self.node, self.stage, self.args[0]))


def _rebuild_rank_failure(rank: int, node: str, stage: str, full: str) -> RankFailure:
    exc = RankFailure.__new__(RankFailure)
    exc.rank, exc.node, exc.stage = rank, node, stage
    RuntimeError.__init__(exc, full)
    return exc


def stage_limit(stage: str, timeouts: TimeoutsConfig) -> float | None:
    """Seconds a rank may spend in `stage` (None: unbounded, e.g. the idle `done`)."""
    if stage in ("rendezvous", "process_group"):
        return timeouts.rendezvous_s
    if stage in ("build_layer", "finish", "teardown"):
        return timeouts.collective_s
    if stage in ("start", "warmup", "prefill", "decode", "verify"):
        return timeouts.step_s
    return None


@dataclass(frozen=True)
class FaultSpec:
    """Test-only fault injection: make `rank` misbehave on entering `stage`.

    `kind`: `kill` (SIGKILL itself), `hang` (sleep forever; the watchdog must end it) or `raise`.
    Written as `RANK:STAGE[:KIND]` (default kind `kill`), e.g. `1:decode:kill`.
    """

    rank: int
    stage: str
    kind: str = "kill"

    KINDS = ("kill", "hang", "raise")

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0].isdigit():
            raise ValueError(f"fault spec '{text}' must be RANK:STAGE[:KIND], e.g. 1:decode:kill")
        kind = parts[2] if len(parts) == 3 else "kill"
        if parts[1] not in STAGES:
            raise ValueError(f"fault stage '{parts[1]}' is unknown; allowed: {', '.join(STAGES)}")
        if kind not in cls.KINDS:
            raise ValueError(f"fault kind '{kind}' is unknown; allowed: {', '.join(cls.KINDS)}")
        return cls(int(parts[0]), parts[1], kind)

    def __str__(self) -> str:
        return f"{self.rank}:{self.stage}:{self.kind}"

    def maybe_trigger(self, rank: int, stage: str, flush: Callable[[], None] | None = None) -> None:
        """`flush`: delivers the rank's pending stage reports first (a `kill` then dies with its
        stage known to the driver, as if it died mid-stage, however loaded the machine is)."""
        if rank != self.rank or stage != self.stage:
            return
        print(
            f"[ep-launch] fault injection: rank {rank} {self.kind} at stage '{stage}'",
            file=sys.stderr,
            flush=True,
        )
        if self.kind == "kill":
            if flush is not None:
                flush()
            time.sleep(0.5)  # as if it died mid-stage: its stage report has left the process
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "hang":
            while True:
                time.sleep(3600)
        else:
            raise RuntimeError(f"injected fault at stage '{stage}'")


class StageTracker:
    """The stage one rank is in (thread-safe), with step counters for progress displays.

    Every callable in `listeners` gets the snapshot on each stage change and step, e.g. to write
    the shared progress store that peers' watchdogs read, or the Ray driver's progress board.
    """

    def __init__(self, rank: int, node: str, timeouts: TimeoutsConfig):
        self.rank = rank
        self.node = node
        self.timeouts = timeouts
        self._lock = threading.Lock()
        self._stage = "start"
        self._since = time.monotonic()
        self._limit = stage_limit("start", timeouts)
        self._step = 0
        self._steps = 0
        self.expired: str | None = None
        self.error: str | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.flushers: list[Callable[[float], None]] = []
        """Callables that wait (at most the given seconds) until the listeners' reports so far
        are delivered, for listeners that send asynchronously (the Ray progress board)."""

    def enter(self, stage: str, steps: int = 0) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage '{stage}' is unknown; allowed: {', '.join(STAGES)}")
        with self._lock:
            self._stage, self._since = stage, time.monotonic()
            self._limit = stage_limit(stage, self.timeouts)
            self._step, self._steps = 0, steps
        self._publish()

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait, at most `timeout_s` per flusher, for the stage reports sent so far to land."""
        for flusher in self.flushers:
            try:
                flusher(timeout_s)
            except Exception as exc:  # noqa: BLE001 - a failed delivery must not mask the caller's path
                print(f"[ep-launch] stage report flush failed: {exc}", file=sys.stderr, flush=True)

    def step(self, done: int) -> None:
        with self._lock:
            self._step = done
        self._publish()

    @property
    def stage(self) -> str:
        return self._stage

    @property
    def since(self) -> float:
        """`time.monotonic()` when the current stage was entered."""
        return self._since

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rank": self.rank,
                "node": self.node,
                "pid": os.getpid(),
                "stage": self._stage,
                "elapsed_s": time.monotonic() - self._since,
                "limit_s": self._limit,
                "step": self._step,
                "steps": self._steps,
                "expired": self.expired,
                "error": self.error,
                "wall": time.time(),
            }

    def _publish(self) -> None:
        if not self.listeners:
            return
        snap = self.snapshot()
        for listener in self.listeners:
            try:
                listener(snap)
            except Exception:  # noqa: BLE001 - progress is best effort; the watchdog reports failures
                pass


class Watchdog:
    """Ends a rank whose current stage overruns its limit.

    Args:
        tracker: the rank's stage tracker.
        peers: optional `() -> str` describing peers not heard from (read from the progress store).
        on_expire: called with the message once a limit is exceeded; default prints it and exits
            the process with `EXIT_WATCHDOG` after `grace_s` (so a launcher polling the tracker
            can read the message first).
    """

    def __init__(
        self,
        tracker: StageTracker,
        *,
        peers: Callable[[], str] | None = None,
        on_expire: Callable[[str], None] | None = None,
        grace_s: float = 2.0,
        poll_s: float = 0.25,
        backstop_s: float | None = None,
    ):
        self.tracker = tracker
        self.peers = peers
        self.on_expire = on_expire
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.backstop_s = backstop_s
        self._armed: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"ep-watchdog-{tracker.rank}", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        if self._armed is not None:
            faulthandler.cancel_dump_traceback_later()
            self._armed = None

    def _arm_backstop(self, snap: dict[str, Any]) -> None:
        """The hard backstop (`backstop_s` set; a rank in its own process only): a C-level timer
        that prints every thread's stack and exits the process `backstop_s` after this thread would
        have ended the rank. It fires even when this thread cannot run because a native call holds
        the GIL (DeepEP's buffer set-up and teardown, its intranode dispatch's CPU wait)."""
        key = (snap["stage"], self.tracker.since)  # re-armed once per stage entry
        if self._armed == key:
            return
        limit = snap["limit_s"]
        if limit is None:
            faulthandler.cancel_dump_traceback_later()
        else:
            left = limit + watchdog_slack(limit) - snap["elapsed_s"] + self.grace_s + self.backstop_s
            faulthandler.dump_traceback_later(max(left, 1.0), exit=True)
        self._armed = key

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            snap = self.tracker.snapshot()
            if self.backstop_s is not None:
                self._arm_backstop(snap)
            limit = snap["limit_s"]
            if limit is None or snap["elapsed_s"] <= limit + watchdog_slack(limit):
                continue
            msg = (
                f"rank {snap['rank']} on {snap['node']}: stage '{snap['stage']}' exceeded its timeout "
                f"({limit:g} s; step {snap['step']}/{snap['steps']})"
            )
            if self.peers is not None:
                try:
                    msg += f"; {self.peers()}"
                except Exception as exc:  # noqa: BLE001 - the store may be gone with rank 0
                    msg += f"; peers unknown (progress store unreachable: {exc})"
            self.tracker.expired = msg
            self.tracker._publish()
            print(f"[ep-launch] watchdog: {msg}", file=sys.stderr, flush=True)
            if self.on_expire is not None:
                self.on_expire(msg)
            else:
                time.sleep(self.grace_s)
                os._exit(EXIT_WATCHDOG)
            return
