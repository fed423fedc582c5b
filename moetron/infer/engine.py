"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time (see `step`).

    scheduler (scheduler.py)       which tokens of which sequences run now, and their logits rows
    runner (runner.py)             one packed forward through the paged KV cache
    output processor               sampling, logprobs, draft verification, text, stops
      (output_processor.py)

With speculative decoding on (EngineConfig.speculative_method), decode sequences first get draft
tokens, run 1 + k rows in the same forward, and keep the verified ones (spec_decode.py).

The HTTP server drives this same object (moetron/serve); `LLM` (llm.py) is the offline loop.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch

from moetron import hardware
from moetron.config import EngineConfig
from moetron.infer import fused_layers
from moetron.infer.adapters import load_adapters
from moetron.infer.block_manager import BlockManager
from moetron.infer.detokenizer import IncrementalDetokenizer, StopChecker
from moetron.infer.expert_parallel import ExpertExchange
from moetron.infer.head_parallel import HeadParallel, shard_attention
from moetron.infer.output_processor import OutputProcessor
from moetron.infer.outputs import EngineStats, RequestMetrics, RequestOutput
from moetron.infer.runner import ModelRunner, num_kv_blocks
from moetron.infer.sampling import Sampler, SamplingState, check_token_ids, make_generator
from moetron.infer.sampling_params import SamplingParams
from moetron.infer.scheduler import Scheduler
from moetron.infer.sequence import Request, Sequence, SequenceStatus
from moetron.infer.spec_decode import SpecDecoder
from moetron.infer.structured_output import GrammarCompiler
from moetron.model.transformer import Transformer
from moetron.quant.quantize import quantize_model, quantized_format

log = logging.getLogger("moetron.infer")


def plain_cpu_half(model: Transformer) -> bool:
    """Whether `model` is bf16/fp16 on a CPU without half-precision matmul instructions (no AMX or
    AVX512-BF16). PyTorch emulates half matmuls there; served in float32 (the default for such a
    checkpoint, see EngineConfig.dtype) through the kernels and the fused path, a bf16 checkpoint
    decodes 13x faster (95 vs 7.1 tokens/s at batch 1 on benchmarks/decode.py's model), and
    exactly: bf16 and fp16 values widen to fp32 without rounding."""
    param = next(model.parameters())
    return (
        param.device.type == "cpu"
        and param.dtype in (torch.bfloat16, torch.float16)
        and not hardware.native_bf16_matmul("cpu")
    )


