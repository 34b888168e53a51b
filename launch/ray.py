"""The Ray launcher: one placement group, one actor per rank, results gathered to the driver.

`run_with_ray(config, ...)`:
1. connect to a cluster (`address`: `auto`, `HOST:PORT`, or `RAY_ADDRESS`) or start an embedded
   local one on loopback (token authentication is disabled only for that embedded cluster);
2. reserve one bundle per rank (`{GPU: 1, CPU: n}` on cuda, `{CPU: n}` on cpu) in one placement
   group (`PACK` on one node, `SPREAD` across nodes, or the file's strategy), waiting at most
   `timeouts.placement_s` and naming the missing resources otherwise;
3. start one actor per bundle, order them by node IP then bundle index (consecutive ranks share a
   node), let rank 0 bind the rendezvous port and report it, then run `RankWorker` on every actor;
4. watch: `ray.wait` on the results with a short poll, plus each actor's stage tracker; a rank that
   dies, raises or overruns its stage limit ends the job with a `LaunchError` naming the rank, its
   node and the last stage it reached;
5. always kill the actors, remove the placement group and stop an embedded cluster (also on
   Ctrl-C), so no process is left behind.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from ep_runtime.config import EPConfig, RuntimePlan, parse_config, resolve_plan
from ep_runtime.launch.health import (
    BACKSTOP_S,
    FaultSpec,
    LaunchError,
    RankFailure,
    StageTracker,
    watchdog_slack,
)
from ep_runtime.launch.worker import LOOPBACK, RankInfo, RankWorker, Rendezvous, bind_rendezvous

POLL_S = 0.5
"""How often the driver polls results and stage trackers."""
GRACE_S = 5.0
"""Extra seconds past a rank watchdog's deadline before the driver declares the rank hung (the
watchdog normally ends it first, with a more precise message)."""
STATUS_MISSES = 20
"""Consecutive unanswered status polls (x POLL_S, at least) after which a rank counts as hung."""


class _RankActor:
    """One rank's process under Ray (a threaded actor: `status` answers while `run` works)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._tracker: StageTracker | None = None

    def node_info(self) -> dict[str, Any]:
        import ray

        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        return {
            "ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": gpu_ids,
            "device_index": _visible_index(gpu_ids),
        }

    def bind_rendezvous(self, host: str) -> int:
        self._sock = bind_rendezvous(host)
        return self._sock.getsockname()[1]

    def run(
        self,
        config: dict[str, Any],
        info: RankInfo,
        rendezvous: Rendezvous,
        fault: str | None,
        steps: int | None,
        verify: bool | None,
        board: Any = None,
    ) -> dict[str, Any]:
        import ray

        plan = resolve_plan(parse_config(config))
        self._tracker = StageTracker(info.rank, info.node, plan.config.timeouts)
        if board is not None:
            sent: list[Any] = []  # the last report's ref (reports are sent without waiting)

            def report(snap: dict[str, Any]) -> None:
                sent[:] = [board.report.remote(snap)]

            self._tracker.listeners.append(report)
            self._tracker.flushers.append(lambda timeout_s: ray.wait(list(sent), timeout=timeout_s))
        worker = RankWorker(
            plan,
            info,
            rendezvous,
            listen_socket=self._sock,
            fault=FaultSpec.parse(fault) if fault else None,
            tracker=self._tracker,
            steps=steps,
            verify=verify,
            backstop_s=BACKSTOP_S,
        )
        self._sock = None  # the worker owns (and closes) it now
        return worker.run()

    def status(self) -> dict[str, Any] | None:
        return None if self._tracker is None else self._tracker.snapshot()


class _ProgressBoard:
    """The driver-side record of every rank's last stage (a zero-CPU actor): it outlives any rank,
    so the stage a killed rank last reached is known even when its process is gone."""

    def __init__(self) -> None:
        self._snaps: dict[int, dict[str, Any]] = {}

    def report(self, snap: dict[str, Any]) -> None:
        self._snaps[int(snap["rank"])] = snap

    def get(self) -> dict[int, dict[str, Any]]:
        return dict(self._snaps)


