"""CPU unit tests of the model: shapes and init, MoE against a per-token reference, capacity
dispatch, router losses (and how they reach the gradient), attention, RoPE against Hugging Face,
dense first layers, bf16.

Every reference here is written out by hand (loops over tokens, explicit masks) so that it shares
no code with the module it checks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import torch_threads

from moetron.config import ModelConfig, MoEConfig, RopeConfig, tiny
from moetron.model import Transformer
from moetron.model.moe import FeedForward, MoELayer, grouped_swiglu, load_balancing_loss, router_z_loss
from moetron.model.rope import RotaryEmbedding, apply_rope, rope_inverse_frequencies
from moetron.model.transformer import Attention, RMSNorm, causal_sdpa

FP32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _with_moe(cfg: ModelConfig, **moe_overrides) -> ModelConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe_overrides))


# --- (a) Forward shape, initialisation, tied embeddings


def test_forward_gives_float32_logits() -> None:
    cfg = tiny()
    model = Transformer.from_config(cfg)
    input_ids = torch.randint(0, cfg.vocab_size, (3, 7))
    logits = model(input_ids)
    assert logits.shape == (3, 7, cfg.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # Default positions are 0..T-1 for every row.
    explicit = model(input_ids, positions_BT=torch.arange(7).expand(3, 7))
    torch.testing.assert_close(logits, explicit, rtol=0, atol=0)


def test_forward_rejects_unbatched_input() -> None:
    model = Transformer.from_config(tiny())
    with pytest.raises(ValueError, match=r"input_ids must have shape \[batch, tokens\], got \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_forward_is_causal() -> None:
    """Changing a later token never changes earlier logits."""
    cfg = tiny()
    model = Transformer.from_config(cfg).eval()
    input_ids = torch.randint(0, cfg.vocab_size, (1, 10))
    changed = input_ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(input_ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], **FP32)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def _std(tensors) -> float:
    return torch.cat([t.detach().flatten() for t in tensors]).std().item()


def test_init_from_meta() -> None:
    cfg = tiny()
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()

    assert not any(p.is_meta for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    layers, moes = list(model.layers), list(model.moe_layers())
    # ~8k to ~50k samples per group: the sample std is within 5% of the target.
    assert _std([model.tok_embeddings.weight]) == pytest.approx(std, rel=0.05)
    assert _std([model.output.weight]) == pytest.approx(std, rel=0.05)
    assert _std([layer.attention.wq.weight for layer in layers]) == pytest.approx(std, rel=0.05)
    assert _std([layer.attention.wk.weight for layer in layers]) == pytest.approx(std, rel=0.05)
    assert _std([layer.attention.wv.weight for layer in layers]) == pytest.approx(std, rel=0.05)
    assert _std([m.router.gate.weight for m in moes]) == pytest.approx(std, rel=0.1)  # 512 samples
    assert _std([m.experts.w1 for m in moes]) == pytest.approx(std, rel=0.05)
    assert _std([m.experts.w3 for m in moes]) == pytest.approx(std, rel=0.05)
    # Residual-output projections: scaled by 1/sqrt(2L).
    assert _std([layer.attention.wo.weight for layer in layers]) == pytest.approx(out_std, rel=0.05)
    assert _std([m.experts.w2 for m in moes]) == pytest.approx(out_std, rel=0.05)
    assert abs(model.tok_embeddings.weight.mean().item()) < 0.1 * std

    norms = [model.norm] + [n for layer in layers for n in (layer.attention_norm, layer.ffn_norm)]
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    for moe in moes:
        assert torch.equal(moe.tokens_per_expert, torch.zeros(cfg.moe.num_experts))


def test_rms_norm_by_hand() -> None:
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8) * 4
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, **FP32)
    # bf16 in, bf16 out (normalised in fp32 inside).
    assert norm.to(torch.bfloat16)(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_from_config_initialises_every_parameter() -> None:
    cfg = _with_moe(tiny(), num_shared_experts=1, num_dense_layers=1)
    model = Transformer.from_config(cfg)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu", name
        assert torch.isfinite(p).all(), name
        # Nothing left at an uninitialised 0 or garbage scale.
        assert 0 < p.detach().abs().max() < 10, name


def test_tied_embeddings_share_storage() -> None:
    cfg = dataclasses.replace(tiny(), tie_embeddings=True)
    untied_numel = sum(p.numel() for p in Transformer.from_config(tiny()).parameters())

    def assert_tied(model: Transformer) -> None:
        assert model.output.weight is model.tok_embeddings.weight
        assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
        assert sum(p.numel() for p in model.parameters()) == untied_numel - cfg.vocab_size * cfg.dim

    assert_tied(Transformer(cfg))
    model = Transformer.from_config(cfg)
    assert_tied(model)
    # The output init must not overwrite the shared weight with a second draw.
    assert _std([model.tok_embeddings.weight]) == pytest.approx(cfg.init_std, rel=0.05)
    assert_tied(Transformer.from_config(cfg, dtype=torch.bfloat16))

    # One weight, so a gradient from the head lands on the embedding too.
    model(torch.randint(0, cfg.vocab_size, (1, 4))).sum().backward()
    assert model.tok_embeddings.weight.grad is not None
    with torch.no_grad():
        model.tok_embeddings.weight[3].fill_(0.5)
    assert torch.equal(model.output.weight[3], torch.full((cfg.dim,), 0.5))


# --- (b) MoELayer against a per-token reference


def _moe_layer(**moe_kwargs) -> MoELayer:
    cfg = ModelConfig(
        vocab_size=64, dim=16, num_layers=1, num_heads=2, num_kv_heads=2,
        moe=MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden_dim": 24, **moe_kwargs}),
    )  # fmt: skip
    layer = MoELayer(cfg)
    # A wide router init so top-k choices are far from ties.
    layer.init_weights(std=0.5, out_std=0.3)
    return layer


def _reference_routing(layer: MoELayer, x_TD: torch.Tensor) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Per token: softmax over all experts, top-k, optional renormalisation."""
    moe, gate = layer.cfg, layer.router.gate.weight
    weights, experts = [], []
    for x in x_TD:
        probs = torch.softmax(gate @ x, dim=-1)
        w, e = probs.topk(moe.top_k)
        weights.append(w / w.sum() if moe.normalize_top_k else w)
        experts.append([int(i) for i in e])
    return weights, experts


