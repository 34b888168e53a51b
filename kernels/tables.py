"""Which tuned block-config table a GPU uses.

Each kernel family ships tables tuned per device (`kernels/configs/*.json`, keyed by device name).
A device without its own table takes the table of another device of the same architecture when
there is one, and a device whose own table covers only some shapes takes the rest from there: on Hopper (sm_90) the H100 and H200 share the tensor cores, the SM count and the
shared memory per SM, so block shapes tuned on one are good starting points on the other (the HBM
bandwidth differs, so absolute times do not carry over). Otherwise the kernel's heuristic applies.
A fallback is reported once per (table, device) with `warnings.warn`.

Also here, shared by the split-K GEMMs (router GEMM, masked GEMMs): `k_splits` (how K divides),
`split_k_reduce` (the one-launch reduction: the last split to arrive sums the partials),
`split_k_accumulate` (the one-launch reduction through a self-cleaning atomic workspace), and
their zero-between-launches buffers `arrival_counters` and `zeroed_workspace`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import triton
import triton.language as tl

# Same-architecture families, in order of preference for a device with no table of its own.
_FAMILIES: dict[tuple[int, int], tuple[str, ...]] = {
    (9, 0): ("h200", "h100", "h800", "gh200", "h20"),
}
_warned: set[tuple[str, str]] = set()


def normalise(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (the form `fused_moe.device_key` uses)."""
    return name.replace("NVIDIA ", "").strip().replace(" ", "-").lower()


def _keys(
    tables: Mapping[str, Any], name: str, capability: tuple[int, int] | None
) -> tuple[str | None, str | None]:
    """(the key of `name`'s own table, the key of the preferred same-architecture sibling's), each
    None where `tables` has none. A plain lookup: no warnings."""
    by_norm = {normalise(k): k for k in tables}
    own = by_norm.get(normalise(name))
    for family in _FAMILIES.get(tuple(capability) if capability else (), ()):
        for norm, key in sorted(by_norm.items()):
            if key != own and (norm == family or norm.startswith(family + "-")):
                return own, key
    return own, None


def _warn_once(tag: tuple[str, str], message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, stacklevel=4)


def device_table(
    tables: Mapping[str, Any], name: str, capability: tuple[int, int] | None, what: str
) -> tuple[str | None, Any]:
    """The entry of `tables` (keyed by device name, in either form) for the device `name` with
    compute `capability`: its own, else a same-architecture device's (preferred order above), else
    `(None, None)`. `what` names the table in the one-time fallback warning."""
    own, sibling = _keys(tables, name, capability)
    if own is not None:
        return own, tables[own]
    if sibling is None:
        return None, None
    _warn_once(
        (what, name),
        f"no tuned {what} table for {name}; using the {sibling} table (same architecture, "
        f"sm_{capability[0]}{capability[1]}). Tune this device with the benchmark's --tune.",
    )
    return sibling, tables[sibling]


def device_entries(
    tables: Mapping[str, Any], name: str, capability: tuple[int, int] | None, what: str
) -> dict[str, Any]:
    """The entries device `name` uses: `device_table`'s, and where that is the device's own table
    and a same-architecture device has one too, the latter's entries for the keys (shapes, kernel
    kinds) the own table lacks (a tuning run that covered only some shapes leaves the rest tuned
    on a sibling rather than on the heuristics). One warning per (table, device) when any is borrowed."""
    own, sibling = _keys(tables, name, capability)
    if own is None:
        table = device_table(tables, name, capability, what)[1]
        return dict(table) if isinstance(table, Mapping) else {}
    if not isinstance(tables[own], Mapping):
        return {}
    merged = dict(tables[own])
    donor = tables[sibling] if sibling is not None else None
    if isinstance(donor, Mapping):
        borrowed = sorted(k for k in donor if k not in merged)
        merged.update({k: donor[k] for k in borrowed})
        if borrowed:
            _warn_once(
                (what + " entries", name),
                f"{what} table for {name} has no entry for {', '.join(borrowed)}; using the {sibling} "
                "entries for those. Tune this device with the benchmark's --tune to cover them.",
            )
    return merged


@functools.lru_cache(maxsize=64)
def for_device(what: str, load: Callable[[str], Mapping[str, Any]], path: str, index: int) -> Any:
    """The part of the table `load(path)` that CUDA device `index` uses (`device_entries`), or `{}`;
    cached per (table, device), so the kernels' launch path pays for the lookup once."""
    return device_entries(
        load(path), torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index), what
    )


@functools.lru_cache(maxsize=16)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (the kernels' grid heuristics)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b) for launchers (plain Python: `triton.cdiv` is a constexpr function
    in later Triton, several microseconds per call from the host)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Host-side smallest power of two >= n (1 for n <= 1), like `triton.next_power_of_2`."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def k_splits(k_tiles: int, wanted: int) -> tuple[int, int]:
    """(splits, K blocks per split) for `wanted` splits of `k_tiles` K blocks: at most one split per
    block, at least one, empty splits dropped (the last split may be shorter)."""
    per = cdiv(k_tiles, max(1, min(int(wanted), k_tiles)))
    return cdiv(k_tiles, per), per