def _visible_index(gpu_ids: list[str]) -> int | None:
    """The index, among the devices this process sees, of the GPU Ray assigned: 0 when Ray sets
    `CUDA_VISIBLE_DEVICES` to that GPU alone (its default); its position in the list when all of
    the node's GPUs stay visible (`RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`). None on CPU."""
    if not gpu_ids:
        return None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        return visible.index(gpu_ids[0]) if gpu_ids[0] in visible else 0
    return int(gpu_ids[0]) if gpu_ids[0].isdigit() else 0


def _ip_key(ip: str) -> tuple[int, Any]:
    try:
        return (0, ipaddress.ip_address(ip))
    except ValueError:
        return (1, ip)


def _strategy(plan: RuntimePlan) -> str:
    par = plan.config.parallel
    if par.placement_strategy != "auto":
        return par.placement_strategy
    return "PACK" if par.nodes == 1 else "SPREAD"


def _bundles(plan: RuntimePlan) -> list[dict[str, float]]:
    cpus = plan.config.parallel.cpus_per_rank
    if plan.device == "cuda":
        return [{"GPU": 1.0, "CPU": cpus} for _ in range(plan.ep_size)]
    return [{"CPU": cpus} for _ in range(plan.ep_size)]


def missing_resources_message(
    bundles: list[dict[str, float]], strategy: str, total: dict[str, float], available: dict[str, float]
) -> str:
    """Why a placement group is not ready: the request against the cluster's totals and free
    resources, per resource kind."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    parts, missing = [], []
    for k, v in sorted(need.items()):
        have, free = total.get(k, 0.0), available.get(k, 0.0)
        parts.append(f"{k}: need {v:g}, cluster has {have:g} ({free:g} free)")
        if free < v:
            missing.append(f"{v - free:g} {k}")
    per = ", ".join(f"{k}: {v:g}" for k, v in bundles[0].items()) if bundles else ""
    msg = f"{len(bundles)} bundles of {{{per}}} (strategy {strategy}); " + "; ".join(parts)
    if missing:
        msg += f". Missing: {', '.join(missing)}"
    else:
        msg += ". The totals fit: the strategy's per-node layout does not (or other jobs hold resources)"
    return msg


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast (Ray itself retries for minutes) when nothing listens at `HOST:PORT`."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise LaunchError(f"--address '{address}' must be 'auto' or HOST:PORT (e.g. 10.0.0.10:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise LaunchError(
            f"no Ray cluster answers at {host}:{port} within {timeout_s:g} s ({exc}); start one with "
            f"`ray start --head --port={port}` or leave --address out for an embedded local cluster"
        ) from exc


def _connect(address: str | None, plan: RuntimePlan, log_to_driver: bool) -> tuple[Any, bool]:
    """Connect to `address` (or `RAY_ADDRESS`), or start an embedded local cluster on loopback.
    Returns `(ray module, started_here)`."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    embedded = address is None
    if embedded:
        # Before `import ray`: keep every Ray process of the embedded cluster on loopback, and
        # turn token authentication off for it only (a cluster we join keeps its own setting).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray, False
    common = {"include_dashboard": False, "log_to_driver": log_to_driver, "logging_level": "WARNING"}
    if not embedded and address != "auto":
        _check_reachable(address, min(10.0, plan.config.timeouts.placement_s))
    try:
        if embedded:
            need_cpus = plan.ep_size * plan.config.parallel.cpus_per_rank
            ray.init(
                address="local",  # always a new cluster: never join one found on this machine
                num_cpus=int(max(os.cpu_count() or 1, -(-need_cpus // 1))),
                _node_ip_address=LOOPBACK,
                **common,
            )
        else:
            ray.init(address=address, **common)
    except Exception as exc:
        where = "an embedded local Ray cluster" if embedded else f"the Ray cluster at '{address}'"
        raise LaunchError(f"could not start or join {where}: {type(exc).__name__}: {exc}") from exc
    if embedded and not ray.util.get_node_ip_address().startswith("127."):
        print(
            "[ep-launch] warning: the embedded Ray cluster is not on loopback (Ray was imported before "
            "ep-launch could set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)",
            file=sys.stderr,
        )
    return ray, True


def run_with_ray(
    config: EPConfig,
    *,
    address: str | None = None,
    fault: FaultSpec | None = None,
    steps: int | None = None,
    verify: bool | None = None,
    progress: Callable[[dict[int, dict[str, Any]]], None] | None = None,
    log_to_driver: bool = True,
) -> list[dict[str, Any]]:
    """Run the job on Ray; returns every rank's result, by rank.

    Args:
        config: the validated file (`load_config`), with any CLI overrides applied.
        address: `auto`, `HOST:PORT`, or None (then `RAY_ADDRESS`, else an embedded local cluster).
        fault: test-only fault injection passed to the ranks.
        steps / verify: override `workload.decode_steps` / `workload.verify`.
        progress: called about every `POLL_S` with `{rank: stage snapshot}`.
    Raises: `LaunchError` naming the failed rank(s), node(s) and stage(s).
    """
    plan = resolve_plan(config)
    timeouts = config.timeouts
    ray, started = _connect(address, plan, log_to_driver)
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = None
    actors: list[Any] = []
    try:
        bundles, strategy = _bundles(plan), _strategy(plan)
        pg = placement_group(bundles, strategy=strategy, name="")
        ready, _ = ray.wait([pg.ready()], timeout=timeouts.placement_s)
        if not ready:
            raise LaunchError(
                f"placement group not ready after {timeouts.placement_s:g} s (timeouts.placement_s): "
                + missing_resources_message(
                    bundles, strategy, ray.cluster_resources(), ray.available_resources()
                )
            )
        actor_cls = ray.remote(_RankActor)
        for i in range(plan.ep_size):
            actors.append(
                actor_cls.options(
                    num_cpus=config.parallel.cpus_per_rank,
                    num_gpus=1 if plan.device == "cuda" else 0,
                    max_concurrency=4,
                    max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=i
                    ),
                ).remote()
            )
        try:
            nodes = ray.get([a.node_info.remote() for a in actors], timeout=timeouts.placement_s)
        except Exception as exc:
            raise LaunchError(f"rank actors did not start within {timeouts.placement_s:g} s: {exc}") from exc
        order = sorted(range(len(actors)), key=lambda i: (_ip_key(nodes[i]["ip"]), i))
        ranked = [actors[i] for i in order]
        ranked_nodes = [nodes[i] for i in order]
        ips = [n["ip"] for n in ranked_nodes]
        infos = [
            RankInfo(
                rank=r,
                world_size=plan.ep_size,
                local_rank=ips[:r].count(ips[r]),
                local_world_size=ips.count(ips[r]),
                node=ips[r],
                device_index=ranked_nodes[r]["device_index"],
            )
            for r in range(plan.ep_size)
        ]
        per_node = {ip: ips.count(ip) for ip in dict.fromkeys(ips)}
        want = config.parallel.resolved_ranks_per_node
        if config.parallel.nodes > 1 and (
            len(per_node) != config.parallel.nodes or set(per_node.values()) != {want}
        ):
            print(
                f"[ep-launch] warning: placement put ranks on nodes as {per_node}; the file asks for "
                f"{config.parallel.nodes} nodes x {want} ranks (parallel.nodes, parallel.ranks_per_node)",
                file=sys.stderr,
            )
        host = config.parallel.rendezvous_host
        if host == "auto":
            host = LOOPBACK if len(set(ips)) == 1 else ips[0]
        port = ray.get(ranked[0].bind_rendezvous.remote(host), timeout=timeouts.rendezvous_s)
        rendezvous = Rendezvous(host, port)
        data = config.model_dump(mode="json")
        board = ray.remote(_ProgressBoard).options(num_cpus=0).remote()
        actors.append(board)
        fault_s = str(fault) if fault else None
        refs = {
            actor.run.remote(data, info, rendezvous, fault_s, steps, verify, board): info.rank
            for actor, info in zip(ranked, infos, strict=True)
        }
        return _watch(ray, refs, ranked, ranked_nodes, progress, board)
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if pg is not None:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass
        if started:
            ray.shutdown()


def _watch(
    ray: Any,
    refs: dict[Any, int],
    actors: list[Any],
    nodes: list[dict[str, Any]],
    progress: Callable[[dict[int, dict[str, Any]]], None] | None,
    board: Any,
) -> list[dict[str, Any]]:
    """Gather results; turn the first failure (death, error, overrun) into a `LaunchError`."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    pending = dict(refs)
    results: dict[int, dict[str, Any]] = {}
    status: dict[int, dict[str, Any]] = {}
    misses: dict[int, int] = {}
    failures: dict[int, tuple[str, str]] = {}
    stages: dict[int, str] = {}  # the stage a rank's own error names (it wins over snapshots)
    failed_at: float | None = None
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
        for ref in ready:
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None) or exc
                failures.setdefault(rank, ("error", str(cause)))
                if isinstance(cause, RankFailure):
                    stages[rank] = cause.stage
            except RayActorError as exc:
                failures.setdefault(rank, ("died", _death_reason(exc)))
            except GetTimeoutError:
                pending[ref] = rank
        live = {ref: r for ref, r in pending.items()}
        srefs = {actors[r].status.remote(): r for r in live.values()}
        if srefs:
            sready, snot = ray.wait(list(srefs), num_returns=len(srefs), timeout=2.0)
            for s in sready:
                r = srefs[s]
                try:
                    snap = ray.get(s)
                except Exception:  # noqa: BLE001 - the run ref reports the death
                    continue
                misses[r] = 0
                if snap is not None:
                    status[r] = snap
            for s in snot:
                r = srefs[s]
                misses[r] = misses.get(r, 0) + 1
                if misses[r] >= STATUS_MISSES and r not in failures:
                    failures[r] = ("hung", f"no status answer for {misses[r] * POLL_S:.0f}+ s")
        for r in live.values():
            snap = status.get(r)
            if snap is None or r in failures:
                continue
            if snap.get("expired"):
                failures[r] = ("timed out", snap["expired"])
            elif snap["limit_s"] is not None and snap["elapsed_s"] > (
                snap["limit_s"] + watchdog_slack(snap["limit_s"]) + GRACE_S
            ):
                failures[r] = (
                    "timed out",
                    f"stage '{snap['stage']}' ran {snap['elapsed_s']:.1f} s, past its limit of {snap['limit_s']:g} s",
                )
        if progress is not None:
            progress({**status, **{r: {"stage": "done", "step": 1, "steps": 1} for r in results}})
        if failures:
            failed_at = failed_at or time.monotonic()
            # A killed rank shows up at its peers as broken connections: give the rank that
            # actually failed a moment to report, so the message names it first.
            if time.monotonic() - failed_at > 3.0 or not pending:
                break
    if failures:
        try:  # the board has the stage each rank reported last, dead ones included
            for r, snap in ray.get(board.get.remote(), timeout=5).items():
                if r in failures and (r not in status or snap.get("wall", 0) >= status[r].get("wall", 0)):
                    status[r] = snap
        except Exception as exc:  # noqa: BLE001 - fall back to the last polled status
            print(f"[ep-launch] progress board unavailable: {exc}", file=sys.stderr)
        for r, stage in stages.items():
            status[r] = {**status.get(r, {}), "stage": stage}
        raise LaunchError(_failure_message(failures, status, nodes))
    return [results[r] for r in range(len(actors))]


def _death_reason(exc: Exception) -> str:
    import re

    kind = re.search(r"Worker exit type: (\w+)", str(exc))
    return "its actor process died (killed or crashed" + (
        f"; Ray exit type {kind.group(1)})" if kind else ")"
    )


_SEVERITY = {"died": 0, "hung": 1, "timed out": 2, "error": 3}


def _failure_message(
    failures: dict[int, tuple[str, str]], status: dict[int, dict[str, Any]], nodes: list[dict[str, Any]]
) -> str:
    """Deaths first (a killed rank shows up at its peers as connection errors), then overruns,
    then errors; each line names the rank, node, pid, last stage and step."""
    entries = []
    for r, (kind, detail) in failures.items():
        snap = status.get(r) or {}
        if kind == "died" and snap.get("expired"):
            kind, detail = "timed out", f"{snap['expired']} (ended by its watchdog)"
        entries.append((_SEVERITY[kind], r, kind, detail, snap))
    entries.sort(key=lambda e: (e[0], e[1]))
    lines, heads = [], []
    for _, r, kind, detail, snap in entries:
        stage = snap.get("stage", "start")
        step = f", step {snap['step']}/{snap['steps']}" if snap.get("steps") else ""
        where = f"node {nodes[r]['ip']} ({nodes[r]['host']}, pid {nodes[r]['pid']})"
        lines.append(f"rank {r} on {where} {kind} at stage '{stage}'{step}: {detail}")
        heads.append(f"rank {r} {kind} at stage '{stage}'")
    return "job failed: " + "; ".join(heads) + "\n  " + "\n  ".join(lines)
