"""The plan for one model: its figures, the best training layouts on a cluster, a serving cluster.

    plan = make_plan(PlanRequest(model="gpt4", gpu="a100-80gb", num_gpus=25_000, tokens=13e12))
    plan.to_json()

Everything about the model comes from model/accounting.py; everything about the hardware from
plan/hardware.py; the models of time and memory live in plan/training.py, plan/memory.py and
plan/inference.py. This file only wires them together and states the assumptions.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetron.config import PRESETS, Config, ConfigError, ModelConfig, get_preset
from moetron.convert.hf import CheckpointError
from moetron.convert.hf_shapes import read_hf_config, shape_config_from_hf, shape_notes
from moetron.model.accounting import (
    attention_flops_per_token,
    forward_flops_per_token,
    param_counts,
    train_flops_per_token,
)
from moetron.plan import inference, search, training
from moetron.plan.hardware import COMM_EFFICIENCY, Accelerator, get_accelerator
from moetron.plan.memory import MOE_IMBALANCE, PRECISIONS, Layout
from moetron.plan.published import PUBLISHED_MODELS, PUBLISHED_RUNS

MAX_DEFAULT_SEQ_LEN = 8192
CHINCHILLA_TOKENS_PER_PARAM = 20
DEFAULT_BATCH_TOKENS = 16 * 2**20  # Llama 3 405B's 16M
MIN_DEFAULT_STEPS = 10_000
DEFAULT_TARGET_DAYS = 90.0


class PlanError(ValueError):
    """Bad input, or constraints no layout satisfies; the message says why and what would work."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    cfg: ModelConfig
    kind: str  # "preset", "published", "toml", "hf"
    notes: tuple[str, ...] = ()


def model_names() -> list[str]:
    return [*PRESETS, *PUBLISHED_MODELS]


def load_model(spec: str) -> ModelSource:
    """A preset or published-model name, a moetron TOML run file, or an HF config.json / directory."""
    if spec in PRESETS:
        return ModelSource(spec, get_preset(spec), "preset")
    if spec in PUBLISHED_MODELS:
        notes = ("published shape; see moetron/plan/published.py for what is approximated",)
        return ModelSource(spec, PUBLISHED_MODELS[spec](), "published", notes)
    path = Path(spec)
    if not path.exists():
        raise PlanError(
            f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}), not a published model "
            f"({', '.join(PUBLISHED_MODELS)}), and no such file (a moetron .toml or an HF config.json)"
        )
    try:
        if path.suffix == ".toml":
            with path.open("rb") as f:
                cfg = Config.from_dict(tomllib.load(f)).model
            return ModelSource(path.name, cfg, "toml")
        hf = read_hf_config(path)
        cfg, notes = shape_config_from_hf(hf), shape_notes(hf)
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path} is not valid TOML: {e}") from None
    except (ConfigError, CheckpointError) as e:
        raise PlanError(str(e)) from None
    notes = ("from a Hugging Face config.json (moetron/convert/hf_shapes.py)", *notes)
    return ModelSource(path.parent.name if path.name == "config.json" else path.name, cfg, "hf", notes)


def default_seq_len(cfg: ModelConfig) -> int:
    """The training context (YaRN models train at original_max_seq_len), capped at 8192."""
    trained = cfg.rope.original_max_seq_len if cfg.rope.scaling == "yarn" else cfg.max_seq_len
    return min(trained or cfg.max_seq_len, MAX_DEFAULT_SEQ_LEN)


@dataclass(frozen=True)
class PlanRequest:
    model: str
    gpu: str = "h100"
    num_gpus: int | None = None  # None: the fewest (power of two) that finish in target_days
    tokens: float | None = None  # None: 20 per active parameter (Chinchilla)
    seq_len: int | None = None
    batch_tokens: float | None = None
    precision: str | None = None  # bf16 on accelerators, fp32 on the CPU
    price_per_gpu_hour: float | None = None
    target_days: float = DEFAULT_TARGET_DAYS
    ep_overlap: float = 0.0
    async_checkpoint: bool = True
    fixed: tuple[tuple[str, object], ...] = ()  # layout fields the search must keep
    inference_gpu: str | None = None  # default: the training GPU
    inference_gpus: int | None = None
    concurrency: int | None = None
    context: int | None = None  # default: min(32K, max_seq_len)
    weight_dtype: str = "bf16"
    keep: int = 5