@triton.jit
def split_k_reduce(acc, acc_up, ws_ptr, counter_ptr, tile, split, R: tl.constexpr, C: tl.constexpr,
                   GATED: tl.constexpr, SPLIT_K: tl.constexpr):  # fmt: skip
    """One-launch split-K: this split's partial sums of output tile `tile` (accumulators [R, C], the
    up half too when GATED) go to the workspace, the tile's arrival counter is bumped, and the split
    that arrives last sums all SPLIT_K partials in split order (deterministic), resets the counter
    for the next launch and returns `(True, sums)`; the others return `(False, ...)` and must store
    nothing. The workspace holds `[tiles, SPLIT_K, 1 or 2, R, C]` fp32; the counters come from
    `arrival_counters`."""
    SIZE: tl.constexpr = R * C * (2 if GATED else 1)
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    base = ws_ptr + tile.to(tl.int64) * (SPLIT_K * SIZE)
    tl.store(base + split * SIZE + offs, acc)
    if GATED:
        tl.store(base + split * SIZE + R * C + offs, acc_up)
    tl.debug_barrier()  # every thread's partial is written before the release below
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    if last:
        acc = tl.zeros((R, C), dtype=tl.float32)
        acc_up = tl.zeros((R, C), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(base + s * SIZE + offs, cache_modifier=".cg")
            if GATED:
                acc_up += tl.load(base + s * SIZE + R * C + offs, cache_modifier=".cg")
        tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")
    return last, acc, acc_up


@triton.jit
def split_k_accumulate(
    acc, ws_ptr, counter_ptr, tile, R: tl.constexpr, C: tl.constexpr, SPLIT_K: tl.constexpr
):
    """One-launch split-K through a self-cleaning workspace: this split adds its partial sums of
    output tile `tile` (`acc [R, C]`) into the tile's fp32 workspace with relaxed atomics (summed
    in L2, no partial copies), bumps the tile's arrival counter, and the split that arrives last
    reads the sums once, zeroes the workspace tile and resets the counter for the next launch and
    returns `(True, sums)`; the others return `(False, ...)` and must store nothing. Unlike
    `split_k_reduce` the last split's tail is one tile load whatever SPLIT_K is, but the summation
    order varies from run to run (as with atomics into the output). The workspace
    (`[tiles, R, C]` fp32, zero between launches) comes from `zeroed_workspace`, the counters from
    `arrival_counters`."""
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    ptrs = ws_ptr + tile.to(tl.int64) * (R * C) + offs
    tl.atomic_add(ptrs, acc, sem="relaxed", scope="gpu")
    tl.debug_barrier()  # every thread's adds are issued before the release below
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    if last:
        acc = tl.load(ptrs, cache_modifier=".cg")
        tl.store(ptrs, tl.zeros((R, C), dtype=tl.float32), cache_modifier=".cg")
        tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")
    return last, acc


_ZEROED: dict[tuple[str, str, int], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def _zeroed(what: str, device: torch.device, numel: int, dtype: torch.dtype, minimum: int) -> torch.Tensor:
    """A per-(purpose, device, stream) buffer of at least `numel` zeros that every launch using it
    leaves zero again. Calls on one stream are ordered, so they can share; concurrent streams get
    their own. A buffer outgrown by a larger launch is kept alive, not freed: a CUDA graph
    captured with it still points at it. A buffer first made inside a CUDA-graph capture is zeroed
    by a fill node of that graph (correct, one node more per replay): capture on a stream that has
    run the calls before (the warm-up stream) to keep it out."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (what, str(device), stream)
    buf = _ZEROED.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(numel, minimum), dtype=dtype, device=device)
        _ZEROED[key] = buf
    return buf


def arrival_counters(device: torch.device, num_tiles: int) -> torch.Tensor:
    """int32 arrival counters for one-launch split-K reductions (the last split of a tile to arrive
    finishes it: `split_k_reduce`, `split_k_accumulate`), shared per (device, stream), zero between
    launches (see `_zeroed`)."""
    return _zeroed("counters", device, num_tiles, torch.int32, 1024)


def schedule_counters(device: torch.device, numel: int) -> torch.Tensor:
    """int32 work-queue counters of a persistent kernel (ticket, finished programs, per-item done
    counts: `masked_grouped_gemm._masked_mlp_kernel`), shared per (device, stream), zero between
    launches (see `_zeroed`)."""
    return _zeroed("schedule", device, numel, torch.int32, 1024)


def zeroed_workspace(device: torch.device, numel: int) -> torch.Tensor:
    """fp32 workspace of `split_k_accumulate`, shared per (device, stream), zero between launches
    (see `_zeroed`)."""
    return _zeroed("accumulate", device, numel, torch.float32, 1 << 16)
