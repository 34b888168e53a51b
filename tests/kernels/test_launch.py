"""`kernels.launch.FastLaunch`: which calls reuse a compiled kernel and which go through Triton's
JIT path, checked on the CPU with a real `JITFunction` whose compile-and-launch step is replaced
by a recorder (the compiled launch itself runs in tests/gpu/test_kernels_k1_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ep_runtime.kernels import launch
from ep_runtime.kernels.launch import FastLaunch, arg_key


def _copy(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr, EXTRA: tl.constexpr = 7):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs * stride, tl.load(x_ptr + offs), mask=offs < n)


class _Compiled:
    """Stands in for Triton's CompiledKernel: records the direct launches."""

    function = object()
    packed_metadata = ("meta",)

    def __init__(self):
        self.calls = []

    def run(self, *a):
        self.calls.append(a)


@pytest.fixture
def recorder(monkeypatch):
    """A FastLaunch over a real (uncompiled) JITFunction; Triton's JIT path is replaced by a recorder
    that returns a fresh compiled stand-in per call, and the driver by fixed device/stream values."""
    kernel = triton.runtime.JITFunction(_copy)
    jit_calls = []

    def run(*args, grid, warmup, **kw):
        compiled = _Compiled()
        jit_calls.append((grid, args, kw, compiled))
        return compiled

    monkeypatch.setattr(kernel, "run", run)
    fl = FastLaunch(kernel)
    fl._device, fl._stream = (lambda: 0), (lambda d: 1234)
    return fl, jit_calls


def test_arg_key_separates_what_triton_specialises_on():
    buf = torch.zeros(64, dtype=torch.bfloat16)
    assert arg_key(buf) != arg_key(buf[1:])  # 16-byte alignment of the address
    assert arg_key(buf) != arg_key(buf.float())  # dtype
    assert arg_key(torch.zeros(8)) == arg_key(torch.ones(8))  # another tensor, same specialisation
    # an int is its own key: finer than Triton's (equal to 1, multiple of 16, width)
    assert [arg_key(v) for v in (1, 17, 2**31 + 16, 2**63 + 16)] == [1, 17, 2**31 + 16, 2**63 + 16]
    assert arg_key(True) != arg_key(1) and arg_key(True) != arg_key(False)
    assert arg_key(0.5) == arg_key(2.0) and arg_key(None) is None
    with pytest.raises(launch._Unkeyed):
        arg_key([1, 2])


def test_second_call_with_the_same_specialisation_launches_directly(recorder):
    fl, jit_calls = recorder
    x, y = torch.zeros(32), torch.zeros(32)
    fl((2,), x, y, 32, 1, BLOCK=32, num_warps=4, num_stages=2)
    assert len(jit_calls) == 1
    grid, args, kw, compiled = jit_calls[0]
    assert grid == (2,) and args == (x, y, 32, 1)
    assert kw == dict(BLOCK=32, num_warps=4, num_stages=2)
    # new tensors, same key: the compiled kernel, grid padded to 3-D, the driver's stream, no launch
    # hooks, then the runtime args and every constexpr (defaults too)
    x2, y2 = torch.ones(32), torch.ones(32)
    fl((3, 5), x2, y2, 32, 1, BLOCK=32, num_warps=4, num_stages=2)
    assert len(jit_calls) == 1 and len(compiled.calls) == 1
    want = (3, 5, 1, 1234, _Compiled.function, ("meta",), None, None, None, x2, y2, 32, 1, 32, 7)
    assert compiled.calls[0] == want
    # constexprs by name in another order: the same kernel, constexprs in parameter order
    fl((1,), x2, y2, 32, 1, EXTRA=7, BLOCK=32, num_warps=4, num_stages=2)
    assert len(jit_calls) == 1 and compiled.calls[1][-2:] == (32, 7)


@pytest.mark.parametrize(
    "change",
    [
        "misaligned",
        "dtype",
        "n_is_16",
        "stride_is_1_to_2",
        "constexpr",
        "default_constexpr",
        "warps",
        "stages",
    ],
)
def test_any_change_of_specialisation_goes_through_the_jit(recorder, change):
    fl, jit_calls = recorder
    x, y = torch.zeros(32), torch.zeros(32)
    base = dict(args=(x, y, 33, 1), meta=dict(BLOCK=32), warps=4, stages=2)
    fl((1,), *base["args"], num_warps=4, num_stages=2, **base["meta"])
    args, meta, warps, stages = list(base["args"]), dict(base["meta"]), 4, 2
    if change == "misaligned":
        args[0] = x[1:]
    elif change == "dtype":
        args[1] = y.double()
    elif change == "n":
        args[2] = 34
    elif change == "stride_is_1_to_2":
        args[3] = 2
    elif change == "constexpr":
        meta["BLOCK"] = 64
    elif change == "default_constexpr":
        meta["EXTRA"] = 8
    elif change == "warps":
        warps = 8
    else:
        stages = 3
    fl((1,), *args, num_warps=warps, num_stages=stages, **meta)
    assert len(jit_calls) == 2
    assert not jit_calls[0][3].calls  # the first compiled kernel was not reused


def test_unkeyed_args_hooks_and_interpreter_use_the_jit_path(recorder, monkeypatch):
    fl, jit_calls = recorder
    x, y = torch.zeros(32), torch.zeros(32)
    fl((1,), x, y, 32, 1, BLOCK=32)
    fl((1,), x, y, [32], 1, BLOCK=32)  # a type the key does not cover
    assert len(jit_calls) == 2
    hook = launch._knobs.runtime.launch_enter_hook
    if hasattr(hook, "calls"):  # later Triton: an empty hook chain is no hook
        fl((1,), x, y, 32, 1, BLOCK=32)
        assert len(jit_calls) == 2 and len(jit_calls[0][3].calls) == 1
        monkeypatch.setattr(hook, "calls", [lambda *a: None])
    else:
        monkeypatch.setattr(launch._knobs.runtime, "launch_enter_hook", lambda *a: None)
    n = len(jit_calls)
    fl((1,), x, y, 32, 1, BLOCK=32)  # a profiler's hook must see the launch
    assert len(jit_calls) == n + 1
    interp = FastLaunch(InterpretedFunction(_copy))
    assert not interp.enabled


def test_bad_calls_name_the_argument(recorder):
    fl, _ = recorder
    x, y = torch.zeros(32), torch.zeros(32)
    with pytest.raises(TypeError, match="4 runtime arguments expected, got 3"):
        fl((1,), x, y, 32, BLOCK=32)
    with pytest.raises(TypeError, match="missing constexpr argument 'BLOCK'"):
        fl((1,), x, y, 32, 1)
    with pytest.raises(TypeError, match=r"unknown constexpr arguments \['BLCK'\]"):
        fl((1,), x, y, 32, 1, BLOCK=32, BLCK=3)

    interp = FastLaunch(InterpretedFunction(_copy))
    with pytest.raises(TypeError, match="4 runtime arguments expected, got 3"):
        interp((1,), x, y, 32, BLOCK=32)  # the interpreter's calls keep the convention too

    def bad(x_ptr, B: tl.constexpr, n):
        pass

    with pytest.raises(ValueError, match="constexpr parameters must come last"):
        FastLaunch(triton.runtime.JITFunction(bad))
