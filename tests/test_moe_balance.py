"""Auxiliary-loss-free load balancing (DeepSeek-V3's router selection bias, train/balance.py) and
the sequence-wise aux loss: the config, the update rule, the router's use of the bias (selection
only; a zero bias is bit-identical to choosing on the probabilities), the trainer's update (the
same with accumulation, activation checkpointing and an exact resume; better balance than without),
and the bias through HF export/import, GGUF (refused) and the serving engine (fused and module
paths give the model's own greedy tokens). Every layout vs one process: test_distributed_balance.py.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import reference_greedy, write_shakespeare_corpus
from safetensors.torch import load_file, save_file

from moetron.config import ConfigError, EngineConfig, ModelConfig, MoEConfig, load_run_config, tiny
from moetron.convert.gguf import GGUFExportError, export_gguf
from moetron.convert.hf import from_pretrained, save_pretrained
from moetron.infer.engine import LLMEngine
from moetron.infer.sampling_params import SamplingParams
from moetron.kernels import cpu_kernels
from moetron.model import Transformer
from moetron.model.moe import MoELayer, Router, load_balancing_loss, sequence_load_balancing_loss
from moetron.train import balance
from moetron.train import checkpoint as ckpt
from moetron.train.trainer import train

CFG = ModelConfig(
    vocab_size=97, dim=48, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8, max_seq_len=128,
    moe=MoEConfig(num_experts=6, top_k=2, expert_hidden_dim=40),
)  # fmt: skip
BIAS = "e_score_correction_bias"


def _model(bias_std: float = 0.0, cfg: ModelConfig = CFG) -> Transformer:
    """Seeded random weights; a random selection bias N(0, bias_std) in every MoE layer."""
    torch.manual_seed(0)
    model = Transformer.from_config(cfg)
    gen = torch.Generator().manual_seed(1)
    for layer in model.moe_layers():
        layer.router.expert_bias.copy_(torch.randn(cfg.moe.num_experts, generator=gen) * bias_std)
    return model


def _ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(2))


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [-1e-3, 1.0, 3.0])
def test_bias_update_rate_outside_zero_one_is_named(rate: float) -> None:
    with pytest.raises(ConfigError, match=r"moe\.bias_update_rate=.* must lie in \[0, 1\)"):
        MoEConfig(bias_update_rate=rate)
    with pytest.raises(ConfigError, match=r"moe\.bias_update_rate"):
        load_run_config(None, [f"--model.moe.bias_update_rate={rate}"])


def test_balance_settings_defaults_and_choices() -> None:
    moe = MoEConfig()
    assert (moe.bias_update_rate, moe.aux_loss_type, moe.aux_loss_weight) == (1e-3, "batch", 0.01)
    assert MoEConfig(bias_update_rate=0).bias_update_rate == 0.0  # disables, and an int is a float
    assert load_run_config(None, ["--model.moe.aux_loss_type=sequence"]).model.moe.aux_loss_type == "sequence"
    with pytest.raises(ConfigError, match=r"moe\.aux_loss_type='token' must be one of 'batch', 'sequence'"):
        MoEConfig(aux_loss_type="token")


# --- the update rule ----------------------------------------------------------------------------


def test_update_moves_each_bias_towards_its_less_loaded_experts() -> None:
    load_LE = torch.tensor([[10, 2, 6, 6], [5, 5, 5, 5]])  # mean 6 in layer 0; balanced layer 1
    rate = 0.01
    assert torch.equal(balance.bias_step(load_LE[0], rate), torch.tensor([-rate, rate, 0.0, 0.0]))
    cfg = ModelConfig(
        dim=8, num_heads=2, num_kv_heads=2, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=8)
    )
    first, second = MoELayer(cfg), MoELayer(cfg)
    for _ in range(2):
        balance.update_expert_bias([(0, first), (1, second)], load_LE, rate)
    twice = torch.tensor(rate, dtype=torch.float32) * 2  # fp32 steps, exact
    assert torch.equal(first.router.expert_bias, torch.stack([-twice, twice, 0 * twice, 0 * twice]))
    assert not second.router.expert_bias.any()
    assert balance.max_abs_bias([first, second]) == float(twice)
    assert balance.max_load_ratio(load_LE) == pytest.approx(10 / 6)
    assert balance.max_load_ratio(torch.zeros(2, 4)) == 0.0  # nothing routed


# --- the router ---------------------------------------------------------------------------------


def _router_before_the_bias(router: Router, x_TD: torch.Tensor):
    """Router.forward as it was before the selection bias existed."""
    logits_TE = router.gate(x_TD).float()
    weights_TK, expert_ids_TK = logits_TE.softmax(dim=-1).topk(router.top_k, dim=-1)
    if router.normalize_top_k:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, expert_ids_TK, logits_TE


def _loss_and_grads(model: Transformer) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train().zero_grad()
    ids = _ids()
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_zero_bias_is_bit_identical_to_the_unbiased_router(monkeypatch) -> None:
    """Forward and backward (router losses included), through the whole model."""
    logits, grads = _loss_and_grads(_model())
    monkeypatch.setattr(Router, "forward", _router_before_the_bias)
    logits_before, grads_before = _loss_and_grads(_model())
    assert torch.equal(logits, logits_before)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_before, strict=True))


def test_bias_changes_the_choice_but_not_the_weights_formula() -> None:
    router = _model().layers[0].ffn.router
    x_TD = torch.randn(64, CFG.dim, generator=torch.Generator().manual_seed(4))
    _, unbiased_ids_TK, _ = router(x_TD)
    router.expert_bias[3] = 1.0  # more than any probability: expert 3 is always chosen
    weights_TK, ids_TK, logits_TE = router(x_TD)
    assert (ids_TK == 3).any(dim=-1).all() and not (unbiased_ids_TK == 3).any(dim=-1).all()
    chosen_TK = logits_TE.softmax(dim=-1).gather(-1, ids_TK)  # the unbiased probabilities
    assert torch.equal(weights_TK, chosen_TK / chosen_TK.sum(dim=-1, keepdim=True))
    assert "expert_bias" not in dict(router.named_parameters())  # no gradient: the trainer moves it


def test_bias_is_persistent_and_stays_fp32_in_a_bf16_model() -> None:
    model = _model(bias_std=0.01)
    bias = [layer.router.expert_bias.clone() for layer in model.moe_layers()]
    state = model.state_dict()
    assert torch.equal(state["layers.1.ffn.router.expert_bias"], bias[1])
    model.to(torch.bfloat16)
    assert model.layers[0].ffn.router.gate.weight.dtype == torch.bfloat16
    for layer, expected in zip(model.moe_layers(), bias, strict=True):
        assert layer.router.expert_bias.dtype == torch.float32  # (torch.equal ignores dtypes)
        assert torch.equal(layer.router.expert_bias, expected)
    with torch.no_grad():
        model.eval()(_ids())  # fp32 probabilities + fp32 bias in a bf16 model
    fresh = _model()
    fresh.load_state_dict(state)
    assert all(torch.equal(a.router.expert_bias, b) for a, b in zip(fresh.moe_layers(), bias, strict=True))


# --- the sequence-wise aux loss -------------------------------------------------------------------


def test_sequence_loss_is_the_batch_loss_of_each_sequence_averaged() -> None:
    gen = torch.Generator().manual_seed(5)
    probs_BSE = torch.randn(3, 10, 6, generator=gen).softmax(dim=-1)
    ids_BSK = probs_BSE.topk(2, dim=-1).indices
    per_sequence = [load_balancing_loss(probs_BSE[b], ids_BSK[b]) for b in range(3)]
    assert sequence_load_balancing_loss(probs_BSE, ids_BSK) == pytest.approx(
        float(sum(per_sequence) / 3), rel=1e-6
    )
    assert sequence_load_balancing_loss(probs_BSE[:1], ids_BSK[:1]) == pytest.approx(
        float(per_sequence[0]), rel=1e-6
    )
    # Balanced over the batch, each sequence using two experts only: only the sequence loss sees it.
    probs_BSE = (
        torch.tensor([[0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]]).repeat_interleave(4, 0).view(2, 4, 4)
    )
    ids_BSK = torch.tensor([[0, 1], [2, 3]]).repeat_interleave(4, 0).view(2, 4, 2)
    assert float(load_balancing_loss(probs_BSE.flatten(0, 1), ids_BSK.flatten(0, 1))) == pytest.approx(1.0)
    assert float(sequence_load_balancing_loss(probs_BSE, ids_BSK)) == pytest.approx(1.6)


def test_moe_layer_reports_the_sequence_loss_when_asked() -> None:
    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, aux_loss_type="sequence"))
    layer = _model(bias_std=0.01, cfg=cfg).layers[0].ffn.train()
    x_BTD = torch.randn(3, 7, CFG.dim, generator=torch.Generator().manual_seed(6), requires_grad=True)
    layer(x_BTD).sum().backward()
    _, ids_TK, logits_TE = layer.router(x_BTD.detach().flatten(0, 1))
    expected = sequence_load_balancing_loss(logits_TE.softmax(-1).view(3, 7, -1), ids_TK.view(3, 7, -1))
    assert torch.equal(layer.last_aux_loss, expected.detach())
    assert layer.router.gate.weight.grad is not None


# --- the trainer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_shakespeare_corpus(tmp_path_factory.mktemp("balance-corpus"), 60_000)


def _train(corpus: Path, out_dir: Path, *overrides: str, stop_after: int | None = None) -> list[dict]:
    """configs/tiny.toml on `corpus` (4 steps, a bias rate that moves routing quickly, the training
    settings the balance test was measured with); the records."""
    settings = [
        f"--data.sources=['{corpus}']",
        f"--data.dir={corpus.parent / 'balance-data'}",
        f"--train.out_dir={out_dir}",
        "--train.progress=false",
        "--train.steps=4",
        "--train.batch_size=4",
        "--train.seq_len=64",
        "--train.lr=3e-3",
        "--train.warmup_steps=5",
        "--train.eval_every=100",
        "--train.checkpoint_every=2",
        "--train.dtype=float32",
        "--model.moe.bias_update_rate=0.02",
        *overrides,
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export's "transformers ignores the bias"
        train(load_run_config("configs/tiny.toml", settings), stop_after=stop_after)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_bias(out_dir: Path, step: int) -> dict[str, torch.Tensor]:
    tensors = load_file(out_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")
    return {name: t for name, t in tensors.items() if name.endswith("router.expert_bias")}


def _balance_view(records: list[dict]) -> list[tuple]:
    return [(r["step"], r["expert_load"], r["max_load_ratio"], r["max_abs_expert_bias"]) for r in records]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> tuple[Path, list[dict]]:
    out_dir = tmp_path_factory.mktemp("balance") / "straight"
    return out_dir, _train(corpus, out_dir)


def _replayed_bias(records: list[dict], rate: float = 0.02) -> torch.Tensor:
    """The bias the update rule gives from the logged loads [MoE layers, experts]."""
    bias = torch.zeros(len(records[0]["expert_load"]), len(records[0]["expert_load"][0]))
    for record in records:
        for row, load_E in enumerate(torch.tensor(record["expert_load"])):
            bias[row] += balance.bias_step(load_E, rate)
    return bias


def _saved_bias(out_dir: Path, step: int) -> torch.Tensor:
    saved = _checkpoint_bias(out_dir, step)
    return torch.stack([saved[f"layers.{i}.ffn.router.expert_bias"] for i in range(len(saved))])


def test_trainer_updates_the_bias_from_the_step_load(straight) -> None:
    out_dir, records = straight
    for step, record in enumerate(records, start=1):
        bias = _replayed_bias(records[:step])
        assert record["max_abs_expert_bias"] == float(bias.abs().max())
        assert record["max_load_ratio"] == balance.max_load_ratio(torch.tensor(record["expert_load"]))
    assert torch.equal(_saved_bias(out_dir, 4), _replayed_bias(records))
    assert _replayed_bias(records).abs().max() > 0


def test_accumulated_micro_batches_update_the_bias_as_one_batch(straight, corpus, tmp_path) -> None:
    """2 micro-batches of 2 sequences count the step's load as one batch of 4 does. Compared on the
    first step: after it the weights differ in their last bits (the gradient sums in another
    order), which may route a near-tie token differently later on."""
    _, records = straight
    accumulated = _train(
        corpus, tmp_path / "run", "--train.steps=1", "--train.batch_size=2", "--train.grad_accum_steps=2"
    )
    assert _balance_view(accumulated) == _balance_view(records[:1])
    assert torch.equal(_saved_bias(tmp_path / "run", 1), _replayed_bias(records[:1]))


def test_activation_checkpointing_counts_each_token_once(straight, corpus, tmp_path) -> None:
    """Recomputed forwards leave the load alone: the same loads and bias, step for step."""
    out_dir, records = straight
    recomputed = _train(corpus, tmp_path / "run", "--train.activation_checkpointing=true")
    assert _balance_view(recomputed) == _balance_view(records)
    assert [r["lm_loss"] for r in recomputed] == [r["lm_loss"] for r in records]
    assert torch.equal(_saved_bias(tmp_path / "run", 4), _saved_bias(out_dir, 4))


def test_resume_continues_the_bias_exactly(straight, corpus, tmp_path) -> None:
    out_dir, records = straight
    _train(corpus, tmp_path / "run", stop_after=3)
    saved = _saved_bias(tmp_path / "run", 3)  # the checkpoint holds the bias
    assert saved.any() and torch.equal(saved, _replayed_bias(records[:3]))
    resumed = _train(corpus, tmp_path / "run", "--train.resume=true")
    losses = [(r["lm_loss"], r["grad_norm"]) for r in records]
    assert [(r["lm_loss"], r["grad_norm"]) for r in resumed] == losses
    assert _balance_view(resumed) == _balance_view(records)
    assert torch.equal(_saved_bias(tmp_path / "run", 4), _saved_bias(out_dir, 4))


def test_bias_balances_the_load_without_an_aux_loss(corpus, tmp_path) -> None:
    """No aux loss: the tiny router collapses onto two of its four experts within a few steps
    (max/mean load -> E/K = 2). With the bias the load over the run's second half stays near even.
    (Per step it oscillates: at this rate one bias step outweighs the spread of the probabilities.)"""

    def second_half_ratio(records: list[dict]) -> float:
        load_LE = torch.tensor([r["expert_load"] for r in records[len(records) // 2 :]]).sum(dim=0)
        return balance.max_load_ratio(load_LE)

    common = ("--train.steps=12", "--train.checkpoint_every=100", "--model.moe.aux_loss_weight=0")
    unbalanced = _train(corpus, tmp_path / "off", *common, "--model.moe.bias_update_rate=0")
    balanced = _train(corpus, tmp_path / "on", *common, "--model.moe.bias_update_rate=0.01")
    assert all(r["max_abs_expert_bias"] == 0.0 for r in unbalanced)
    assert second_half_ratio(unbalanced) > 1.8
    assert second_half_ratio(balanced) < 1.5


# --- export and serving ---------------------------------------------------------------------------


def test_hf_export_carries_a_nonzero_bias_and_reads_it_back(tmp_path) -> None:
    model = _model(bias_std=0.01).eval()
    with pytest.warns(UserWarning, match="selection bias is nonzero"):
        save_pretrained(model, tmp_path / "fp32")
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and "ignores" in config["moetron_expert_bias"]
    stored = load_file(tmp_path / "fp32" / "model.safetensors")
    assert stored[f"model.layers.1.block_sparse_moe.gate.{BIAS}"].dtype == torch.float32
    back = from_pretrained(tmp_path / "fp32")
    for ours, theirs in zip(model.moe_layers(), back.moe_layers(), strict=True):
        assert torch.equal(ours.router.expert_bias, theirs.router.expert_bias)
    with torch.no_grad():
        assert torch.equal(back(_ids()), model(_ids()))

    # bf16 weights: the bias is written and read back in fp32, and does not decide the model's dtype
    with pytest.warns(UserWarning):
        save_pretrained(_model(bias_std=0.01).to(torch.bfloat16), tmp_path / "bf16")
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert stored[f"model.layers.0.block_sparse_moe.gate.{BIAS}"].dtype == torch.float32
    back = from_pretrained(tmp_path / "bf16")
    assert back.layers[0].ffn.router.gate.weight.dtype == torch.bfloat16
    for ours, theirs in zip(model.moe_layers(), back.moe_layers(), strict=True):
        assert torch.equal(ours.router.expert_bias, theirs.router.expert_bias)

    # transformers' Mixtral loads the directory, ignoring the bias: it computes our model without it
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32).eval()
    for layer in model.moe_layers():
        layer.router.expert_bias.zero_()
    with torch.no_grad():
        assert (hf(_ids()).logits - model(_ids())).abs().max().item() <= 1e-4


def test_zero_bias_exports_as_before(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        save_pretrained(_model(), tmp_path)
    assert not any(BIAS in name for name in load_file(tmp_path / "model.safetensors"))
    assert "moetron_expert_bias" not in json.loads((tmp_path / "config.json").read_text())
    assert not any(layer.router.expert_bias.any() for layer in from_pretrained(tmp_path).moe_layers())


def test_gguf_export_refuses_a_nonzero_bias(tmp_path) -> None:
    """llama.cpp's Mixtral graph has no selection bias: refused before the converter is looked for."""
    with pytest.warns(UserWarning):
        save_pretrained(_model(bias_std=0.01), tmp_path)
    with pytest.raises(GGUFExportError, match="nonzero selection bias"):
        export_gguf(tmp_path, tmp_path / "x.gguf")


