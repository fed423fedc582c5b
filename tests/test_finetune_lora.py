"""LoRA (moetron/finetune): a fresh adapter leaves the outputs alone, merging equals the unmerged
adapter, and adapters cross to and from `peft` (an independent implementation) in its own format:
moetron's adapter loaded by `PeftModel.from_pretrained` on transformers' Mixtral gives moetron's
logits, and an adapter peft wrote gives the same logits in moetron (fp32, ≤ 1e-4)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from moetron.config import LoRAConfig, get_preset
from moetron.convert.hf import from_pretrained, save_pretrained
from moetron.finetune.lora import apply_lora, lora_parameters, merge_lora
from moetron.finetune.peft_format import AdapterError, load_adapter, save_adapter
from moetron.model.transformer import Transformer

peft = pytest.importorskip("peft", reason="peft is a dev dependency")
transformers = pytest.importorskip("transformers")
ATOL = 1e-4  # float32, two implementations summing in different orders
ALL = ["attention", "experts", "router"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora-base")
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=128)
    torch.manual_seed(0)
    save_pretrained(Transformer.from_config(cfg), directory)
    return directory


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def _randomise(model: Transformer) -> None:
    """Non-zero B (a trained adapter's state), so every update shows in the outputs."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_a_fresh_adapter_is_the_base_model_and_only_it_trains(base_dir) -> None:
    base, model = from_pretrained(base_dir), from_pretrained(base_dir)
    names = apply_lora(model, LoRAConfig(rank=4, targets=ALL))
    assert len(names) == 2 * (4 + 1 + 1)  # per layer: q/k/v/o, the router, the experts
    assert torch.equal(model(_ids()), base(_ids()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora_parameters(model)} and trainable


def test_merge_equals_the_unmerged_adapter(base_dir) -> None:
    model = from_pretrained(base_dir)
    apply_lora(model, LoRAConfig(rank=4, targets=ALL))
    _randomise(model)
    unmerged = model(_ids())
    merge_lora(model)
    assert not list(lora_parameters(model))
    torch.testing.assert_close(model(_ids()), unmerged, atol=ATOL, rtol=0)


def _hf_logits(base_dir, adapter_dir) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    wrapped = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        return wrapped(_ids()).logits


def test_moetron_adapter_loads_in_peft_with_the_same_logits(base_dir, tmp_path) -> None:
    model = from_pretrained(base_dir)
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=ALL)
    apply_lora(model, cfg)
    _randomise(model)
    save_adapter(model, cfg, tmp_path, base_model=str(base_dir))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == [
        "mlp.gate.weight",
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
    ]
    with torch.no_grad():
        ours = model(_ids())
    theirs = _hf_logits(base_dir, tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        moved = (theirs - base(_ids()).logits).abs().max()
    assert moved > 1e-2  # the adapter changes the logits: the comparison below is not vacuous
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_a_peft_written_adapter_loads_in_moetron(base_dir, tmp_path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, init_lora_weights=False,  # random B: a trained adapter's state
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip
    torch.manual_seed(3)
    peft.get_peft_model(hf, config).save_pretrained(tmp_path)
    theirs = _hf_logits(base_dir, tmp_path)
    model = from_pretrained(base_dir)
    cfg = load_adapter(model, tmp_path)
    assert (cfg.rank, cfg.alpha, sorted(cfg.targets)) == (4, 16.0, ["attention", "experts"])
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), theirs, atol=ATOL, rtol=0)


def test_an_adapter_for_another_base_is_refused_naming_shapes(base_dir, tmp_path) -> None:
    other = dataclasses.replace(get_preset("tiny"), vocab_size=128, dim=96)
    model = Transformer.from_config(other)
    cfg = LoRAConfig(rank=4, targets=["attention"])
    apply_lora(model, cfg)
    save_adapter(model, cfg, tmp_path)
    with pytest.raises(
        AdapterError, match=r"q_proj.*the adapter has \[4, 96\], this base model needs \[4, 64\]"
    ):
        load_adapter(from_pretrained(base_dir), tmp_path)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="targets"):
        LoRAConfig(targets=["mlp"])
    dense = Transformer.from_config(get_preset("tiny"))
    with pytest.raises(ValueError, match=r"\['shared'\] match no module"):
        apply_lora(dense, LoRAConfig(targets=["attention", "shared"]))


def test_moetron_merge_writes_a_plain_model(base_dir, tmp_path) -> None:
    from moetron.cli import main

    model = from_pretrained(base_dir)
    cfg = LoRAConfig(rank=4, targets=ALL)
    apply_lora(model, cfg)
    _randomise(model)
    save_adapter(model, cfg, tmp_path / "adapter")
    assert main(["merge", str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()), model(_ids()), atol=ATOL, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(_ids()).logits, model(_ids()), atol=ATOL, rtol=0)
