"""The engine's fused decoder path (moetron/infer/fused_layers.py) computes what the module path
computes: same greedy tokens, logprobs within 1e-5 (fp32; the router's softmax and the residual
adds run in C instead of PyTorch), the same per-expert token counts; it is used only for the
models it covers; and a bf16 model served in float32 gives its float32 copy's exact bits."""

from __future__ import annotations

import copy

import pytest
import torch

from moetron.config import EngineConfig, ModelConfig, MoEConfig
from moetron.infer import fused_layers
from moetron.infer.engine import LLMEngine
from moetron.infer.sampling_params import SamplingParams
from moetron.kernels import cpu_kernels
from moetron.model import Transformer

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason="needs moetron's CPU kernels (AVX2, a compiler)"
)

CFG = ModelConfig(
    vocab_size=97, dim=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, max_seq_len=128,
    moe=MoEConfig(num_experts=6, top_k=2, expert_hidden_dim=40),
)  # fmt: skip


def generate(
    model: Transformer, fused: bool, invariant: bool = True, dtype: str | None = None
) -> tuple[list, list[torch.Tensor]]:
    options = dict(
        num_kv_blocks=64, block_size=8, max_num_batched_tokens=40, batch_invariant=invariant, dtype=dtype
    )
    engine = LLMEngine(model, None, EngineConfig(**options, fused_layers=fused))
    assert engine.runner.fused == (fused and fused_layers.supports(model))
    for layer in model.moe_layers():
        layer.tokens_per_expert.zero_()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=gen).tolist() for n in (5, 33, 17, 61)]
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    results = [
        (done[i].token_ids, [{t: lp.logprob for t, lp in p.items()} for p in done[i].logprobs]) for i in ids
    ]
    return results, [layer.tokens_per_expert.clone() for layer in model.moe_layers()]


def test_fused_path_matches_module_path() -> None:
    torch.manual_seed(0)
    model = Transformer.from_config(CFG).eval()
    assert fused_layers.supports(model)
    fused, fused_counts = generate(model, fused=True)
    plain, plain_counts = generate(model, fused=False)
    for (fused_ids, fused_lps), (plain_ids, plain_lps) in zip(fused, plain, strict=True):
        assert fused_ids == plain_ids
        for a, b in zip(fused_lps, plain_lps, strict=True):
            assert a.keys() == b.keys()
            assert max(abs(a[t] - b[t]) for t in a) < 1e-5
    for a, b in zip(fused_counts, plain_counts, strict=True):
        assert torch.equal(a, b) and int(a.sum()) > 0


@pytest.mark.parametrize(
    "moe",
    [
        MoEConfig(
            num_experts=4, top_k=2, expert_hidden_dim=16, num_shared_experts=1, shared_expert_hidden_dim=16
        ),
        MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=16, num_dense_layers=1, dense_hidden_dim=32),
    ],
    ids=["shared-experts", "dense-layer"],
)
@pytest.mark.parametrize("invariant", [True, False], ids=["invariant", "plain"])
def test_uncovered_models_take_the_module_path(moe: MoEConfig, invariant: bool, monkeypatch) -> None:
    """...where the per-op kernels still serve them, with the results of PyTorch's kernels (in
    plain mode whole prompts go to SDPA and the other rows, in the same steps, to the kernel)."""
    cfg = ModelConfig(vocab_size=97, dim=48, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8, moe=moe)
    torch.manual_seed(0)
    model = Transformer.from_config(cfg).eval()
    assert not fused_layers.supports(model)
    bf16 = Transformer.from_config(CFG, dtype=torch.bfloat16).eval()  # computed in bf16: module path
    assert LLMEngine(bf16, None, EngineConfig(num_kv_blocks=16, block_size=8)).runner.fused is False
    with_kernels, _ = generate(model, fused=False, invariant=invariant)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    with_torch, _ = generate(model, fused=False, invariant=invariant)
    for (ids_a, lps_a), (ids_b, lps_b) in zip(with_kernels, with_torch, strict=True):
        assert ids_a == ids_b
        assert all(max(abs(a[t] - b[t]) for t in a) < 1e-5 for a, b in zip(lps_a, lps_b, strict=True))