def _generate(model: Transformer, prompts: list[list[int]], fused: bool) -> list[tuple[list[int], list]]:
    """Greedy tokens and their top-2 logprobs per prompt, all prompts in one engine."""
    options = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=40, fused_layers=fused)
    engine = LLMEngine(model, None, EngineConfig(**options))
    assert engine.runner.fused == fused
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [
        (list(done[i].token_ids), [{t: lp.logprob for t, lp in p.items()} for p in done[i].logprobs])
        for i in ids
    ]


@pytest.mark.parametrize(
    "fused",
    [
        pytest.param(
            True, marks=pytest.mark.skipif(not cpu_kernels.available(), reason="needs moetron's CPU kernels")
        ),
        False,
    ],
    ids=["fused", "module"],
)
def test_engine_serves_the_biased_selection(fused: bool) -> None:
    model = _model(bias_std=0.01).eval()
    unbiased = _model().eval()
    with torch.no_grad():  # the bias changes which experts run, so the logits
        assert (model(_ids()) - unbiased(_ids())).abs().max() > 1e-3
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=gen).tolist() for n in (5, 23, 11)]
    batched = _generate(model, prompts, fused)
    assert [tokens for tokens, _ in batched] == [reference_greedy(model, p, max_tokens=8) for p in prompts]
    assert _generate(model, prompts[1:2], fused) == batched[1:2]  # alone: the same bits as in a batch


def test_a_checkpoint_from_before_bias_balancing_loads_with_zero_bias(tmp_path) -> None:
    model = Transformer.from_config(tiny())
    optimizer = torch.optim.AdamW(model.parameters())
    state = ckpt.TrainingState(step=1, loader={}, config={}, extra={})
    path = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, state, keep=1)
    tensors = load_file(path / "model.safetensors")
    old = {name: t for name, t in tensors.items() if not name.endswith("expert_bias")}
    assert len(old) < len(tensors)
    save_file(old, path / "model.safetensors", metadata={"format": "pt"})

    resumed = Transformer.from_config(tiny())
    for layer in resumed.moe_layers():
        layer.router.expert_bias.fill_(0.5)  # must not survive the load
    ckpt.load_checkpoint(path, resumed, torch.optim.AdamW(resumed.parameters()))
    assert all(bool(layer.router.expert_bias.eq(0).all()) for layer in resumed.moe_layers())
    torch.testing.assert_close(resumed.layers[0].ffn.experts.w1, model.layers[0].ffn.experts.w1)