def _reference_moe(
    layer: MoELayer, x_TD: torch.Tensor, kept: set[tuple[int, int]] | None = None
) -> torch.Tensor:
    """Loop over tokens: Σ_k weight_k · SwiGLU_{expert_k}(x), plus shared experts.
    `kept`: the (token, k) pairs computed; None keeps all (dropless)."""
    w1, w2, w3 = layer.experts.w1, layer.experts.w2, layer.experts.w3
    weights, experts = _reference_routing(layer, x_TD)
    rows = []
    for t, x in enumerate(x_TD):
        y = torch.zeros_like(x)
        for k, e in enumerate(experts[t]):
            if kept is None or (t, k) in kept:
                y = y + weights[t][k] * (w2[e] @ (F.silu(w1[e] @ x) * (w3[e] @ x)))
        if layer.shared_experts is not None:
            s = layer.shared_experts
            y = y + s.w2.weight @ (F.silu(s.w1.weight @ x) * (s.w3.weight @ x))
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("normalize_top_k", [True, False])
@pytest.mark.parametrize("num_shared_experts", [0, 2])
def test_moe_dropless_matches_reference(top_k: int, normalize_top_k: bool, num_shared_experts: int) -> None:
    layer = _moe_layer(top_k=top_k, normalize_top_k=normalize_top_k, num_shared_experts=num_shared_experts)
    x_BTD = torch.randn(2, 6, 16)
    with torch.no_grad():
        out_eval = layer.eval()(x_BTD)
        out_train = layer.train()(x_BTD)  # capacity_factor=None: training is dropless too
        expected = _reference_moe(layer, x_BTD.reshape(-1, 16)).reshape(2, 6, 16)
    assert out_eval.shape == x_BTD.shape
    torch.testing.assert_close(out_eval, expected, **FP32)
    torch.testing.assert_close(out_train, expected, **FP32)


@pytest.mark.parametrize(
    ("top_k", "normalize_top_k", "num_shared_experts"),
    [(1, False, 0), (2, True, 0), (2, False, 1), (3, True, 1)],
)
def test_moe_gradients_match_reference(top_k: int, normalize_top_k: bool, num_shared_experts: int) -> None:
    layer = _moe_layer(
        top_k=top_k, normalize_top_k=normalize_top_k, num_shared_experts=num_shared_experts
    ).eval()
    x_TD = torch.randn(12, 16, requires_grad=True)
    upstream = torch.randn(12, 16)
    params = dict(layer.named_parameters())
    inputs = [*params.values(), x_TD]

    grads = torch.autograd.grad((layer(x_TD[None])[0] * upstream).sum(), inputs)
    expected = torch.autograd.grad((_reference_moe(layer, x_TD) * upstream).sum(), inputs)
    for name, g, e in zip([*params, "x"], grads, expected, strict=True):
        torch.testing.assert_close(g, e, **FP32, msg=lambda m, name=name: f"{name}: {m}")

    # Every part of the layer learns: the router, and w1/w2/w3 of exactly the experts that got tokens.
    _, experts = _reference_routing(layer, x_TD)
    used = {e for row in experts for e in row}
    for name in ("experts.w1", "experts.w2", "experts.w3"):
        g = grads[list(params).index(name)]
        for e in range(4):
            assert bool(g[e].ne(0).any()) == (e in used), f"{name}[{e}]"
    assert grads[list(params).index("router.gate.weight")].ne(0).all()


def test_top1_normalised_router_learns_only_from_router_losses() -> None:
    """Renormalising a single weight gives 1.0: the output carries no gradient to the gate
    (Mixtral semantics with top_k=1), so the aux and z losses are its only signal."""
    layer = _moe_layer(top_k=1, normalize_top_k=True)
    x_BTD = torch.randn(1, 12, 16)
    layer.eval()(x_BTD).sum().backward()
    assert layer.router.gate.weight.grad.abs().max() < 1e-5  # zero up to the rounding of w / w
    layer.zero_grad()
    layer.train()(x_BTD).sum().backward()
    assert layer.router.gate.weight.grad.abs().max() > 1e-3


# --- (c) Capacity-factor dispatch


def _gshard_kept(experts_TK: list[list[int]], capacity: int) -> set[tuple[int, int]]:
    """Each expert keeps its first `capacity` assignments ordered by (choice rank, token position)."""
    kept, taken = set(), {}
    pairs = sorted(((k, t, e) for t, row in enumerate(experts_TK) for k, e in enumerate(row)))
    for k, t, e in pairs:
        if taken.get(e, 0) < capacity:
            taken[e] = taken.get(e, 0) + 1
            kept.add((t, k))
    return kept


# (first choice, second choice) per token. Expert 0 is everyone's favourite.
_ROUTES = [(1, 0), (2, 0), (0, 3), (0, 1), (0, 1), (3, 1)]


def _rigged_layer_and_input(routes, capacity_factor: float | None) -> tuple[MoELayer, torch.Tensor]:
    """Gate = identity on the first E input features, so those features are the router logits."""
    layer = _moe_layer(num_experts=4, top_k=2, capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, :4] = torch.eye(4)
    x_TD = torch.randn(len(routes), 16)
    x_TD[:, :4] = 0.0
    for t, (first, second) in enumerate(routes):
        x_TD[t, first], x_TD[t, second] = 3.0, 2.0
    return layer, x_TD


