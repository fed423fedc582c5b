"""`moetron finetune` (moetron/finetune): the loss is on answers only, packed examples are kept
apart, LoRA and full SFT learn and write what peft / transformers load, a resumed run continues
bit for bit, DPO's loss is trl's formula and it learns the preference, bad data is named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moetron.cli import main
from moetron.config import FinetuneConfig, LoRAConfig
from moetron.convert.hf import from_pretrained
from moetron.data.errors import DataError
from moetron.finetune.data import Example, load_dataset
from moetron.finetune.packing import IGNORE, DocumentCausalAttention, make_batch, pack_examples
from moetron.finetune.peft_format import load_adapter
from moetron.finetune.trainer import dpo_loss, finetune

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Who speaks line {i}?"},
            {"role": "assistant", "content": name},
        ]
    }
    for i, name in enumerate(["ROMEO", "JULIET", "MERCUTIO", "TYBALT"] * 6)
]


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny random model with a head of a trained model's scale: at init (std 0.02, width 64)
    no logit can exceed ~1.3, so no update of the layers below a frozen head could make any token
    likelier than ~e^-4.7 among 400; a trained head spans tens of nats."""
    from moetron.convert.hf import save_pretrained
    from moetron.data.tokenizer import load_tokenizer

    model = from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.output.weight.mul_(10.0)
    directory = tmp_path_factory.mktemp("finetune-base")
    save_pretrained(model, directory)
    load_tokenizer(tiny_model_dir).save(directory)
    return directory


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_only_the_answer_is_trained(tokenizer, tmp_path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name one?"},
                      {"role": "assistant", "content": "ROMEO"}, {"role": "user", "content": "Another?"},
                      {"role": "assistant", "content": "JULIET"}]},
        {"prompt": "The lady is", "completion": " Juliet."},
        {"messages": [{"role": "user", "content": "no answer here"}]},
    ]  # fmt: skip
    data = load_dataset(_write(tmp_path / "d.jsonl", rows), tokenizer)
    assert data.num_skipped == 1 and len(data.examples) == 2
    chat, pair = data.examples
    trained = tokenizer.decode([t for t, keep in zip(chat.ids, chat.trained, strict=True) if keep])
    assert trained == "ROMEO<|end|>\nJULIET<|end|>\n"  # the answers and their end-of-turn markers
    assert tokenizer.decode(chat.ids) == tokenizer.apply_chat_template(
        rows[0]["messages"], add_generation_prompt=False
    )
    assert (
        tokenizer.decode([t for t, k in zip(pair.ids, pair.trained, strict=True) if k]) == " Juliet.<|eos|>"
    )
    everything = load_dataset(tmp_path / "d.jsonl", tokenizer, train_on_prompt=True)
    assert all(all(e.trained) for e in everything.examples)


def test_bad_lines_name_the_file_and_line(tokenizer, tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_dataset(path, tokenizer)
    path.write_text('{"messages": [{"role": "narrator", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: messages\[0\] has role 'narrator'"):
        load_dataset(path, tokenizer)


def test_packed_examples_compute_what_they_would_alone(tiny_model_dir) -> None:
    model = from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    examples = [
        Example(torch.randint(3, 300, (n,), generator=gen).tolist(), [False] * 3 + [True] * (n - 3))
        for n in (9, 14, 6)
    ]
    packed, _ = pack_examples(examples, 40, pack=True, pad_id=0)
    alone, _ = pack_examples(examples, 40, pack=False, pad_id=0)
    assert len(packed) == 1 and len(alone) == 3
    with torch.no_grad():
        batch = make_batch(packed)
        logits = model(batch.inputs_BT, batch.positions_BT, DocumentCausalAttention(batch.documents_BT))[0]
        start = 0
        for row in alone:
            single = make_batch([row])
            n = sum(d == 0 for d in row.documents)
            expected = model(single.inputs_BT[:, :n])[0]
            torch.testing.assert_close(logits[start : start + n], expected, atol=1e-5, rtol=0)
            start += n
    assert (batch.targets_BT != IGNORE).sum() == sum(sum(e.trained[1:]) for e in examples)


def _cfg(base: Path, data: Path, out: Path, **changes) -> FinetuneConfig:
    settings = {
        "base": str(base), "data": str(data), "out_dir": str(out), "steps": 30, "batch_size": 4, "seq_len": 64,
        "lr": 3e-3, "warmup_steps": 2, "eval_fraction": 0.25, "eval_every": 10, "checkpoint_every": 10,
        "lora": LoRAConfig(rank=4, alpha=8.0), "progress": False,
    }  # fmt: skip
    return FinetuneConfig(**(settings | changes))


def test_lora_sft_learns_and_its_adapter_loads(base_dir, tmp_path) -> None:
    data = _write(tmp_path / "chats.jsonl", CHATS)
    result = finetune(_cfg(base_dir, data, tmp_path / "run", merge=True), log=lambda _: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < evals[0] - 1.0, evals  # a nat per answer token gained on held-out questions
    assert result.output_dir == tmp_path / "run" / "adapter"
    model = from_pretrained(base_dir)
    load_adapter(model, result.output_dir)
    merged = from_pretrained(tmp_path / "run" / "merged")
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=1e-4, rtol=0)


def test_a_resumed_run_continues_bit_for_bit(base_dir, tmp_path) -> None:
    data = _write(tmp_path / "chats.jsonl", CHATS)
    straight = finetune(
        _cfg(base_dir, data, tmp_path / "a", steps=12, lora=LoRAConfig(rank=4, dropout=0.1)),
        log=lambda _: None,
    )
    cfg = _cfg(base_dir, data, tmp_path / "b", steps=12, lora=LoRAConfig(rank=4, dropout=0.1))
    assert finetune(cfg, stop_after=7, log=lambda _: None).output_dir is None  # checkpoint at 7
    resumed = finetune(cfg, log=lambda _: None)

    def losses(directory: Path) -> list[float]:
        return [
            json.loads(line)["lm_loss"] for line in (directory / "metrics.jsonl").read_text().splitlines()
        ]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "b")) == 12
    a = (straight.output_dir / "adapter_model.safetensors").read_bytes()
    assert a == (resumed.output_dir / "adapter_model.safetensors").read_bytes()


