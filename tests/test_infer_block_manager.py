"""BlockManager: allocation, ref-counts, prefix-cache hits and LRU eviction of cached free blocks."""

from __future__ import annotations

import pytest
from conftest import make_sequence

from moetron.infer.block_manager import BlockManager
from moetron.infer.sequence import Sequence


def compute(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """What one engine step does to the bookkeeping: allocate, 'compute', register full blocks."""
    num_new = seq.num_uncomputed_tokens if num_tokens is None else num_tokens
    assert bm.allocate(seq, num_new)
    seq.num_computed_tokens += num_new
    bm.commit(seq)


def test_allocate_and_free_counts_blocks() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_sequence(list(range(10)))
    compute(bm, seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3  # ceil(10 / 4)
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 7
    seq.append_token(99)  # 11 tokens: still fits in 3 blocks
    assert bm.allocate(seq, 1) and len(seq.block_table) == 3
    seq.num_computed_tokens += 1
    seq.append_token(98)
    assert bm.allocate(seq, 1) and len(seq.block_table) == 3  # token 12 fills block 3
    seq.num_computed_tokens += 1
    seq.append_token(97)
    assert bm.allocate(seq, 1) and len(seq.block_table) == 4
    bm.free(seq)
    assert bm.num_used_blocks == 0 and seq.block_table == []


def test_allocate_fails_without_taking_anything() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = make_sequence(list(range(20)))
    assert not bm.allocate(seq, 20)  # needs 5 blocks
    assert seq.block_table == [] and bm.num_free_blocks == 3


def test_prefix_hit_shares_full_blocks_with_ref_counts() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_sequence(list(range(14)))  # 3 full blocks + 2 tokens
    compute(bm, first)
    second = make_sequence([*range(12), 50, 51, 52])  # same first 3 blocks, different tail
    assert bm.match_prefix(second) == 12
    assert second.block_table == first.block_table[:3]
    assert all(bm.ref_counts[b] == 2 for b in first.block_table[:3])
    assert bm.ref_counts[first.block_table[3]] == 1
    compute(bm, second)
    assert second.block_table[3] != first.block_table[3]
    bm.free(first)
    assert all(bm.ref_counts[b] == 1 for b in second.block_table[:3])  # still held by `second`
    bm.free(second)
    assert bm.num_used_blocks == 0


def test_prefix_hit_leaves_a_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, make_sequence(list(range(8))))
    again = make_sequence(list(range(8)))  # exactly 2 blocks, both cached
    assert bm.match_prefix(again) == 4  # the last block is recomputed so its last token gets logits
    diverging = make_sequence([0, 1, 2, 9, 4, 5, 6, 7, 8])
    assert bm.match_prefix(diverging) == 0  # chained hash: a change in block 0 invalidates all after it


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    old, new = make_sequence([1, 2, 3, 4, 0]), make_sequence([5, 6, 7, 8, 0])
    compute(bm, old)
    compute(bm, new)
    bm.free(old)  # freed first: least recently used
    bm.free(new)
    assert bm.num_used_blocks == 0 and bm.num_cached_free_blocks == 4
    # The two partial last blocks hold no registered prefix and go first; a 3-block request then
    # evicts exactly one cached block, the least recently used: old's last full block.
    filler = make_sequence(list(range(100, 106)))
    assert bm.allocate(filler, 6)
    assert bm.num_cached_free_blocks == 3
    probe_old, probe_new = make_sequence([1, 2, 3, 4, 0]), make_sequence([5, 6, 7, 8, 0])
    assert bm.match_prefix(probe_old) == 2  # block [1, 2] survived, [3, 4] was evicted
    assert bm.match_prefix(probe_new) == 4  # the newer prefix is intact


def test_reset_prefix_cache_forgets_free_blocks_only() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    held, dropped = make_sequence([1, 2, 3]), make_sequence([7, 8, 9])
    compute(bm, held)
    compute(bm, dropped)
    bm.free(dropped)
    bm.reset_prefix_cache()
    assert bm.match_prefix(make_sequence([7, 8, 9])) == 0
    assert bm.match_prefix(make_sequence([1, 2, 3])) == 2


def test_bad_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