@dataclass
class Plan:
    request: PlanRequest
    source: ModelSource
    device: Accelerator
    job: training.TrainingJob
    layouts: list[training.LayoutEstimate]
    chose_num_gpus: bool
    inference_device: Accelerator
    inference: inference.InferencePlan
    assumptions: list[str] = field(default_factory=list)

    @property
    def best(self) -> training.LayoutEstimate:
        return self.layouts[0]

    @property
    def cfg(self) -> ModelConfig:
        return self.source.cfg

    def model_figures(self) -> dict[str, float]:
        cfg, seq, tokens = self.cfg, self.job.seq_len, self.job.tokens
        counts = param_counts(cfg)
        train_per_token = train_flops_per_token(cfg, seq)
        attention = 3 * attention_flops_per_token(cfg, seq)
        return {
            "total_params": counts.total,
            "active_params": counts.active,
            "flops_per_token": forward_flops_per_token(cfg, seq),
            "attention_flops_per_token": attention_flops_per_token(cfg, seq),
            "train_flops_per_token": train_per_token,
            "train_flops": train_per_token * tokens,
            # the convention published figures use: 6 · active weights · tokens, no attention
            "train_flops_6nd": (train_per_token - attention) * tokens,
        }

    def engine_layout(self) -> inference.EngineLayout:
        """How `moetron serve` would run on the inference devices (inference.engine_layout)."""
        inf = self.inference
        return inference.engine_layout(
            self.cfg, self.inference_device, inf.num_gpus, inf.context, inf.concurrency, inf.weight_dtype
        )

    def to_json(self) -> dict[str, Any]:
        best, inf = self.best, self.inference
        layout = dataclasses.asdict(best.layout)
        return {
            "model": self.source.name,
            **self.model_figures(),
            "seq_len": self.job.seq_len,
            "tokens": self.job.tokens,
            "gpu": self.device.name,
            "num_gpus": self.job.num_gpus,
            "gpus_used": best.layout.world,
            "precision": self.job.precision.name,
            "batch_tokens": best.batch_sequences * self.job.seq_len,
            "layout": layout,
            "memory_per_gpu_bytes": best.memory.total,
            "memory_breakdown_bytes": best.memory.as_dict(),
            "usable_memory_per_gpu_bytes": self.device.usable_memory_bytes,
            "step_time_s": best.step.total,
            "step_time_breakdown_s": dataclasses.asdict(best.step),
            "steps": best.steps,
            "mfu": best.mfu,
            "hfu": best.hfu,
            "effective_mfu": best.effective_mfu,
            "train_compute_days": best.compute_days,
            "train_days": best.days,
            "train_gpu_hours": best.gpu_hours,
            "train_cost_usd": best.cost_usd,
            "failures": dataclasses.asdict(best.failures),
            "alternatives": [
                {"layout": dataclasses.asdict(e.layout), "mfu": e.mfu, "train_days": e.days}
                for e in self.layouts[1:]
            ],
            "inference": {
                "gpu": self.inference_device.name,
                "gpus": inf.num_gpus,
                "tp": inf.tp,
                "pp": inf.pp,
                "weight_dtype": inf.weight_dtype,
                "weights_bytes": inf.weights_bytes,
                "weights_bytes_by_dtype": inference.weights_by_dtype(self.cfg),
                "kv_bytes_per_token": inf.kv_bytes_per_token,
                "kv_bytes_per_sequence_32k": inference.kv_cache_bytes(self.cfg, 32_768),
                "kv_copies": inf.kv_copies,
                "context": inf.context,
                "concurrency": inf.concurrency,
                "max_concurrency": inf.max_concurrency,
                "memory_per_gpu_bytes": inf.memory_per_gpu_bytes,
                "tokens_per_s": inf.tokens_per_s,
                "tokens_per_s_memory_bound": inf.tokens_per_s_memory_bound,
                "tokens_per_s_compute_bound": inf.tokens_per_s_compute_bound,
                "usd_per_hour": inf.usd_per_hour,
                "monthly_cost_usd": inf.monthly_cost_usd,
                "cost_per_million_tokens_usd": inf.cost_per_million_tokens_usd,
                "moetron_engine": {
                    **dataclasses.asdict(engine := self.engine_layout()),
                    "memory_per_rank_bytes": engine.memory_per_rank_bytes,
                },
            },
            "assumptions": self.assumptions,
        }


