"""Bad model directories fail with a CheckpointError that says what is wrong, never a deep torch
traceback, and never by unpickling anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetron
from moetron import CheckpointError
from moetron.config import ModelConfig, MoEConfig
from moetron.convert.hf import save_pretrained
from moetron.model import Transformer

CFG = ModelConfig(
    vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=16),
)  # fmt: skip


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_pretrained(Transformer.from_config(CFG), tmp_path / "m")
    return tmp_path / "m"


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        moetron.from_pretrained(tmp_path / "nope")


def test_missing_config(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        moetron.from_pretrained(model_dir)


def test_invalid_json_config(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        moetron.from_pretrained(model_dir)


def test_missing_weights_and_pickles_refused(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        moetron.from_pretrained(model_dir)
    # a pickle is named, and refused rather than loaded
    marker = model_dir / "pytorch_model.bin"
    marker.write_bytes(b"\x80\x04this would be a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never loaded"):
        moetron.from_pretrained(model_dir)


def test_unsupported_architecture(model_dir: Path) -> None:
    _edit_config(model_dir, architectures=["LlamaForCausalLM"], model_type="llama")
    config = json.loads((model_dir / "config.json").read_text())
    del config["moetron"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM.*not supported"):
        moetron.from_pretrained(model_dir)


def test_unsupported_rope_and_activation(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    del config["moetron"]
    config["hidden_act"] = "gelu"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_act='gelu'"):
        moetron.from_pretrained(model_dir)
    config["hidden_act"] = "silu"
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope type 'longrope'"):
        moetron.from_pretrained(model_dir)


def test_invalid_config_value_names_the_field(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["moetron"]["moe"]["top_k"] = 9
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"top_k=9 must lie in \[1, moe.num_experts=4\]"):
        moetron.from_pretrained(model_dir)


def test_shape_mismatch_names_tensor_and_shapes(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        moetron.from_pretrained(model_dir)
    message = str(info.value)
    assert "model.layers.1.self_attn.q_proj.weight" in message
    assert "[16, 32]" in message and "[32, 32]" in message


def test_missing_and_unexpected_tensors(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.0\.ffn\.experts\.w2"):
        moetron.from_pretrained(model_dir)
    tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"] = torch.zeros(32, 16)
    tensors["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.7"):
        moetron.from_pretrained(model_dir)


def test_expert_index_out_of_range(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = torch.zeros(16, 32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="expert 9 but the config has 4 experts"):
        moetron.from_pretrained(model_dir)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.002, 0.5, 0.999])
def test_truncated_safetensors(model_dir: Path, keep_fraction: float) -> None:
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        moetron.from_pretrained(model_dir)


def test_garbage_header(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        moetron.from_pretrained(model_dir)


def test_index_pointing_to_missing_shard(model_dir: Path) -> None:
    model = moetron.from_pretrained(model_dir)
    save_pretrained(model, model_dir, max_shard_bytes=20_000)
    shards = sorted(model_dir.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name} is listed.*but missing"):
        moetron.from_pretrained(model_dir)


def test_save_is_atomic_no_temp_files_left(model_dir: Path) -> None:
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
