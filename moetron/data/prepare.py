"""`prepare`: sources -> documents -> train/val split -> tokenizer -> flat token shards on disk.

Layout of `cfg.dir/<key>/` (key: hash of the inputs and settings, so a changed file, tokenizer,
vocab size, split or seed gives a new directory and an unchanged one is reused without work):

    train.bin, val.bin          every document's tokens followed by EOS, uint16 (vocab <= 65536)
                                or uint32, in corpus order; read with np.memmap
    train.idx.npy, val.idx.npy  int64 start offset of each document in the .bin
    tokenizer.json, tokenizer_config.json
    meta.json                   dtype, counts, sources with sizes/mtimes; written last

The directory is built under a temporary name and renamed into place, so a crash or a concurrent
run never leaves a half-written one that looks finished. Same inputs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from moetron.config import DataConfig
from moetron.data import sources as sources_
from moetron.data.errors import DataError
from moetron.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

FORMAT_VERSION = 1  # bump when the layout or the way documents are read/split changes
_ENCODE_BATCH_DOCS = 256


@dataclass(frozen=True)
class PreparedData:
    """A finished shard directory. Token counts include the EOS after every document."""

    dir: Path
    tokenizer: Tokenizer = field(compare=False, repr=False)
    vocab_size: int
    dtype: str  # "uint16" or "uint32"
    num_train_tokens: int
    num_val_tokens: int
    num_train_docs: int
    num_val_docs: int
    meta: dict[str, Any] = field(repr=False)  # meta.json: inputs, sources, per-split counts

    @property
    def train_path(self) -> Path:
        return self.dir / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.dir / "val.bin"

    @property
    def train_idx_path(self) -> Path:
        return self.dir / "train.idx.npy"

    @property
    def val_idx_path(self) -> Path:
        return self.dir / "val.idx.npy"


def prepare(cfg: DataConfig, seed: int = 0, *, progress: bool | None = None) -> PreparedData:
    """Tokenize `cfg.sources` into shards under `cfg.dir`, or reuse them if the inputs are unchanged.
    `seed` picks the validation documents. progress=None shows a bar only on a terminal."""
    inputs = _inputs(cfg, seed)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(cfg.dir) / key
    if (out / "meta.json").is_file():
        return load_prepared(out)

    documents = sources_.read_documents(cfg.sources, cfg.text_field)
    train_docs, val_docs = split_documents(documents, cfg.val_fraction, seed)
    tokenizer = (
        train_bpe(train_docs, cfg.vocab_size) if cfg.tokenizer == "bpe" else load_tokenizer(cfg.tokenizer)
    )
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    show = sys.stderr.isatty() if progress is None else progress

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=out.parent))
    try:
        with tqdm(total=len(documents), unit="doc", desc="tokenizing", disable=not show) as bar:
            splits = {
                name: _write_split(tmp, name, docs, tokenizer, dtype, bar)
                for name, docs in (("train", train_docs), ("val", val_docs))
            }
        tokenizer.save(tmp)
        meta = {
            **inputs,
            "key": key,
            "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size,
            **splits,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "meta.json").is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(out)


def load_prepared(directory: str | Path) -> PreparedData:
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{directory} is not a prepared data directory (no meta.json)") from None
    return PreparedData(
        dir=directory,
        tokenizer=load_tokenizer(directory),
        vocab_size=meta["vocab_size"],
        dtype=meta["dtype"],
        num_train_tokens=meta["train"]["tokens"],
        num_val_tokens=meta["val"]["tokens"],
        num_train_docs=meta["train"]["docs"],
        num_val_docs=meta["val"]["docs"],
        meta=meta,
    )


def split_documents(documents: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded random round(val_fraction * n) documents (at least one) for validation; both sides
    keep corpus order, so neighbouring chunks of one work stay neighbours in the stream."""
    if len(documents) < 2:
        raise DataError(
            f"found {len(documents)} document(s); a train/validation split needs at least 2 "
            "(use several .txt files, or JSONL/Parquet with one document per row)"
        )
    num_val = min(max(1, round(val_fraction * len(documents))), len(documents) - 1)
    is_val = np.zeros(len(documents), dtype=bool)
    is_val[np.random.default_rng(seed).permutation(len(documents))[:num_val]] = True
    train = [doc for doc, val in zip(documents, is_val, strict=True) if not val]
    val = [doc for doc, val in zip(documents, is_val, strict=True) if val]
    return train, val


def _inputs(cfg: DataConfig, seed: int) -> dict[str, Any]:
    """Everything the shards depend on; hashed into the directory name and kept in meta.json."""
    if cfg.tokenizer == "bpe":
        tokenizer: dict[str, Any] = {"kind": "bpe", "vocab_size": cfg.vocab_size}
    elif cfg.tokenizer == "cl100k_base":
        tokenizer = {"kind": "cl100k_base"}
    else:
        path = Path(cfg.tokenizer).expanduser()
        files = [path / "tokenizer.json", path / "tokenizer_config.json"] if path.is_dir() else [path]
        digests = {str(f.resolve()): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}
        if not digests:
            raise DataError(f"tokenizer {cfg.tokenizer!r}: no tokenizer.json at {files[0]}")
        tokenizer = {"kind": "file", "files": digests}
    return {
        "format": FORMAT_VERSION,
        "sources": sources_.fingerprint(cfg.sources),
        "text_field": cfg.text_field,
        "tokenizer": tokenizer,
        "val_fraction": cfg.val_fraction,
        "seed": seed,
    }


def _write_split(
    directory: Path, name: str, docs: Sequence[str], tokenizer: Tokenizer, dtype: type, bar: tqdm
) -> dict[str, int]:
    starts: list[int] = []
    num_tokens = 0
    with open(directory / f"{name}.bin", "wb") as f:
        for i in range(0, len(docs), _ENCODE_BATCH_DOCS):
            batch = docs[i : i + _ENCODE_BATCH_DOCS]
            for ids in tokenizer.encode_batch(batch):
                starts.append(num_tokens)
                ids.append(tokenizer.eos_id)
                np.asarray(ids, dtype=dtype).tofile(f)
                num_tokens += len(ids)
            bar.update(len(batch))
    np.save(directory / f"{name}.idx.npy", np.asarray(starts, dtype=np.int64))
    text_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    return {"tokens": num_tokens, "docs": len(docs), "text_bytes": text_bytes}
