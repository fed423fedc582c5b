"""The KV pool's bookkeeping: which block holds what, who uses it, and the prefix cache.

Blocks are ref-counted; a sequence's block table lists its blocks in token order. A full block is
registered under a chained hash, hash(parent block's hash, its tokens), so one hash names a whole
prefix. Freed blocks keep their contents and registration and go to the back of an LRU free list:
a later prompt with the same prefix takes them back (a hit), and they are only overwritten when the
free list runs out of never-registered blocks and reaches them. Only full blocks are shared, and
never written again, so no copy-on-write is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq

from moetron.infer.sequence import Sequence


def block_hash(parent_hash: int | tuple | None, token_ids: Seq[int]) -> int:
    return hash((parent_hash, tuple(token_ids)))


def _root(seq: Sequence) -> tuple | None:
    """The hash chain's root: None for the base model; a LoRA adapter's rows have other keys and
    values, so each adapter's blocks chain from their own root."""
    adapter = seq.request.adapter
    return ("lora", adapter) if adapter else None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # guards against hash collisions
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(
            range(num_blocks)
        )  # front: evict first
        self.cached: dict[int, int] = {}  # hash -> block id

    # --- queries ---

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for b in self.free_blocks if self.hashes[b] is not None)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- allocation ---

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence without blocks the cached blocks of its longest registered prefix; returns
        the tokens they hold (the scheduler marks them computed). At least one token is always left to compute: the step
        that computes it yields the logits for the next token."""
        assert not seq.block_table, "match_prefix is for a sequence without blocks"
        parent = _root(seq)
        size = self.block_size
        for i in range((seq.num_tokens - 1) // size):
            tokens = tuple(seq.token_ids[i * size : (i + 1) * size])
            h = block_hash(parent, tokens)
            block = self.cached.get(h)
            if block is None or self.tokens[block] != tokens:
                break
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        return len(seq.block_table) * size

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq's block table to hold num_new_tokens more tokens; False (nothing taken) if the
        pool is short."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > len(self.free_blocks):
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        h = self.hashes[block]
        if h is not None:  # evict: its prefix is no longer cached
            if self.cached.get(h) == block:
                del self.cached[h]
            self.hashes[block] = self.tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def commit(self, seq: Sequence) -> None:
        """Register the full blocks seq has finished computing (prompt or output) in the prefix cache."""
        size = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else _root(seq)
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // size):
            tokens = tuple(seq.token_ids[i * size : (i + 1) * size])
            h = block_hash(parent, tokens)
            block = seq.block_table[i]
            if h not in self.cached:  # else an identical block is registered already; keep that one
                self.cached[h] = block
                self.hashes[block], self.tokens[block] = h, tokens
            seq.block_hashes.append(h)
            parent = h

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Free seq's blocks past the first num_tokens tokens (speculative rollback: those hold only
        rejected draft tokens, never registered, so they go to the front of the free list)."""
        keep = self.blocks_for(num_tokens)
        assert keep >= len(seq.block_hashes), "cannot truncate registered blocks"
        for block in reversed(seq.block_table[keep:]):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                self.free_blocks.move_to_end(block, last=False)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Drop seq's references. Its last blocks go to the free list first, so they are evicted
        before its first ones (later prompts share beginnings more often than ends); blocks holding
        no registered prefix go to the front, to be reused before any cached one."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.hashes[block] is None:
                    self.free_blocks.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> None:
        """Forget every registered block that no sequence holds (benchmarks, tests)."""
        for block in self.free_blocks:
            if self.hashes[block] is not None:
                del self.cached[self.hashes[block]]
                self.hashes[block] = self.tokens[block] = None
