"""Low-overhead launches of `@triton.jit` kernels.

`kernel[grid](*args, **meta)` spends most of its host time before the launch itself: binding the
arguments, computing each one's specialisation, building the cache key as strings, and looking up
the compiled kernel (on the H200 machine about 19 us of a 29 us call for the router's GEMV, where the
launch proper costs about 10 us). For a kernel whose GPU time is a few microseconds that host time
is the whole call whenever the host, not the GPU, sets the pace: eager decode steps, and
`triton.testing.do_bench` once the host falls behind its cache flush.

`FastLaunch(kernel)` keeps that path for the first call of each specialisation and remembers the
compiled kernel it returns; later calls with the same key go straight to the compiled kernel's
launcher. The key is finer than Triton's own specialisation on NVIDIA GPUs: per tensor its dtype
and whether its address is a multiple of 16; per integer its value (Triton keys on equal to 1,
multiple of 16 and width); per float its type and per bool its value; plus the constexpr values,
num_warps, num_stages and the current device. A finer key only means more entries, each filled
once by Triton's own path (a new token count costs one slow call); the cache is emptied when it
reaches `MAX_ENTRIES`.

The JIT path is used every time: under the interpreter (`TRITON_INTERPRET=1`, no compiled kernel),
while a launch hook is installed (profilers such as proton see every launch), for arguments of
any other type (tensor descriptors, for example), and on a Triton without the `knobs` module.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import triton

try:  # Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: always the JIT path
    _knobs = None

MAX_ENTRIES = 4096
_EMPTY = inspect.Parameter.empty


class _Unkeyed(Exception):
    """An argument type the key does not cover: launch through the JIT path."""


def arg_key(a: Any) -> Any:
    """The part of the cache key for one runtime argument (see the module docstring)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    cls = a.__class__
    if cls is int:
        return a
    if cls is bool:
        return ("b", a)
    if cls is float:
        return "f"
    if a is None:
        return None
    raise _Unkeyed(cls.__name__)


def _installed(hook: Any) -> bool:
    """A launch hook is set: a callable (Triton 3.6) or a non-empty hook chain (later Triton)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_installed() -> bool:
    rt = _knobs.runtime
    return _installed(rt.launch_enter_hook) or _installed(rt.launch_exit_hook)


class FastLaunch:
    """`FastLaunch(kernel)(grid, *args, num_warps=..., num_stages=..., **constexprs)` launches
    `kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)` with the same result.

    `args` are the kernel's runtime parameters in order; its constexpr parameters must all come
    after them (checked here) and are passed by name (defaults apply). `grid` is a tuple of 1 to
    3 ints. Returns nothing."""

    def __init__(self, kernel: Any):
        self.kernel = kernel
        fn = getattr(kernel, "fn", None)
        if fn is None:
            raise TypeError(f"FastLaunch needs a @triton.jit function, got {type(kernel).__name__}")
        self.name = fn.__name__
        # constexpr parameters from the annotations (strings under `from __future__ import
        # annotations`), as Triton reads them; the same under the interpreter
        params = list(inspect.signature(fn).parameters.values())
        flags = ["constexpr" in str(p.annotation) for p in params]
        first = flags.index(True) if True in flags else len(flags)
        if not all(flags[first:]):
            raise ValueError(f"FastLaunch({self.name}): constexpr parameters must come last")
        self.num_args = first
        self.const_names = tuple(p.name for p in params[first:])
        self.const_defaults = tuple(p.default for p in params[first:])
        self.enabled = _knobs is not None and isinstance(kernel, triton.runtime.JITFunction)
        self.cache: dict[tuple, Any] = {}
        self._device = self._stream = None  # the driver's, bound at the first launch

    def _bind_driver(self) -> None:
        driver = triton.runtime.driver.active
        self._device, self._stream = driver.get_current_device, driver.get_current_stream

    def _consts(self, meta: dict[str, Any]) -> tuple:
        out = []
        for name, default in zip(self.const_names, self.const_defaults, strict=True):
            if name in meta:
                out.append(meta[name])
            elif default is not _EMPTY:
                out.append(default)
            else:
                raise TypeError(f"{self.name}: missing constexpr argument {name!r}")
        if len(meta) > sum(n in meta for n in self.const_names):
            extra = sorted(set(meta) - set(self.const_names))
            raise TypeError(f"{self.name}: unknown constexpr arguments {extra}")
        return tuple(out)

    def _key(self, args: tuple, consts: tuple, num_warps: int, num_stages: int) -> tuple | None:
        """The cache key of a call (see the module docstring); None for an argument type it does
        not cover."""
        try:
            spec = tuple([a if a.__class__ is int else arg_key(a) for a in args])  # ints inline
        except _Unkeyed:
            return None
        if self._device is None:
            self._bind_driver()
        return (self._device(), num_warps, num_stages, consts, spec)

    def __call__(
        self, grid: tuple[int, ...], *args: Any, num_warps: int = 4, num_stages: int = 3, **meta: Any
    ):
        if len(args) != self.num_args:
            raise TypeError(f"{self.name}: {self.num_args} runtime arguments expected, got {len(args)}")
        # the common case inline (callers pass every constexpr, in order);
        # checked on every path, so calls under the interpreter are held to the same convention
        consts = tuple(meta.values()) if tuple(meta) == self.const_names else self._consts(meta)
        key = (
            self._key(args, consts, num_warps, num_stages)
            if self.enabled and not _hooks_installed()
            else None
        )
        compiled = self.cache.get(key) if key is not None else None
        if compiled is None:
            # Triton's JIT path: every call where no key applies, and the first of each key
            compiled = self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **meta)
            if key is not None and getattr(compiled, "function", None) is not None:
                if len(self.cache) >= MAX_ENTRIES:
                    self.cache.clear()
                self.cache[key] = compiled
            return
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], g1, g2, self._stream(key[0]), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *consts)  # fmt: skip
