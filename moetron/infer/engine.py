"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

    batch = scheduler.schedule()              # which tokens of which sequences run now
    logits = runner.run(batch, rows)          # one packed forward through the paged KV cache
    finished_prefill = scheduler.update(batch)
    tokens = sampler(logits, states)          # batch-invariant, per-sequence generators
    -> append, detokenize, check stops, free finished sequences

With speculative decoding on (EngineConfig.speculative_method), decode sequences first get draft
tokens, run 1 + k rows in the same forward, and keep the verified ones (spec_decode.py).

The HTTP server drives this same object (moetron/serve); `LLM` (llm.py) is the offline loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch

from moetron.infer.block_manager import BlockManager
from moetron.infer.config import EngineConfig
from moetron.infer.detokenizer import IncrementalDetokenizer, StopChecker
from moetron.infer.fused_layers import FusedLayers
from moetron.infer.outputs import EngineStats, PositionLogprobs, RequestMetrics, RequestOutput
from moetron.infer.runner import ModelRunner, num_kv_blocks
from moetron.infer.sampling import Sampler, SamplingState, check_token_ids, make_generator, position_logprobs
from moetron.infer.sampling_params import SamplingParams
from moetron.infer.scheduler import Scheduler
from moetron.infer.sequence import Request, Sequence, SequenceStatus
from moetron.infer.spec_decode import SpecDecoder
from moetron.model import ops
from moetron.model.transformer import Transformer

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
        and not ops.cpu_has_native_half_matmul()
    )


def serving_dtype(model: Transformer, requested: torch.dtype | None) -> torch.dtype:
    """The dtype of the engine's activations and KV cache for `requested` (None: the model's).
    A bf16 model served in float32 keeps its bf16 weights when the fused path runs it (half the
    memory and bytes per token, the same numbers); any other mismatch converts the model in place."""
    weights = next(model.parameters()).dtype
    if requested is None or requested == weights:
        return weights
    if requested == torch.float32 and weights == torch.bfloat16 and FusedLayers.supports(model):
        return torch.float32
    model.to(requested)
    return requested


