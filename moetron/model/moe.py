"""Mixture-of-Experts feed-forward: router, stacked SwiGLU experts, dropless or capacity dispatch.

Legend: T tokens, D model width, I expert hidden width, E experts, K experts chosen per token,
N = routed (token, expert) pairs in expert order; B sequences and S positions when the T tokens
are taken as B sequences of S (the sequence-wise aux loss).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moetron.config import ModelConfig, MoEConfig
from moetron.model import grouped_swiglu_cpu, routed_swiglu_cpu
from moetron.model.ops import Linear, grouped_linear, grouped_mm_dtype, linear
from moetron.model.row_moves import count_per_expert, dispatch_order, gather_rows, inverse_map, move_rows


class FeedForward(nn.Module):
    """Dense SwiGLU: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float, out_std: float) -> None:
        for w in (self.w1.weight, self.w3.weight):
            nn.init.normal_(w, std=std)
        nn.init.normal_(self.w2.weight, std=out_std)


class Router(nn.Module):
    """Linear gate → softmax (fp32) → top-k, Mixtral semantics, plus DeepSeek-V3's per-expert
    selection bias (`expert_bias` [E]): it shifts which experts are chosen, never their weights.

    The bias is no parameter (no gradient): the trainer moves it after each step towards the
    experts that received fewer tokens (train/balance.py). It is a persistent buffer, so
    checkpoints, state dicts and exports carry it, and stays fp32 under model.to(bfloat16) (see
    _apply): its steps of bias_update_rate (1e-3) would round away in bf16 once it nears 1.
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.gate = Linear(dim, cfg.num_experts)
        self.top_k, self.normalize_top_k = cfg.top_k, cfg.normalize_top_k
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        # A faster top-k + weights (probs, bias, k, normalize) -> (weights, ids) or None where it does
        # not apply, installed from outside (train/moe_cpu_kernels.py); None: the torch ops below.
        self.select_topk: Callable[..., tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (weights_TK fp32, expert_ids_TK, logits_TE fp32)."""
        logits_TE = self.gate(x_TD).float()
        probs_TE = logits_TE.softmax(dim=-1)
        if self.select_topk is not None:
            routed = self.select_topk(probs_TE, self.expert_bias, self.top_k, self.normalize_top_k)
            if routed is not None:
                return *routed, logits_TE
        # Choose on the biased scores, weigh with the unbiased probabilities (DeepSeek-V3 eq. 16,
        # torchtitan): the bias steers load without entering the output or its gradient. A zero
        # bias chooses exactly as before (p + 0.0 == p), and gather returns topk's own values.
        expert_ids_TK = (probs_TE + self.expert_bias).topk(self.top_k, dim=-1).indices
        weights_TK = probs_TE.gather(-1, expert_ids_TK)
        if self.normalize_top_k:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK, expert_ids_TK, logits_TE

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Router:
        # model.to(dtype) casts every floating buffer; the bias must stay fp32 (see the class doc).
        # Where `fn` changed its dtype, keep the fp32 values, moved to wherever `fn` put the buffer.
        bias_E = self.expert_bias
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias_E.to(self.expert_bias.device)
        return self


