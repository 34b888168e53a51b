"""Execution schedules over gloo (torch backend): two-batch decode, chunked prefill, the padded
decode-graph body, and the async dispatcher API, each against the plain path and the float32 reference.

One spawned run (2 ranks) executes every case; each case builds the layer with a switch on and the
same layer (same seed, same weights) with it off, feeds both the same tokens and compares:
  - switch on vs off: relative Frobenius error < 2e-3 (the same per-row arithmetic; what remains is
    CPU GEMM blocking differences over different row counts, rounded to bf16), and bitwise-equal
    routing;
  - switch on vs `reference_moe`: the layer tests' bounds.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks

D, I = 128, 128  # noqa: E741 - the design doc's names
SAME_TOL = 2e-3
REF_TOL = {"bf16": 1.5e-2, "fp8_block": 2e-2}


def _plan(world: int, mode: str, execution: dict, weights: str = "bf16", C: int = 6, check: bool = False):
    from ep_runtime.config import parse_config, resolve_plan

    cfg = parse_config(
        dict(
            model=dict(
                hidden_size=D, num_experts=8, top_k=3, moe_intermediate_size=I, seed=7, weights=weights
            ),
            parallel=dict(ep_size=world, device="cpu"),
            dispatch=dict(
                backend="torch", mode=mode, num_max_dispatch_tokens_per_rank=C, check_conservation=check
            ),
            execution=execution,
        )
    )
    return resolve_plan(cfg)


def _hidden(seed: int, rank: int, num_tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * seed + rank)
    return torch.randn(num_tokens, D, generator=g).to(torch.bfloat16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    n = b.norm().item()
    return (a - b).norm().item() / n if n > 0 else (a - b).norm().item()


CASES = [
    # (name, mode, execution switches, weights, steps: (tokens per rank, is_prefill, layout), C, checks)
    (
        "two-batch-ll",
        "low_latency",
        dict(decode_two_batch=True),
        "bf16",
        [([5, 2], False), ([1, 0], False)],
        6,
        True,
    ),
    ("two-batch-rounds", "low_latency", dict(decode_two_batch=True), "bf16", [([9, 3], False)], 4, False),
    ("two-batch-fp8", "auto", dict(decode_two_batch=True), "fp8_block", [([4, 3], False)], 6, False),
    ("chunks-2", "normal", dict(prefill_chunks=2), "bf16", [([7, 4], True), ([1, 0], False)], 6, True),
    ("chunks-3-auto", "auto", dict(prefill_chunks=3), "bf16", [([8, 2], True), ([3, 1], False)], 6, False),
    ("chunks-4-fp8", "normal", dict(prefill_chunks=4), "fp8_block", [([6, 9], True)], 6, False),
    (
        "all-on",
        "auto",
        dict(prefill_chunks=2, decode_two_batch=True),
        "bf16",
        [([6, 5], True), ([3, 6], False)],
        6,
        False,
    ),
]


def _counting(fn, calls: dict):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        return fn(*args, **kwargs)

    return wrapped


def _run(rank: int, world: int) -> list[dict]:
    from ep_runtime.execution import DecodeGraphRunner, split_bounds
    from ep_runtime.layer import EPMoE
    from ep_runtime.types import Layout

    out: list[dict] = []
    for name, mode, execution, weights, steps, C, check in CASES:
        on = EPMoE(_plan(world, mode, execution, weights, C, check), rank=rank)
        off = EPMoE(_plan(world, mode, {}, weights, C, check), rank=rank)
        calls = {"n": 0}
        for d in on.dispatchers.values():  # count the async calls: the schedule really ran
            d.dispatch_async = _counting(d.dispatch_async, calls)
        for i, (tokens, is_prefill) in enumerate(steps):
            h = _hidden(i + len(name), rank, tokens[rank])
            y_on = on(h, is_prefill=is_prefill)
            y_off = off(h, is_prefill=is_prefill)
            tel = on.last_telemetry
            ref = on.reference_forward(h, layout=tel.layout)
            out.append(
                dict(
                    name=f"{name}[{i}]",
                    weights=weights,
                    shape_ok=tuple(y_on.shape) == (tokens[rank], D) and y_on.dtype == torch.bfloat16,
                    same=_rel(y_on, y_off),
                    ref=_rel(y_on, ref),
                    routing_equal=bool(torch.equal(on.last_routing.topk_ids, off.last_routing.topk_ids)),
                    pairs=sum(tel.tokens_per_local_expert),
                    pairs_off=sum(off.last_telemetry.tokens_per_local_expert),
                    per_rank=tel.tokens_per_rank,
                    total=3 * sum(tokens),
                    async_calls=calls["n"],
                )
            )
        on.close()
        off.close()

    # The decode-graph body run eagerly (use_graph=False): padding rows routed to -1 must leave the
    # real rows' results unchanged; buckets differ between ranks, one rank has no tokens.
    plan = _plan(world, "auto", {}, "bf16", 8)
    layer = EPMoE(plan, rank=rank)
    runner = DecodeGraphRunner(layer, buckets=[1, 2, 4], use_graph=False)
    assert runner.buckets == [1, 2, 4, 8], runner.buckets
    for i, tokens in enumerate(([3, 0], [8, 5], [1, 2], [2, 7])):
        h = _hidden(50 + i, rank, tokens[rank])
        y_eager = layer(h)
        ids_eager = layer.last_routing.topk_ids.clone()
        y_pad, counts, per_rank = runner.run(h)
        out.append(
            dict(
                name=f"graph-body[{i}]",
                weights="bf16",
                shape_ok=tuple(y_pad.shape) == (tokens[rank], D),
                same=_rel(y_pad, y_eager),
                ref=_rel(y_pad, layer.reference_forward(h, layout="low_latency")),
                routing_equal=bool(torch.equal(layer.last_routing.topk_ids, ids_eager)),
                pairs=int(counts.sum()),
                pairs_off=sum(layer.last_telemetry.tokens_per_local_expert),
                per_rank=per_rank.tolist(),
                total=3 * sum(tokens),
                bucket=runner.bucket_for(tokens[rank]),
            )
        )
    # The layer's graph branch (runner injected, eager body): no mode all-reduce, telemetry from it.
    layer.graph_runner = runner
    h = _hidden(60, rank, [4, 1][rank])
    y = layer(h)
    tel = layer.last_telemetry
    layer.graph_runner = None
    y_plain = layer(h)
    out.append(
        dict(
            name="graph-branch",
            weights="bf16",
            shape_ok=tuple(y.shape) == (h.shape[0], D),
            same=_rel(y, y_plain),
            ref=_rel(y, layer.reference_forward(h, layout="low_latency")),
            routing_equal=True,
            pairs=sum(tel.tokens_per_local_expert),
            pairs_off=sum(layer.last_telemetry.tokens_per_local_expert),
            per_rank=tel.tokens_per_rank,
            total=3 * 5,
            layout=tel.layout,
            max_tokens=tel.max_tokens_any_rank,
            has_graph_stage="graph" in tel.stage_ms,
        )
    )
    # Bucket lists that differ between ranks are refused on every rank before any capture.
    mismatched = DecodeGraphRunner(layer, buckets=[1, 2] if rank == 0 else [1, 4], use_graph=False)
    with pytest.raises(ValueError, match="buckets differ between ranks"):
        mismatched.run(_hidden(70, rank, 1))
    # prefill (T > C) with a runner present takes the eager path
    layer.graph_runner = runner
    h = _hidden(61, rank, 10)
    y = layer(h, is_prefill=True)
    out.append(dict(name="graph-skip-prefill", layout=layer.last_telemetry.layout))
    # graph_step given by the caller (group-consistent): False runs eagerly even with T <= C; True
    # with T > C is refused before any collective (on both ranks here, as both break it).
    layer(_hidden(62, rank, [2, 3][rank]), graph_step=False)
    assert "graph" not in layer.last_telemetry.stage_ms and layer.last_telemetry.max_tokens_any_rank == 3
    with pytest.raises(ValueError, match=r"graph_step=True needs .* T <= C"):
        layer(_hidden(63, rank, 10), graph_step=True)
    layer.graph_runner = None

    # The async API against the sync one, both layouts (exact: same ops, same order).
    for layout in (Layout.NORMAL, Layout.LOW_LATENCY):
        d = layer.dispatchers[layout]
        h = _hidden(70, rank, 5)
        routing = layer._route(h)
        got, handle = d.dispatch_async(h, routing).wait()
        want, handle2 = d.dispatch(h, routing)
        if layout == Layout.NORMAL:
            y_exp = got.x.float().mul(1.5).to(torch.bfloat16)
        else:
            y_exp = got.x.float().mul(1.5).to(torch.bfloat16)
        p = d.combine_async(y_exp, handle)
        c1 = p.wait()
        c2 = d.combine(y_exp, handle2)
        out.append(
            dict(
                name=f"async-{layout.value}",
                x_equal=bool(torch.equal(got.x, want.x)),
                counts_equal=bool(torch.equal(got.num_recv_per_expert, want.num_recv_per_expert)),
                combine_equal=bool(torch.equal(c1, c2)),
                wait_twice_same=p.wait() is c1,
            )
        )
    # set_execution toggles the switches at run time (what the step benchmark does).
    h = _hidden(80, rank, 7)
    y0 = layer(h, is_prefill=True)
    layer.set_execution(prefill_chunks=3, decode_two_batch=True)
    y1 = layer(h, is_prefill=True)
    y2 = layer(h[:5])
    layer.set_execution(prefill_chunks=1, decode_two_batch=False)
    y3 = layer(h[:5])
    errors = []
    for kw in (dict(cuda_graph_decode=True), dict(prefill_chunks=0)):
        try:
            layer.set_execution(**kw)
        except ValueError as exc:
            errors.append(str(exc))
    out.append(
        dict(
            name="set-execution",
            equal=bool(torch.equal(y0, y1)) and bool(torch.equal(y2, y3)),
            errors=errors,
            switches=layer.execution.model_dump(),
        )
    )
    layer.close()
    assert [s.stop - s.start for s in split_bounds(5, 3)] == [2, 2, 1]
    assert [s.stop - s.start for s in split_bounds(1, 3)] == [1, 0, 0]
    return out


def test_execution_schedules_two_ranks():
    results = run_ranks(_run, 2, timeout=300)
    for rank, rows in enumerate(results):
        for r in rows:
            where = f"rank {rank} {r['name']}"
            if r["name"].startswith("async-"):
                assert r["x_equal"] and r["counts_equal"] and r["combine_equal"] and r["wait_twice_same"], (
                    where,
                    r,
                )
                continue
            if r["name"] == "set-execution":
                assert r["equal"], where
                assert len(r["errors"]) == 2 and "cuda_graph_decode" in r["errors"][0], r["errors"]
                assert "prefill_chunks" in r["errors"][1], r["errors"]
                assert r["switches"] == dict(
                    cuda_graph_decode=False, decode_two_batch=False, prefill_chunks=1
                )
                continue
            if r["name"] == "graph-skip-prefill":
                assert r["layout"] == "normal", where
                continue
            assert r["shape_ok"], where
            assert r["routing_equal"], where
            assert r["same"] < SAME_TOL, f"{where}: switch on vs off differ, rel {r['same']:.3g}"
            assert r["ref"] < REF_TOL[r["weights"]], f"{where}: rel error vs reference {r['ref']:.3g}"
            assert r["pairs"] == r["pairs_off"], where
            if "async_calls" in r:
                assert r["async_calls"] > 0, f"{where}: the overlapped schedule did not run"
            if r["per_rank"] is not None:
                assert sum(r["per_rank"]) == r["total"], where
            if r["name"] == "graph-branch":
                assert r["layout"] == "low_latency" and r["max_tokens"] is None and r["has_graph_stage"], r
    names = {r["name"] for r in results[0]}
    assert {"two-batch-ll[0]", "chunks-2[0]", "graph-body[0]", "async-normal", "async-low_latency"} <= names


def test_execution_config_errors():
    from ep_runtime.config import ConfigError, parse_config  # noqa: F401

    base = dict(
        model=dict(hidden_size=D, num_experts=8, top_k=3, moe_intermediate_size=I),
        parallel=dict(ep_size=1, device="cpu"),
        dispatch=dict(backend="torch", mode="auto", num_max_dispatch_tokens_per_rank=4),
    )
    with pytest.raises(Exception, match="cuda_graph_decode"):
        parse_config({**base, "execution": dict(cuda_graph_decode=True)})
    with pytest.raises(Exception, match="prefill_chunks"):
        parse_config({**base, "execution": dict(prefill_chunks=0)})


def test_graph_runner_argument_errors():
    import torch.distributed as dist

    from ep_runtime.config import parse_config, resolve_plan
    from ep_runtime.execution import DecodeGraphRunner, default_buckets
    from ep_runtime.layer import EPMoE

    assert default_buckets(1) == [1]
    assert default_buckets(6) == [1, 2, 4, 6]
    assert default_buckets(8) == [1, 2, 4, 8]
    cfg = parse_config(
        dict(
            model=dict(hidden_size=D, num_experts=8, top_k=3, moe_intermediate_size=I),
            parallel=dict(ep_size=1, device="cpu"),
            dispatch=dict(backend="torch", mode="auto", num_max_dispatch_tokens_per_rank=4),
        )
    )
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    try:
        layer = EPMoE(resolve_plan(cfg), rank=0)
        with pytest.raises(ValueError, match="graph buckets"):
            DecodeGraphRunner(layer, buckets=[0, 2])
        with pytest.raises(ValueError, match="use_graph=True needs a CUDA"):
            DecodeGraphRunner(layer, use_graph=True)
        runner = DecodeGraphRunner(layer, use_graph=False)
        with pytest.raises(ValueError, match="T <= C"):
            runner.bucket_for(5)
        assert runner.bucket_for(3) == 4 and runner.bucket_for(0) == 1
        layer.close()
    finally:
        dist.destroy_process_group()


def test_bench_step_cpu_smoke(tmp_path):
    """benchmarks/bench_step.py end to end on 2 gloo ranks (tiny shapes, torch backend, no GPU floors)."""
    import json

    from benchmarks import bench_step

    rc = bench_step.main(
        [
            "--device", "cpu", "--world", "2", "--hidden", "128", "--num-experts", "8", "--inter", "128",
            "--topk", "2", "--n-group", "0", "--decode-tokens", "3", "--prefill-tokens", "9",
            "--iters", "1", "--warmup", "1", "--weights", "bf16", "--out-dir", str(tmp_path), "--no-report",
            "--timeout", "120",
        ]
    )  # fmt: skip
    assert rc == 0
    (path,) = tmp_path.glob("*-step-cpu-smoke.json")
    doc = json.loads(path.read_text())
    got = {(p["phase"], p["backend"], p["variant"]): p for p in doc["points"]}
    assert set(got) == {
        ("decode", "torch", "plain"),
        ("decode", "torch", "two_batch"),
        ("prefill", "torch", "chunks1"),
        ("prefill", "torch", "chunks2"),
        ("prefill", "torch", "chunks4"),
    }
    for p in got.values():
        assert p["ranks"] == 2 and p["step_ms"] > 0 and not p.get("errors"), p
        assert p["layout"] == ("low_latency" if p["phase"] == "decode" else "normal")
        assert p.get("rel_vs_plain", 0.0) < 1e-2
    assert got[("decode", "torch", "plain")]["pairs"] > 0


# ---------------------------------------------------------------------------------------------
# The DeepEP async calls and the overlapped schedules' issue order, against a recording stand-in
# for `deep_ep` (no GPU): which kwargs reach DeepEP, and that every low-latency send comes after the
# previous low-latency call's receive (DeepEP's double buffer).
# ---------------------------------------------------------------------------------------------


class _Event:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def current_stream_wait(self):
        self.log.append(("wait", self.name))


class _Buffer:
    log: list = []
    num_sms = 20

    def __init__(self, group, **kwargs):
        self.rank = 0
        self.n = 0

    @staticmethod
    def set_num_sms(n):
        pass

    @staticmethod
    def get_dispatch_config(num_ranks):
        return _Cfg()

    get_combine_config = get_dispatch_config

    @staticmethod
    def get_low_latency_rdma_size_hint(c, hidden, num_ranks, num_experts):
        return 128 * c

    @staticmethod
    def is_sm90_compiled():
        return True

    @staticmethod
    def capture():
        _Buffer.log.append(("capture",))
        return _Event(_Buffer.log, "captured")

    def clean_low_latency_buffer(self, c, hidden, num_experts):
        pass

    def get_comm_stream(self):
        self.log.append(("comm_stream",))
        return None  # torch.cuda.stream(None) is a no-op context: CPU tensors stay usable

    def destroy(self):
        pass

    def _tag(self):
        self.n += 1
        return self.n

    def low_latency_dispatch(self, x, ids, c, e, use_fp8=True, async_finish=False, return_recv_hook=False):
        t = self._tag()
        self.log.append(("ll_dispatch", t, x.shape[0], return_recv_hook, async_finish))
        recv = x.new_zeros(2, 2 * c, x.shape[1])
        return (
            recv,
            torch.zeros(2, dtype=torch.int32),
            t,
            None,
            lambda: self.log.append(("ll_dispatch_recv", t)),
        )

    def low_latency_combine(self, x, ids, w, handle, async_finish=False, return_recv_hook=False):
        self.log.append(("ll_combine", handle, return_recv_hook, async_finish))
        out = torch.zeros(ids.shape[0], x.shape[-1], dtype=torch.bfloat16)
        return out, None, lambda: self.log.append(("ll_combine_recv", handle))

    def get_dispatch_layout(
        self, ids, e, previous_event=None, async_finish=False, allocate_on_comm_stream=False
    ):
        assert ids.is_contiguous(), "DeepEP asserts a contiguous topk_idx"
        ev = previous_event.name if previous_event is not None else None
        self.log.append(("layout", ev, async_finish, allocate_on_comm_stream))
        return None, None, None, None, _Event(self.log, "layout")

    def dispatch(self, x, previous_event=None, async_finish=False, allocate_on_comm_stream=False, **kw):
        assert all(t.is_contiguous() for t in (*(x if isinstance(x, tuple) else (x,)), kw["topk_idx"]))
        assert kw["topk_weights"].is_contiguous()
        t = self._tag()
        self.log.append(("dispatch", t, previous_event.name, async_finish, allocate_on_comm_stream))
        k, n = kw["topk_idx"].shape[1], (x[0] if isinstance(x, tuple) else x).shape[0]  # fp8: (e4m3, scales)
        return (
            x,
            torch.zeros(n, k, dtype=torch.int32),
            torch.zeros(n, k),
            [0, 0],
            t,
            _Event(self.log, f"dispatch{t}"),
        )

    def combine(
        self, x, handle, config=None, previous_event=None, async_finish=False, allocate_on_comm_stream=False
    ):
        self.log.append(
            ("combine", handle, previous_event is not None, async_finish, allocate_on_comm_stream)
        )
        return x, None, _Event(self.log, f"combine{handle}")


class _Cfg:
    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        return 1 << 20


def test_deepep_async_calls_and_schedule_order(monkeypatch):
    import sys
    import types

    from ep_runtime.comm.deepep import DeepEPDispatcher
    from ep_runtime.config import parse_config, resolve_plan
    from ep_runtime.execution import chunked_normal_step, two_batch_round
    from ep_runtime.types import Layout, Routing

    mod = types.ModuleType("deep_ep")
    mod.Buffer, mod.Config, mod.topk_idx_t = _Buffer, _Cfg, torch.int64
    monkeypatch.setitem(sys.modules, "deep_ep", mod)
    monkeypatch.setattr(DeepEPDispatcher, "supports", classmethod(lambda cls, plan, mode_plan: (True, "ok")))
    raw = {
        "model": {"hidden_size": 2048, "num_experts": 4, "top_k": 2, "moe_intermediate_size": 256},
        "parallel": {"ep_size": 2, "device": "cuda"},
        "dispatch": {"backend": "deepep", "num_max_dispatch_tokens_per_rank": 8},
    }
    plan = resolve_plan(parse_config(raw))
    disp = DeepEPDispatcher.build_all(plan, None)
    log = _Buffer.log = []

    def experts(d, w):
        log.append(("experts", d.x.shape[0]))
        return torch.zeros(d.x.shape[0], d.x.shape[-1], dtype=torch.bfloat16) if d.x.dim() == 2 else d.x

    layer = types.SimpleNamespace(
        dispatchers=disp,
        experts=types.SimpleNamespace(forward=experts),
        weights=types.SimpleNamespace(experts=None),
        plan=plan,
        _dist=False,
        group=None,
    )
    x = torch.randn(5, 2048).to(torch.bfloat16)
    # Non-contiguous routing (as the router's sorted top-k slices are): DeepEP gets contiguous copies.
    routing = Routing(torch.randint(0, 4, (2, 5)).t(), torch.rand(2, 5).t())
    counts = torch.zeros(2, dtype=torch.int64)

    out = two_batch_round(layer, x, routing, counts)
    assert out.shape == (5, 2048)
    assert log == [
        ("ll_dispatch", 1, 3, True, False),
        ("ll_dispatch_recv", 1),
        ("ll_dispatch", 2, 2, True, False),
        ("experts", 2),
        ("ll_dispatch_recv", 2),
        ("ll_combine", 1, True, False),
        ("experts", 2),
        ("ll_combine_recv", 1),
        ("ll_combine", 2, True, False),
        ("ll_combine_recv", 2),
    ], log

    log.clear()
    out = chunked_normal_step(layer, x, routing, 3, counts)
    assert out.shape == (5, 2048)

    def dispatch(tag):
        return [("layout", "captured", True, True), ("dispatch", tag, "layout", True, True)]

    # The inputs are prepared (copies, fp8 cast) on the comm stream after the mark.
    on_comm = [("comm_stream",), ("wait", "captured")]

    # A mark when the inputs are ready; one dispatch at a time, each issued right after the previous
    # chunk's experts and before its combine, ordered after the mark (not after those experts).
    assert log == [
        ("capture",),  # the mark
        *on_comm,
        *dispatch(3),
        ("wait", "dispatch3"),
        ("experts", 2),
        *on_comm,
        *dispatch(4),
        ("capture",),
        ("combine", 3, True, True, True),
        ("wait", "dispatch4"),
        ("experts", 2),
        *on_comm,
        *dispatch(5),
        ("capture",),
        ("combine", 4, True, True, True),
        ("wait", "dispatch5"),
        ("experts", 1),
        ("capture",),
        ("combine", 5, True, True, True),
        ("wait", "combine3"),
        ("wait", "combine4"),
        ("wait", "combine5"),
    ], log

    # Without a mark: an event captured at the call, after the inputs' preparation, orders the layout.
    log.clear()
    disp[Layout.NORMAL].dispatch_async(x, routing).wait()
    assert log == [("capture",), *dispatch(6), ("wait", "dispatch6")], log
    for d in disp.values():
        d.close()

    # fp8: the cast runs on the communication stream after the mark, so it cannot queue behind
    # the previous chunk's experts on the compute stream.
    plan8 = resolve_plan(
        parse_config({**raw, "dispatch": {**raw["dispatch"], "precision": {"normal": "fp8"}}})
    )
    disp = layer.dispatchers = DeepEPDispatcher.build_all(plan8, None)
    real_input = DeepEPDispatcher._normal_input

    def logged_input(self, x):
        log.append(("quant", x.shape[0]))
        return real_input(self, x)

    monkeypatch.setattr(DeepEPDispatcher, "_normal_input", logged_input)
    log.clear()
    chunked_normal_step(layer, x, routing, 2, counts)
    assert log[:13] == [
        ("capture",),
        *on_comm,
        ("quant", 3),
        *dispatch(1),
        ("wait", "dispatch1"),
        ("experts", 3),
        *on_comm,
        ("quant", 2),
        *dispatch(2),
    ], log
    # A second low-latency call before the first one's receive ran is refused on this rank (DeepEP
    # would clear the signals the receive waits for and every rank would hang). Only calls DeepEP
    # accepted flip the buffer parity.
    ll, owner = disp[Layout.LOW_LATENCY], disp[Layout.LOW_LATENCY].owner
    calls = owner.low_latency_calls
    pending = ll.dispatch_async(x, routing)
    with pytest.raises(RuntimeError, match="receive was still pending"):
        ll.dispatch_async(x, routing)
    with pytest.raises(RuntimeError, match="receive was still pending"):
        disp[Layout.NORMAL].dispatch(x, routing)
    d_ll, h_ll = pending.wait()
    ll.combine(d_ll.x, h_ll)
    assert owner.low_latency_calls == calls + 2

    def refused(*args, **kwargs):
        raise ValueError("refused by DeepEP's input checks")

    owner.buffer.low_latency_dispatch = refused
    with pytest.raises(ValueError, match="refused"):
        ll.dispatch(x, routing)
    assert owner.low_latency_calls == calls + 2

    for d in disp.values():
        d.close()
