"""The trainer end to end on a small corpus: metrics, exact resume, atomic checkpoints, HF export."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_shakespeare_corpus

from moetron.config import ConfigError, load_run_config
from moetron.data import ValLoader, prepare
from moetron.train import checkpoint as ckpt
from moetron.train.trainer import train

# tests/dist/train.py (a torchrun script) holds the stepped clock that the time-budget tests use
_spec = importlib.util.spec_from_file_location("dist_train", Path(__file__).parent / "dist" / "train.py")
_dist_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dist_train)

REQUIRED_METRICS = {
    "step",
    "loss",
    "lm_loss",
    "aux_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "expert_load",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~150 KB of the bundled Shakespeare as plain-text documents (a user-data source)."""
    return write_shakespeare_corpus(tmp_path_factory.mktemp("corpus"), 150_000)


def _config(corpus: Path, data_dir: Path, out_dir: Path, *overrides: str):
    return load_run_config(
        "configs/tiny.toml",
        [
            f"--data.sources=['{corpus}']",
            f"--data.dir={data_dir}",
            f"--train.out_dir={out_dir}",
            "--train.progress=false",
            "--train.steps=8",
            "--train.eval_every=4",
            "--train.checkpoint_every=4",
            "--model.moe.capacity_factor=1.25",  # exercise token dropping too
            *overrides,
        ],
    )


def _records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    result = train(_config(corpus, root / "data", root / "run"))
    return root, result


def test_metrics_plots_and_learning(straight_run, corpus) -> None:
    root, result = straight_run
    records = _records(root / "run")
    assert [r["step"] for r in records] == list(range(1, 9))
    for record in records:
        assert record.keys() >= REQUIRED_METRICS
        assert len(record["expert_load"]) == 2 and len(record["expert_load"][0]) == 4
        assert math.isfinite(record["loss"]) and record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1
    assert records[-1]["lm_loss"] < records[0]["lm_loss"]  # it learns
    assert records[0]["lr"] < records[4]["lr"]  # warmup
    assert {"val_loss", "val_perplexity", "val_bpb"} <= records[3].keys()
    assert result.val_loss == pytest.approx(records[-1]["val_loss"])
    assert result.val_bpb == pytest.approx(records[-1]["val_bpb"])
    # bits per byte = nats per token / ln 2 / (text bytes per scored token), the bytes counted here
    # by decoding the validation targets back to text
    tc = (cfg := _config(corpus, root / "data", root / "run")).train
    data = prepare(cfg.data, seed=tc.seed)
    batches = ValLoader(data.val_path, tc.seq_len, tc.batch_size, tc.eval_batches, dtype=data.dtype)
    num_tokens = num_bytes = 0
    for _, targets in batches:
        for row in targets.tolist():
            num_tokens += len(row)
            num_bytes += sum(len(data.tokenizer.decode([t], skip_special=True).encode()) for t in row)
    assert result.val_bpb == pytest.approx(result.val_loss * num_tokens / num_bytes / math.log(2), rel=1e-3)
    assert (root / "run" / "loss.png").stat().st_size > 0
    assert (root / "run" / "expert_load.png").stat().st_size > 0
    saved = json.loads((root / "run" / "config.json").read_text())
    assert saved["train"]["steps"] == 8 and saved["model"]["vocab_size"] == 512


def test_resume_is_exact(straight_run, corpus, tmp_path) -> None:
    root, _ = straight_run
    cfg = _config(corpus, root / "data", tmp_path / "run")
    partial = train(cfg, stop_after=5)
    assert partial.final_dir is None
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step_00000004",
        "step_00000005",
    ]
    resumed = train(_config(corpus, root / "data", tmp_path / "run", "--train.resume=true"))
    assert resumed.final_dir is not None
    straight = [(r["step"], r["lm_loss"], r["grad_norm"]) for r in _records(root / "run")]
    assert [(r["step"], r["lm_loss"], r["grad_norm"]) for r in _records(tmp_path / "run")] == straight