def grouped_swiglu(
    x_ND: torch.Tensor,
    num_tokens_per_expert_E: torch.Tensor,
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = linear,
    activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """Expert e's SwiGLU on its contiguous slice of the expert-sorted rows x_ND → [N, D].

    A function of explicit weights, not of a module, so that a caller holding only some experts
    (e.g. a rank's local shard of the stack) runs the same math on them. `matmul` (x, w) -> x @ w.T
    and `activation` are the per-expert loop's kernels: the serving engine passes its own.
    """
    if (dtype := grouped_mm_dtype(x_ND)) is not None:
        offsets_E = torch.cumsum(num_tokens_per_expert_E, 0, dtype=torch.int32)
        x_ND, w1_EID, w2_EDI, w3_EID = (t.to(dtype) for t in (x_ND, w1_EID, w2_EDI, w3_EID))
        h_NI = F.silu(grouped_linear(x_ND, w1_EID, offsets_E)) * grouped_linear(x_ND, w3_EID, offsets_E)
        return grouped_linear(h_NI, w2_EDI, offsets_E)
    if (
        matmul is linear
        and activation is F.silu
        and grouped_swiglu_cpu.compute_dtype(x_ND, w1_EID, w2_EDI, w3_EID) is not None
    ):
        return grouped_swiglu_cpu.grouped_swiglu(
            x_ND, num_tokens_per_expert_E.tolist(), w1_EID, w2_EDI, w3_EID
        )
    # One host sync for the split sizes, then each expert's whole SwiGLU on its slice.
    # unbind/split, not w[e] / x[a:b]: indexing's backward materialises a zeroed gradient of the
    # whole [E, ...] stack (or [N, D] input) per expert and adds them up; unbind's and split's
    # backward is one stack / cat.
    w1, w2, w3 = w1_EID.unbind(0), w2_EDI.unbind(0), w3_EID.unbind(0)
    outputs = []
    for expert, x in enumerate(x_ND.split(num_tokens_per_expert_E.tolist())):
        if x.shape[0] == 0:
            continue
        h = activation(matmul(x, w1[expert])) * matmul(x, w3[expert])
        outputs.append(matmul(h, w2[expert]))
    return torch.cat(outputs) if outputs else x_ND.new_zeros(0, x_ND.shape[-1])


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights (w1, w3: [E, I, D]; w2: [E, D, I]), each run once
    on its contiguous slice of expert-sorted tokens."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(x_ND, num_tokens_per_expert_E, self.w1, self.w2, self.w3)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=out_std)


class _AttachRouterLoss(torch.autograd.Function):
    """Identity on `out`; in backward, feeds `scale` as the gradient of `router_loss`.

    This lets each MoE layer add its own auxiliary loss to the objective without the trainer
    collecting tensors from inside the model, so it stays correct under activation checkpointing
    and pipeline parallelism (Megatron's MoEAuxLossAutoScaler does the same).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, router_loss: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(router_loss)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        (router_loss,) = ctx.saved_tensors
        return grad_out, torch.full_like(router_loss, ctx.scale), None


class _DispatchRows(torch.autograd.Function):
    """Token rows x_TD copied to the kept (token, k) pairs pairs_N (flat pair indices t * K + k, in
    expert order; all T * K pairs when dropless). The gradient moves each pair's row back to its pair
    slot (slot_P: the pair's kept row, or N if dropped) and sums each token's K slots: gathers only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x_TD: torch.Tensor, pairs_N: torch.Tensor, slot_P: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        ctx.save_for_backward(slot_P)
        ctx.top_k = top_k
        return x_TD.index_select(0, pairs_N // top_k)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (slot_P,) = ctx.saved_tensors
        grad_PD = gather_rows(grad_ND, slot_P, has_holes=grad_ND.shape[0] < slot_P.shape[0])
        return grad_PD.unflatten(0, (-1, ctx.top_k)).sum(1), None, None, None


def load_balancing_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss E * Σ_e f_e P_e, with f_e the fraction of the T*K assignments sent
    to expert e and P_e its mean router probability. Equals 1.0 when perfectly balanced."""
    num_experts = probs_TE.shape[-1]
    counts_E = count_per_expert(expert_ids_TK, num_experts).to(probs_TE.dtype)
    fraction_E = counts_E / expert_ids_TK.numel()
    return num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()


def sequence_load_balancing_loss(probs_BSE: torch.Tensor, expert_ids_BSK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (eq. 17-20): `load_balancing_loss` of each
    sequence's S tokens, averaged over the B sequences. Equals 1.0 when every sequence is balanced."""
    num_sequences, _, num_experts = probs_BSE.shape
    ids_BX = expert_ids_BSK.flatten(1)  # X = S*K assignments of a sequence
    ones_BX = torch.ones(ids_BX.shape, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE = probs_BSE.new_zeros(num_sequences, num_experts).scatter_add_(1, ids_BX, ones_BX)
    fraction_BE = counts_BE / ids_BX.shape[1]
    return num_experts * (fraction_BE * probs_BSE.mean(dim=1)).sum(dim=-1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition, keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class MoELayer(nn.Module):
    """Routed experts (+ optional shared experts). Input and output [B, T, D].

    Side outputs for the trainer, refreshed each forward:
      tokens_per_expert: int64 buffer [E], kept (token, expert) assignments, accumulated until the
        trainer resets it;
      last_aux_loss, last_z_loss: detached scalars of the latest training forward.
    In training mode the weighted router losses are added to the objective through backward
    (see _AttachRouterLoss), scaled by `router_loss_scale`, which a trainer sets to the factor it
    applies to the LM loss (e.g. 1 / gradient-accumulation steps).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe = cfg.moe
        self.cfg = moe
        self.router = Router(cfg.dim, moe)
        self.experts = GroupedExperts(cfg.dim, moe.expert_hidden_dim, moe.num_experts)
        self.shared_experts = (
            FeedForward(cfg.dim, moe.shared_expert_hidden_dim * moe.num_shared_experts)
            if moe.num_shared_experts > 0
            else None
        )
        # int64: exact at any count, and model.to(bfloat16) leaves integer buffers alone
        self.register_buffer(
            "tokens_per_expert", torch.zeros(moe.num_experts, dtype=torch.int64), persistent=False
        )
        self.router_loss_scale = 1.0
        # The CPU training node's row plan and moves (routed_swiglu_cpu.TorchMoves, or kernels
        # installed from outside: train/moe_cpu_kernels.py).
        self.row_moves: type[routed_swiglu_cpu.TorchMoves] = routed_swiglu_cpu.TorchMoves
        self.record_stats = True  # off while activation checkpointing recomputes a forward
        self.last_aux_loss: torch.Tensor | None = None
        self.last_z_loss: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        weights_TK, expert_ids_TK, logits_TE = self.router(x_TD)
        out_TD = self.routed_experts(x_TD, weights_TK, expert_ids_TK)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        if self.training and torch.is_grad_enabled():
            num_sequences = shape[0] if len(shape) == 3 else 1
            out_TD = self._add_router_loss(out_TD, logits_TE, expert_ids_TK, num_sequences)
        return out_TD.reshape(shape)

    def routed_experts(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        """Σ_k weights_TK · expert_{expert_ids_TK}(x_TD) → [T, D]: dispatch in expert order, the
        experts, combine. (The serving engine swaps in a one-kernel version of this method.)"""
        capacity = self._capacity(expert_ids_TK.shape[0])
        experts = self.experts
        weights = (experts.w1, experts.w2, experts.w3)
        if (
            type(x_TD) is torch.Tensor
            and type(experts) is GroupedExperts
            and routed_swiglu_cpu.supports(x_TD, *weights)
        ):  # CPU training: all of it one node (experts subclassed by EP or LoRA keep theirs)
            out_TD, num_tokens_per_expert_E = routed_swiglu_cpu.routed_swiglu(
                x_TD, weights_TK, expert_ids_TK, capacity, *weights, moves=self.row_moves
            )
            if self.record_stats:
                self.tokens_per_expert += num_tokens_per_expert_E
            return out_TD
        order_N, num_tokens_per_expert_E = dispatch_order(expert_ids_TK, self.cfg.num_experts, capacity)
        if self.record_stats:
            with torch.no_grad():
                self.tokens_per_expert += num_tokens_per_expert_E
        if type(x_TD) is torch.Tensor:  # DTensor inputs take the general path below
            return self._moved_experts(x_TD, weights_TK, order_N, num_tokens_per_expert_E)
        token_ids_N = order_N // self.cfg.top_k
        y_ND = self.experts(x_TD[token_ids_N], num_tokens_per_expert_E)
        y_ND = y_ND * weights_TK.reshape(-1)[order_N, None].to(y_ND.dtype)
        # Under autocast the experts' matmuls return bf16 while the residual stream is fp32: combine
        # in the stream's dtype (as Mixtral does).
        return torch.zeros_like(x_TD).index_add_(0, token_ids_N, y_ND.to(x_TD.dtype))

    def _moved_experts(
        self,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        pairs_N: torch.Tensor,
        num_tokens_per_expert_E: torch.Tensor,
    ) -> torch.Tensor:
        """routed_experts on plain tensors: dispatch and combine as row moves whose gradients are
        gathers too (row_moves.py), not indexing's and index_add_'s scatter-adds. A dropped pair
        gets a zero row. Combining a token's K rows with sum(1) equals index_add_'s adds for
        K <= 2 (a + b == b + a)."""
        num_tokens, top_k = weights_TK.shape
        slot_P = inverse_map(pairs_N, num_tokens * top_k)
        y_ND = self.experts(_DispatchRows.apply(x_TD, pairs_N, slot_P, top_k), num_tokens_per_expert_E)
        y_PD = move_rows(y_ND.to(x_TD.dtype), slot_P, pairs_N)
        return (y_PD.unflatten(0, (num_tokens, top_k)) * weights_TK.unsqueeze(-1).to(x_TD.dtype)).sum(1)

    def _capacity(self, num_tokens: int) -> int | None:
        """Each expert's kept (token, expert) pairs: None (dropless) unless training with a
        capacity factor, then ceil(capacity_factor * T * K / E)."""
        if self.cfg.capacity_factor is None or not self.training:
            return None
        return math.ceil(self.cfg.capacity_factor * num_tokens * self.cfg.top_k / self.cfg.num_experts)

    def _add_router_loss(
        self, out_TD: torch.Tensor, logits_TE: torch.Tensor, expert_ids_TK: torch.Tensor, num_sequences: int
    ) -> torch.Tensor:
        # A loss of weight 0 is still computed (trainers log it) but kept out of the graph: its
        # backward would be whole [T, E] passes that add zeros.
        aux_weight, z_weight = self.cfg.aux_loss_weight, self.cfg.z_loss_weight
        with torch.set_grad_enabled(torch.is_grad_enabled() and aux_weight > 0):
            probs_TE = logits_TE.softmax(dim=-1)
            if self.cfg.aux_loss_type == "sequence":
                aux_loss = sequence_load_balancing_loss(
                    probs_TE.unflatten(0, (num_sequences, -1)),
                    expert_ids_TK.unflatten(0, (num_sequences, -1)),
                )
            else:
                aux_loss = load_balancing_loss(probs_TE, expert_ids_TK)
        with torch.set_grad_enabled(torch.is_grad_enabled() and z_weight > 0):
            z_loss = router_z_loss(logits_TE)
        if self.record_stats:
            self.last_aux_loss, self.last_z_loss = aux_loss.detach(), z_loss.detach()
        router_loss = aux_weight * aux_loss + z_weight * z_loss
        if router_loss.requires_grad:
            out_TD = _AttachRouterLoss.apply(out_TD, router_loss, self.router_loss_scale)
        return out_TD

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.gate.weight, std=std)
        self.router.expert_bias.zero_()
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        self.tokens_per_expert.zero_()


@contextlib.contextmanager
def expert_stats_paused(model: nn.Module) -> Iterator[None]:
    """Forwards inside this context leave `tokens_per_expert` alone: activation-checkpoint
    recomputes and the pipeline's shape-inference pass on empty tensors are not routed tokens."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    previous = [layer.record_stats for layer in layers]
    for layer in layers:
        layer.record_stats = False
    try:
        yield
    finally:
        for layer, record in zip(layers, previous, strict=True):
            layer.record_stats = record