@pytest.mark.parametrize("invariant", [True, False], ids=["invariant", "plain"])
def test_bf16_weights_served_in_float32_give_their_float32_copys_bits(invariant: bool) -> None:
    """bf16 weights widened in the kernels' registers: the same products, sums and tokens as the
    weights widened in memory, from half the bytes; activations and KV cache are fp32."""
    torch.manual_seed(0)
    bf16 = Transformer.from_config(CFG).eval().to(torch.bfloat16)
    widened = copy.deepcopy(bf16).float()
    engine = LLMEngine(bf16, None, EngineConfig(num_kv_blocks=16, block_size=8, dtype="float32"))
    assert engine.runner.fused and engine.runner.k_caches[0].dtype == torch.float32
    ours, our_counts = generate(bf16, fused=True, invariant=invariant, dtype="float32")
    theirs, their_counts = generate(widened, fused=True, invariant=invariant, dtype="float32")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # served, not converted
    assert ours == theirs  # token ids and every logprob, exactly
    for a, b in zip(our_counts, their_counts, strict=True):
        assert torch.equal(a, b)


def test_paused_expert_stats_stay_untouched() -> None:
    from moetron.model.moe import expert_stats_paused

    torch.manual_seed(0)
    model = Transformer.from_config(CFG).eval()
    engine = LLMEngine(model, None, EngineConfig(num_kv_blocks=16, block_size=8))
    assert engine.runner.fused
    for layer in model.moe_layers():
        layer.tokens_per_expert.zero_()
    with expert_stats_paused(model):
        engine.add_request([1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=3))
        while engine.has_unfinished_requests():
            engine.step()
    assert all(int(layer.tokens_per_expert.sum()) == 0 for layer in model.moe_layers())


def _layer_by_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine steps each FusedBlock from Python and calls the norm's and head's modules."""
    monkeypatch.setattr(fused_layers.FusedTransformer, "runs_whole_stack", lambda self, *args: False)
    monkeypatch.setattr(fused_layers.FusedTransformer, "logits", Transformer.logits)


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "q4_k"])
@pytest.mark.parametrize("invariant", [True, False], ids=["invariant", "plain"])
def test_whole_stack_call_gives_the_layer_by_layer_bits(weights: str, invariant: bool, monkeypatch) -> None:
    """One kernel call for all layers (and one for the final norm and head) computes exactly what
    the per-layer calls do: every token id, logprob and expert count, over prefill chunks and
    decodes of several sequences; and it is the path an engine step takes."""
    from moetron.quant.quantize import quantize_model

    def build() -> Transformer:
        torch.manual_seed(0)
        model = Transformer.from_config(CFG).eval()
        if weights == "bfloat16":
            model = model.to(torch.bfloat16)
        elif weights != "float32":
            quantize_model(model, weights)
        return model

    lib = cpu_kernels.library()
    calls = {"layers": 0, "logits": 0}
    for name, key in (("moetron_decoder_layers", "layers"), ("moetron_logits", "logits")):
        kernel = getattr(lib, name)

        def counted(*args, _kernel=kernel, _key=key):
            calls[_key] += 1
            _kernel(*args)

        monkeypatch.setattr(lib, name, counted)
    stacked, stacked_counts = generate(build(), fused=True, invariant=invariant, dtype="float32")
    assert calls["layers"] > 0 and calls["logits"] > 0
    _layer_by_layer(monkeypatch)
    calls.update(layers=0, logits=0)
    layered, layered_counts = generate(build(), fused=True, invariant=invariant, dtype="float32")
    assert calls == {"layers": 0, "logits": 0}
    assert stacked == layered
    for a, b in zip(stacked_counts, layered_counts, strict=True):
        assert torch.equal(a, b) and int(a.sum()) > 0


def test_whole_stack_follows_reloaded_weights(monkeypatch) -> None:
    """A weight re-homed through .data between one engine's steps (new values at a new address) is
    read from its new place, as the per-layer calls read it: the stack's cached addresses are
    checked every step."""

    def serve(engine: LLMEngine) -> list:
        params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=1, ignore_eos=True)
        request = engine.add_request([5, 9, 2, 7, 1], params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id == request:
                    result = out.outputs[0]
        return [result.token_ids, [{t: lp.logprob for t, lp in p.items()} for p in result.logprobs]]

    def reload(model: Transformer) -> None:
        for layer in model.layers:
            for param in (layer.attention.wq.weight, layer.ffn.experts.w2):
                param.data = param.data * 1.5

    torch.manual_seed(0)
    model = Transformer.from_config(CFG).eval()
    reference = copy.deepcopy(model)
    options = EngineConfig(num_kv_blocks=16, block_size=8, enable_prefix_caching=False)
    engine = LLMEngine(model, None, options)
    before = serve(engine)  # the stack's tables now hold these addresses
    reload(model)
    stacked = serve(engine)
    _layer_by_layer(monkeypatch)
    reload(reference)
    layered = serve(LLMEngine(reference, None, options))
    assert stacked == layered != before
