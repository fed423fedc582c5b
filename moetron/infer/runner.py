"""The model runner: owns the KV cache tensors, installs the serving kernels into the model, and
runs one packed forward per engine step.

All tokens of a step (prefill chunks and decodes of every sequence) go through the model as one
[1, T] row, so each MoE layer routes and runs its experts once per step: batching is what makes
sparse experts cheap to serve. The forward is the model's own (`Transformer.hidden_states` with
the paged-attention backend, then `Transformer.logits` on the rows the step needs); what makes it
a serving forward is the kernels installed from outside (serving_kernels.py, fused_layers.py).

Legend: T packed tokens of the step, R rows whose logits are wanted, D width, V vocabulary,
N KV blocks, S block size, G kv heads, d head_dim.
"""

from __future__ import annotations

import torch

from moetron.config import EngineConfig, ModelConfig
from moetron.infer import fused_layers, serving_kernels
from moetron.infer.adapters import AdapterSet, adapter_kernels
from moetron.infer.expert_parallel import ExpertExchange, sharded_kernels
from moetron.infer.head_parallel import HeadParallel
from moetron.infer.paged_attention import PagedAttention, SeqSlice
from moetron.infer.scheduler import ScheduledBatch
from moetron.model.accounting import kv_bytes_per_token
from moetron.model.transformer import Transformer