def serving_dtype(model: Transformer, requested: torch.dtype | None) -> torch.dtype:
    """The dtype of the engine's activations and KV cache for `requested` (None: the model's).
    A bf16 model served in float32 keeps its bf16 weights when the fused path runs it (half the
    memory and bytes per token, the same numbers); any other mismatch converts the model in place."""
    weights = next(model.parameters()).dtype
    if requested is None or requested == weights:
        return weights
    if requested == torch.float32 and weights == torch.bfloat16 and fused_layers.supports(model):
        return torch.float32
    model.to(requested)
    return requested


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights `model` holds: parameters and buffers (quantized blocks are buffers),
    each storage once (a tied head is the embedding)."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class LLMEngine:
    """The engine takes over `model`: it is put in eval mode, converted when a dtype asks for it, and
    its runner installs the serving kernels into it by swapping module classes (serving_kernels.py).
    Called directly afterwards, the model computes with those kernels (batch-invariant, within 1e-5
    of training's); `serving_kernels.restore(model)` gives it training's numerics back."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        model_name: str | None = None,
        draft_model: Transformer | None = None,
        exchange: ExpertExchange | None = None,
        heads: HeadParallel | None = None,
    ) -> None:
        cfg = config or EngineConfig()
        self.config = cfg
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model, "name_or_path", None) or "moetron"
        self.max_model_len = cfg.resolve_max_model_len(model.cfg)
        self.vocab_size = model.cfg.vocab_size
        if cfg.quantization is not None and quantized_format(model) != cfg.quantization:
            quantize_model(model, cfg.quantization)  # float32 afterwards
        dtype = serving_dtype(model, cfg.torch_dtype)
        kv_dtype = cfg.torch_kv_dtype(dtype)
        blocks = num_kv_blocks(model.cfg, cfg, kv_dtype, self.max_model_len)
        self.block_manager = BlockManager(blocks, cfg.block_size)
        self.scheduler = Scheduler(cfg, self.block_manager)
        # LoRA adapters per request (infer/adapters.py); read before the runner installs its kernels.
        self.adapters = load_adapters(model, cfg.lora_modules, cfg.max_loras) if cfg.lora_modules else None
        self.lora_names = self.adapters.names if self.adapters else []
        self.runner = ModelRunner(model, cfg, blocks, dtype, kv_dtype, exchange, heads, self.adapters)
        self.num_forward_steps_total = 0
        self.weight_bytes = model_weight_bytes(model)
        self.eos_token_id = getattr(tokenizer, "eos_id", None)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        sampler = Sampler(self.eos_token_id)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size)
        self.spec: SpecDecoder | None = None
        if cfg.speculative_method is not None:
            if cfg.speculative_method == "draft" and draft_model is None:
                if cfg.draft_model_dir is None:
                    raise ValueError("speculative_method='draft' needs draft_model_dir")
                from moetron.convert.hf import from_pretrained

                draft_model = from_pretrained(cfg.draft_model_dir, device=cfg.device, dtype=dtype)
            self.spec = SpecDecoder(cfg, model, sampler, draft_model)
        self.output_processor = OutputProcessor(
            self.scheduler, sampler, self.requests, self.max_model_len, self.spec
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides: Any) -> LLMEngine:
        """An HF Mixtral (or moetron) directory, or a GGUF file; `overrides` are EngineConfig fields.
        With data_parallel_size > 1 this starts (or, under torchrun, joins) the serving ranks and
        returns rank 0's DataParallelEngine, which has this class's interface (infer/data_parallel.py)."""
        cfg = EngineConfig.from_overrides(**overrides)
        if cfg.data_parallel_size > 1 or cfg.tensor_parallel_size > 1:
            from moetron.infer.data_parallel import launch

            return launch(model_dir, cfg, cls.load)  # type: ignore[return-value]
        return cls.load(model_dir, cfg)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        cfg: EngineConfig,
        experts: range | None = None,
        exchange: ExpertExchange | None = None,
        heads: HeadParallel | None = None,
    ) -> LLMEngine:
        """One process's engine; an expert-parallel rank's with `experts` (the shard it loads) and
        `exchange` (its collectives); a tensor-parallel rank's with `heads` (head_parallel.py)."""
        from moetron.convert.hf import from_pretrained
        from moetron.data.errors import DataError
        from moetron.data.tokenizer import load_tokenizer
        from moetron.infer.huge_pages import move_to_huge_pages

        if Path(model_dir).suffix == ".gguf":
            return cls._from_gguf(Path(model_dir), cfg)
        # Served in float32, a bf16 checkpoint may keep its bf16 weights (serving_dtype): load as is.
        model = from_pretrained(
            model_dir,
            device=cfg.device,
            dtype=None if cfg.dtype in (None, "float32") else cfg.torch_dtype,
            experts=experts,
        )
        if heads is not None:
            shard_attention(model, heads)
        if cfg.quantization is not None:  # before the weights move to huge pages
            quantize_model(model, cfg.quantization)
        loaded = next(model.parameters()).dtype
        auto_half = cfg.dtype is None and plain_cpu_half(model)
        if auto_half:
            cfg = cfg.replace(dtype="float32")
        serving_dtype(model, cfg.torch_dtype)  # any conversion before the weights move to huge pages
        if auto_half:
            kept = next(model.parameters()).dtype != torch.float32
            how = "weights kept, widened in the kernels" if kept else "weights converted"
            half = str(loaded).removeprefix("torch.")
            log.info("serving the %s checkpoint in float32 (%s): this CPU has no %s matmul", half, how, half)
        move_to_huge_pages(model)  # the engine owns these weights: stream them with fewer TLB misses
        try:
            tokenizer = load_tokenizer(model_dir)
        except DataError:
            tokenizer = None  # token-id prompts still work; outputs then carry no text
        return cls(model, tokenizer, cfg, model_name=Path(model_dir).name, exchange=exchange, heads=heads)

    @classmethod
    def _from_gguf(cls, path: Path, cfg: EngineConfig) -> LLMEngine:
        """A GGUF file (convert/gguf_file.py): quantized tensors served as they are, float ones in
        float32 (quantized at load if cfg.quantization asks)."""
        from moetron.convert.gguf_file import load_gguf
        from moetron.infer.huge_pages import move_to_huge_pages

        if cfg.device != "cpu" or cfg.dtype not in (None, "float32"):
            raise ValueError(f"{path}: GGUF files are served on the CPU in float32 activations")
        model, tokenizer = load_gguf(path)
        stored = quantized_format(model)
        if stored is not None and cfg.quantization not in (None, stored):
            raise ValueError(
                f"{path} holds {stored} weights already; quantization={cfg.quantization} would re-quantize them"
            )
        if stored is None and cfg.quantization is not None:
            quantize_model(model, cfg.quantization)
        move_to_huge_pages(model)
        return cls(model, tokenizer, cfg, model_name=path.stem)

    # --- requests ---

    def add_request(
        self,
        prompt_token_ids: Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt: str | None = None,
        lora: str | None = None,
    ) -> str:
        """`lora`: the name of a served adapter (EngineConfig.lora_modules) to run it with."""
        params = params or SamplingParams()
        ids = list(prompt_token_ids)
        self._check_prompt(ids, params)
        if lora is not None and self.adapters is None:
            raise ValueError(f"LoRA adapter {lora!r} requested, but this engine serves none")
        adapter = self.adapters.index(lora) if self.adapters else 0
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        request = Request(
            request_id, prompt, ids, params, RequestMetrics(arrival_time=time.monotonic()), adapter=adapter
        )
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        for index in range(params.n):
            seq = Sequence(
                request,
                index,
                SamplingState(
                    params,
                    ids,
                    [],
                    make_generator(params.seed, index),
                    self.eos_token_id,
                    self.grammars.state(params.structured_outputs) if params.structured_outputs else None,
                ),
                StopChecker(params, self.eos_token_id),
                None
                if self.tokenizer is None
                else IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
            )
            request.seqs.append(seq)
            if index > 0:
                seq.status = SequenceStatus.PENDING  # joins when sequence 0 has prefilled
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])
        self.prompt_tokens_total += len(ids)
        return request_id

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        check_token_ids(params, self.vocab_size)
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)  # a bad grammar fails here, not mid-step
        wanted = len(ids) + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens or 1}) = {wanted} tokens "
                f"exceeds max_model_len={self.max_model_len}"
            )
        blocks = self.block_manager.blocks_for(
            len(ids) + (params.max_tokens or self.max_model_len - len(ids))
        )
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens needs {blocks} KV blocks; the pool has only "
                f"{self.block_manager.num_blocks}: raise the KV cache size or lower max_tokens"
            )

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (finish_reason "abort"
        for the sequences still running), or None for an unknown or already finished request."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        request.metrics.finished_time = time.monotonic()
        return request.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step ---

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns the outputs of the requests that got new tokens or finished
        (cumulative text and token ids)."""
        if self.spec is not None:
            self.spec.propose(self.scheduler.running, self.max_model_len)
        batch = self.scheduler.schedule()
        if not batch:
            self.runner.idle()
            return []
        logits_RV = self.runner.run(batch)
        self.num_forward_steps_total += 1
        self.scheduler.update(batch)
        return self.output_processor.process(batch, logits_RV)

    # --- introspection ---

    def get_stats(self) -> EngineStats:
        bm, exchange = self.block_manager, self.runner.exchange
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_preempted_total=self.scheduler.num_preempted_total,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_cached_free=bm.num_cached_free_blocks,
            prefix_cache_hit_tokens_total=self.scheduler.prefix_hit_tokens_total,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.output_processor.generation_tokens_total,
            tokens_per_expert=[layer.tokens_per_expert.tolist() for layer in self.model.moe_layers()],
            spec_proposed_tokens_total=self.spec.num_proposed_total if self.spec else 0,
            spec_accepted_tokens_total=self.spec.num_accepted_total if self.spec else 0,
            weight_bytes=self.weight_bytes,
            # Expert parallelism: the steps any rank ran a forward in (this one took part in all).
            num_forward_steps_total=exchange.num_steps if exchange else self.num_forward_steps_total,
            exchange_seconds_total=exchange.exchange_seconds_total if exchange else 0.0,
        )

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.runner.k_caches + self.runner.v_caches)
