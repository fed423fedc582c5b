"""Data pipeline: sources -> documents -> tokenizer -> token shards -> packed, resumable batches.

prepared = prepare(cfg.data, seed=cfg.train.seed)
loader = PackedLoader(prepared.train_path, seq_len, batch_size, seed, rank, world_size)
inputs_BT, targets_BT = loader.next_batch()
"""

from moetron.data.errors import DataError
from moetron.data.loader import PackedLoader, ValLoader, open_tokens
from moetron.data.prepare import PreparedData, load_prepared, prepare, split_documents
from moetron.data.sources import read_documents
from moetron.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "DataError",
    "PackedLoader",
    "PreparedData",
    "Tokenizer",
    "ValLoader",
    "load_prepared",
    "load_tokenizer",
    "open_tokens",
    "prepare",
    "read_documents",
    "split_documents",
    "train_bpe",
]
