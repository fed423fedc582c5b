"""Reading training text: the bundled corpus, .txt/.jsonl/.parquet files and directories, and a
DataError naming the path for everything missing, empty or malformed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moetron.data import DataError, read_documents, shakespeare


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _jsonl(path: Path, records: list) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in records))


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


def test_bundled_corpus_is_shakespeare() -> None:
    works = shakespeare.works()
    assert len(works) == 42 and "hamlet_gut" in works and "sonnets_gut" in works
    assert sum(len(text) for text in works.values()) == 5_057_198
    assert works["hamlet_gut"].startswith("HAMLET, PRINCE OF DENMARK")


def test_bundled_documents_are_paragraph_chunks() -> None:
    documents = read_documents(["shakespeare"])
    assert len(documents) == len(shakespeare.documents()) > 1000
    assert all(len(doc) >= shakespeare.CHUNK_CHARS // 2 for doc in documents)
    # Chunking only regroups paragraphs: nothing is lost or reordered.
    text = shakespeare.works()["sonnets_gut"]
    paragraphs = [p.strip("\n") for p in shakespeare._PARAGRAPH_BREAK.split(text) if p.strip()]
    assert "\n\n".join(shakespeare.chunk_paragraphs(text)) == "\n\n".join(paragraphs)


def test_chunk_paragraphs_sizes() -> None:
    text = "\n\n".join(f"paragraph {i} " + "x" * 50 for i in range(40))
    chunks = shakespeare.chunk_paragraphs(text, min_chars=200)
    assert all(len(c) >= 200 for c in chunks)
    assert chunks[0].startswith("paragraph 0 ") and chunks[-1].endswith("x")
    assert shakespeare.chunk_paragraphs("  indented\n\n\n\n  second", min_chars=30) == [
        "  indented\n\n  second"
    ]


def test_directory_of_mixed_files(tmp_path: Path) -> None:
    _write(tmp_path / "b.txt", "second file\n")
    _write(tmp_path / "a.txt", "first file\n")
    _jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "row one"}, {"text": "   "}, {"text": "row two", "id": 3}])
    _write(tmp_path / "README.md", "not data")  # other types in a directory are skipped
    _write(tmp_path / ".hidden" / "x.txt", "hidden")
    _write(tmp_path / "empty.txt", "")
    assert read_documents([str(tmp_path)]) == ["first file\n", "second file\n", "row one", "row two"]


def test_sources_keep_their_order(tmp_path: Path) -> None:
    a, b = _write(tmp_path / "a.txt", "A"), _write(tmp_path / "b.txt", "B")
    assert read_documents([str(b), str(a)]) == ["B", "A"]


def test_jsonl_text_field(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"body": "hello"}, {"body": "world 🌍"}])
    _write(tmp_path / "d.jsonl", path.read_text() + "\n\n")  # blank lines are fine
    assert read_documents([str(path)], text_field="body") == ["hello", "world 🌍"]


def test_jsonl_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"content": "no text here"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: no field 'text' \(found \['content'\]\)"):
        read_documents([str(path)])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:1: not valid JSON"),
        ('{"text": 3}', "is int, not a string"),
        ("[1, 2]", "found list"),
    ],
)
def test_jsonl_malformed(tmp_path: Path, line: str, message: str) -> None:
    path = _write(tmp_path / "bad.jsonl", line + "\n")
    with pytest.raises(DataError, match=message):
        read_documents([str(path)])


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "beta", ""], "n": [1, 2, 3, 4]}), path)
    assert read_documents([str(path)]) == ["alpha", "beta"]
    with pytest.raises(DataError, match=r"d\.parquet: no column 'body' \(found \['text', 'n'\]\)"):
        read_documents([str(path)], text_field="body")
    corrupt = _write(tmp_path / "corrupt.parquet", b"not parquet at all")
    with pytest.raises(DataError, match=r"corrupt\.parquet: not a readable Parquet file"):
        read_documents([str(corrupt)])


def test_parquet_without_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "d.parquet", b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(
        DataError, match=r"d\.parquet: reading Parquet needs pyarrow: pip install 'moetron\[parquet\]'"
    ):
        read_documents([str(path)])


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt\' does not exist"):
        read_documents([str(tmp_path / "nope.txt")])


def test_unknown_file_type(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.csv", "a,b\n")
    with pytest.raises(DataError, match=r"data\.csv': unsupported file type '\.csv'"):
        read_documents([str(path)])


def test_empty_file_and_directories(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.txt", "  \n\n")
    with pytest.raises(DataError, match=r"empty\.txt\' contains no text"):
        read_documents([str(empty)])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing' is a directory with no \.txt/\.jsonl/\.parquet files"):
        read_documents([str(tmp_path / "nothing")])
    _write(tmp_path / "blank" / "a.jsonl", "\n")
    with pytest.raises(DataError, match="blank' contains no text"):
        read_documents([str(tmp_path / "blank")])


def test_not_utf8(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text \(bad byte at offset 3\)"):
        read_documents([str(path)])
