"""Offline batch generation: `LLM(model_dir).generate(prompts, params)`, vLLM's interface."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moetron.infer.data_parallel import DataParallelEngine
from moetron.infer.engine import LLMEngine
from moetron.infer.outputs import RequestOutput
from moetron.infer.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | Path | LLMEngine | DataParallelEngine, **engine_overrides: Any) -> None:
        """`model`: a model directory (HF Mixtral or moetron) or GGUF file, or a ready engine.
        `engine_overrides` are EngineConfig fields (data_parallel_size=2 serves on two processes)."""
        if not isinstance(model, str | Path):
            if engine_overrides:
                raise ValueError("engine options go to the LLMEngine when passing one")
            self.engine = model
        else:
            self.engine = LLMEngine.from_pretrained(model, **engine_overrides)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids) together; outputs in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        ids = [self._encode(p) for p in prompts]  # validate all before running any
        request_ids = []
        try:
            for prompt, token_ids, p in zip(prompts, ids, params, strict=True):
                text = prompt if isinstance(prompt, str) else None
                request_ids.append(self.engine.add_request(token_ids, p, prompt=text))
        except Exception:
            for request_id in request_ids:
                self.engine.abort(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        while len(finished) < len(request_ids):
            for output in self.engine.step():
                if output.finished and output.request_id in wanted:
                    finished[output.request_id] = output
        return [finished[r] for r in request_ids]

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("this model directory has no tokenizer: pass token ids instead of text")
            return self.engine.tokenizer.encode(prompt)
        return list(prompt)