def test_resume_skips_a_damaged_newest_checkpoint(straight_run, corpus, tmp_path) -> None:
    root, _ = straight_run
    train(_config(corpus, root / "data", tmp_path / "run"), stop_after=6)
    checkpoints = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    newest = checkpoints[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn write from some other tool
    train(_config(corpus, root / "data", tmp_path / "run", "--train.resume=true"))
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 9))
    straight = [r["lm_loss"] for r in _records(root / "run")]
    assert [r["lm_loss"] for r in records] == straight  # resumed from step 4, not the damaged 6


def test_failed_save_leaves_previous_checkpoint_intact(straight_run, corpus, tmp_path, monkeypatch) -> None:
    root, _ = straight_run
    train(_config(corpus, root / "data", tmp_path / "run"), stop_after=4)
    calls = {"n": 0}
    real_save = ckpt.save_file

    def disk_full(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the optimizer file of the step-5 checkpoint
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(ckpt.CheckpointSaveError, match=r"No space left on device.*untouched"):
        train(_config(corpus, root / "data", tmp_path / "run", "--train.resume=true"), stop_after=5)
    directory = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step_00000004"]
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setattr(ckpt, "save_file", real_save)
    train(_config(corpus, root / "data", tmp_path / "run", "--train.resume=true"))
    assert [r["lm_loss"] for r in _records(tmp_path / "run")] == [
        r["lm_loss"] for r in _records(root / "run")
    ]


def test_export_loads_and_generates_in_transformers(straight_run) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moetron

    _, result = straight_run
    final = result.final_dir
    hf_model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(final)
    ours = moetron.from_pretrained(final)
    # The run trained a router selection bias, which transformers' Mixtral ignores (hf.py says
    # so in config.json): compare everything else, our model choosing without it.
    assert "moetron_expert_bias" in json.loads((final / "config.json").read_text())
    for layer in ours.moe_layers():
        layer.router.expert_bias.zero_()
    ids = hf_tokenizer("ROMEO: What light", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (hf_model(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    out = hf_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    chat = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in chat


def test_activation_checkpointing_and_accumulation_match(straight_run, corpus, tmp_path) -> None:
    """Recompute changes memory, not math; 2 micro-batches of 2 equal one batch of 4 (to fp32 rounding)."""
    root, _ = straight_run
    base = ["--train.steps=3", "--train.eval_every=100", "--train.checkpoint_every=100"]
    plain = train(_config(corpus, root / "data", tmp_path / "a", *base, "--model.moe.capacity_factor=none"))
    recompute = train(
        _config(corpus, root / "data", tmp_path / "b", *base, "--model.moe.capacity_factor=none",
                "--train.activation_checkpointing=true")
    )  # fmt: skip
    accumulated = train(
        _config(corpus, root / "data", tmp_path / "c", *base, "--model.moe.capacity_factor=none",
                "--train.batch_size=2", "--train.grad_accum_steps=2")
    )  # fmt: skip
    assert plain.final_dir and recompute.final_dir and accumulated.final_dir
    a, b, c = (_records(tmp_path / name) for name in "abc")
    assert [r["lm_loss"] for r in a] == [r["lm_loss"] for r in b]
    assert [r["expert_load"] for r in a] == [r["expert_load"] for r in b]  # counted once, not twice
    for x, y in zip(a, c, strict=True):
        assert x["lm_loss"] == pytest.approx(y["lm_loss"], rel=1e-4)


def test_bad_configs_are_named(corpus, tmp_path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        _config(corpus, tmp_path, tmp_path, "--train.stepz=3")
    with pytest.raises(ConfigError, match=r"train.seq_len=4096 must be <= model.max_seq_len=256"):
        _config(corpus, tmp_path, tmp_path, "--train.seq_len=4096")
    with pytest.raises(ConfigError, match=r"train\.lr=-1\.0 must be > 0"):
        _config(corpus, tmp_path, tmp_path, "--train.lr=-1")


def test_killed_save_is_invisible_and_cleaned_up(straight_run, corpus, tmp_path) -> None:
    """A save killed mid-write leaves only a hidden temporary directory: resume ignores it."""
    root, _ = straight_run
    train(_config(corpus, root / "data", tmp_path / "run"), stop_after=4)
    directory = tmp_path / "run" / "checkpoints"
    torn = directory / ".tmp-step_00000006-99999"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\x00" * 100)
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step_00000004"]
    train(_config(corpus, root / "data", tmp_path / "run", "--train.resume=true"))
    assert [r["lm_loss"] for r in _records(tmp_path / "run")] == [
        r["lm_loss"] for r in _records(root / "run")
    ]
    assert not torn.exists()


def test_one_process_takes_the_gpu_when_there_is_one(monkeypatch) -> None:
    """Without torchrun the trainer's device is the machine's first GPU where CUDA is available
    (a one-GPU `moetron train` once trained on the CPU), else the CPU; no process group either way."""
    from moetron.config import ParallelConfig
    from moetron.train.distributed import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert init_distributed(ParallelConfig()).device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ctx = init_distributed(ParallelConfig())
    assert ctx.device == torch.device("cuda", 0) and not ctx.distributed


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("max_norm", [0.5, 100.0, math.inf], ids=["clips", "within", "no-limit"])
def test_clip_and_step_matches_torch(max_norm: float, fused: bool) -> None:
    """The trainer's clip + AdamW step against torch's clip_grad_norm_ + the same AdamW: the norm to
    1e-6 (another summation order); nothing clipped: the weights bit for bit and no gradient written;
    clipped: the gradients left scaled as torch's (the fused kernel writes back what it read) and
    the weights within 1e-6 (it divides by 1/coef where torch multiplies by coef; a step moves them
    ~0.1); a NaN gradient makes every weight NaN, as torch's does."""
    from moetron.train.optim import clip_and_step

    def model_and_optimizer() -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (7, 300, 4096)]
        for p in params:
            p.grad = torch.randn(p.shape) * 0.3
        return params, torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=fused)

    ours, optimizer = model_and_optimizer()
    theirs, reference = model_and_optimizer()
    before = [p.detach().clone() for p in ours]
    versions = [p.grad._version for p in ours]
    norm = clip_and_step(optimizer, ours, max_norm)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    reference.step()
    assert float(norm) == pytest.approx(float(torch_norm), rel=1e-6)
    clipped = max_norm < float(norm)
    for a, b, start in zip(ours, theirs, before, strict=True):
        if clipped:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            assert (a - start).abs().max() > 0.05  # (the step moved them)
        else:
            assert torch.equal(a, b)
    if not clipped:
        assert [p.grad._version for p in ours] == versions
    ours[1].grad[3] = math.nan
    assert math.isnan(clip_and_step(optimizer, ours, max_norm))
    assert all(torch.isnan(p).all() for p in ours)


def test_clip_and_step_sums_bf16_gradients_in_fp32() -> None:
    """bf16 gradients (a model trained in bf16 weights): the norm is their exact values' norm to fp32
    accuracy, not a sum rounded to bf16 (a bf16 dot product: ~1e-3 off)."""
    from moetron.train.optim import clip_and_step

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n).bfloat16()) for n in (300, 40_000)]
    for p in params:
        p.grad = torch.randn(p.shape).bfloat16()
    exact = torch.cat([p.grad.double() for p in params]).norm()
    norm = clip_and_step(torch.optim.AdamW(params, lr=1e-3, fused=True), params, math.inf)
    assert float(norm) == pytest.approx(float(exact), rel=1e-5)  # (2.4e-6 here; bf16's ulp is 4e-3)


