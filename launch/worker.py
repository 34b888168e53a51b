"""What one rank runs, identical under Ray and MPI.

`RankWorker(plan, info, rendezvous).run()`:
1. environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
   `MASTER_PORT`; on CUDA NCCL async error handling on and NVLink multicast off (NCCL NVLS, torch
   symmetric memory, NVSHMEM NVLS), the device from `LOCAL_RANK`;
2. rendezvous on rank 0's TCPStore (rank 0 listens on a socket its launcher bound on the plan's
   interface, so there is no free-port race) within `timeouts.rendezvous_s`, naming the peers not
   heard from on expiry; then the process group with `timeouts.collective_s` per collective;
3. `workload.num_layers` `EPMoE` layers (residual adds between them);
4. the workload: warmup, one prefill step (`is_prefill=True`), `decode_steps` decode steps, on
   synthetic hidden states deterministic per (seed, rank, step), each step timed;
5. optional verification of every timed token against the float32 reference.

The rank's stage is tracked (`launch.health`) and published to a progress store on rank 0's
TCPStore; a watchdog thread ends the rank when a stage overruns its limit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ep_runtime.config import RuntimePlan
from ep_runtime.launch.health import (
    STAGES,
    FaultSpec,
    RankFailure,
    StageTracker,
    Watchdog,
)
from ep_runtime.types import Layout

LOOPBACK = "127.0.0.1"
_MASK63 = (1 << 63) - 1

# Relative error (max |out - ref| / max |ref|, over this rank's tokens, on the MoE contribution)
# allowed per weights scheme and dispatch precision. bf16 rounding of activations and outputs gives
# ~1e-2; fp8 e4m3 activations (3 mantissa bits) ~6e-2; int4 weights are compared to their own
# dequantised values, so w4a8 only adds the per-tensor vs per-group activation scale difference.
VERIFY_TOLERANCE = {
    ("bf16", "bf16"): 3e-2,
    ("bf16", "fp8"): 1.2e-1,
    ("fp8_block", "bf16"): 1.2e-1,
    ("fp8_block", "fp8"): 1.2e-1,
    ("w4a8", "bf16"): 1.5e-1,
    ("w4a8", "fp8"): 1.5e-1,
}


@dataclass(frozen=True)
class RankInfo:
    """Where one rank sits: global rank, world size, its position among the ranks of its node and
    their count, the node's address, and (under Ray on GPUs) the index of its GPU among the devices
    this process sees: 0 when Ray gives each actor its own `CUDA_VISIBLE_DEVICES`. `LOCAL_RANK`
    is that device index when set (what torch programs use it for), else the position on the node."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: str
    device_index: int | None = None

    @property
    def local_rank_env(self) -> int:
        return self.device_index if self.device_index is not None else self.local_rank


