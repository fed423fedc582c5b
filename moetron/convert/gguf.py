"""Hugging Face (Mixtral) model directory -> GGUF, llama.cpp's file format, via llama.cpp's own converter.

    python -m moetron.convert.gguf fetch                       # once: unpack the converter (see below)
    python -m moetron.convert.gguf MODEL_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0]

We do not reimplement the format: `export_gguf` runs llama.cpp's `convert_hf_to_gguf.py` in a
subprocess, so the file is exactly what llama.cpp's maintainers write for a Mixtral checkpoint.
That script (with its `conversion/` package and `gguf-py`) ships in llama-cpp-python's *source*
distribution but its wheel installs only the `llama_cpp` bindings. `fetch_converter` therefore
unpacks those three entries from the sdist of the *installed* llama-cpp-python version (one
`pip download`), so converter and runtime always come from the same llama.cpp commit. A llama.cpp
checkout works too: pass `llama_cpp_dir` or set MOETRON_LLAMA_CPP_DIR.

Router selection bias (aux-loss-free balancing): a model directory whose config.json has
`moetron_expert_bias` (convert/hf.py writes it where the bias is nonzero) is refused. llama.cpp has
such a tensor (`ffn_exp_probs_b`) only for architectures that use it (DeepSeek-V3 and kin); its
Mixtral (llama) graph has none, so the converter cannot place the tensor and the file would choose
other experts than the trained model. A zero bias is not exported, and those models convert.

Tokenizer: the converter identifies a byte-level BPE `tokenizer.json` by hashing how it splits a
probe string and rejects hashes it does not know, which includes every tokenizer moetron trains.
A SentencePiece `tokenizer.model` (what Llama-2 and Mixtral ship) needs no such table;
`write_sentencepiece_tokenizer` trains one. llama-cpp-python and sentencepiece are the `bench` extra.
For moetron's own models use moetron's writer instead (`moetron export gguf`, convert/gguf_file.py):
it names the pre-tokenizer (`llama-bpe`: GPT-4's split, which moetron's BPE uses) and quantizes to
Q8_0/Q4_0/Q4_K without llama.cpp.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

LLAMA_CPP_DIR_ENV = "MOETRON_LLAMA_CPP_DIR"
CONVERTER = "convert_hf_to_gguf.py"
# What the converter imports next to itself: the per-architecture classes and its gguf writer.
_CONVERTER_ENTRIES = (CONVERTER, "conversion/", "gguf-py/")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
INSTALL_HINT = 'pip install -e ".[bench]"  (builds llama.cpp from source: minutes)'


class GGUFExportError(RuntimeError):
    """llama.cpp's converter is missing, or refused or failed to convert a model directory."""


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version (without importing it: that loads the C library)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise GGUFExportError(f"llama-cpp-python is not installed; {INSTALL_HINT}")
    return metadata.version("llama_cpp_python")


def default_converter_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "moetron" / f"llama.cpp-{llama_cpp_version()}"


def find_converter(llama_cpp_dir: str | Path | None = None) -> Path:
    """The directory holding convert_hf_to_gguf.py: `llama_cpp_dir`, else $MOETRON_LLAMA_CPP_DIR,
    else the one `fetch_converter` unpacked for the installed llama-cpp-python."""
    explicit = llama_cpp_dir or os.environ.get(LLAMA_CPP_DIR_ENV)
    directory = Path(explicit) if explicit else default_converter_dir()
    if not (directory / CONVERTER).is_file():
        how = (
            f"{directory} has no {CONVERTER}"
            if explicit
            else f"llama.cpp's converter is not unpacked yet (looked in {directory})"
        )
        raise GGUFExportError(
            f"{how}. Run `python -m moetron.convert.gguf fetch` (unpacks it from the llama-cpp-python "
            f"sdist of the installed version) or set {LLAMA_CPP_DIR_ENV} to a llama.cpp checkout."
        )
    return directory


