"""LoRA adapters in PEFT's format for `MixtralForCausalLM` (transformers ≥ 5 module names), both ways:
`adapter_config.json` + `adapter_model.safetensors`, keys and shapes as peft 0.21 writes them, so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)` loads what
moetron saves and moetron loads what peft saves.

    moetron module                      peft key (under base_model.model.)          peft shapes
    layers.i.attention.wq / wk / wv / wo model.layers.i.self_attn.{q,k,v,o}_proj     A [r, in], B [out, r]
    layers.i.ffn.router.gate            model.layers.i.mlp.gate (parameter weight)  A [r, D], B [E, r]
    layers.i.ffn.experts (w1 / w3)      model.layers.i.mlp.experts.base_layer       A [r·E, D], B [2I, r·E]
                                          (parameter gate_up_proj)
    layers.i.ffn.experts (w2)           model.layers.i.mlp.experts (down_proj)      A [r·E, I], B [D, r·E]

peft wraps the expert module once per target parameter, in `target_parameters` order, so the first
(gate_up_proj) ends up inner (`experts.base_layer.`) and the second outer (`experts.`); moetron writes
them in that order. Its expert factors are [r·E, in] with expert e's rows at e·r … e·r + r - 1, and
[out, r·E] with expert e's column j at j·E + e (peft's ParamWrapper.get_delta_weight).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetron.config import ConfigError, LoRAConfig
from moetron.finetune.lora import LoRAGroupedExperts, LoRALinear, apply_lora
from moetron.model.transformer import Transformer

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


class AdapterError(ValueError):
    """An adapter directory moetron cannot load or write, with the reason."""


def _lora_factors(model: Transformer) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, bool]]:
    """(peft key without `.lora_A/B.weight`, moetron's A, moetron's B, whether they are per expert)
    for every LoRA of `model`: the one place that names moetron's adapters in peft's keys."""
    for name, module in model.named_modules():
        layer = re.match(r"layers\.(\d+)\.", name)
        if isinstance(module, LoRALinear):
            leaf = name.rsplit(".", 1)[1]
            if ".attention." in name:
                key = f"model.layers.{layer[1]}.self_attn.{_ATTENTION[leaf]}"
            elif name.endswith(".router.gate"):
                key = f"model.layers.{layer[1]}.mlp.gate"
            else:
                raise AdapterError(
                    f"{name}: a LoRA on shared experts or dense layers has no PEFT key for MixtralForCausalLM"
                )
            yield f"{_PREFIX}{key}", module.lora_A, module.lora_B, False
        elif isinstance(module, LoRAGroupedExperts):
            key = f"{_PREFIX}model.layers.{layer[1]}.mlp.experts"
            yield f"{key}.base_layer", module.lora_A_gate_up, module.lora_B_gate_up, True
            yield key, module.lora_A_down, module.lora_B_down, True


def _peft_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """peft's tensors of `model`'s LoRA, by peft key (expert factors [E, r, in] / [E, out, r] laid
    out as peft's [r·E, in] / [out, r·E])."""
    tensors: dict[str, torch.Tensor] = {}
    for key, a, b, per_expert in _lora_factors(model):
        if per_expert:
            num_experts, rank, width = a.shape
            a = a.reshape(num_experts * rank, width)
            b = b.permute(1, 2, 0).reshape(b.shape[1], rank * num_experts)
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    return tensors


def save_adapter(
    model: Transformer, cfg: LoRAConfig, directory: str | Path, base_model: str | None = None
) -> Path:
    """Write `model`'s LoRA as a peft adapter directory (replacing the two files atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _peft_tensors(model).items()}
    if not tensors:
        raise AdapterError("the model has no LoRA to save")
    targets = cfg.targets
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(_ATTENTION.values()) if "attention" in targets else [],
        "target_parameters": (["mlp.gate.weight"] if "router" in targets else [])
        + (_EXPERT_PARAMETERS if "experts" in targets else []),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "auto_mapping": {"base_model_class": "MixtralForCausalLM", "parent_library": "transformers.models.mixtral.modeling_mixtral"},
    }  # fmt: skip
    for file, write in (
        (WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": "pt"})),
        (CONFIG_FILE, lambda path: path.write_text(json.dumps(config, indent=2) + "\n")),
    ):
        tmp = directory / f".{file}.tmp"
        write(tmp)
        tmp.replace(directory / file)
    return directory


def read_config(directory: str | Path) -> LoRAConfig:
    """The LoRAConfig of a peft adapter directory (r, alpha, dropout, and the targets its modules
    and parameters name)."""
    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{directory}: no {CONFIG_FILE} (not a peft adapter directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON: {e}") from None
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {raw.get('peft_type')!r}; moetron loads LORA adapters")
    for key in ("use_dora", "use_rslora"):
        if raw.get(key):
            raise AdapterError(f"{path}: {key}=true is not supported")
    modules = raw.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    parameters = raw.get("target_parameters") or []
    targets = []
    if any(m in modules for m in _ATTENTION.values()) or any(
        "proj" in m for m in modules if isinstance(m, str)
    ):
        targets.append("attention")
    if any(p.endswith("gate.weight") for p in parameters):
        targets.append("router")
    if any("experts" in p for p in parameters):
        targets.append("experts")
    if not targets:
        raise AdapterError(f"{path}: targets {modules} / {parameters} name no module moetron adapts")
    try:
        return LoRAConfig(
            rank=int(raw["r"]),
            alpha=float(raw["lora_alpha"]),
            dropout=float(raw.get("lora_dropout", 0.0)),
            targets=targets,
        )
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise AdapterError(f"{path}: {e}") from None


def load_adapter(model: Transformer, directory: str | Path, device: str | None = None) -> LoRAConfig:
    """Give `model` the LoRA of a peft adapter directory (frozen base, adapter weights loaded;
    `device` as apply_lora's). Refuses an adapter for another base (a shape mismatch names the
    tensor and both shapes)."""
    directory = Path(directory)
    cfg = read_config(directory)
    apply_lora(model, cfg, device=device)
    wanted = _peft_tensors(model)
    path = directory / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except FileNotFoundError:
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE}") from None
    except Exception as e:
        raise AdapterError(f"{path}: unreadable safetensors file ({e})") from None
    stored = {re.sub(r"\.default\.weight$", ".weight", k): v for k, v in stored.items()}
    if missing := sorted(set(wanted) - set(stored)):
        raise AdapterError(f"{path} lacks {missing[:4]} for its own targets {cfg.targets}")
    if extra := sorted(set(stored) - set(wanted)):
        raise AdapterError(f"{path} holds tensors moetron has no module for: {extra[:4]}")
    for key, view in wanted.items():
        if tuple(stored[key].shape) != tuple(view.shape):
            raise AdapterError(
                f"{key}: the adapter has {list(stored[key].shape)}, this base model needs {list(view.shape)} "
                "(an adapter for another base model?)"
            )
    _assign(model, stored)
    return cfg


@torch.no_grad()
def _assign(model: Transformer, stored: dict[str, torch.Tensor]) -> None:
    """Copy peft tensors into the LoRA parameters (the inverse of _peft_tensors' layout)."""
    for key, a, b, per_expert in _lora_factors(model):
        peft_a, peft_b = stored[f"{key}.lora_A.weight"], stored[f"{key}.lora_B.weight"]
        if per_expert:
            num_experts, rank, width = a.shape
            peft_a = peft_a.reshape(num_experts, rank, width)
            peft_b = peft_b.reshape(peft_b.shape[0], rank, num_experts).permute(2, 0, 1)
        a.copy_(peft_a)
        b.copy_(peft_b)