@dataclass(frozen=True)
class Rendezvous:
    """Rank 0's TCPStore address."""

    host: str
    port: int


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def bind_rendezvous(host: str) -> socket.socket:
    """A listening TCP socket on `host` (an address of this node) with a port chosen by the kernel.

    Rank 0 hands its file descriptor to the TCPStore, so the port is never released between being
    chosen and being served, and the store listens only on the interface the plan names.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen on parallel.rendezvous_host '{host}' ({exc}); it must be an address of "
            "rank 0's node"
        ) from exc
    return sock


def _loopback_ifname() -> str | None:
    try:
        for _, name in socket.if_nameindex():
            if name == "lo" or name.startswith("lo0"):
                return name
    except OSError:
        pass
    return None


def rank_environment(plan: RuntimePlan, info: RankInfo, rendezvous: Rendezvous) -> dict[str, str]:
    """Environment variables one rank sets before torch.distributed, NCCL or NVSHMEM start.

    Rank variables are always set; library knobs (NCCL, NVSHMEM, gloo) only where the user's
    environment does not already choose (`setdefault` semantics are applied by `apply_environment`).
    """
    env = {
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank_env),
        "LOCAL_WORLD_SIZE": str(info.local_world_size),
        "MASTER_ADDR": rendezvous.host,
        "MASTER_PORT": str(rendezvous.port),
    }
    return env


def library_environment(plan: RuntimePlan, rendezvous: Rendezvous) -> dict[str, str]:
    """Defaults for NCCL / NVSHMEM / gloo that the plan implies (the user's values win)."""
    env: dict[str, str] = {}
    if plan.device == "cuda":
        env.update(
            {
                # On an NCCL error or timeout, end the process without aborting communicators
                # (3 = SkipCleanUp): an abort could wait behind a kernel stuck on a dead peer.
                "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
                # NVLink multicast (NVLS) is off: the lent H200 machines do not support it, and
                # neither NCCL, torch symmetric memory nor NVSHMEM need it for EP traffic.
                "NCCL_NVLS_ENABLE": "0",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1",
            }
        )
    if is_loopback(rendezvous.host):
        lo = _loopback_ifname()
        if lo is not None:
            env["GLOO_SOCKET_IFNAME"] = lo
    return env


def apply_environment(plan: RuntimePlan, info: RankInfo, rendezvous: Rendezvous) -> dict[str, str]:
    """Set this process's rank variables (always) and library defaults (unless already set)."""
    applied = rank_environment(plan, info, rendezvous)
    os.environ.update(applied)
    for key, value in library_environment(plan, rendezvous).items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def synthetic_hidden(seed: int, rank: int, step: int, num_tokens: int, hidden: int, device: torch.device):
    """`[num_tokens, hidden]` bfloat16 standard-normal hidden states, a pure function of
    (seed, rank, step) on a given device type (CPU and CUDA generators draw different values)."""
    mixed = (((seed & _MASK63) * 1_000_003 + rank) * 1_000_003 + step + 7919) & _MASK63
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed)
    return torch.randn(num_tokens, hidden, generator=gen, device=device, dtype=torch.float32).to(
        torch.bfloat16
    )