def available_memory_bytes(device: torch.device) -> int:
    """Free memory where the cache will live: the GPU's, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil  # optional; /proc/meminfo says the same on Linux

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the free host memory; set num_kv_blocks or kv_cache_memory_bytes")


def num_kv_blocks(model_cfg: ModelConfig, cfg: EngineConfig, dtype: torch.dtype, max_model_len: int) -> int:
    """Blocks in the pool: given, or a memory budget divided by one block's bytes (the KV-bytes formula
    lives in model/accounting.py), capped at what max_num_seqs full-length sequences could use."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    block_bytes = kv_bytes_per_token(model_cfg, dtype.itemsize) * cfg.block_size
    budget = cfg.kv_cache_memory_bytes
    if budget is None:
        budget = int(available_memory_bytes(torch.device(cfg.device)) * cfg.kv_cache_memory_fraction)
    blocks_per_seq = -(-max_model_len // cfg.block_size)
    num_blocks = min(budget // block_bytes, cfg.max_num_seqs * blocks_per_seq)
    if num_blocks < blocks_per_seq:
        raise ValueError(
            f"the KV cache budget ({budget / 2**20:.1f} MiB) holds {num_blocks} blocks of {cfg.block_size} "
            f"tokens; one {max_model_len}-token sequence needs {blocks_per_seq}: raise "
            "kv_cache_memory_fraction / kv_cache_memory_bytes or lower max_model_len"
        )
    return num_blocks


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cfg: EngineConfig,
        num_blocks: int,
        dtype: torch.dtype | None = None,
        kv_dtype: torch.dtype | None = None,
        exchange: ExpertExchange | None = None,
        heads: HeadParallel | None = None,
        adapters: AdapterSet | None = None,
    ) -> None:
        """`dtype`: activations, default the parameters'. float32 with a bf16 model runs the fused
        path on the bf16 weights (serving_dtype() in engine.py decides). `kv_dtype`: the KV cache's,
        default `dtype` (bf16 under float32 activations: half the cache bytes, engine.kv_cache_dtype).
        `exchange`: this rank's expert-parallel collectives when `model` holds a shard of its
        experts (expert_parallel.py); every step then takes part in them, `idle()` included.
        `heads`: its tensor-parallel group when `model` holds a shard of its attention heads
        (head_parallel.py; the cache then holds only those heads). `adapters`: LoRA adapters served
        per request (adapters.py): the module path then runs, with their classes installed."""
        self.model = model
        self.block_size = cfg.block_size
        self.invariant = cfg.batch_invariant
        param = next(model.parameters())
        self.device, self.dtype = param.device, dtype or param.dtype
        self.kv_dtype = kv_dtype or self.dtype
        mc = model.cfg
        num_kv_heads = model.layers[0].attention.num_kv_heads  # this rank's, under tensor parallelism
        shape = (num_blocks, cfg.block_size, num_kv_heads, mc.head_dim)
        # Zeros, not empty: padded attention reads (masked) slots never written, and 0 * NaN is NaN.
        self.k_caches = [
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(mc.num_layers)
        ]
        self.v_caches = [
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(mc.num_layers)
        ]
        self.adapters = adapters
        self.fused = (
            cfg.fused_layers
            and adapters is None
            and self.dtype == torch.float32
            and fused_layers.supports(model)
        )
        if self.dtype != param.dtype and not self.fused:
            raise ValueError(f"{self.dtype} activations over {param.dtype} weights need the fused path")
        kernels = serving_kernels.INVARIANT if self.invariant else serving_kernels.FAST
        self.exchange = exchange
        if exchange is not None or heads is not None:
            if not self.fused:
                raise ValueError(
                    "expert- and tensor-parallel serving run the fused CPU path: float32 activations (fp32, "
                    "bf16 or quantized weights), MoE layers without shared experts, moetron's CPU kernels, "
                    "engine.fused_layers=true"
                )
            self.kernels = sharded_kernels(model, kernels, exchange, heads)
        elif adapters is not None:
            self.kernels = adapter_kernels(serving_kernels.INVARIANT, adapters)
        else:
            self.kernels = fused_layers.fused_kernels(model, kernels) if self.fused else kernels
        serving_kernels.install(model, self.kernels)

    def idle(self) -> None:
        """A step with nothing scheduled here: an expert-parallel rank still serves its experts to
        the ranks that run one (a one-process engine has nothing to do)."""
        if self.exchange is not None:
            self.exchange.idle(self.model)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Compute the step's tokens into the cache; returns float32 logits [R, V] of the packed rows
        `batch.logits_rows` (the last row of each sequence that samples, all rows of a verification
        or of a prompt chunk whose logprobs are wanted)."""
        if serving_kernels.installed(self.model) is not self.kernels:  # another engine served it since
            serving_kernels.install(self.model, self.kernels)
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[SeqSlice] = []
        size = self.block_size
        for item in batch.scheduled:
            seq, first, num_new = item.seq, item.first_position, item.num_new_tokens
            seqs.append(
                SeqSlice(
                    start=item.first_row,
                    num_new=num_new,
                    context_len=first + num_new,
                    block_ids=seq.block_table,
                    device=self.device,
                )
            )
            token_ids.extend(seq.scheduled_token_ids(first, num_new))  # + draft tokens
            positions.extend(range(first, first + num_new))
            slots.extend(seq.block_table[p // size] * size + p % size for p in range(first, first + num_new))
        if self.exchange is not None:
            self.exchange.begin_step(len(token_ids))
        if self.adapters is not None:  # each packed row's adapter (0: the base)
            self.adapters.step.set_step(
                [item.seq.request.adapter for item in batch.scheduled for _ in range(item.num_new_tokens)]
            )
        ids_BT = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        positions_BT = torch.tensor([positions], dtype=torch.long, device=self.device)
        slots_T = torch.tensor(slots, dtype=torch.long, device=self.device)
        attention = PagedAttention(
            self.k_caches,
            self.v_caches,
            slots_T,
            seqs,
            self.invariant,
            every_row_to_kernel=self.fused,
            float32_queries=self.dtype == torch.float32,
        )
        h_TD = self.model.hidden_states(ids_BT, positions_BT, attention)[0]
        rows = batch.logits_rows
        if len(rows) == 1 == h_TD.shape[0]:  # a single decode: no gather copy
            return self.model.logits(h_TD)
        return self.model.logits(
            h_TD.index_select(0, torch.tensor(rows, dtype=torch.long, device=self.device))
        )
