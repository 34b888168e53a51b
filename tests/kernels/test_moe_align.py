"""moe_align_block_size (the Triton kernel, under the interpreter on CPU) and its torch-ops fallback
against a Python-loop reference."""

from __future__ import annotations

import pytest
import torch

from ep_runtime.kernels.fused_moe import _moe_align_torch, align_buffer_size, moe_align_block_size

IMPLS = {"triton": moe_align_block_size, "torch": _moe_align_torch}


def ref_align(topk_ids, block_m, num_experts, expert_map=None):
    """Python-loop reference: (sorted slot ids without the tail, expert per block, padded total)."""
    flat = topk_ids.reshape(-1).tolist()
    emap = expert_map.tolist() if expert_map is not None else None
    groups = [[] for _ in range(num_experts)]
    for slot, e in enumerate(flat):
        if e < 0 or e >= num_experts:
            continue
        if emap is not None:
            e = emap[e]
            if e < 0:
                continue
        groups[e].append(slot)
    sentinel = len(flat)
    ids, blocks = [], []
    for e, g in enumerate(groups):
        if not g:
            continue
        n = -(-len(g) // block_m) * block_m
        ids += g + [sentinel] * (n - len(g))
        blocks += [e] * (n // block_m)
    return ids, blocks, len(ids)


def check_align(topk_ids, block_m, num_experts, expert_map=None, impl="triton"):
    sorted_ids, expert_ids, num_post = IMPLS[impl](topk_ids, block_m, num_experts, expert_map)
    ids, blocks, total = ref_align(
        topk_ids.cpu(), block_m, num_experts, None if expert_map is None else expert_map.cpu()
    )
    size = align_buffer_size(topk_ids.numel(), block_m, num_experts)
    assert (
        sorted_ids.dtype == torch.int32 and expert_ids.dtype == torch.int32 and num_post.dtype == torch.int32
    )
    assert sorted_ids.shape == (size,) and expert_ids.shape == (size // block_m,) and num_post.shape == (1,)
    assert sorted_ids.device == topk_ids.device and num_post.device == topk_ids.device
    assert num_post.item() == total
    assert sorted_ids[:total].tolist() == ids
    assert (sorted_ids[total:] == topk_ids.numel()).all()
    assert expert_ids[: len(blocks)].tolist() == blocks
    assert (expert_ids[len(blocks) :] == -1).all()
    return total


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_random_with_skips(rng_seed, block_m, impl):
    ids = torch.randint(-1, 7, (23, 3))
    check_align(ids, block_m, 7, impl=impl)
    check_align(torch.randint(-1, 5, (700, 4)), block_m, 5, impl=impl)  # several 1024-slot chunks
    check_align(torch.randint(-1, 9, (1500, 6)), block_m, 9, impl=impl)  # 4096-slot chunks (> 4096 slots)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_align_t0_and_t1(rng_seed, impl):
    assert check_align(torch.empty(0, 8, dtype=torch.long), 16, 5, impl=impl) == 0
    check_align(torch.tensor([[4, 0, -1]]), 4, 5, impl=impl)
    check_align(torch.tensor([[-1, -1]]), 4, 5, impl=impl)
    check_align(torch.randperm(128)[:8].view(1, 8), 16, 128, impl=impl)  # decode: 8 slots, 128 experts


def test_align_chunk_follows_the_slots():
    """The scan step is the slots rounded up to a power of two (32..1024), 4096 past 4096 slots:
    each size class above runs through its own chunk width."""
    from ep_runtime.kernels.fused_moe import _align_chunk

    assert [_align_chunk(n) for n in (1, 8, 33, 69, 1024, 1025, 4096, 4097)] == [
        32, 32, 64, 128, 1024, 1024, 1024, 4096
    ]  # fmt: skip


@pytest.mark.parametrize("impl", list(IMPLS))
def test_align_zero_token_experts_and_all_on_one(impl):
    ids = torch.tensor([[2, 2], [2, 5], [5, 2]])
    check_align(ids, 4, 6, impl=impl)  # experts 0, 1, 3, 4 have no tokens
    one = torch.full((37, 1), 3, dtype=torch.long)
    assert check_align(one, 16, 5, impl=impl) == 48


@pytest.mark.parametrize("impl", list(IMPLS))
def test_align_out_of_range_ids_are_skipped(impl):
    ids = torch.tensor([[0, 9], [-3, 1]])
    check_align(ids, 2, 3, impl=impl)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_align_expert_map(rng_seed, impl):
    num_experts = 10
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[torch.tensor([1, 4, 7])] = torch.tensor([0, 1, 2], dtype=torch.int32)
    ids = torch.randint(-1, num_experts, (19, 4))
    check_align(ids, 4, num_experts, expert_map, impl=impl)


def test_align_errors():
    with pytest.raises(ValueError, match="topk_ids"):
        moe_align_block_size(torch.zeros(3, dtype=torch.long), 4, 2)
    with pytest.raises(ValueError, match="block_m"):
        moe_align_block_size(torch.zeros(3, 2, dtype=torch.long), 0, 2)
    with pytest.raises(ValueError, match="num_experts"):
        moe_align_block_size(torch.zeros(3, 2, dtype=torch.long), 4, 0)
    with pytest.raises(ValueError, match="expert_map"):
        moe_align_block_size(torch.zeros(3, 2, dtype=torch.long), 4, 2, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="dtype"):
        moe_align_block_size(torch.zeros(3, 2), 4, 2)