def test_full_finetune_writes_a_model_transformers_loads(base_dir, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    data = _write(tmp_path / "pc.jsonl", [{"prompt": f"Q{i}:", "completion": " ROMEO"} for i in range(16)])
    status = main(["finetune", str(base_dir), "--data", str(data), "--method", "full", "--out",
                   str(tmp_path / "full"), "--finetune.steps=6", "--finetune.lr=1e-3", "--finetune.seq_len=32"])  # fmt: skip
    assert status == 0
    ours = from_pretrained(tmp_path / "full" / "final")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "full" / "final", dtype=torch.float32
    )
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=0)
    assert not torch.equal(ours.tok_embeddings.weight, from_pretrained(base_dir).tok_embeddings.weight)


def test_dpo_loss_is_trls_formula() -> None:
    pc, pr = torch.tensor([-5.0, -7.0, -3.0]), torch.tensor([-6.0, -6.0, -9.0])
    rc, rr = torch.tensor([-5.5, -7.0, -4.0]), torch.tensor([-5.5, -6.0, -8.0])
    beta = 0.2
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    # trl (sigmoid loss, no label smoothing): -log σ(β((πc - πr) - (refc - refr))), averaged
    expected = (
        sum(
            -math.log(1 / (1 + math.exp(-beta * ((a - b) - (c - d)))))
            for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)
        )
        / 3
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["reward_accuracy"] == pytest.approx(2 / 3)
    assert dpo_loss(pc, pr, pc, pr, beta)[0].item() == pytest.approx(math.log(2))


def test_dpo_learns_the_preference(base_dir, tmp_path) -> None:
    pairs = [
        {
            "prompt": [{"role": "user", "content": f"Who loves Juliet? ({i})"}],
            "chosen": "ROMEO",
            "rejected": "TYBALT",
        }
        for i in range(16)
    ]
    data = _write(tmp_path / "prefs.jsonl", pairs)
    finetune(_cfg(base_dir, data, tmp_path / "dpo", method="dpo", steps=20, lr=5e-3), log=lambda _: None)
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts as the reference
    assert records[-1]["reward_accuracy"] == 1.0 and records[-1]["reward_margin"] > 0.5
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < math.log(2) - 0.1


def test_the_demo_task_holds_out_unseen_passages(tmp_path) -> None:
    from moetron.finetune.demo import QUESTION, make_task

    heldout = make_task(tmp_path / "train.jsonl", num_train=200, num_eval=50)
    train = [json.loads(line)["messages"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line)["messages"] for line in heldout.read_text().splitlines()]
    assert (len(train), len(held)) == (200, 50)
    for user, answer in train + held:  # the answer is the name the passage opens with
        assert user["content"].startswith(f"{QUESTION}\n\n{answer['content']}.\n")
    assert not {m[0]["content"] for m in held} & {m[0]["content"] for m in train}


def test_lora_over_a_bf16_base_trains_a_float32_adapter(base_dir, tmp_path) -> None:
    from safetensors import safe_open

    data = _write(tmp_path / "chats.jsonl", CHATS)
    finetune(_cfg(base_dir, data, tmp_path / "bf16", base_dtype="bfloat16", steps=12), log=lambda _: None)
    losses = [
        json.loads(line)["lm_loss"] for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < losses[0] - 0.5
    with safe_open(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118
    with pytest.raises(ValueError, match="base_dtype='bfloat16' is for a frozen base under LoRA"):
        FinetuneConfig(method="full", base_dtype="bfloat16")