def test_capacity_keeps_first_choices_before_second_choices() -> None:
    # capacity = ceil(0.5 * 6 tokens * 2 / 4 experts) = 2
    layer, x_TD = _rigged_layer_and_input(_ROUTES, capacity_factor=0.5)
    _, experts = _reference_routing(layer, x_TD)
    assert experts == [list(r) for r in _ROUTES]
    kept = _gshard_kept(experts, capacity=2)
    # Expert 0: first choices of tokens 2 and 3 beat the (earlier) second choices of tokens 0 and 1;
    # token 4's first choice is over capacity. Expert 1: token 0's first choice, token 3's second.
    assert kept == {(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (5, 0)}

    layer.train()
    out = layer(x_TD[None])[0]
    torch.testing.assert_close(out, _reference_moe(layer, x_TD, kept), **FP32)
    assert torch.equal(layer.tokens_per_expert, torch.tensor([2.0, 2.0, 1.0, 2.0]))
    # Token 4 lost both assignments: the layer adds exactly nothing (the residual carries it).
    assert torch.equal(out[4], torch.zeros(16))
    assert out[5].ne(0).any()  # lost only its second choice
    out.sum().backward()  # dropping is differentiable
    assert layer.router.gate.weight.grad is not None

    # Evaluation is dropless even with a capacity factor.
    layer.eval().tokens_per_expert.zero_()
    with torch.no_grad():
        out_eval = layer(x_TD[None])[0]
    torch.testing.assert_close(out_eval, _reference_moe(layer, x_TD), **FP32)
    assert out_eval[4].ne(0).any()
    assert torch.equal(layer.tokens_per_expert, torch.tensor([5.0, 4.0, 1.0, 2.0]))


@pytest.mark.parametrize("capacity_factor", [0.3, 0.75, 1.0, 1.25])  # below 1 always drops
def test_capacity_random_routing_matches_reference(capacity_factor: float) -> None:
    layer = _moe_layer(num_experts=4, top_k=2, capacity_factor=capacity_factor).train()
    num_tokens = 40
    x_TD = torch.randn(num_tokens, 16)
    capacity = math.ceil(capacity_factor * num_tokens * 2 / 4)
    _, experts = _reference_routing(layer, x_TD)
    kept = _gshard_kept(experts, capacity)
    with torch.no_grad():
        out = layer(x_TD[None])[0]
    torch.testing.assert_close(out, _reference_moe(layer, x_TD, kept), **FP32)
    assert (layer.tokens_per_expert <= capacity).all()
    assert layer.tokens_per_expert.sum().item() == len(kept)


def test_moe_gradients_with_dropped_pairs_match_reference() -> None:
    """Dispatch and combine move rows with gather gradients (row_moves.py): under a capacity every
    gradient (input, router, experts) against autograd through the per-token loop of kept pairs."""
    layer = _moe_layer(capacity_factor=0.75, aux_loss_weight=0.0, z_loss_weight=0.0).train()
    x_TD = torch.randn(40, 16, requires_grad=True)
    upstream = torch.randn(40, 16)
    params = [x_TD, layer.router.gate.weight, layer.experts.w1, layer.experts.w2, layer.experts.w3]
    grads = torch.autograd.grad((layer(x_TD[None])[0] * upstream).sum(), params)
    _, experts = _reference_routing(layer, x_TD.detach())
    kept = _gshard_kept(experts, capacity=math.ceil(0.75 * 40 * 2 / 4))
    assert len(kept) < 80  # pairs were dropped
    expected = torch.autograd.grad((_reference_moe(layer, x_TD, kept) * upstream).sum(), params)
    for name, g, e in zip(["x", "gate", "w1", "w2", "w3"], grads, expected, strict=True):
        torch.testing.assert_close(g, e, **FP32, msg=lambda m, name=name: f"{name}: {m}")


def test_move_rows_and_its_gradient_are_gathers_with_holes() -> None:
    from moetron.model.row_moves import inverse_map, move_rows

    x_ND = torch.randn(5, 3, requires_grad=True)
    rows_N = torch.tensor([6, 0, 2, 3, 7])  # five rows into eight, three zero rows
    source_M = inverse_map(rows_N, 8)
    assert source_M.tolist() == [1, 5, 2, 3, 5, 5, 0, 4]
    out = move_rows(x_ND, source_M, rows_N)
    expected = torch.zeros(8, 3).index_copy(0, rows_N, x_ND.detach())
    assert torch.equal(out, expected)
    upstream = torch.randn(8, 3)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x_ND)
    assert torch.equal(grad, upstream[rows_N])
    # and back: the rows at rows_N out of eight (the other three dropped)
    y = torch.randn(8, 3, requires_grad=True)
    back = move_rows(y, rows_N, source_M)
    assert torch.equal(back, y.detach()[rows_N])
    (grad_y,) = torch.autograd.grad((back * upstream[:5]).sum(), y)
    assert torch.equal(grad_y, torch.zeros(8, 3).index_copy(0, rows_N, upstream[:5]))


def test_generous_capacity_is_dropless() -> None:
    layer = _moe_layer(capacity_factor=100.0).train()
    x_TD = torch.randn(10, 16)
    with torch.no_grad():
        out = layer(x_TD[None])[0]
    torch.testing.assert_close(out, _reference_moe(layer, x_TD), **FP32)


# --- (d) Router losses


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_matches_transformers(top_k: int) -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits_TE = torch.randn(20, 6) * 2
    probs_TE = logits_TE.softmax(dim=-1)
    expert_ids_TK = probs_TE.topk(top_k, dim=-1).indices
    ours = load_balancing_loss(probs_TE, expert_ids_TK)
    # Mixtral's loss averages the one-hot mask over tokens only, so it is top_k times ours (which
    # normalises by the T*K assignments so that 1.0 is balanced for any top_k).
    theirs = load_balancing_loss_func((logits_TE,), num_experts=6, top_k=top_k)
    torch.testing.assert_close(ours, theirs / top_k, rtol=1e-6, atol=1e-6)


def test_load_balancing_loss_values() -> None:
    num_tokens, num_experts, top_k = 12, 4, 2
    uniform_TE = torch.full((num_tokens, num_experts), 1 / num_experts)
    any_ids_TK = torch.randint(0, num_experts, (num_tokens, top_k))
    assert load_balancing_loss(uniform_TE, any_ids_TK).item() == pytest.approx(1.0, abs=1e-6)

    # Balanced assignments give 1.0 whatever the probabilities.
    balanced_ids_TK = torch.arange(num_tokens * top_k).reshape(num_tokens, top_k) % num_experts
    probs_TE = torch.randn(num_tokens, num_experts).softmax(-1)
    assert load_balancing_loss(probs_TE, balanced_ids_TK).item() == pytest.approx(1.0, abs=1e-6)

    # Collapse onto expert 0 with probability ~1: E times the balanced value (its maximum).
    collapsed_TE = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(num_tokens, -1)
    collapsed_ids_TK = torch.zeros(num_tokens, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed_TE, collapsed_ids_TK).item() == pytest.approx(num_experts)


def test_router_z_loss_by_hand() -> None:
    logits_TE = torch.randn(7, 5) * 3
    by_hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits_TE.tolist()) / 7
    assert router_z_loss(logits_TE).item() == pytest.approx(by_hand, rel=1e-5)
    assert router_z_loss(torch.zeros(3, 8)).item() == pytest.approx(math.log(8) ** 2, rel=1e-6)


# --- (e) Router losses reach the gradient through backward; expert load bookkeeping