def _check_request(request: PlanRequest, cfg: ModelConfig, seq_len: int) -> None:
    if seq_len < 1 or seq_len > cfg.max_seq_len:
        raise PlanError(f"--seq-len {seq_len} must lie in [1, max_seq_len={cfg.max_seq_len}]")
    if request.num_gpus is not None and request.num_gpus < 1:
        raise PlanError(f"--gpus {request.num_gpus} must be >= 1")
    if request.tokens is not None and request.tokens <= 0:
        raise PlanError(f"--tokens {request.tokens} must be > 0")
    if request.precision is not None and request.precision not in PRECISIONS:
        raise PlanError(f"--precision {request.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not 0 <= request.ep_overlap <= 1:
        raise PlanError(f"--ep-overlap {request.ep_overlap} must lie in [0, 1]")
    names = {f.name for f in dataclasses.fields(Layout)}
    for name, value in request.fixed:
        if name not in names:
            raise PlanError(f"cannot fix layout field {name!r}; fixable: {', '.join(sorted(names))}")
        if isinstance(value, int) and value < 1 and name != "zero":
            raise PlanError(f"--{name} {value} must be >= 1")


def _fixed_problems(job: training.TrainingJob) -> list[str]:
    """Why fixed layout values can never be met, whatever the memory."""
    cfg, fixed = job.cfg, dict(job.fixed)
    problems = []
    if "tp" in fixed and fixed["tp"] not in search.tp_candidates(cfg, job.device):
        problems.append(
            f"--tp {fixed['tp']} must divide num_heads={cfg.num_heads} and fit one "
            f"{job.device.name} node ({job.device.scale_up_size} devices): "
            f"{search.tp_candidates(cfg, job.device)}"
        )
    if "ep" in fixed and cfg.moe.num_experts % int(fixed["ep"]):
        problems.append(f"--ep {fixed['ep']} must divide num_experts={cfg.moe.num_experts}")
    if "pp" in fixed and int(fixed["pp"]) > cfg.num_layers:
        problems.append(f"--pp {fixed['pp']} exceeds num_layers={cfg.num_layers}")
    return problems


def _no_fit_message(job: training.TrainingJob) -> str:
    problems = _fixed_problems(job)
    if problems:
        return "no layout satisfies the constraints: " + "; ".join(problems)
    usable = job.device.usable_memory_bytes / 1e9
    lean = search.leanest_layout(job, job.num_gpus)
    message = (
        f"nothing fits on {job.num_gpus} × {job.device.name}: the leanest layout "
        f"({lean.layout.describe()}) needs {lean.memory.total / 1e9:,.1f} GB per GPU "
        f"(weights {lean.memory.weights / 1e9:,.1f}, optimizer {lean.memory.optimizer / 1e9:,.1f}, "
        f"activations {lean.memory.activations / 1e9:,.1f}) but {usable:,.1f} GB are usable"
    )
    if job.fixed:
        message += f" (with {', '.join(f'{k}={v}' for k, v in job.fixed)} fixed)"
    smallest = search.smallest_cluster(job)
    if smallest:
        gpus, estimate = smallest
        message += (
            f"; the smallest cluster that fits is {gpus:,} GPUs ({estimate.layout.describe()}, "
            f"{estimate.memory.total / 1e9:,.1f} GB per GPU, {estimate.days:,.1f} days)"
        )
    return message


def _choose_num_gpus(job: training.TrainingJob, target_days: float) -> tuple[int, list]:
    """Fewest GPUs (a power of two) whose best layout trains within target_days."""
    node = min(job.device.scale_up_size, 8)
    flops = train_flops_per_token(job.cfg, job.seq_len) * job.tokens
    guess = flops / (job.device.peak_bf16_flops * 0.4 * target_days * 86_400)
    gpus = max(node, 2 ** math.ceil(math.log2(max(guess, 1))))

    def in_time(count: int) -> list:
        found = search.search(dataclasses.replace(job, num_gpus=count))
        return found if found and found[0].days <= target_days else []

    found = in_time(gpus)
    if found:  # the guess was generous: halve while it still finishes in time
        while gpus > 1 and (fewer := in_time(gpus // 2)):
            gpus, found = gpus // 2, fewer
        return gpus, found
    for _ in range(12):
        gpus *= 2
        if found := in_time(gpus):
            return gpus, found
    raise PlanError(
        f"no cluster of up to {gpus // 2:,} {job.device.name} trains {job.tokens:.3g} tokens in "
        f"{target_days:g} days; give --gpus or a larger --days"
    )


def make_plan(request: PlanRequest) -> Plan:
    source = load_model(request.model)
    cfg = source.cfg
    try:
        device = get_accelerator(request.gpu, request.price_per_gpu_hour)
        inference_device = get_accelerator(request.inference_gpu or request.gpu, request.price_per_gpu_hour)
    except ValueError as e:
        raise PlanError(str(e)) from None
    seq_len = request.seq_len or default_seq_len(cfg)
    _check_request(request, cfg, seq_len)
    is_cpu = request.gpu.lower() == "cpu"
    precision = PRECISIONS[request.precision or ("fp32" if is_cpu else "bf16")]
    tokens = request.tokens or CHINCHILLA_TOKENS_PER_PARAM * param_counts(cfg).active
    # default: the batch a published run of this model used (gpt4: 60M tokens), else 16M tokens,
    # but at least MIN_DEFAULT_STEPS optimizer steps and one sequence
    published_batch = next(
        (run.batch_tokens for run in PUBLISHED_RUNS if run.model == source.name and run.batch_tokens), None
    )
    batch_tokens = request.batch_tokens or (
        8 * seq_len
        if is_cpu
        else max(seq_len, min(published_batch or DEFAULT_BATCH_TOKENS, tokens / MIN_DEFAULT_STEPS))
    )
    job = training.TrainingJob(
        cfg=cfg,
        device=device,
        num_gpus=request.num_gpus or (1 if is_cpu else 8),
        tokens=tokens,
        seq_len=seq_len,
        batch_tokens=batch_tokens,
        precision=precision,
        ep_overlap=request.ep_overlap,
        fused_optimizer=not is_cpu,
        reliability=training.Reliability(async_checkpoint=request.async_checkpoint),
        fixed=request.fixed,
    )
    problems = _fixed_problems(job)
    if problems:
        raise PlanError("no layout satisfies the constraints: " + "; ".join(problems))
    chose = request.num_gpus is None and not is_cpu
    if chose:
        num_gpus, layouts = _choose_num_gpus(job, request.target_days)
        job = dataclasses.replace(job, num_gpus=num_gpus)
    else:
        layouts = search.search(job, keep=request.keep)
    if not layouts:
        raise PlanError(_no_fit_message(job))

    context = request.context or min(32_768, cfg.max_seq_len)
    try:
        serving = inference.plan_inference(
            cfg,
            inference_device,
            context,
            num_gpus=request.inference_gpus,
            concurrency=request.concurrency,
            weight_dtype=request.weight_dtype,
        )
    except inference.InferencePlanError as e:
        raise PlanError(f"inference: {e}") from None
    plan = Plan(request, source, device, job, layouts, chose, inference_device, serving)
    plan.assumptions = assumptions(plan)
    return plan


def assumptions(plan: Plan) -> list[str]:
    """Every assumption behind the numbers, in words (printed with the plan and in --json)."""
    dev, job, rel = plan.device, plan.job, plan.job.reliability
    prec = job.precision
    price = dev.price
    lines = [
        f"FLOPs: model/accounting.py — 2 per active weight per token forward (output head included, "
        f"embedding lookup free) plus causal attention at seq_len {job.seq_len}; training = 3× forward. "
        "Published totals use 6·N·D without attention (train_flops_6nd).",
        f"{dev.name}: peak bf16 {dev.peak_bf16_flops / 1e12:,.0f} TFLOP/s, large GEMMs reach "
        f"{dev.matmul_efficiency:.0%} of it; HBM {dev.hbm_bytes_per_s / 1e9:,.0f} GB/s; scale-up "
        f"{dev.scale_up_bytes_per_s / 1e9:,.0f} GB/s per direction within {dev.scale_up_size} devices; "
        f"network {dev.network_bytes_per_s / 1e9:,.1f} GB/s per device. {dev.notes}",
        f"Collectives reach {COMM_EFFICIENCY:.0%} of link bandwidth; TP uses sequence parallelism and "
        "is not overlapped; DP sync is hierarchical and overlaps one microbatch; "
        f"EP all-to-all {job.ep_overlap:.0%} overlapped; the busiest expert rank carries "
        f"{MOE_IMBALANCE - 1:.0%} more than the mean.",
        f"Memory: {prec.weight_bytes} B weights + {prec.grad_bytes} B gradients + "
        f"{prec.optimizer_bytes} B optimizer state per parameter ({prec.name}), sharded by ZeRO stage; "
        "activations per Korthikanti et al. 2022 for moetron's block; "
        f"usable = 95% of {dev.memory_bytes / 1e9:,.0f} GB minus 2 GiB.",
        f"Pipeline: 1F1B (interleaved with v chunks), bubble (p-1)/(v·m); global batch "
        f"{job.batch_tokens / 1e6:,.2f}M tokens, rounded up by at most "
        f"{training.MAX_BATCH_ROUNDING - 1:.0%} to fit dp · microbatches.",
        f"Failures: {rel.gpu_mtbf_hours:,.0f} h MTBF per GPU (Llama 3), {rel.restart_minutes:g} min to "
        f"restart, {'asynchronous' if rel.async_checkpoint else 'blocking'} checkpoints of weights + "
        "optimizer state at the Young/Daly interval; storage writes "
        f"{rel.storage_bytes_per_s_per_gpu / 1e9:g} GB/s per GPU up to "
        f"{rel.storage_bytes_per_s_max / 1e12:g} TB/s.",
        f"Tokens: {job.tokens:.3g}"
        + (" (default: 20 per active parameter)" if plan.request.tokens is None else "")
        + "; idle GPUs (when tp·pp does not divide the count) are paid for.",
        f"Price: ${price.usd_per_gpu_hour:,.2f} per GPU-hour — {price.instance}; {price.source}."
        if price
        else "Price: none known for this device.",
        f"Inference: TP within a node, PP across nodes; every sequence at {plan.inference.context:,} "
        f"tokens; bf16 KV cache; decode streams weights and KV at {inference.HBM_EFFICIENCY:.0%} of HBM "
        f"bandwidth; a month is {inference.HOURS_PER_MONTH:g} h; prefill not modelled.",
    ]
    if prec.matmul_fp8:
        lines.append(
            f"fp8: weight GEMMs {training.FP8_GEMM_SPEEDUP}× the bf16 rate; MFU is against the bf16 peak."
        )
    lines += list(plan.source.notes)
    if plan.cfg.num_kv_heads < plan.inference.tp:
        lines.append(
            f"KV cache: {plan.cfg.num_kv_heads} KV head(s) under {plan.inference.tp}-way TP is stored "
            f"{plan.inference.kv_copies}× (each GPU keeps its own copy)."
        )
    return lines
