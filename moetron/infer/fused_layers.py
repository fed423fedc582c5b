"""The engine's fused decoder path: a step's whole decoder stack as one kernel call, each layer two
C functions (moetron/kernels/layer_avx2.cpp).

For fp32 models on an AVX2 CPU whose layers are all routed-expert MoE layers without shared
experts (the Mixtral/GPT-4 shape), a decode step of a small model would otherwise spend more time
in Python dispatch (~40 kernel and ~300 tensor-op calls) than in streaming its weights. So the
runner installs, on top of the serving kernels (serving_kernels.py), a `FusedBlock` class for each
decoder layer (its attention half and MoE half, each one C function reading the engine's paged
caches and tables for the layer's index) and a `FusedTransformer` for the model, whose
`hidden_states` hands every layer's arguments to C in one call (moetron_decoder_layers) and whose
`logits` runs the final norm and the head in another: a decode step is then two kernel calls and
a few torch ops (the embedding rows, the sampler). Returning to Python between layers cost 13% of
a 4-bit decode step of benchmarks/decode.py's model. The numbers are those of the separate serving
kernels, so the path is batch-invariant too; anything it does not cover (dense or shared-expert
layers, other dtypes, no kernels, sharded layers: those run FusedBlock by FusedBlock) takes the
module path.

A model quantized for serving (moetron/quant/quantize.py: GGML Q8_0 / Q4_0 / Q4_K blocks) runs here
too: each weight's format code goes with its address, and the kernels quantize each activation row
as llama.cpp does, still row by row. A bf16 model runs here too when the engine serves it in float32 (a CPU without bf16 matmul
instructions): its weights stay bf16 and are widened in the kernels' registers, so every number is
the one its float32 copy would give, from half the bytes. Activations and the KV cache are fp32;
the embedding's rows, the final norm and the head are widened the same way (the norm weights are
fp32 copies taken at install: a few KB).

Legend: B = 1 packed row, T packed tokens, D width, d head_dim, P positions in the RoPE table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moetron.infer.batch_invariant import SMALL_ROWS
from moetron.infer.paged_attention import PagedAttention
from moetron.infer.serving_kernels import ServingKernels, ServingModule
from moetron.kernels import cpu_kernels
from moetron.model.moe import MoELayer
from moetron.model.ops import Embedding, Linear
from moetron.model.rope import RotaryEmbedding
from moetron.model.transformer import AttentionBackend, Block, RMSNorm, Transformer, causal_sdpa
from moetron.quant.quantize import weight_format


def supports(model: Transformer) -> bool:
    """Whether the fused path runs this model: all its layers routed-expert MoE without shared
    experts, all its parameters fp32 (or all bf16, to be served in float32) on the CPU, the routers'
    selection biases fp32 (as the Router keeps them)."""
    if not cpu_kernels.available() or model.tok_embeddings is None or model.output is None:
        return False
    for layer in model.layers:
        ffn = layer.ffn
        if not isinstance(ffn, MoELayer) or ffn.shared_experts is not None or ffn.training:
            return False
        bias = ffn.router.expert_bias
        if bias.dtype != torch.float32 or bias.device.type != "cpu" or not bias.is_contiguous():
            return False
    params = list(model.parameters())
    dtypes = {p.dtype for p in params}
    return (dtypes == {torch.float32} or dtypes == {torch.bfloat16}) and all(
        p.device.type == "cpu" and p.is_contiguous() for p in params
    )


def fused_kernels(model: Transformer, base: ServingKernels) -> ServingKernels:
    """`base` (the batch mode's kernels) with every layer fused; for a bf16 model the embedding,
    final norm and head widen its weights to fp32 (the fp32 model's norm and head are `base`'s)."""
    classes = {
        **base.classes,
        Transformer: FusedTransformer,
        Block: FusedBlock,
        RotaryEmbedding: TabledRotaryEmbedding,
    }
    if model.output.weight.dtype == torch.bfloat16:
        classes |= {Embedding: WideningEmbedding, RMSNorm: WidenedRMSNorm, Linear: WidenedLinear}
    return ServingKernels(f"{base.name}+fused", classes, prepare=_prepare)


def _prepare(model: nn.Module, module: nn.Module) -> None:
    if isinstance(module, FusedTransformer | FusedBlock | TabledRotaryEmbedding | WidenedRMSNorm):
        module.prepare()


class FusedTransformer(ServingModule, Transformer):
    """An engine step's decoder stack in one kernel call (moetron_decoder_layers) when every layer
    is a FusedBlock: the embedding and RoPE rows in torch, then each layer's two blocks in C, the
    same calls FusedBlock makes from Python (so the same bits) without a return to Python between
    them. Anything else (sharded layers, the model called outside an engine step) runs layer by
    layer."""

    model_class = Transformer

    def prepare(self) -> None:
        # Gathered at the first step (the layers are swapped and prepared after this module).
        self.fused_layers: tuple[FusedBlock, ...] | None = None
        self.stack_key: tuple | None = None
        self.stack_tables: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0))

    def hidden_states(
        self,
        input_ids_BT: torch.Tensor,
        positions_BT: torch.Tensor | None = None,
        attention_backend: AttentionBackend = causal_sdpa,
    ) -> torch.Tensor:
        if not self.runs_whole_stack(input_ids_BT, positions_BT, attention_backend):
            return super().hidden_states(input_ids_BT, positions_BT, attention_backend)
        assert isinstance(attention_backend, PagedAttention) and positions_BT is not None
        h_BTD = self.tok_embeddings(input_ids_BT)
        if h_BTD.dtype != torch.float32 or not h_BTD.is_contiguous():
            raise ValueError("the fused layers take contiguous float32 hidden states")
        tables = attention_backend.kernel_tables
        cos_Pd, sin_Pd = self.rope.tables(tables.max_position + 1)  # rows by position: the kernel picks
        fields_LF, scalars_LS = self.layer_tables(attention_backend)
        k_cache = attention_backend.k_caches[0]
        num_tokens, dim = h_BTD.shape[1:]
        cpu_kernels.library().moetron_decoder_layers(
            h_BTD.data_ptr(), fields_LF.data_ptr(), scalars_LS.data_ptr(), len(self.layers), cos_Pd.data_ptr(),
            sin_Pd.data_ptr(), cos_Pd.shape[1], attention_backend.slot_mapping_T.data_ptr(),
            tables.tables_QB.data_ptr(), tables.tables_QB.shape[1], tables.seq_of_row_T.data_ptr(),
            tables.pos_of_row_T.data_ptr(), num_tokens, dim, k_cache.shape[1], torch.get_num_threads(),
        )  # fmt: skip
        return h_BTD

    def logits(self, h_xD: torch.Tensor) -> torch.Tensor:
        """The final norm and the head in one kernel call for an engine step's few rows: the two
        kernels the norm's and the head's modules call there (so the same bits). More rows, which
        non-invariant mode hands to MKL, and calls outside the engine take the modules."""
        if not (
            self.fused_layers
            and h_xD.dim() == 2
            and 0 < h_xD.shape[0] <= SMALL_ROWS
            and h_xD.dtype == torch.float32
            and h_xD.stride(-1) == 1
            and not h_xD.requires_grad
        ):
            return super().logits(h_xD)
        norm, head = self.norm, self.output
        norm_weight = getattr(norm, "weight_fp32", norm.weight)  # a bf16 model's widened copy
        weight = head.weight
        num_rows, dim = h_xD.shape
        out_RV = torch.empty(num_rows, weight.shape[0], dtype=torch.float32)
        cpu_kernels.library().moetron_logits(
            h_xD.data_ptr(), h_xD.stride(0), norm_weight.data_ptr(), norm.eps, weight.data_ptr(),
            _format_code(head, "weight"), out_RV.data_ptr(), num_rows, dim, weight.shape[0], torch.get_num_threads(),
        )  # fmt: skip
        return out_RV

    def runs_whole_stack(
        self, input_ids_BT: torch.Tensor, positions_BT: torch.Tensor | None, attention_backend: object
    ) -> bool:
        """An engine step of one packed row whose every row goes to the kernels, every layer fused."""
        if self.fused_layers is None:
            layers = tuple(self.layers)
            fused = isinstance(self.rope, TabledRotaryEmbedding) and all(
                type(la) is FusedBlock for la in layers
            )
            self.fused_layers = layers if fused else ()
        return (
            bool(self.fused_layers)
            and isinstance(attention_backend, PagedAttention)
            and attention_backend.kernel_tables is not None
            and attention_backend.kernel_rows_T is None
            and positions_BT is not None
            and input_ids_BT.dim() == 2
            and input_ids_BT.shape[0] == 1
        )

    def layer_tables(self, attention_backend: PagedAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """moetron_decoder_layers' per-layer rows as tensors. Rebuilt only when an address they hold
        changed (a weight re-homed through .data, other caches, expert stats paused or replaced):
        comparing those costs a few microseconds a step, building the rows ~25 per layer."""
        layers = self.fused_layers
        assert layers
        key = (
            *(cache.data_ptr() for cache in attention_backend.k_caches),
            *(cache.data_ptr() for cache in attention_backend.v_caches),
            *(tensor.data_ptr() for layer in layers for tensor in layer.stack_tensors),
            *(layer.expert_counts().data_ptr() for layer in layers),
        )
        if key != self.stack_key:
            lib = cpu_kernels.library()
            fields: list[int] = []
            scalars: list[float] = []
            for layer in layers:
                named, named_scalars = layer.stack_fields(attention_backend)
                fields += [named[name] for name in lib.layer_fields]
                scalars += [named_scalars[name] for name in lib.layer_scalars]
            self.stack_tables = (
                torch.tensor(fields, dtype=torch.int64).view(len(layers), -1),
                torch.tensor(scalars, dtype=torch.float32).view(len(layers), -1),
            )
            self.stack_key = key
        return self.stack_tables


class FusedBlock(ServingModule, Block):
    """A decoder layer as two kernel calls on the packed hidden states, in place: attention (norm,
    q/k/v, RoPE, K/V into the paged cache, attention, output projection, residual) and the routed
    experts (norm, router, top-k on probabilities + selection bias, experts, combine, residual,
    per-expert counts)."""

    model_class = Block

    def prepare(self) -> None:
        # The tensors whose addresses each step passes (Parameter objects, so a weight re-homed or
        # reloaded through .data stays correct), their format codes and the constants, gathered
        # once: nn.Module attribute lookups cost ~1 us each, too much to repeat per step.
        att, moe = self.attention, self.ffn
        assert isinstance(moe, MoELayer)
        experts = moe.experts
        # Norm weights as fp32 (a copy of a bf16 model's few KB; an fp32 one's own Parameter).
        self.attention_tensors = (self.attention_norm.weight.float(), att.wq.weight, att.wk.weight,
                                  att.wv.weight, att.wo.weight)  # fmt: skip
        self.attention_formats = tuple(_format_code(m, "weight") for m in (att.wq, att.wk, att.wv, att.wo))
        self.routed_tensors = (self.ffn_norm.weight.float(), moe.router.gate.weight,
                               moe.router.expert_bias, experts.w1, experts.w3, experts.w2)  # fmt: skip
        self.routed_formats = (
            _format_code(moe.router.gate, "weight"),
            *(_format_code(experts, name) for name in ("w1", "w3", "w2")),
        )
        self.attention_constants = (
            att.num_heads,
            att.num_kv_heads,
            att.head_dim,
            1.0 / math.sqrt(att.head_dim),
        )
        self.routed_constants = (
            moe.cfg.top_k,
            int(moe.cfg.normalize_top_k),
            experts.w1.shape[1],
            moe.cfg.num_experts,
        )
        self.discarded_counts = torch.zeros(moe.cfg.num_experts, dtype=torch.int64)
        self.stack_tensors = self.attention_tensors + self.routed_tensors
        # The MoE layer again, outside nn.Module's registry (not a second submodule): its lookup as
        # self.ffn costs ~1 us.
        self.__dict__["routed_layer"] = moe

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTd: torch.Tensor,
        sin_BTd: torch.Tensor,
        attention_backend: PagedAttention,
    ) -> torch.Tensor:
        tables = getattr(attention_backend, "kernel_tables", None)
        if tables is None or attention_backend.kernel_rows_T is not None or x_BTD.shape[0] != 1:
            # Not an engine step (e.g. the model called directly after serving): the module path,
            # with the serving kernels still installed in the layer's modules.
            return super().forward(x_BTD, cos_BTd, sin_BTd, attention_backend)
        h_TD = x_BTD[0]
        if h_TD.dtype != torch.float32 or not (h_TD.is_contiguous() and cos_BTd.is_contiguous()):
            raise ValueError("the fused layers take contiguous float32 hidden states and RoPE rows")
        self.attention_half(h_TD, cos_BTd, sin_BTd, attention_backend)
        self.moe_half(h_TD)
        return x_BTD

    def attention_half(
        self,
        h_TD: torch.Tensor,
        cos_BTd: torch.Tensor,
        sin_BTd: torch.Tensor,
        attention_backend: PagedAttention,
    ) -> None:
        num_tokens, dim = h_TD.shape
        num_heads, num_kv_heads, head_dim, scale = self.attention_constants
        attn_norm, wq, wk, wv, wo = (t.data_ptr() for t in self.attention_tensors)
        q_format, k_format, v_format, o_format = self.attention_formats
        (k_cache, v_cache, cache_format, slots, tables, max_blocks, seq_of_row, pos_of_row,
         block_size) = self.paged_cache_arguments(attention_backend)  # fmt: skip
        cpu_kernels.library().moetron_attention_block(
            h_TD.data_ptr(), attn_norm, self.attention_norm.eps, wq, q_format, wk, k_format, wv, v_format,
            wo, o_format, cos_BTd.data_ptr(), sin_BTd.data_ptr(), k_cache, v_cache, cache_format, slots, tables,
            max_blocks, seq_of_row, pos_of_row, num_tokens, dim, num_heads, num_kv_heads, head_dim, block_size,
            scale, torch.get_num_threads(),
        )  # fmt: skip

    def paged_cache_arguments(self, attention_backend: PagedAttention) -> tuple[int, ...]:
        """The attention kernels' cache arguments for this layer: the K and V caches' addresses, their
        format code, the slot mapping, the block tables and their width, each row's sequence and
        position, the block size."""
        tables = attention_backend.kernel_tables
        k_cache = attention_backend.k_caches[self.layer_id]
        return (
            k_cache.data_ptr(),
            attention_backend.v_caches[self.layer_id].data_ptr(),
            cpu_kernels.FORMAT_CODES[cpu_kernels.DTYPE_FORMATS[k_cache.dtype]],
            attention_backend.slot_mapping_T.data_ptr(),
            tables.tables_QB.data_ptr(),
            tables.tables_QB.shape[1],
            tables.seq_of_row_T.data_ptr(),
            tables.pos_of_row_T.data_ptr(),
            k_cache.shape[1],
        )

    def stack_fields(self, attention_backend: PagedAttention) -> tuple[dict[str, int], dict[str, float]]:
        """This layer's row of moetron_decoder_layers' tables, by field name: what its two calls
        below pass, less the step's shared arguments."""
        attn_norm, wq, wk, wv, wo = (t.data_ptr() for t in self.attention_tensors)
        ffn_norm, gate, bias, w1, w3, w2 = (t.data_ptr() for t in self.routed_tensors)
        q_format, k_format, v_format, o_format = self.attention_formats
        gate_format, w1_format, w3_format, w2_format = self.routed_formats
        num_heads, num_kv_heads, head_dim, scale = self.attention_constants
        top_k, normalize, hidden, num_experts = self.routed_constants
        k_cache, v_cache, cache_format = self.paged_cache_arguments(attention_backend)[:3]
        fields = dict(
            attention_norm=attn_norm, wq=wq, wq_format=q_format, wk=wk, wk_format=k_format, wv=wv,
            wv_format=v_format, wo=wo, wo_format=o_format, k_cache=k_cache, v_cache=v_cache,
            cache_format=cache_format, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, ffn_norm=ffn_norm, gate=gate, gate_format=gate_format,
            bias=bias, top_k=top_k, normalize=normalize, w1=w1, w1_format=w1_format, w3=w3, w3_format=w3_format,
            w2=w2, w2_format=w2_format, counts=self.expert_counts().data_ptr(), hidden=hidden,
            num_experts=num_experts,
        )  # fmt: skip
        scalars = dict(attention_eps=self.attention_norm.eps, ffn_eps=self.ffn_norm.eps, scale=scale)
        return fields, scalars

    def moe_half(self, h_TD: torch.Tensor) -> None:
        num_tokens, dim = h_TD.shape
        top_k, normalize, hidden, num_experts = self.routed_constants
        ffn_norm, gate, bias, w1, w3, w2 = (t.data_ptr() for t in self.routed_tensors)
        gate_format, w1_format, w3_format, w2_format = self.routed_formats
        cpu_kernels.library().moetron_moe_block(
            h_TD.data_ptr(), ffn_norm, self.ffn_norm.eps, gate, gate_format, bias, top_k, normalize, w1,
            w1_format, w3, w3_format, w2, w2_format,
            self.expert_counts().data_ptr(), num_tokens, dim, hidden, num_experts, torch.get_num_threads(),
        )  # fmt: skip

    def expert_counts(self) -> torch.Tensor:
        """Where this step's (token, expert) choices are counted: the layer's tokens_per_expert."""
        moe = self.routed_layer
        return moe.tokens_per_expert if moe.record_stats else self.discarded_counts


def _format_code(module: nn.Module, name: str) -> int:
    return cpu_kernels.FORMAT_CODES[weight_format(module, name)]


class TabledRotaryEmbedding(ServingModule, RotaryEmbedding):
    """RoPE's cos/sin per position from a table the model's own rope fills, grown on demand: a decode
    step indexes two rows instead of recomputing angles, cos, sin and concatenations. The fused
    kernels take them as contiguous fp32 [T, d]."""

    model_class = RotaryEmbedding

    def prepare(self) -> None:
        self.cos_Pd = self.sin_Pd = torch.empty(0)

    def tables(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [P, d] (fp32, contiguous) for positions 0..P-1 at least."""
        if num_positions > self.cos_Pd.shape[0]:
            size = max(num_positions, 2 * self.cos_Pd.shape[0], 256)
            cos_BPd, sin_BPd = super().forward(torch.arange(size)[None], torch.float32)
            self.cos_Pd, self.sin_Pd = cos_BPd[0].contiguous(), sin_BPd[0].contiguous()
        return self.cos_Pd, self.sin_Pd

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions_N = positions_BT.flatten()
        self.tables(int(positions_N.max()) + 1)
        shape = (*positions_BT.shape, -1)
        cos_BTd = self.cos_Pd.index_select(0, positions_N).view(shape)
        sin_BTd = self.sin_Pd.index_select(0, positions_N).view(shape)
        return cos_BTd.to(dtype), sin_BTd.to(dtype)


class WideningEmbedding(ServingModule, Embedding):
    model_class = Embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


class WidenedRMSNorm(ServingModule, RMSNorm):
    model_class = RMSNorm

    def prepare(self) -> None:
        self.weight_fp32 = self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.rms_norm_f32(x, self.weight_fp32, self.eps)


class WidenedLinear(ServingModule, Linear):
    model_class = Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear_f32(x, self.weight)