def _hand_aux_loss(logits_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    num_experts = logits_TE.shape[-1]
    fraction_E = torch.stack([(expert_ids_TK == e).sum() for e in range(num_experts)]) / expert_ids_TK.numel()
    return num_experts * (fraction_E * logits_TE.softmax(-1).mean(0)).sum()


def _hand_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return (logits_TE.exp().sum(-1).log() ** 2).mean()


def test_router_loss_is_added_through_backward() -> None:
    cfg = _with_moe(tiny(), aux_loss_weight=0.3, z_loss_weight=0.2)
    model = Transformer.from_config(cfg)
    scale = 0.25
    for moe in model.moe_layers():
        moe.router_loss_scale = scale
    input_ids = torch.randint(0, cfg.vocab_size, (2, 8))
    names, params = zip(*model.named_parameters(), strict=True)

    model.train()
    train_grads = torch.autograd.grad(model(input_ids).sum(), params, allow_unused=True)

    model.eval()
    routed = []  # (weights_TK, expert_ids_TK, logits_TE) per MoE layer
    hooks = [
        moe.router.register_forward_hook(lambda m, i, out: routed.append(out)) for moe in model.moe_layers()
    ]
    logits = model(input_ids)
    for hook in hooks:
        hook.remove()
    assert len(routed) == cfg.num_moe_layers
    router_loss = scale * sum(
        cfg.moe.aux_loss_weight * _hand_aux_loss(logits_TE, ids_TK)
        + cfg.moe.z_loss_weight * _hand_z_loss(logits_TE)
        for _, ids_TK, logits_TE in routed
    )
    eval_grads = torch.autograd.grad(logits.sum(), params, retain_graph=True, allow_unused=True)
    router_grads = torch.autograd.grad(router_loss, params, allow_unused=True)

    def dense(g, p):
        return torch.zeros_like(p) if g is None else g

    for name, p, g_train, g_eval, g_router in zip(
        names, params, train_grads, eval_grads, router_grads, strict=True
    ):
        g_train, g_eval, g_router = dense(g_train, p), dense(g_eval, p), dense(g_router, p)
        # Summed in a different order than autograd does: allow fp32 rounding at the tensor's scale
        # (embedding gradients reach ~100 here).
        atol = 1e-6 * (1 + g_eval.abs().max().item())
        torch.testing.assert_close(
            g_train, g_eval + g_router, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )
        if name.endswith("router.gate.weight"):
            assert g_router.abs().max() > 1e-4, name  # the test has teeth
            assert not torch.allclose(g_train, g_eval), name

    # The side outputs report the same losses (last layer's, from the training forward).
    last = list(model.moe_layers())[-1]
    _, ids_TK, logits_TE = routed[-1]
    assert last.last_aux_loss.item() == pytest.approx(_hand_aux_loss(logits_TE, ids_TK).item(), rel=1e-5)
    assert last.last_z_loss.item() == pytest.approx(_hand_z_loss(logits_TE).item(), rel=1e-5)
    assert not last.last_aux_loss.requires_grad


def test_no_router_loss_without_grad_or_in_eval() -> None:
    cfg = tiny()
    model = Transformer.from_config(cfg).eval()
    input_ids = torch.randint(0, cfg.vocab_size, (1, 6))
    model(input_ids)
    assert all(moe.last_aux_loss is None for moe in model.moe_layers())
    model.train()
    with torch.no_grad():
        model(input_ids)
    assert all(moe.last_aux_loss is None for moe in model.moe_layers())


def test_tokens_per_expert_accumulates() -> None:
    cfg = tiny()
    model = Transformer.from_config(cfg).eval()
    batch, seq_len, num_forwards = 2, 9, 3
    moes = list(model.moe_layers())
    expected = [torch.zeros(cfg.moe.num_experts) for _ in moes]

    def counter(index: int):
        def count(router, inputs, outputs):
            _, ids_TK, _ = outputs
            expected[index] += torch.bincount(ids_TK.flatten(), minlength=cfg.moe.num_experts)

        return count

    for index, moe in enumerate(moes):
        moe.router.register_forward_hook(counter(index))
    with torch.no_grad():
        for _ in range(num_forwards):
            model(torch.randint(0, cfg.vocab_size, (batch, seq_len)))
    for moe, counts in zip(moes, expected, strict=True):
        assert moe.tokens_per_expert.sum().item() == num_forwards * batch * seq_len * cfg.moe.top_k
        assert torch.equal(moe.tokens_per_expert, counts)
    model.init_buffers()
    assert all(moe.tokens_per_expert.sum() == 0 for moe in model.moe_layers())


def test_tokens_per_expert_counts_exactly_in_bf16() -> None:
    """A bf16 model's counters must still count: bf16 holds integers exactly only up to 256."""
    routes = [(0, 1)] * 301  # every token: expert 0 first, expert 1 second
    layer, x_TD = _rigged_layer_and_input(routes, capacity_factor=None)
    layer.to(torch.bfloat16).eval()
    with torch.no_grad():
        layer(x_TD[None].to(torch.bfloat16))
    assert layer.tokens_per_expert.tolist() == [301, 301, 0, 0]


# --- (f) Attention


def _reference_rope(x_BHTd: torch.Tensor, positions_T: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pair (i, i + d/2) by angle position * theta^(-2i/d)."""
    d = x_BHTd.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles_Th = (positions_T.double()[:, None] * inv_freq).float()
    cos, sin = angles_Th.cos(), angles_Th.sin()
    x1, x2 = x_BHTd[..., : d // 2], x_BHTd[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _reference_attention(attention: Attention, x_BTD: torch.Tensor, positions_T: torch.Tensor, theta: float):
    B, T, _ = x_BTD.shape
    H, G, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    q = (x_BTD @ attention.wq.weight.T).view(B, T, H, d).transpose(1, 2)
    k = (x_BTD @ attention.wk.weight.T).view(B, T, G, d).transpose(1, 2)
    v = (x_BTD @ attention.wv.weight.T).view(B, T, G, d).transpose(1, 2)
    q, k = _reference_rope(q, positions_T, theta), _reference_rope(k, positions_T, theta)
    out = torch.empty(B, H, T, d)
    for h in range(H):
        g = h // (H // G)  # query head h reads kv head h // (H / G)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(d)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        out[:, h] = scores.masked_fill(future, float("-inf")).softmax(-1) @ v[:, g]
    return out.transpose(1, 2).reshape(B, T, H * d) @ attention.wo.weight.T


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(4, 4, None), (4, 2, None), (4, 1, None), (6, 3, 10), (4, 1, 24)],
    ids=["mha", "gqa", "mqa", "gqa-head-dim-10", "mqa-head-dim-24"],
)
def test_attention_matches_naive_causal_softmax(
    num_heads: int, num_kv_heads: int, head_dim: int | None
) -> None:
    cfg = ModelConfig(
        vocab_size=64, dim=32, num_layers=1, rope=RopeConfig(theta=500.0),
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
    )  # fmt: skip
    attention = Attention(0, cfg)
    attention.init_weights(std=0.2, out_std=0.2)
    rope = RotaryEmbedding(cfg.rope, cfg.head_dim)
    x_BTD = torch.randn(2, 7, 32)
    for start in (0, 11):  # prefill at 0, and a chunk further into the sequence
        positions_T = torch.arange(start, start + 7)
        cos, sin = rope(positions_T.expand(2, 7), torch.float32)
        with torch.no_grad():
            out = attention(x_BTD, cos, sin, causal_sdpa)
            expected = _reference_attention(attention, x_BTD, positions_T, theta=500.0)
        torch.testing.assert_close(out, expected, **FP32)


def test_attention_depends_only_on_relative_positions() -> None:
    cfg = tiny()
    attention = Attention(0, cfg)
    attention.init_weights(std=0.2, out_std=0.2)
    rope = RotaryEmbedding(cfg.rope, cfg.head_dim)
    x_BTD = torch.randn(1, 8, cfg.dim)
    with torch.no_grad():
        outs = [
            attention(x_BTD, *rope(torch.arange(s, s + 8)[None], torch.float32), causal_sdpa)
            for s in (0, 100)
        ]
    torch.testing.assert_close(outs[0], outs[1], **FP32)


# --- (g) RoPE against Hugging Face


def _hf_config(rope: RopeConfig, head_dim: int, max_seq_len: int):
    from transformers import MixtralConfig

    params = {"rope_type": "default" if rope.scaling == "none" else rope.scaling, "rope_theta": rope.theta}
    if rope.scaling != "none":
        params["factor"] = rope.factor
    if rope.scaling == "yarn":
        params |= {
            "original_max_position_embeddings": rope.original_max_seq_len,
            "beta_fast": rope.beta_fast,
            "beta_slow": rope.beta_slow,
        }
    return MixtralConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=1, head_dim=head_dim,
        max_position_embeddings=max_seq_len, rope_parameters=params,
    )  # fmt: skip


ROPE_CASES = {
    "default": (RopeConfig(theta=10_000.0), 16, 2048),
    "default-mixtral": (RopeConfig(theta=1e6), 128, 32_768),
    "linear": (RopeConfig(theta=10_000.0, scaling="linear", factor=4.0), 64, 8192),
    "yarn": (RopeConfig(theta=10_000.0, scaling="yarn", factor=4.0, original_max_seq_len=1024), 64, 4096),
    "yarn-gpt4": (RopeConfig(theta=5e5, scaling="yarn", factor=4.0, original_max_seq_len=8192), 128, 32_768),
    "yarn-betas": (
        RopeConfig(
            theta=10_000.0,
            scaling="yarn",
            factor=8.0,
            original_max_seq_len=2048,
            beta_fast=16.0,
            beta_slow=2.0,
        ),
        32,
        16_384,
    ),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_frequencies_match_transformers(case: str) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    rope, head_dim, max_seq_len = ROPE_CASES[case]
    hf_config = _hf_config(rope, head_dim, max_seq_len)
    inv_freq, attention_factor = rope_inverse_frequencies(rope, head_dim)
    if rope.scaling == "none":
        hf_inv_freq, hf_factor = MixtralRotaryEmbedding.compute_default_rope_parameters(hf_config)
    else:
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[rope.scaling](hf_config, "cpu")
    assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), rtol=1e-6, atol=1e-6)
    assert attention_factor == pytest.approx(hf_factor, abs=1e-6)
    if rope.scaling == "yarn":
        assert attention_factor == pytest.approx(0.1 * math.log(rope.factor) + 1)

    # Same cos/sin (YaRN's temperature folded in) at the positions served.
    hf_rope = MixtralRotaryEmbedding(hf_config)
    positions_BT = torch.tensor([[0, 1, 7, 1000, max_seq_len - 1]])
    cos, sin = RotaryEmbedding(rope, head_dim)(positions_BT, torch.float32)
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions_BT)
    torch.testing.assert_close(cos, hf_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, hf_sin, rtol=1e-5, atol=1e-5)


def test_apply_rope_matches_transformers() -> None:
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    rope = RopeConfig(theta=10_000.0, scaling="yarn", factor=4.0, original_max_seq_len=64)
    cos, sin = RotaryEmbedding(rope, 16)(torch.arange(10).expand(2, 10), torch.float32)
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 1, 10, 16)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q, **FP32)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k, **FP32)


def test_rope_frequencies_stay_fp32_in_a_bf16_model() -> None:
    model = Transformer.from_config(tiny(), dtype=torch.bfloat16)
    assert model.rope.inv_freq(torch.device("cpu")).dtype == torch.float32
    assert "rope" not in " ".join(model.state_dict())


# --- (h) Dense first layers


def test_dense_first_layers() -> None:
    cfg = dataclasses.replace(_with_moe(tiny(), num_dense_layers=1), num_layers=3)
    model = Transformer.from_config(cfg)
    first = model.layers[0].ffn
    assert isinstance(first, FeedForward) and not isinstance(first, MoELayer)
    assert first.w1.weight.shape == (cfg.moe.expert_hidden_dim * cfg.moe.top_k, cfg.dim)
    assert all(isinstance(layer.ffn, MoELayer) for layer in model.layers[1:])
    assert list(model.moe_layers()) == [layer.ffn for layer in model.layers[1:]]
    model.eval()
    with torch.no_grad():
        logits = model(torch.randint(0, cfg.vocab_size, (2, 5)))
    assert logits.shape == (2, 5, cfg.vocab_size) and torch.isfinite(logits).all()
    for moe in model.moe_layers():
        assert moe.tokens_per_expert.sum().item() == 2 * 5 * cfg.moe.top_k


def test_feed_forward_is_swiglu() -> None:
    ffn = FeedForward(8, 12)
    ffn.init_weights(std=0.3, out_std=0.3)
    x = torch.randn(3, 8)
    expected = (F.silu(x @ ffn.w1.weight.T) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected, **FP32)


# --- (i) bf16


def test_bf16_forward_close_to_fp32() -> None:
    """Same weights in bf16 (8 significant bits, ~0.4% per rounding) through two layers, with the odd
    near-tied token possibly taking a different expert: we allow 3% relative L2 error on the logits
    and 0.1 absolute (logits have std ~0.15 at this init). Measured: ~0.5% and ~0.015."""
    cfg = tiny()
    fp32 = Transformer.from_config(cfg).eval()
    bf16 = Transformer.from_config(cfg, dtype=torch.bfloat16).eval()
    bf16.load_state_dict(fp32.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    input_ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        expected, logits = fp32(input_ids), bf16(input_ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert ((logits - expected).norm() / expected.norm()).item() < 0.03
    assert (logits - expected).abs().max().item() < 0.1
    assert not torch.equal(logits, expected)  # really computed in bf16


def test_bf16_model_trains_a_step() -> None:
    cfg = tiny()
    model = copy.deepcopy(Transformer.from_config(cfg)).to(torch.bfloat16).train()
    input_ids = torch.randint(0, cfg.vocab_size, (2, 8))
    logits = model(input_ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(p.grad).all(), name


def test_grouped_swiglu_node_matches_the_per_expert_loop() -> None:
    """The CPU training node (one autograd node, products written in place) against the generic
    per-expert loop run in float64: values and every gradient, with an expert that gets no rows and
    a non-contiguous input."""
    torch.manual_seed(0)
    num_experts, hidden, dim = 5, 24, 16
    sizes = torch.tensor([7, 0, 3, 11, 4])
    x_ND = torch.randn(dim, int(sizes.sum())).t().requires_grad_()  # non-contiguous
    weights = [
        (torch.randn(num_experts, *shape) * 0.3).requires_grad_()
        for shape in ((hidden, dim), (dim, hidden), (hidden, dim))
    ]
    upstream = torch.randn(int(sizes.sum()), dim)
    y = grouped_swiglu(x_ND, sizes, *weights)
    assert type(y.grad_fn).__name__ == "GroupedSwiGLUBackward"
    grads = torch.autograd.grad((y * upstream).sum(), [x_ND, *weights])

    inputs64 = [t.detach().double().requires_grad_() for t in (x_ND, *weights)]
    y64 = grouped_swiglu(inputs64[0], sizes, *inputs64[1:])  # float64: the generic loop
    expected = torch.autograd.grad((y64 * upstream.double()).sum(), inputs64)
    torch.testing.assert_close(y, y64.float(), **FP32)
    for name, g, e in zip(["x", "w1", "w2", "w3"], grads, expected, strict=True):
        torch.testing.assert_close(g, e.float(), **FP32, msg=lambda m, name=name: f"{name}: {m}")
    assert all(g[1].eq(0).all() for g in grads[1:])  # the expert without rows learns nothing


def _autograd_node_names(tensor: torch.Tensor) -> set[str]:
    names, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_weights", "bf16_autocast"])
@pytest.mark.parametrize(
    "sizes, call_flops, runs",
    [
        # a call costs more than any padding: one batched matmul over all four (4 x 40 rows for 115)
        ([37, 0, 40, 38], 10**9, [(0, 4, 40)]),
        # calls cost nothing: each busy expert padded to its own bucket (37 -> 38, 70 -> 72)
        ([37, 0, 70, 5], 0, [(0, 1, 38), (2, 1, 72), (3, 1, 5)]),
    ],
    ids=["one_run", "per_expert"],
)
def test_grouped_swiglu_node_in_bf16_matches_the_per_expert_loop(
    autocast: bool, sizes: list[int], call_flops: int, runs: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In bf16 (weights, or fp32 master weights under CPU autocast) the node takes over where the
    CPU multiplies bf16 natively, padding rows to cached sizes and running consecutive experts as
    one batched matmul where that saves more in calls than the padding costs; the per-expert loop
    (reached by passing a matmul of our own) is the reference, and gradients reach fp32 masters as
    fp32. Elsewhere the node must leave bf16 to the loop."""
    from moetron.hardware import native_bf16_matmul
    from moetron.model import grouped_swiglu_cpu

    num_experts, hidden, dim = 4, 32, 16
    monkeypatch.setattr(grouped_swiglu_cpu, "CALL_FLOPS", call_flops)
    assert grouped_swiglu_cpu.expert_rows(sizes, torch.bfloat16, hidden * dim)[1] == runs
    torch.manual_seed(0)
    sizes = torch.tensor(sizes)
    master = torch.float32 if autocast else torch.bfloat16
    x_ND = torch.randn(int(sizes.sum()), dim).to(master).requires_grad_()
    weights = [
        (torch.randn(num_experts, *shape) * 0.3).to(master).requires_grad_()
        for shape in ((hidden, dim), (dim, hidden), (hidden, dim))
    ]
    upstream = torch.randn(int(sizes.sum()), dim)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = grouped_swiglu(x_ND, sizes, *weights)
        y_loop = grouped_swiglu(x_ND, sizes, *weights, matmul=lambda x, w: F.linear(x, w))
    assert ("GroupedSwiGLUBackward" in _autograd_node_names(y)) == native_bf16_matmul("cpu")
    assert y.dtype == y_loop.dtype == torch.bfloat16
    grads = torch.autograd.grad((y.float() * upstream).sum(), [x_ND, *weights])
    expected = torch.autograd.grad((y_loop.float() * upstream).sum(), [x_ND, *weights])
    bf16 = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y.float(), y_loop.float(), **bf16)
    for name, g, e in zip(["x", "w1", "w2", "w3"], grads, expected, strict=True):
        assert g.dtype == master, name
        torch.testing.assert_close(g.float(), e.float(), **bf16, msg=lambda m, name=name: f"{name}: {m}")
    for expert in torch.nonzero(sizes == 0).flatten().tolist():  # an expert without rows learns nothing
        assert all(g[expert].eq(0).all() for g in grads[1:])


@pytest.mark.parametrize("kernels", [False, True], ids=["torch_moves", "kernel_moves"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75], ids=["dropless", "capacity"])
@pytest.mark.parametrize("skew", [0.0, 0.4], ids=["balanced", "skewed"])
def test_routed_experts_node_equals_the_composed_path(
    kernels: bool, autocast: bool, capacity_factor: float | None, skew: float
) -> None:
    """The CPU training node for dispatch + experts + combine (routed_swiglu_cpu) against the same
    layer through autograd's composed ops (row moves, the experts' node, the weighted sum), with
    padding rows (both buffer layouts in bf16: a biased router skews the loads) and dropped pairs.
    Its row moves as torch ops give the same bits everywhere; as kernels (moe_train_avx2.cpp), the
    same bits but for the router weights' gradient (a dot product in the kernel's order), which
    reaches the gate and the input. The kernels' expert products (grouped_sgemm.cpp) are MKL's at
    one thread, which can differ from its multi-threaded bits at small shapes (9 x 16 x 24 did),
    so their composed reference runs at one thread."""
    from moetron.hardware import native_bf16_matmul
    from moetron.model import routed_swiglu_cpu
    from moetron.train import moe_cpu_kernels

    layer = _moe_layer(num_experts=8, capacity_factor=capacity_factor).train()
    if kernels and not moe_cpu_kernels.install(layer):
        pytest.skip("moetron's CPU kernels are not built here (no compiler or no AVX2)")
    with torch.no_grad():
        layer.router.expert_bias[:2] = skew  # experts 0 and 1 take most tokens
    x_BTD = torch.randn(3, 40, 16, requires_grad=True)
    upstream = torch.randn(3, 40, 16)
    params = [x_BTD, *layer.parameters()]

    def output_and_grads(fused: bool) -> tuple[list[torch.Tensor], set[str]]:
        with (
            mock.patch.object(routed_swiglu_cpu, "supports", routed_swiglu_cpu.supports if fused else _never),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        ):
            out = layer(x_BTD)
        grads = torch.autograd.grad((out.float() * upstream).sum(), params)
        return [out.detach(), *grads], _autograd_node_names(out)

    fused, fused_nodes = output_and_grads(fused=True)
    with torch_threads(1 if kernels else torch.get_num_threads()):
        composed, composed_nodes = output_and_grads(fused=False)
    ran = "RoutedSwiGLUBackward" in fused_nodes
    assert ran == (not autocast or native_bf16_matmul("cpu")) and "RoutedSwiGLUBackward" not in composed_nodes
    names = ["out", "x", *(name for name, _ in layer.named_parameters())]
    for name, a, b in zip(names, fused, composed, strict=True):
        if kernels and name in ("x", "router.gate.weight"):
            torch.testing.assert_close(a, b, **FP32, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("capacity_factor", [None, 0.75], ids=["dropless", "capacity"])
def test_routed_experts_kernel_moves_on_bf16_token_rows(capacity_factor: float | None, monkeypatch) -> None:
    """A bf16 layer (bf16 weights and tokens, no autocast): the kernels' moves sum each token's
    weighted expert rows in fp32 and round once, where torch's ops round every product to bf16.
    Against the same layer in fp32 (the same values), the output and every gradient are as close
    as torch's moves get (within 1.5x their error, or 1% of the largest value), and the kernels ran."""
    from moetron.kernels import cpu_kernels
    from moetron.model import grouped_swiglu_cpu
    from moetron.train import moe_cpu_kernels

    assert cpu_kernels.available(), "moetron's CPU kernels are unavailable here"
    # bf16 layers take the one-node CPU path only where bf16 matmul is native; the moves are the
    # same code on any CPU (only the matmuls' speed differs), so take that path on this one too.
    monkeypatch.setattr(grouped_swiglu_cpu, "native_bf16_matmul", lambda device_type: True)
    layer = _moe_layer(num_experts=8, capacity_factor=capacity_factor).train().to(torch.bfloat16)
    reference = copy.deepcopy(layer).float()
    x_BTD = torch.randn(3, 40, 16).bfloat16()
    upstream = torch.randn(3, 40, 16)

    def output_and_grads(model: MoELayer, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.detach().requires_grad_()
        out = model(x)
        return [
            out.detach().float(),
            *(
                g.float()
                for g in torch.autograd.grad((out.float() * upstream).sum(), [x, *model.parameters()])
            ),
        ]

    expected = output_and_grads(reference, x_BTD.float())
    torch_moves = output_and_grads(layer, x_BTD)
    # The moves only: bf16 router scores tie often, and top-k's order among ties is torch's choice.
    layer.row_moves = moe_cpu_kernels.KernelMoves
    with mock.patch.object(
        moe_cpu_kernels.KernelMoves, "combine", wraps=moe_cpu_kernels.KernelMoves.combine
    ) as combine:
        kernel_moves = output_and_grads(layer, x_BTD)
    assert combine.called
    names = ["out", "x", *(name for name, _ in layer.named_parameters())]
    for name, ours, torchs, ref in zip(names, kernel_moves, torch_moves, expected, strict=True):
        ours_error, torchs_error = (ours - ref).abs().max(), (torchs - ref).abs().max()
        assert ours_error <= 1.5 * torchs_error + 1e-2 * ref.abs().max(), (
            name,
            float(ours_error),
            float(torchs_error),
        )


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_topk_routing_kernel_matches_torchs_router_ops(normalize: bool) -> None:
    """The router's top-k node (train/moe_cpu_kernels.py) against Router's torch ops on the same
    biased probabilities: the same experts and weight bits; the probabilities' gradient to fp32
    rounding."""
    from moetron.kernels import cpu_kernels
    from moetron.train.moe_cpu_kernels import topk_routing

    if not cpu_kernels.available():
        pytest.skip("moetron's CPU kernels are not built here (no compiler or no AVX2)")
    logits_TE = torch.randn(300, 16, requires_grad=True)
    bias_E = torch.randn(16) * 0.05
    upstream_TK = torch.randn(300, 2)
    probs_TE = logits_TE.softmax(dim=-1)
    weights_TK, ids_TK = topk_routing(probs_TE, bias_E, 2, normalize)
    expected_ids_TK = (probs_TE + bias_E).topk(2, dim=-1).indices
    expected_TK = probs_TE.gather(-1, expected_ids_TK)
    if normalize:
        expected_TK = expected_TK / expected_TK.sum(dim=-1, keepdim=True)
    assert torch.equal(ids_TK, expected_ids_TK) and torch.equal(weights_TK, expected_TK)
    (grad,) = torch.autograd.grad((weights_TK * upstream_TK).sum(), logits_TE, retain_graph=True)
    (expected_grad,) = torch.autograd.grad((expected_TK * upstream_TK).sum(), logits_TE)
    torch.testing.assert_close(grad, expected_grad, **FP32)


@pytest.mark.parametrize("capacity", [None, 20], ids=["dropless", "capacity"])
def test_row_plan_kernel_matches_the_dispatch_order(capacity: int | None) -> None:
    """Where each pair's row goes in the experts' padded buffer: the counting-sort kernel against
    row_moves.dispatch_order (an argsort) placed in the padded blocks."""
    from moetron.kernels import cpu_kernels
    from moetron.model import routed_swiglu_cpu
    from moetron.train.moe_cpu_kernels import KernelMoves

    if not cpu_kernels.available():
        pytest.skip("moetron's CPU kernels are not built here (no compiler or no AVX2)")
    ids_TK = torch.randint(0, 6, (50, 2))
    sizes = torch.bincount(ids_TK.flatten(), minlength=6).clamp(max=capacity or 100).tolist()
    padded = [size + extra for size, extra in zip(sizes, [3, 0, 1, 0, 2, 5], strict=True)]
    planned = KernelMoves.plan(ids_TK, sizes, padded, capacity)
    expected = routed_swiglu_cpu.TorchMoves.plan(ids_TK, sizes, padded, capacity)
    assert all(torch.equal(a, b) for a, b in zip(planned, expected, strict=True))
    assert (planned[0] == sum(padded)).any() == (capacity is not None)  # dropped pairs


def _never(*args: object) -> bool:
    return False


def test_scatter_counts_equal_bincount() -> None:
    """The GPU's sync-free expert counts (row_moves.scatter_counts) against bincount: experts that
    get nothing, repeated ids, no ids at all."""
    from moetron.model.row_moves import scatter_counts

    for ids in (torch.randint(0, 5, (7, 2)), torch.tensor([3, 3, 3]), torch.empty(0, dtype=torch.int64)):
        counts = scatter_counts(ids, 8)
        assert counts.dtype == torch.int64
        assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=8))


def test_experts_share_one_batched_matmul_where_padding_costs_less_than_the_calls() -> None:
    """bf16: one batched matmul over all experts, padded to the busiest one's bucket, while the
    padded rows cost less than the per-expert calls would (a call ~ CALL_FLOPS of work): for the
    demo's 16 experts of 128 x 256 up to ~1.45x the rows, for 64 of 128 x 64 up to ~2.9x. fp32
    keeps every expert's own rows, one call each."""
    from moetron.model.grouped_swiglu_cpu import CALL_FLOPS, bucket_rows, expert_rows

    demo = 128 * 256
    assert CALL_FLOPS // (2 * demo) == 244  # rows' worth of work per call
    # 15 experts at 497 rows (bucket 512) and a busiest one: 16 x 736 + 244 <= 16 x 244 + 8416
    assert expert_rows([736] + [497] * 15, torch.bfloat16, demo) == ([736] * 16, [(0, 16, 736)])
    sizes = [800] + [497] * 15  # 16 x 800 + 244 > 16 x 244 + 8480: each its own bucket
    assert expert_rows(sizes, torch.bfloat16, demo) == (
        [bucket_rows(size) for size in sizes],
        [(expert, 1, bucket_rows(size)) for expert, size in enumerate(sizes)],
    )
    fine = 128 * 64  # 64 experts, mean ~512 rows: batched even at 2.75x, not at 3.1x
    assert expert_rows([1400] + [505] * 63, torch.bfloat16, fine)[1] == [(0, 64, 1408)]
    assert expert_rows([1600] + [505] * 63, torch.bfloat16, fine)[1][0] == (0, 1, 1600)
    # idle experts need no call of their own, and fp32 runs each expert's rows as they are
    assert expert_rows([0, 40, 0, 0], torch.bfloat16, demo)[1] == [(1, 1, 40)]
    assert expert_rows([3, 0, 5], torch.float32, demo) == ([3, 0, 5], [(0, 1, 3), (2, 1, 5)])


def test_bucket_rows_pads_at_most_a_sixteenth_to_few_sizes() -> None:
    from moetron.model.grouped_swiglu_cpu import bucket_rows

    buckets = [bucket_rows(rows) for rows in range(1, 8193)]
    assert all(rows <= b <= rows * 17 / 16 for rows, b in zip(range(1, 8193), buckets, strict=True))
    assert all(b == rows for rows, b in zip(range(1, 33), buckets, strict=False))
    assert len(set(buckets)) <= 32 + 16 * 8  # exact below 32, then 16 sizes per octave


@pytest.mark.parametrize("rows", ["torch_ops", "torch_ops_two_row_blocks", "kernel"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_fused_lm_loss_matches_cross_entropy_of_the_logits(
    autocast: bool, rows: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's loss with targets (the output projection fused with the cross-entropy, never
    materialising fp32 logits) against F.cross_entropy of its logits: the value and the gradient
    of every parameter, with ignored positions and a scaled loss (as gradient accumulation scales
    it). fp32 agrees to rounding; under bf16 autocast both round the logits' gradient to bf16.
    The per-row work in torch ops (in one block of rows, as on a GPU, or in blocks of two rows, as
    on a CPU at a large vocabulary), or in the CPU kernel (train/loss_cpu.py)."""
    from moetron.model import loss
    from moetron.train import loss_cpu

    cfg = tiny()
    model = Transformer.from_config(cfg)
    if rows == "kernel":
        assert loss_cpu.install(model), "moetron's CPU kernels are unavailable here"
    block_elements = 2 * cfg.vocab_size if rows == "torch_ops_two_row_blocks" else loss.DEVICE_BLOCK_ELEMENTS
    monkeypatch.setattr(loss, "BLOCK_ELEMENTS", block_elements)
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[1, :4] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = model(ids, targets_BT=targets)
        reference = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    assert fused.dtype == torch.float32 and fused.dim() == 0
    assert type(fused.grad_fn).__name__ == "_LinearCrossEntropyBackward"
    grads = torch.autograd.grad(fused / 3, params)
    expected = torch.autograd.grad(reference / 3, params)
    tol = {"rtol": 2e-2, "atol": 1e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(fused, reference, **({"rtol": 1e-3, "atol": 1e-3} if autocast else FP32))
    for (name, _), g, e in zip(model.named_parameters(), grads, expected, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("rows", ["torch_ops", "kernel"])
def test_fused_lm_loss_with_every_position_ignored_is_zero_with_zero_gradient(rows: str) -> None:
    from moetron.model.loss import linear_cross_entropy
    from moetron.train.loss_cpu import lm_loss_rows

    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(
        h, w, torch.full((4,), -100), rows_loss=lm_loss_rows if rows == "kernel" else None
    )
    loss.backward()
    assert loss.item() == 0.0 and h.grad.eq(0).all() and w.grad.eq(0).all()


def test_loss_kernel_rows_match_torch_on_both_dtypes_and_a_bad_target_errs_as_torch_does() -> None:
    """The kernel's losses and gradient rows (vocabulary not a multiple of 8: the vector tail)
    against the torch ops' block loop on the same logits; an out-of-range target takes the torch
    ops, which raise their usual error."""
    from moetron.model.loss import linear_cross_entropy
    from moetron.train.loss_cpu import lm_loss_rows

    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        h, w = torch.randn(37, 16, generator=gen).to(dtype), torch.randn(1001, 16, generator=gen).to(dtype)
        targets = torch.randint(0, 1001, (37,), generator=gen)
        targets[::5] = -100
        grads = []
        for rows_loss in (None, lm_loss_rows):
            hi, wi = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss = linear_cross_entropy(hi, wi, targets, rows_loss=rows_loss)
            loss.backward()
            grads.append((loss, hi.grad, wi.grad))
        tol = FP32 if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
        for ours, torchs in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(ours.float(), torchs.float(), **tol)
    with pytest.raises((IndexError, RuntimeError)):
        linear_cross_entropy(
            torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 7]), rows_loss=lm_loss_rows
        )