class LLMEngine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        model_name: str | None = None,
        draft_model: Transformer | None = None,
    ) -> None:
        cfg = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model, "name_or_path", None) or "moetron"
        limit = model.cfg.max_seq_len
        if cfg.max_model_len is not None and cfg.max_model_len > limit:
            raise ValueError(f"max_model_len={cfg.max_model_len} exceeds the model's max_seq_len={limit}")
        self.max_model_len = cfg.max_model_len or limit
        if not cfg.enable_chunked_prefill and cfg.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={cfg.max_num_batched_tokens} must be >= max_model_len="
                f"{self.max_model_len} without chunked prefill (a whole prompt must fit in one step)"
            )
        self.config = cfg
        self.vocab_size = model.cfg.vocab_size
        dtype = serving_dtype(model, cfg.torch_dtype)
        blocks = num_kv_blocks(model.cfg, cfg, dtype, self.max_model_len)
        self.block_manager = BlockManager(blocks, cfg.block_size)
        self.scheduler = Scheduler(cfg, self.block_manager)
        self.runner = ModelRunner(model, cfg, blocks, dtype)
        self.eos_token_id = getattr(tokenizer, "eos_id", None)
        self.sampler = Sampler(self.eos_token_id)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.spec: SpecDecoder | None = None
        if cfg.speculative_method is not None:
            if cfg.speculative_method == "draft" and draft_model is None:
                if cfg.draft_model_dir is None:
                    raise ValueError("speculative_method='draft' needs draft_model_dir")
                from moetron.convert.hf import from_pretrained

                draft_model = from_pretrained(cfg.draft_model_dir, device=cfg.device, dtype=dtype)
            self.spec = SpecDecoder(cfg, model, self.sampler, draft_model)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides: Any) -> LLMEngine:
        """An HF Mixtral (or moetron) directory; `overrides` are EngineConfig fields."""
        from moetron.convert.hf import from_pretrained
        from moetron.data.errors import DataError
        from moetron.data.tokenizer import load_tokenizer
        from moetron.kernels.huge_pages import move_to_huge_pages

        cfg = EngineConfig.from_overrides(**overrides)
        # Served in float32, a bf16 checkpoint may keep its bf16 weights (serving_dtype): load as is.
        model = from_pretrained(
            model_dir, device=cfg.device, dtype=None if cfg.dtype in (None, "float32") else cfg.torch_dtype
        )
        loaded = next(model.parameters()).dtype
        auto_half = cfg.dtype is None and plain_cpu_half(model)
        if auto_half:
            cfg = dataclasses.replace(cfg, dtype="float32")
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
        return cls(model, tokenizer, cfg, model_name=Path(model_dir).name)

    # --- requests ---

    def add_request(
        self,
        prompt_token_ids: Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        ids = list(prompt_token_ids)
        self._check_prompt(ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        request = Request(request_id, prompt, ids, params, RequestMetrics(arrival_time=time.monotonic()))
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        for index in range(params.n):
            seq = Sequence(request, index)
            seq.sampling_state = SamplingState(
                params, ids, seq.output_token_ids, make_generator(params.seed, index), self.eos_token_id
            )
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            seq.stop_checker = StopChecker(params, self.eos_token_id)
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
            return []
        now = time.monotonic()
        rows: list[int] = []  # packed rows whose logits we need
        sample_rows: list[int] = []  # indices into `rows`, one per sequence that samples
        prompt_rows: list[tuple[Sequence, int, int]] = []  # (seq, first index into rows, count)
        spec_rows: list[tuple[Sequence, int]] = []  # (seq with draft tokens, first index into rows)
        start = 0
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
            samples = seq.num_computed_tokens + num_new == seq.num_tokens
            if seq.spec_token_ids:  # 1 + k rows: the last real token and each draft token
                spec_rows.append((seq, len(rows)))
                rows.extend(range(start, start + num_new))
            elif seq.index == 0 and seq.request.prompt_logprobs is not None and not seq.output_token_ids:
                prompt_rows.append((seq, len(rows), num_new))
                rows.extend(range(start, start + num_new))
                if samples:
                    sample_rows.append(len(rows) - 1)
            elif samples:
                sample_rows.append(len(rows))
                rows.append(start + num_new - 1)
            start += num_new
        logits_RV = self.runner.run(batch, rows)
        for seq, first_row, num_new in prompt_rows:
            self._add_prompt_logprobs(seq, logits_RV[first_row : first_row + num_new])
        done = self.scheduler.update(batch)
        progressed: dict[str, Request] = {}
        done = [s for s in done if not s.spec_token_ids]
        if done:
            every_row = sample_rows == list(range(logits_RV.shape[0]))  # decodes only: no gather copy
            sample_logits_SV = logits_RV if every_row else logits_RV[sample_rows]
            sampled = self.sampler(sample_logits_SV, [s.sampling_state for s in done])
            for seq, token_id, logprobs in zip(done, sampled.token_ids, sampled.logprobs, strict=True):
                self._append_token(seq, token_id, logprobs)
                progressed[seq.request.request_id] = seq.request
        for seq, first_row in spec_rows:
            num_rows = 1 + len(seq.spec_token_ids)
            tokens, logprobs = self.spec.verify(seq, logits_RV[first_row : first_row + num_rows])
            for token_id, token_logprobs in zip(tokens, logprobs, strict=True):
                self._append_token(seq, token_id, token_logprobs)  # stops mid-run drop the rest
                if seq.is_finished:
                    break
            self.spec.rollback(seq, self.block_manager)
            progressed[seq.request.request_id] = seq.request
        outputs = []
        for request in progressed.values():
            outputs.append(request.output())
            if request.finished:
                request.metrics.finished_time = time.monotonic()
                self.requests.pop(request.request_id, None)
        return outputs

    def _add_prompt_logprobs(self, seq: Sequence, logits_nV: torch.Tensor) -> None:
        """Row i of this chunk (position p) scores prompt token p + 1."""
        first = seq.num_computed_tokens
        if first == 0:  # a recompute after preemption starts the list over
            seq.request.prompt_logprobs = [None]
        logprobs_nV = torch.log_softmax(logits_nV, dim=-1)
        num_top = seq.request.params.prompt_logprobs
        for i in range(logits_nV.shape[0]):
            if first + i + 1 < seq.num_prompt_tokens:
                token = seq.token_ids[first + i + 1]
                seq.request.prompt_logprobs.append(position_logprobs(logprobs_nV[i], token, num_top))

    def _append_token(self, seq: Sequence, token_id: int, logprobs: PositionLogprobs | None) -> None:
        request, now = seq.request, time.monotonic()
        first = not seq.output_token_ids
        seq.append_token(token_id)
        self.generation_tokens_total += 1
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
            request.metrics.num_cached_prompt_tokens = seq.num_cached_tokens
        request.metrics.last_token_time = now
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token_id].logprob
        if seq.detokenizer is not None:
            seq.detokenizer.add(token_id)
            seq.text = seq.detokenizer.text
        finish_reason, stop_reason, text = seq.stop_checker.check(seq.output_token_ids, seq.text)
        if finish_reason is None and seq.num_tokens >= self.max_model_len:
            finish_reason = "length"
        if finish_reason is not None:
            if seq.detokenizer is not None and not isinstance(stop_reason, str):
                seq.detokenizer.flush()  # bytes held back for a character that will never complete
                text = seq.detokenizer.text
            seq.text, seq.finish_reason, seq.stop_reason = text, finish_reason, stop_reason
            self.scheduler.finish(seq)
        if first and seq.index == 0:  # the prompt is in the cache: siblings can share its blocks
            for sibling in reversed(request.seqs[1:]):
                self.scheduler.add(sibling, front=True)

    # --- introspection ---

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_preempted_total=self.scheduler.num_preempted_total,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_cached_free=bm.num_cached_free_blocks,
            prefix_cache_hit_tokens_total=self.scheduler.prefix_hit_tokens_total,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            tokens_per_expert=[layer.tokens_per_expert.tolist() for layer in self.model.moe_layers()],
            spec_proposed_tokens_total=self.spec.num_proposed_total if self.spec else 0,
            spec_accepted_tokens_total=self.spec.num_accepted_total if self.spec else 0,
        )

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.runner.k_caches + self.runner.v_caches)
