"""The engine's fused decoder path: each layer as two kernel calls (moetron/kernels/layer_avx2.cpp).

For fp32 models on an AVX2 CPU whose layers are all routed-expert MoE layers without shared
experts (the Mixtral/GPT-4 shape), the runner skips the module-by-module forward: a decode step of a
small model would otherwise spend more time in Python dispatch (~40 kernel and ~300 tensor-op calls)
than in streaming its weights. The numbers are those of the separate serving kernels, so the
path is batch-invariant too; anything it does not cover (dense or shared-expert layers, other
dtypes, no kernels) takes the module path.

A bf16 model runs here too when the engine serves it in float32 (a CPU without bf16 matmul
instructions): its weights stay bf16 and are widened in the kernels' registers, so every number is
the one its float32 copy would give, from half the bytes. Activations and the KV cache are fp32.

Legend: T packed tokens, D width, d head_dim, R rows whose logits are wanted.
"""

from __future__ import annotations

import math

import torch

from moetron.infer.paged_attention import KernelTables
from moetron.kernels import cpu_kernels
from moetron.model.moe import MoELayer
from moetron.model.transformer import Transformer


class FusedLayers:
    def __init__(self, model: Transformer) -> None:
        self.model = model
        cfg = model.cfg
        self.dims = (cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        lib = cpu_kernels.library()
        self.bf16_weights = model.output.weight.dtype == torch.bfloat16
        suffix = "bf16w" if self.bf16_weights else "f32"
        self.attention_block = getattr(lib, f"moetron_attention_block_{suffix}")
        self.moe_block = getattr(lib, f"moetron_moe_block_{suffix}")

        # Per layer: the tensors whose addresses each step passes (Parameter objects, so a weight
        # re-homed or reloaded through .data stays correct; a bf16 model's norm weights are fp32
        # copies taken here) and the constants; nn.Module attribute lookups cost ~1 us each, too much
        # to repeat per step.
        self.layers = []
        for layer in model.layers:
            att, moe = layer.attention, layer.ffn
            attention = (
                self._fp32(layer.attention_norm.weight),
                att.wq.weight,
                att.wk.weight,
                att.wv.weight,
                att.wo.weight,
            )
            experts = moe.experts
            routed = (
                self._fp32(layer.ffn_norm.weight),
                moe.router.gate.weight,
                experts.w1,
                experts.w3,
                experts.w2,
            )
            constants = (
                layer.attention_norm.eps,
                layer.ffn_norm.eps,
                moe.cfg.top_k,
                int(moe.cfg.normalize_top_k),
                experts.w1.shape[1],
                moe.cfg.num_experts,
            )
            self.layers.append((attention, routed, moe, constants))
        self.final_norm = (self._fp32(model.norm.weight), model.norm.eps)
        self.discarded_counts = torch.zeros(max(1, cfg.moe.num_experts), dtype=torch.int64)
        # RoPE's cos/sin per position, from the model's own rope, grown on demand: a decode step then
        # indexes two rows instead of recomputing angles, cos, sin and concatenations.
        self.cos_Pd = self.sin_Pd = torch.empty(0, cfg.head_dim)

    def _fp32(self, norm_weight: torch.Tensor) -> torch.Tensor:
        """Norm weights enter the kernels as fp32: a widened copy when the model is bf16 (a few KB)."""
        return norm_weight.float() if self.bf16_weights else norm_weight

    def _rope_rows(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions_T = positions_BT[0]
        needed = int(positions_T.max()) + 1
        if needed > self.cos_Pd.shape[0]:
            size = max(needed, 2 * self.cos_Pd.shape[0], 256)
            cos_BPd, sin_BPd = self.model.rope(torch.arange(size)[None], torch.float32)
            self.cos_Pd, self.sin_Pd = cos_BPd[0].contiguous(), sin_BPd[0].contiguous()
        return self.cos_Pd.index_select(0, positions_T), self.sin_Pd.index_select(0, positions_T)

    @staticmethod
    def supports(model: Transformer) -> bool:
        """Whether the fused path runs this model: all its layers routed-expert MoE without shared
        experts, all its parameters fp32 (or all bf16, to be served in float32) on the CPU."""
        if not cpu_kernels.available() or model.tok_embeddings is None or model.output is None:
            return False
        for layer in model.layers:
            ffn = layer.ffn
            if not isinstance(ffn, MoELayer) or ffn.shared_experts is not None or ffn.training:
                return False
        params = list(model.parameters())
        dtypes = {p.dtype for p in params}
        return (dtypes == {torch.float32} or dtypes == {torch.bfloat16}) and all(
            p.device.type == "cpu" and p.is_contiguous() for p in params
        )

    def forward(
        self,
        ids_BT: torch.Tensor,
        positions_BT: torch.Tensor,
        slots_T: torch.Tensor,
        tables: KernelTables,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        rows_R: torch.Tensor,
    ) -> torch.Tensor:
        """Every packed row through all layers (keys/values into the caches) → float32 logits [R, V]."""
        model = self.model
        dim, num_heads, num_kv_heads, head_dim = self.dims
        h_TD = model.tok_embeddings(ids_BT)[0].float().contiguous()
        cos_Td, sin_Td = self._rope_rows(positions_BT)
        num_tokens = h_TD.shape[0]
        if tables.rows != list(range(num_tokens)):
            raise ValueError("the fused path attends every packed row, in order")
        threads = torch.get_num_threads()
        h, cos, sin, slots = h_TD.data_ptr(), cos_Td.data_ptr(), sin_Td.data_ptr(), slots_T.data_ptr()
        step_tables = (
            tables.tables_QB.data_ptr(),
            tables.tables_QB.shape[1],
            tables.seq_of_row_T.data_ptr(),
            tables.pos_of_row_T.data_ptr(),
        )
        block_size = k_caches[0].shape[1]
        for (attention, routed, moe, constants), k_cache, v_cache in zip(
            self.layers, k_caches, v_caches, strict=True
        ):
            attention_eps, ffn_eps, top_k, normalize, hidden, num_experts = constants
            attn_norm, wq, wk, wv, wo = (t.data_ptr() for t in attention)
            self.attention_block(
                h, attn_norm, attention_eps, wq, wk, wv, wo, cos, sin, k_cache.data_ptr(), v_cache.data_ptr(),
                slots, *step_tables, num_tokens, dim, num_heads, num_kv_heads, head_dim, block_size, self.scale,
                threads,
            )  # fmt: skip
            ffn_norm, gate, w1, w3, w2 = (t.data_ptr() for t in routed)
            counts = moe.tokens_per_expert if moe.record_stats else self.discarded_counts
            self.moe_block(
                h, ffn_norm, ffn_eps, gate, top_k, normalize, w1, w3, w2, counts.data_ptr(), num_tokens, dim,
                hidden, num_experts, threads,
            )  # fmt: skip
        h_RD = h_TD if rows_R.numel() == num_tokens == 1 else h_TD.index_select(0, rows_R)
        if self.bf16_weights:  # the ops the fp32 model's norm and head take under serving_kernels()
            norm_weight, eps = self.final_norm
            return cpu_kernels.linear_f32(
                cpu_kernels.rms_norm_f32(h_RD, norm_weight, eps), model.output.weight
            )
        return model.output(model.norm(h_RD)).float()