def fetch_converter(dest: str | Path | None = None) -> Path:
    """Unpack convert_hf_to_gguf.py, conversion/ and gguf-py/ from the sdist of the installed
    llama-cpp-python (downloaded with pip) into `dest` (default: `default_converter_dir()`)."""
    version = llama_cpp_version()
    dest = Path(dest) if dest else default_converter_dir()
    with tempfile.TemporaryDirectory(prefix="moetron-llama-sdist-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp]
        done = subprocess.run([*pip, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise GGUFExportError(
                f"pip could not download the llama-cpp-python=={version} sdist:\n{done.stderr[-2000:]}"
            )
        with tarfile.open(archives[0]) as sdist:
            prefix = f"{sdist.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = []
            for member in sdist.getmembers():
                inner = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and inner.startswith(_CONVERTER_ENTRIES):
                    member.name = inner
                    members.append(member)
            if not any(m.name == CONVERTER for m in members):
                raise GGUFExportError(f"{archives[0].name} has no vendor/llama.cpp/{CONVERTER}")
            staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=_mkdir(dest.parent)))
            sdist.extractall(staging, members=members, filter="data")
    if dest.exists():  # a concurrent fetch finished first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(dest)
    return dest


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def export_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f32",
    llama_cpp_dir: str | Path | None = None,
) -> Path:
    """Convert a Mixtral-layout model directory (as `save_pretrained` writes) to a GGUF file.

    `outtype` is llama.cpp's: f32, f16, bf16 or q8_0. The directory needs a tokenizer the converter
    accepts: a SentencePiece tokenizer.model (see `write_sentencepiece_tokenizer`). Returns out_path.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r} must be one of {', '.join(OUTTYPES)}")
    config = model_dir / "config.json"
    if not config.is_file():
        raise GGUFExportError(f"{model_dir} is not a model directory (no config.json)")
    hf_config = json.loads(config.read_text())
    architectures = hf_config.get("architectures") or ["?"]
    if architectures[0] != "MixtralForCausalLM":
        raise GGUFExportError(
            f"{config}: architecture {architectures[0]!r} has no GGUF mapping; only configs Mixtral can "
            "express convert (no shared experts, no dense layers, normalised top-k)"
        )
    if "moetron_expert_bias" in hf_config:  # the key convert/hf.py writes beside a nonzero bias
        raise GGUFExportError(
            f"{config}: the model's routers carry a nonzero selection bias (moe.bias_update_rate > 0 "
            "in training), which llama.cpp's Mixtral graph has no place for: its GGUF would choose "
            "other experts. Train with --model.moe.bias_update_rate=0 to export to GGUF."
        )
    if not (model_dir / "tokenizer.model").is_file():
        raise GGUFExportError(
            f"{model_dir} has no SentencePiece tokenizer.model; llama.cpp's converter rejects byte-level "
            "BPE tokenizers it has no hash for (moetron's own). Write one with "
            "moetron.convert.gguf.write_sentencepiece_tokenizer."
        )
    converter = find_converter(llama_cpp_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(converter / CONVERTER), str(model_dir)]
    command += ["--outfile", str(out_path), "--outtype", outtype]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not out_path.is_file():
        raise GGUFExportError(f"{CONVERTER} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return out_path


def write_sentencepiece_tokenizer(texts: Iterable[str], vocab_size: int, directory: str | Path) -> Path:
    """Train a SentencePiece BPE tokenizer (byte fallback: any text encodes) on `texts` and write
    `directory/tokenizer.model`. Deterministic for the same texts; ids 0-2 are <unk>, <s>, </s>."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise GGUFExportError(f"sentencepiece is not installed; {INSTALL_HINT}") from None
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,  # multi-threaded training is not reproducible
        minloglevel=2,
    )
    path = _mkdir(Path(directory)) / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moetron.convert.gguf", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model_dir", help="a Mixtral model directory, or 'fetch' to unpack the converter")
    parser.add_argument("out_path", nargs="?", help="the .gguf file to write")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f32")
    parser.add_argument("--llama-cpp-dir", default=None, help=f"default: ${LLAMA_CPP_DIR_ENV} or the cache")
    args = parser.parse_args(argv)
    try:
        if args.model_dir == "fetch":
            print(f"llama.cpp converter unpacked in {fetch_converter(args.llama_cpp_dir)}")
            return
        if args.out_path is None:
            parser.error("out_path is required")
        out = export_gguf(args.model_dir, args.out_path, args.outtype, args.llama_cpp_dir)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    except GGUFExportError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
