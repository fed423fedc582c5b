"""Decoder-only transformer with MoE feed-forward layers. Single-device code only: parallelism is
applied from outside (moetron/parallel); the serving engine passes its attention backend and
swaps in its kernels from outside (moetron/infer/serving_kernels.py).

Legend: B batch, T tokens, D model width, H query heads, G kv heads, d head_dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moetron.config import ModelConfig
from moetron.model.loss import RowsLoss, linear_cross_entropy
from moetron.model.moe import FeedForward, MoELayer
from moetron.model.ops import Embedding, Linear
from moetron.model.rope import RotaryEmbedding, apply_rope

# (q_BHTd, k_BGTd, v_BGTd, layer_id) -> out_BHTd. Training uses causal SDPA; the serving engine
# passes one that reads and writes layer `layer_id`'s paged KV cache.
AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def causal_sdpa(
    q_BHTd: torch.Tensor, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor, layer_id: int
) -> torch.Tensor:
    return F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, is_causal=True, enable_gqa=True)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        # (x, weight, eps) -> the output, or None where it does not apply: a CPU training kernel
        # installed from outside (train/norm_cpu.py).
        self.kernel: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and (out := self.kernel(x, self.weight, self.eps)) is not None:
            return out
        # Normalise in fp32, scale in the input dtype (as Llama/Mixtral do).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    """Multi-head attention with num_kv_heads ≤ num_heads (MHA, GQA, MQA) and RoPE."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id  # told to the attention backend (which KV cache is this layer's)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.num_heads * cfg.head_dim)
        self.wk = Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim)
        self.wv = Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim)
        self.wo = Linear(cfg.num_heads * cfg.head_dim, cfg.dim)
        # (x_BHTd, cos_BTd, sin_BTd) -> x rotated: apply_rope, or a CPU training kernel installed
        # from outside (train/attention_cpu.py).
        self.rotate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = apply_rope

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTd: torch.Tensor,
        sin_BTd: torch.Tensor,
        attention_backend: AttentionBackend,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # -1 instead of num_heads: tensor parallelism shards the heads without telling us.
        q_BHTd = self.wq(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        k_BGTd = self.wk(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        v_BGTd = self.wv(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        q_BHTd, k_BGTd = self.rotate(q_BHTd, cos_BTd, sin_BTd), self.rotate(k_BGTd, cos_BTd, sin_BTd)
        out_BHTd = attention_backend(q_BHTd, k_BGTd, v_BGTd, self.layer_id)
        return self.wo(out_BHTd.transpose(1, 2).reshape(B, T, -1))

    def init_weights(self, std: float, out_std: float) -> None:
        for w in (self.wq.weight, self.wk.weight, self.wv.weight):
            nn.init.normal_(w, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(layer_id, cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn: MoELayer | FeedForward = (
            MoELayer(cfg) if cfg.is_moe_layer(layer_id) else FeedForward(cfg.dim, cfg.moe.dense_hidden_dim)
        )

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTd: torch.Tensor,
        sin_BTd: torch.Tensor,
        attention_backend: AttentionBackend,
    ) -> torch.Tensor:
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos_BTd, sin_BTd, attention_backend)
        return h_BTD + self.ffn(self.ffn_norm(h_BTD))

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(std, out_std)
        self.ffn.init_weights(std, out_std)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size)
        # The attention a forward without a backend runs (training, evaluation), and the loss's
        # per-row work (None: torch ops); CPU training kernels are installed from outside
        # (train/attention_cpu.py, train/loss_cpu.py).
        self.default_attention: AttentionBackend = causal_sdpa
        self.loss_rows: RowsLoss | None = None
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        positions_BT: torch.Tensor | None = None,
        attention_backend: AttentionBackend | None = None,
        targets_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids_BT: int [B, T] → float32 logits [B, T, V]. Positions default to 0..T-1.
        With `targets_BT` (ids, -100 where a position counts for nothing): the mean cross-entropy
        instead, an fp32 scalar, computed without materialising the logits (`lm_loss`).

        A pipeline stage (moetron/parallel/pipeline.py) is this model with parts removed: without
        `tok_embeddings` it takes hidden states [B, T, D] instead of ids, without `output` it
        returns hidden states [B, T, D]."""
        h_BTD = self.hidden_states(input_ids_BT, positions_BT, attention_backend)
        if self.output is None:
            return h_BTD
        return self.logits(h_BTD) if targets_BT is None else self.lm_loss(h_BTD, targets_BT)

    def hidden_states(
        self,
        input_ids_BT: torch.Tensor,
        positions_BT: torch.Tensor | None = None,
        attention_backend: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """The last layer's output [B, T, D], before the final norm. The serving engine runs a step's
        packed tokens ([1, T]) through here with its paged-KV backend, then `logits` on the rows it
        samples: a 1,000-token prefill chunk would otherwise cost 1,000 x V logits."""
        if self.tok_embeddings is None:
            h_BTD = input_ids_BT
        elif input_ids_BT.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, tokens], got {tuple(input_ids_BT.shape)}")
        else:
            h_BTD = self.tok_embeddings(input_ids_BT)
        if positions_BT is None:
            positions_BT = torch.arange(h_BTD.shape[1], device=h_BTD.device).expand(h_BTD.shape[:2])
        cos_BTd, sin_BTd = self.rope(positions_BT, h_BTD.dtype)
        attention_backend = attention_backend or self.default_attention
        for layer in self.layers:
            h_BTD = layer(h_BTD, cos_BTd, sin_BTd, attention_backend)
        return h_BTD

    def logits(self, h_xD: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] → float32 logits [..., V]."""
        return self.output(self.norm(h_xD)).float()

    def lm_loss(self, h_BTD: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits of `h_BTD` against `targets_BT`, fused with the output
        projection (model/loss.py) where its weight is a plain tensor; a sharded one (tensor
        parallelism's DTensor) takes the logits and `F.cross_entropy`."""
        weight = self.output.weight
        if type(self.output) is Linear and type(weight) in (torch.Tensor, nn.Parameter):
            return linear_cross_entropy(
                self.norm(h_BTD).flatten(0, 1), weight, targets_BT.flatten(), rows_loss=self.loss_rows
            )
        return F.cross_entropy(self.logits(h_BTD).flatten(0, 1), targets_BT.flatten())

    def init_weights(self) -> None:
        """Init for training from scratch: N(0, init_std) (the embeddings: embedding_init_std),
        residual-output projections scaled by 1/sqrt(2 * num_layers) (GPT-2) so the residual
        stream's variance does not grow with depth."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        if self.tok_embeddings is not None:  # parts may be absent on a pipeline stage
            embedding_std = self.cfg.embedding_init_std
            nn.init.normal_(self.tok_embeddings.weight, std=std if embedding_std is None else embedding_std)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        if self.norm is not None:
            self.norm.init_weights()
        if self.output is not None and not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        self.init_buffers()

    def init_buffers(self) -> None:
        """Reset non-persistent buffers (after to_empty, or after loading a state dict)."""
        for layer in self.moe_layers():
            layer.tokens_per_expert.zero_()

    def moe_layers(self) -> Iterator[MoELayer]:
        for layer in self.layers:
            if isinstance(layer.ffn, MoELayer):
                yield layer.ffn

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> Transformer:
        """Build on the meta device (no memory touched), then materialise and initialise."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        if cfg.tie_embeddings:  # to_empty re-creates parameters; re-tie explicitly
            model.output.weight = model.tok_embeddings.weight
        with torch.no_grad():
            model.init_weights()
        if dtype is not None:
            model.to(dtype)
        return model