def _telemetry_dict(telemetry: Any) -> dict[str, Any]:
    """A JSON-friendly view of one `StepTelemetry` (tensors become lists)."""
    if telemetry is None:
        return {}
    if dataclasses.is_dataclass(telemetry):
        raw = {f.name: getattr(telemetry, f.name) for f in dataclasses.fields(telemetry)}
    elif isinstance(telemetry, dict):
        raw = dict(telemetry)
    else:
        return {}

    def conv(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().cpu().tolist()
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if dataclasses.is_dataclass(v):
            return _telemetry_dict(v)
        if hasattr(v, "value") and isinstance(v.value, str):  # enums
            return v.value
        return v

    return {k: conv(v) for k, v in raw.items()}


def _merge_step_telemetry(per_layer: list[dict[str, Any]]) -> dict[str, Any]:
    """One step's telemetry over the stacked layers: stage times add, per-expert counts add,
    imbalance is the worst layer's, layouts and rounds are listed."""
    out: dict[str, Any] = {}
    for t in per_layer:
        for k, v in t.items():
            if isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
                acc = out.setdefault(k, {})
                for sk, sv in v.items():
                    acc[sk] = acc.get(sk, 0.0) + float(sv)
            elif isinstance(v, bool) or isinstance(v, str):
                out.setdefault(k, v)
            elif isinstance(v, (int, float)):
                if k.endswith("_ms"):
                    out[k] = out.get(k, 0.0) + float(v)
                else:  # imbalance, token counts, rounds: the worst layer
                    out[k] = max(out.get(k, v), v)
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                prev = out.get(k)
                out[k] = (
                    v
                    if prev is None or len(prev) != len(v)
                    else [a + b for a, b in zip(prev, v, strict=True)]
                )
            else:
                out.setdefault(k, v)
    return out


class RankWorker:
    """One rank of the EP MoE job (see the module docstring).

    Args:
        plan: the resolved plan (identical on every rank).
        info: this rank's place in the job.
        rendezvous: rank 0's store address.
        listen_socket: on rank 0, the socket `bind_rendezvous` returned (its fd serves the store).
        mpi_comm: an `MPI.Comm` to hand to the layer (DeepEP may build its buffer from it).
        fault: test-only fault injection.
        tracker: the rank's stage tracker (created when None); launchers poll it.
        on_expire: what the watchdog does when a stage overruns (default: exit the process).
        steps: overrides `workload.decode_steps` when given.
        verify: overrides `workload.verify` when given.
    """

    def __init__(
        self,
        plan: RuntimePlan,
        info: RankInfo,
        rendezvous: Rendezvous,
        *,
        listen_socket: socket.socket | None = None,
        mpi_comm: Any = None,
        fault: FaultSpec | None = None,
        tracker: StageTracker | None = None,
        on_expire: Callable[[str], None] | None = None,
        steps: int | None = None,
        verify: bool | None = None,
        backstop_s: float | None = None,
    ):
        if info.rank == 0 and listen_socket is None:
            raise ValueError("rank 0 needs listen_socket (bind_rendezvous) to serve the rendezvous store")
        if not 0 <= info.rank < info.world_size:
            raise ValueError(f"rank ({info.rank}) must be in [0, world_size={info.world_size})")
        if info.world_size != plan.ep_size:
            raise ValueError(f"world_size ({info.world_size}) must equal parallel.ep_size ({plan.ep_size})")
        self.plan = plan
        self.info = info
        self.rendezvous = rendezvous
        self.listen_socket = listen_socket
        self.mpi_comm = mpi_comm
        self.fault = fault
        self.tracker = tracker or StageTracker(info.rank, info.node, plan.config.timeouts)
        self.on_expire = on_expire
        self.backstop_s = backstop_s
        """Seconds past the watchdog's own deadline after which a C-level timer ends the process
        (see `Watchdog`); only for a rank in its own process (the launchers), None in tests."""
        w = plan.config.workload
        self.decode_steps = w.decode_steps if steps is None else steps
        self.verify = w.verify if verify is None else verify
        self._store = None
        self._progress_store = None
        self._store_lock = threading.Lock()  # the progress connection is shared by threads
        self._layers: list[Any] = []
        self._shared_comm: Any = None

    # -- stages -----------------------------------------------------------------------------------

    def _enter(self, stage: str, steps: int = 0) -> None:
        self.tracker.enter(stage, steps)
        if self.fault is not None:
            self.fault.maybe_trigger(self.info.rank, stage, flush=self.tracker.flush)

    def _device(self) -> torch.device:
        if self.plan.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("parallel.device is 'cuda' but no CUDA device is visible to this rank")
            # Under Ray each actor usually sees only its own GPU (CUDA_VISIBLE_DEVICES): index 0.
            idx = self.info.local_rank_env
            if idx >= torch.cuda.device_count():
                raise RuntimeError(
                    f"rank {self.info.rank}: LOCAL_RANK {idx} but only {torch.cuda.device_count()} CUDA "
                    f"device(s) are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})"
                )
            torch.cuda.set_device(idx)
            return torch.device("cuda", idx)
        return torch.device("cpu")

    def _connect(self) -> None:
        """Rendezvous: every rank joins rank 0's store and announces itself; bounded by
        `timeouts.rendezvous_s`, naming the ranks that never arrived."""
        import torch.distributed as dist

        t = self.plan.config.timeouts
        host, port, ws, rank = (
            self.rendezvous.host,
            self.rendezvous.port,
            self.info.world_size,
            self.info.rank,
        )
        timeout = timedelta(seconds=t.rendezvous_s)
        try:
            if rank == 0:
                self._store = dist.TCPStore(
                    host, port, ws, True, timeout=timeout, wait_for_workers=False,
                    master_listen_fd=self.listen_socket.fileno(),
                )  # fmt: skip
                self.listen_socket.detach()  # the store owns (and closes) the descriptor now
                self.listen_socket = None
            else:
                self._store = dist.TCPStore(host, port, ws, False, timeout=timeout)
            # A second connection for progress reports and the watchdog, whose reads must not
            # queue behind a blocked rendezvous call on the main connection.
            self._progress_store = dist.TCPStore(host, port, ws, False, timeout=timedelta(seconds=10))
        except Exception as exc:
            raise RuntimeError(
                f"could not reach rank 0's rendezvous store at {host}:{port} within {t.rendezvous_s:g} s "
                f"(timeouts.rendezvous_s): {exc}"
            ) from exc
        self.tracker.listeners.append(self._publish_progress)
        self._publish_progress(self.tracker.snapshot())
        self._store.set(f"ep/arrived/{rank}", self.info.node)
        keys = [f"ep/arrived/{r}" for r in range(ws)]
        try:
            self._store.wait(keys, timeout)
        except Exception as exc:
            missing = [r for r in range(ws) if not self._store.check([f"ep/arrived/{r}"])]
            raise RuntimeError(
                f"rendezvous at {host}:{port} timed out after {t.rendezvous_s:g} s (timeouts.rendezvous_s); "
                f"ranks not heard from: {', '.join(map(str, missing)) or 'none'} ({exc})"
            ) from exc

    def _publish_progress(self, snap: dict[str, Any]) -> None:
        with self._store_lock:
            if self._progress_store is not None:
                self._progress_store.set(f"ep/progress/{self.info.rank}", json.dumps(snap))

    def progress_snapshots(self) -> dict[int, dict[str, Any]]:
        """Every rank's last published stage snapshot (ranks that never reported are left out)."""
        out: dict[int, dict[str, Any]] = {}
        with self._store_lock:
            if self._progress_store is None:
                return out
            for r in range(self.info.world_size):
                key = f"ep/progress/{r}"
                if self._progress_store.check([key]):
                    out[r] = json.loads(self._progress_store.get(key))
        return out

    def peers_report(self) -> str:
        """Which peers are behind this rank or silent (read from the progress store)."""
        if self._progress_store is None:
            return "peers unknown (no progress store yet)"
        me = self.tracker.snapshot()
        order = {s: i for i, s in enumerate(STAGES)}
        progress = self.progress_snapshots()
        behind = []
        for r in range(self.info.world_size):
            if r == self.info.rank:
                continue
            p = progress.get(r)
            if p is None:
                behind.append(f"rank {r} (never reported)")
                continue
            ago = time.time() - p.get("wall", time.time())
            if (order.get(p["stage"], -1), p["step"]) < (order.get(me["stage"], -1), me["step"]):
                behind.append(
                    f"rank {r} on {p['node']} (at '{p['stage']}' step {p['step']}/{p['steps']}, "
                    f"last report {ago:.1f} s ago)"
                )
        if not behind:
            return (
                "no peer is behind this rank's stage and step (the stall is in this step, here or in a peer)"
            )
        return "peers not heard from: " + "; ".join(behind)

    def _init_process_group(self, device: torch.device) -> None:
        import torch.distributed as dist

        t = self.plan.config.timeouts
        kwargs: dict[str, Any] = {}
        if self.plan.dist_backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(
            self.plan.dist_backend,
            store=dist.PrefixStore("ep/pg", self._store),
            rank=self.info.rank,
            world_size=self.info.world_size,
            timeout=timedelta(seconds=t.collective_s),
            **kwargs,
        )

    def _build_layers(self, device: torch.device) -> None:
        import torch.distributed as dist

        from ep_runtime.comm import build_shared_state
        from ep_runtime.layer import EPMoE
        from ep_runtime.resources import check_memory

        # Fail before allocating (weights, DeepEP buffers) with advice on what to lower.
        check_memory(self.plan, device)
        # One communication state (DeepEP: one buffer) for all the layers of this process.
        self._shared_comm = build_shared_state(self.plan, dist.group.WORLD, mpi_comm=self.mpi_comm)
        base = self.plan.config.model.layer_index
        for i in range(self.plan.config.workload.num_layers):
            self._layers.append(
                EPMoE(
                    self.plan,
                    rank=self.info.rank,
                    group=dist.group.WORLD,
                    device=device,
                    mpi_comm=self.mpi_comm,
                    layer_index=base + i,
                    shared_comm=self._shared_comm,
                )
            )

    def _forward(
        self, hidden: torch.Tensor, is_prefill: bool, record: list[list[Any]] | None = None
    ) -> torch.Tensor:
        """All layers on `hidden [T, D]` bf16 with residual adds; `record[i]` collects layer i's
        `(input, output)` for verification."""
        for i, layer in enumerate(self._layers):
            y = layer.forward(hidden, is_prefill=is_prefill)
            if record is not None:
                record[i].append((hidden, y))
            hidden = hidden + y
        return hidden

    def _step_telemetry(self) -> dict[str, Any]:
        """The last step's telemetry over all layers. Read after the step's timing: materialising
        it waits for the step's events and copies counts to the host."""
        return _merge_step_telemetry(
            [_telemetry_dict(getattr(layer, "last_telemetry", None)) for layer in self._layers]
        )

    def expected_layout(self, is_prefill: bool, tokens: int) -> str:
        """The layout the plan resolves for a step (the layer's own choice is in its telemetry)."""
        if self.plan.mode != "auto":
            return self.plan.mode
        auto = self.plan.config.dispatch.auto
        if (is_prefill and auto.prefill_uses_normal) or tokens > self.plan.normal_above_tokens:
            return Layout.NORMAL.value
        return Layout.LOW_LATENCY.value

    # -- the job ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the whole job on this rank; returns its result (JSON-friendly)."""
        watchdog = Watchdog(
            self.tracker, peers=self.peers_report, on_expire=self.on_expire, backstop_s=self.backstop_s
        ).start()
        failed = True
        try:
            result = self._run()
            failed = False
            # Teardown is collective (DeepEP's buffer, the process group): bounded like one.
            self._enter("teardown")
            self._shutdown(collective=True)
            self._enter("done")
            return result
        except RankFailure:
            raise
        except BaseException as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if "timeout" in str(exc).lower() or "timed out" in str(exc).lower():
                try:  # a collective or init that ran out of time: say which peers never showed up
                    detail += f"; {self.peers_report()}"
                except Exception:  # noqa: BLE001 - rank 0's store may be gone
                    pass
            self.tracker.error = detail
            raise RankFailure(self.info.rank, self.info.node, self.tracker.stage, detail) from exc
        finally:
            if failed:
                self._shutdown(collective=False)
            watchdog.stop()

    def _run(self) -> dict[str, Any]:
        import torch.distributed as dist

        t0 = time.perf_counter()
        self._enter("start")
        env = apply_environment(self.plan, self.info, self.rendezvous)
        device = self._device()
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(self.plan.config.parallel.cpus_per_rank)))
        self._enter("rendezvous")
        self._connect()
        self._enter("process_group")
        self._init_process_group(device)
        self._enter("build_layer")
        self._build_layers(device)
        dist.barrier()
        setup_s = time.perf_counter() - t0

        w = self.plan.config.workload
        seed, rank, d = self.plan.config.model.seed, self.info.rank, self.plan.config.model.hidden_size
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        phases = []
        if w.prefill_tokens_per_rank > 0:
            phases.append(("prefill", True, w.prefill_tokens_per_rank, 1))
        if self.decode_steps > 0 and w.decode_tokens_per_rank > 0:
            phases.append(("decode", False, w.decode_tokens_per_rank, self.decode_steps))
        results: dict[str, Any] = {}
        records: dict[str, list[list[Any]]] = {}
        layouts: dict[str, str] = {}
        step_id = 0
        with torch.no_grad():  # not inference_mode: layers may keep step state across calls
            self._enter("warmup", w.warmup_steps * len(phases))
            done = 0
            for _, is_prefill, tokens, _ in phases:
                for _ in range(w.warmup_steps):
                    x = synthetic_hidden(seed, rank, 1_000_000 + done, tokens, d, device)
                    self._forward(x, is_prefill)
                    done += 1
                    self.tracker.step(done)
            sync()
            for name, is_prefill, tokens, steps in phases:
                self._enter(name, steps)
                record = [[] for _ in self._layers] if self.verify else None
                step_ms, telemetry = [], []
                for s in range(steps):
                    x = synthetic_hidden(seed, rank, step_id, tokens, d, device)
                    sync()
                    start = time.perf_counter()
                    self._forward(x, is_prefill, record)
                    sync()
                    step_ms.append((time.perf_counter() - start) * 1e3)
                    telemetry.append(self._step_telemetry())
                    step_id += 1
                    self.tracker.step(s + 1)
                layout = telemetry[0].get("layout") if telemetry else None
                layouts[name] = (
                    layout if isinstance(layout, str) else self.expected_layout(is_prefill, tokens)
                )
                if record is not None:
                    records[name] = record
                results[name] = {
                    "tokens_per_rank": tokens,
                    "steps": steps,
                    "layout": layouts[name],
                    "step_ms": step_ms,
                    "telemetry": telemetry,
                }
            verification = None
            if self.verify:
                self._enter("verify")
                verification = self._verify(records, layouts)
        self._enter("finish")
        dist.barrier()
        return {
            "rank": rank,
            "node": self.info.node,
            "local_rank": self.info.local_rank,
            "pid": os.getpid(),
            "device": str(device),
            "env": {k: v for k, v in env.items() if k != "MASTER_PORT"},
            "setup_s": setup_s,
            "phases": results,
            "verify": verification,
        }

    def _verify(
        self, records: dict[str, list[list[tuple[torch.Tensor, torch.Tensor]]]], layouts: dict[str, str]
    ):
        """Compare every timed token of this rank with the float32 reference, layer by layer: each
        layer's reference runs on the same input the layer saw, so errors do not compound through
        the residual chain. Token rows are independent, so all steps of a phase go in one call.

        Args:
            records: per phase, per layer, the `(input [T, D] bf16, output [T, D] bf16)` of each step.
            layouts: the dispatch layout each phase ran in (decides the dispatch precision).
        Returns: per phase and overall: max absolute error, max relative error (over the largest
        reference magnitude), tokens over tolerance, the tolerance and pass/fail.
        """
        m = self.plan.config.model
        out: dict[str, Any] = {"phases": {}}
        worst_abs = worst_rel = 0.0
        bad = total = 0
        tol = 0.0
        for phase, per_layer in records.items():
            layout = layouts.get(phase)
            mode = self.plan.modes.get(Layout(layout)) if layout in (lay.value for lay in Layout) else None
            if mode is None:
                mode = next(iter(self.plan.modes.values()))
            precision = mode.precision.value
            tol = max(tol, VERIFY_TOLERANCE[(m.weights, precision)])
            ph_tol = VERIFY_TOLERANCE[(m.weights, precision)]
            ph_abs = ph_rel = 0.0
            ph_bad = ph_total = 0
            for layer, steps in zip(self._layers, per_layer, strict=True):
                if not steps:
                    continue
                x = torch.cat([s[0] for s in steps])
                y = torch.cat([s[1] for s in steps]).float()
                ref = layer.reference_forward(x, layout=mode.layout)
                scale = ref.abs().max().clamp_min(1e-6)
                err_t = (y - ref).abs().amax(dim=1)  # [T] per-token max abs error
                ph_abs = max(ph_abs, float(err_t.max()))
                ph_rel = max(ph_rel, float(err_t.max() / scale))
                ph_bad += int((err_t > ph_tol * scale).sum())
                ph_total += err_t.numel()
            out["phases"][phase] = {
                "precision": precision,
                "layout": mode.layout.value,
                "max_abs_err": ph_abs,
                "max_rel_err": ph_rel,
                "tokens_over_tol": ph_bad,
                "tokens": ph_total,
                "tolerance": ph_tol,
            }
            worst_abs, worst_rel = max(worst_abs, ph_abs), max(worst_rel, ph_rel)
            bad, total = bad + ph_bad, total + ph_total
        # A token whose top-k differs between the runtime router and the float32 reference (a
        # near-tie broken differently by rounding) can exceed the tolerance without any bug; allow
        # 0.1% of tokens (a real dispatch/combine/expert bug hits far more), and report the count.
        allowed = int(total * 1e-3)
        out.update(
            max_abs_err=worst_abs,
            max_rel_err=worst_rel,
            tokens_over_tol=bad,
            tokens=total,
            tolerance=tol,
            allowed_over_tol=allowed,
            passed=bad <= allowed,
        )
        return out

    def _shutdown(self, collective: bool = True) -> None:
        """Free the layers, the shared communication state and the process group. After a failure
        (`collective=False`) the layers are only dropped: closing them may wait on peers (DeepEP's
        buffer teardown is collective), and a peer that died or hangs would keep this rank from
        ever reporting; the launcher ends the processes, which frees what is left."""
        for layer in self._layers if collective else ():
            try:
                layer.close()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self._layers = []
        if self._shared_comm is not None and collective:  # after its layers: the last reference frees it
            try:
                self._shared_comm.release()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self._shared_comm = None
        try:
            import torch.distributed as dist

            # After a failure an NCCL group may block in its teardown behind a stuck collective;
            # the process is about to end, so only gloo (CPU) groups are destroyed then.
            if dist.is_initialized() and (collective or dist.get_backend() == "gloo"):
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        with self._store_lock:
            self._progress_store = None
        self._store = None
        if self.listen_socket is not None:  # never handed to a store
            self.listen_socket.close()
            self.listen_socket = None