def test_lr_schedule_over_a_time_budget() -> None:
    from moetron.config import TrainConfig
    from moetron.train.optim import lr_at

    tc = TrainConfig(steps=1000, lr=1.0, min_lr_ratio=0.1, warmup_steps=4, time_budget_s=100.0)
    assert [lr_at(s, tc, train_time_s=50.0) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]  # warmup: steps
    # after warmup (which ended at 10 s) the cosine runs over the remaining 90 s, whatever the step
    assert lr_at(5, tc, 10.0, 10.0) == pytest.approx(1.0)
    assert lr_at(5, tc, 55.0, 10.0) == lr_at(900, tc, 55.0, 10.0) == pytest.approx(0.55)
    assert lr_at(6, tc, 100.0, 10.0) == lr_at(7, tc, 250.0, 10.0) == pytest.approx(0.1)
    stepped = TrainConfig(steps=104, lr=1.0, min_lr_ratio=0.1, warmup_steps=4)
    assert lr_at(54, stepped, train_time_s=99.0) == pytest.approx(0.55)  # no budget: over steps


def test_time_budget_stops_the_run_and_resumes_exactly(straight_run, corpus, tmp_path, monkeypatch) -> None:
    """train.time_budget_s=4 at 0.5 s a step: 8 steps of the 50 allowed, the last one evaluated,
    checkpointed and exported; its learning rates follow the time; a run stopped at step 4 and
    resumed trains the same 8 steps; a third call finds the budget spent and trains nothing."""
    from moetron.train import trainer
    from moetron.train.optim import lr_at

    root, _ = straight_run
    budget = ("--train.time_budget_s=4", "--train.steps=50")

    def run(out: str, *extra: str, stop_after: int | None = None):
        monkeypatch.setattr(trainer, "time", _dist_train.SteppedClock(0.5))  # each step lasts 0.5 s
        return train(_config(corpus, root / "data", tmp_path / out, *budget, *extra), stop_after=stop_after)

    result = run("straight")
    records = _records(tmp_path / "straight")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert result.final_dir is not None and result.last_step == 8
    assert "val_bpb" in records[-1] and result.val_bpb == records[-1]["val_bpb"]
    checkpoints = ckpt.list_checkpoints(tmp_path / "straight" / "checkpoints")
    assert checkpoints[-1].name == "step_00000008"
    tc = _config(corpus, root / "data", tmp_path, *budget).train  # warmup 5 steps: ends at 2.5 s
    assert [r["lr"] for r in records] == [lr_at(s, tc, 0.5 * (s - 1), 2.5) for s in range(1, 9)]
    # step 8 starts 3.5 s in: 1 of the 1.5 s after warmup gone
    assert records[-1]["lr"] == pytest.approx(tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 3))))

    assert run("resumed", stop_after=4).final_dir is None
    resumed = run("resumed", "--train.resume=true")
    assert resumed.final_dir is not None and resumed.last_step == 8
    keys = ("step", "lr", "lm_loss", "grad_norm")
    assert [[r[k] for k in keys] for r in _records(tmp_path / "resumed")] == [
        [r[k] for k in keys] for r in records
    ]

    again = run("straight")  # resume="auto": the budget is spent, nothing is trained or lost
    assert again.last_step == 8 and again.val_bpb == result.val_bpb
    assert _records(tmp_path / "straight") == records


def test_time_budget_must_be_finite_and_not_negative(corpus, tmp_path) -> None:
    for bad in ("-1", "inf"):
        with pytest.raises(ConfigError, match=rf"train\.time_budget_s={bad}(\.0)? must be a finite number"):
            _config(corpus, tmp_path, tmp_path, f"--train.time_budget_s={bad}")


def test_progress_on_a_time_budget_counts_seconds(capsys) -> None:
    """Without a terminal, a line each tenth of the budget (and at evaluations), in seconds."""
    from moetron.train.metrics import Progress

    progress = Progress(0, 10_000, True, time_budget_s=10.0)
    for step in range(1, 9):
        record = {"lm_loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0, "step_time_s": 0.75}
        progress.update(step, record | ({"val_loss": 0.5} if step == 8 else {}), time_spent_s=0.75 * step)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" loss")[0] for line in lines] == [
        "[train] step 2, 1.5/10 s", "[train] step 3, 2.2/10 s", "[train] step 4, 3.0/10 s",
        "[train] step 6, 4.5/10 s", "[train] step 7, 5.2/10 s", "[train] step 8, 6.0/10 s",
    ]  # fmt: skip
