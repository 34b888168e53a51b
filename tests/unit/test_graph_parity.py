"""CUDA-graph decode on a backend that alternates two low-latency buffers per call (DeepEP): a
replay after an odd number of eager low-latency calls since the capture is refused with advice,
never run into the buffer the last call used. (The check is host-side bookkeeping: no GPU needed.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ep_runtime.execution import DecodeGraphRunner
from ep_runtime.types import Layout


def _runner(call_parity: bool, calls: int) -> tuple[DecodeGraphRunner, SimpleNamespace]:
    owner = SimpleNamespace(low_latency_calls=calls)
    disp = SimpleNamespace(call_parity=call_parity, owner=owner)
    runner = DecodeGraphRunner.__new__(DecodeGraphRunner)  # the parity check only reads these
    runner.layer = SimpleNamespace(dispatchers={Layout.LOW_LATENCY: disp})
    runner._parity = calls % 2 if call_parity else None
    return runner, owner


def test_even_eager_calls_since_capture_replay():
    runner, owner = _runner(True, 7)
    owner.low_latency_calls += 2  # one eager dispatch + combine
    runner._check_parity()


def test_odd_eager_calls_since_capture_are_refused():
    runner, owner = _runner(True, 7)
    owner.low_latency_calls += 3  # dispatch, combine and one unpaired extra call
    with pytest.raises(RuntimeError, match=r"odd number of DeepEP low-latency calls .*reset\(\)"):
        runner._check_parity()


def test_backends_without_buffer_alternation_are_not_checked():
    runner, owner = _runner(False, 7)
    owner.low_latency_calls += 1
    runner._check_parity()
