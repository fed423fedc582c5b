"""Hugging Face model directories <-> moetron: a name table plus a few transforms.

moetron's inference checkpoint *is* an HF directory: config.json, model.safetensors (or shards
with model.safetensors.index.json), tokenizer files. Configs that Mixtral can express are written
as `MixtralForCausalLM` with per-expert `experts.{e}.w1/w2/w3` tensors (the layout
`MixtralForCausalLM.save_pretrained` writes), so `transformers` loads them unchanged. The others
(shared experts, dense first layers, un-normalised top-k) are written as `MoetronForCausalLM`
with the same naming plus the extra tensors. Loading never unpickles: safetensors only.

The router's selection bias (aux-loss-free balancing, model/moe.py `Router.expert_bias`) has no
Mixtral counterpart, and a bias on the top-k choice cannot be folded into the gate's weights. A
model whose bias is nonzero anywhere carries it, fp32, as one extra tensor per MoE layer named as
DeepSeek-V3 names its own, `model.layers.{i}.block_sparse_moe.gate.e_score_correction_bias` [E],
and config.json gains the key `moetron_expert_bias` saying so. moetron loads it back exactly;
transformers' Mixtral ignores it (it reports the tensor as unused), so its top-k choice differs
from ours wherever the bias changes it, and `save_pretrained` warns. An all-zero bias is not
written: such exports are byte-for-byte what they were before the bias existed, and a directory
without the tensor (any Mixtral checkpoint) loads with a zero bias.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetron.config import ConfigError, ModelConfig, MoEConfig, RopeConfig, from_dict
from moetron.model.moe import GroupedExperts
from moetron.model.transformer import Transformer

MIXTRAL = "MixtralForCausalLM"
MOETRON = "MoetronForCausalLM"
SAFE_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


class CheckpointError(RuntimeError):
    """A model directory is missing, unsupported, inconsistent or corrupt."""


# --- Tensor names -----------------------------------------------------------------------------
# (HF pattern, moetron pattern); {i} layer, {e} expert. An {e} on the HF side only means the HF
# tensor is one slice [e] of a stacked moetron parameter.
_MOE = "model.layers.{i}.block_sparse_moe"
NAME_TABLE: list[tuple[str, str]] = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight"),
    (f"{_MOE}.gate.weight", "layers.{i}.ffn.router.gate.weight"),
    (f"{_MOE}.experts.{{e}}.w1.weight", "layers.{i}.ffn.experts.w1"),
    (f"{_MOE}.experts.{{e}}.w2.weight", "layers.{i}.ffn.experts.w2"),
    (f"{_MOE}.experts.{{e}}.w3.weight", "layers.{i}.ffn.experts.w3"),
    # moetron extensions (MoetronForCausalLM only)
    (f"{_MOE}.shared_experts.w1.weight", "layers.{i}.ffn.shared_experts.w1.weight"),
    (f"{_MOE}.shared_experts.w2.weight", "layers.{i}.ffn.shared_experts.w2.weight"),
    (f"{_MOE}.shared_experts.w3.weight", "layers.{i}.ffn.shared_experts.w3.weight"),
    ("model.layers.{i}.mlp.w1.weight", "layers.{i}.ffn.w1.weight"),
    ("model.layers.{i}.mlp.w2.weight", "layers.{i}.ffn.w2.weight"),
    ("model.layers.{i}.mlp.w3.weight", "layers.{i}.ffn.w3.weight"),
    # the router's selection bias, only where nonzero (see the module docstring)
    (f"{_MOE}.gate.e_score_correction_bias", "layers.{i}.ffn.router.expert_bias"),
]
_EXPERT_BIAS = "router.expert_bias"
EXPERT_BIAS_NOTE = (
    "model.layers.{i}.block_sparse_moe.gate.e_score_correction_bias [num_local_experts] fp32: "
    "moetron's router adds it to the softmax probabilities to choose the top-k experts "
    "(DeepSeek-V3's auxiliary-loss-free balancing) and weighs them by the unbiased probabilities. "
    "transformers' Mixtral ignores this tensor, so there the choice of experts differs wherever "
    "the bias changes it."
)
# transformers >= 5 keeps experts fused in memory; accept that layout too when reading.
_FUSED_GATE_UP = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.gate_up_proj$")
_FUSED_DOWN = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.down_proj$")
_V5_GATE = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight$")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _compile(pattern: str) -> re.Pattern[str]:
    regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(regex + "$")


_HF_TO_OURS = [(_compile(hf), ours) for hf, ours in NAME_TABLE]


@dataclass(frozen=True)
class Target:
    """Where an HF tensor goes: a moetron parameter, optionally one expert slice, optionally a
    row range of it (fused gate_up holds w1 rows then w3 rows)."""

    name: str
    expert: int | None = None


def hf_to_moetron(hf_name: str) -> list[tuple[Target, slice | None]]:
    """Maps one HF tensor name to its destination(s). Empty list: not a known tensor."""
    for regex, ours in _HF_TO_OURS:
        if m := regex.match(hf_name):
            expert = int(m["e"]) if "e" in regex.groupindex else None
            return [(Target(ours.format(i=m["i"]) if "i" in regex.groupindex else ours, expert), None)]
    if m := _V5_GATE.match(hf_name):
        return [(Target(f"layers.{m[1]}.ffn.router.gate.weight"), None)]
    if m := _FUSED_DOWN.match(hf_name):
        return [(Target(f"layers.{m[1]}.ffn.experts.w2"), None)]
    if m := _FUSED_GATE_UP.match(hf_name):
        # [E, 2I, D]: first I rows gate (w1), next I rows up (w3)
        return [
            (Target(f"layers.{m[1]}.ffn.experts.w1"), slice(0, 1)),
            (Target(f"layers.{m[1]}.ffn.experts.w3"), slice(1, 2)),
        ]
    return []


class ExpertBiasExportWarning(UserWarning):
    """An export carries a nonzero router selection bias, which transformers' Mixtral ignores."""


def has_expert_bias(model: Transformer) -> bool:
    """Whether any router's selection bias is nonzero (then exports carry it)."""
    return any(bool(layer.router.expert_bias.any()) for layer in model.moe_layers())


def moetron_to_hf(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, tensor view) in a stable order; stacked experts are split per expert."""
    patterns = [(_compile(ours), hf) for hf, ours in NAME_TABLE]
    with_bias = has_expert_bias(model)
    for name, param in model.state_dict().items():
        if name == "output.weight" and model.cfg.tie_embeddings:
            continue  # tied: HF stores only the embedding
        if name.endswith(_EXPERT_BIAS) and not with_bias:
            continue  # all zero: written as before the bias existed
        for regex, hf in patterns:
            if m := regex.match(name):
                layer = m["i"] if "i" in regex.groupindex else None
                if "{e}" in hf:
                    for e in range(param.shape[0]):
                        yield hf.format(i=layer, e=e), param[e]
                else:
                    yield hf.format(i=layer), param
                break
        else:
            raise CheckpointError(f"no Hugging Face name for parameter {name!r}")


# --- config.json --------------------------------------------------------------------------------


def mixtral_can_express(cfg: ModelConfig) -> bool:
    moe = cfg.moe
    return moe.normalize_top_k and moe.num_shared_experts == 0 and moe.num_dense_layers == 0


def to_hf_config(cfg: ModelConfig, dtype: torch.dtype, expert_bias: bool = False) -> dict[str, Any]:
    """config.json for `cfg`; `expert_bias`: the weights carry the routers' selection bias."""
    rope: dict[str, Any] = {"rope_type": "default" if cfg.rope.scaling == "none" else cfg.rope.scaling}
    rope["rope_theta"] = cfg.rope.theta
    if cfg.rope.scaling != "none":
        rope["factor"] = cfg.rope.factor
    if cfg.rope.scaling == "yarn":
        rope.update(
            original_max_position_embeddings=cfg.rope.original_max_seq_len,
            beta_fast=cfg.rope.beta_fast,
            beta_slow=cfg.rope.beta_slow,
        )
    mixtral = mixtral_can_express(cfg)
    out: dict[str, Any] = {
        "architectures": [MIXTRAL if mixtral else MOETRON],
        "model_type": "mixtral" if mixtral else "moetron",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.moe.expert_hidden_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": cfg.moe.aux_loss_weight,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        # both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta/rope_scaling
        "rope_parameters": rope,
        "rope_theta": cfg.rope.theta,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # the whole config, so nothing HF cannot express (z-loss, capacity...) is lost
        "moetron": cfg.to_dict(),
    }
    if cfg.rope.scaling != "none":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if expert_bias:
        out["moetron_expert_bias"] = EXPERT_BIAS_NOTE
    return out


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=params["factor"])
    if kind == "yarn":
        unsupported = {
            k for k in ("attention_factor", "mscale", "mscale_all_dim") if params.get(k) is not None
        }
        if unsupported or params.get("truncate", True) is False:
            raise CheckpointError(
                f"config.json: YaRN options {sorted(unsupported) or ['truncate']} are not supported"
            )
        return RopeConfig(
            theta=theta,
            scaling="yarn",
            factor=params["factor"],
            original_max_seq_len=params["original_max_position_embeddings"],
            beta_fast=params.get("beta_fast") or 32.0,
            beta_slow=params.get("beta_slow") or 1.0,
        )
    raise CheckpointError(
        f"config.json: rope type {kind!r} is not supported (supported: default, linear, yarn)"
    )


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    architectures = hf.get("architectures") or [hf.get("model_type", "?")]
    arch = architectures[0]
    try:
        if arch == MOETRON or (arch == MIXTRAL and "moetron" in hf):
            return ModelConfig.from_dict(hf["moetron"])
        if arch != MIXTRAL and hf.get("model_type") != "mixtral":
            raise CheckpointError(
                f"config.json: architecture {arch!r} is not supported (supported: {MIXTRAL}, {MOETRON})"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(
                f"config.json: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')"
            )
        window = hf.get("sliding_window")
        if window is not None and window < hf.get("max_position_embeddings", 0):
            raise CheckpointError(f"config.json: sliding_window={window} attention is not supported")
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            max_seq_len=hf.get("max_position_embeddings", 4096),
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02),
            rope=_rope_from_hf(hf),
            moe=from_dict(
                MoEConfig,
                {
                    "num_experts": hf["num_local_experts"],
                    "top_k": hf["num_experts_per_tok"],
                    "expert_hidden_dim": hf["intermediate_size"],
                    "aux_loss_weight": hf.get("router_aux_loss_coef", 0.01),
                },
                "moe",
            ),
        )
    except KeyError as e:
        raise CheckpointError(f"config.json: required field {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise CheckpointError(f"config.json: {e}") from None


# --- Loading ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / SAFE_INDEX
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    else:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = (
            f" (found {pickled}: pickled weights are never loaded; convert them to safetensors)"
            if pickled
            else ""
        )
        raise CheckpointError(f"{directory}: no model.safetensors or {SAFE_INDEX}{hint}")
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file} is listed in {SAFE_INDEX} but missing")
    return files


def _iter_safetensors(
    file: Path, rows: Callable[[str], slice | None] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The file's tensors; with `rows`, only the dim-0 rows it gives for each name (None: skip the
    tensor, unread)."""
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if rows is None:
                    yield name, f.get_tensor(name)
                elif (part := rows(name)) is not None:
                    yield name, f.get_slice(name)[part]
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    except Exception as e:  # safetensors_rust.SafetensorError does not subclass the above
        if type(e).__name__ == "SafetensorError":
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        raise


def load_config(path: str | Path) -> ModelConfig:
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    return from_hf_config(_read_json(directory / "config.json"))


def from_pretrained(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    experts: range | None = None,
) -> Transformer:
    """Load a Hugging Face (Mixtral) or moetron model directory. dtype defaults to the stored one.
    `experts`: load only these routed experts of every MoE layer (an expert-parallel rank's shard,
    stacked from index 0); the other experts' tensors are never read."""
    directory = Path(path)
    cfg = load_config(directory)
    files = safetensors_files(directory)
    with torch.device("meta"):
        model = Transformer(cfg)
        if experts is not None:
            for layer in model.moe_layers():
                layer.experts = GroupedExperts(cfg.dim, cfg.moe.expert_hidden_dim, len(experts))
    rows = None if experts is None else functools.partial(_shard_rows, experts)
    params = dict(model.named_parameters())
    filled: dict[str, set[int | None]] = {name: set() for name in params}
    biases: dict[str, tuple[str, torch.Tensor]] = {}  # fp32 whatever the weights' dtype: set last
    materialised = False
    for file in files:
        for hf_name, tensor in _iter_safetensors(file, rows):
            targets = hf_to_moetron(hf_name)
            if not targets:
                if _IGNORED.match(hf_name):
                    continue
                raise CheckpointError(
                    f"{file.name}: unexpected tensor {hf_name!r} for {cfg.num_layers}-layer config"
                )
            if targets[0][0].name.endswith(_EXPERT_BIAS):
                biases[targets[0][0].name] = (hf_name, tensor)
                continue
            if not materialised:  # allocate once the stored dtype is known
                model.to_empty(device=device)
                model.to(dtype or tensor.dtype)
                if cfg.tie_embeddings:
                    model.output.weight = model.tok_embeddings.weight
                params = dict(model.named_parameters())
                materialised = True
            for target, part in targets:
                if target.name == "output.weight" and cfg.tie_embeddings:
                    continue  # tied: the embedding is the head
                if experts is not None and target.expert is not None:
                    target = Target(target.name, target.expert - experts.start)
                _copy_into(params, target, part, tensor, hf_name, filled)
    if cfg.tie_embeddings:
        filled.pop("output.weight", None)
    missing = [name for name, got in filled.items() if not _complete(got, params[name], name)]
    if missing or not materialised:
        raise CheckpointError(f"{directory}: missing tensors for {missing[:8] or 'every parameter'}")
    _load_expert_biases(model, biases)
    model.init_buffers()
    model.eval()
    model.name_or_path = str(directory)
    return model


def _shard_rows(experts: range, hf_name: str) -> slice | None:
    """The rows of `hf_name` an expert shard reads: all of a non-expert tensor, a per-expert tensor
    of its experts whole (others: None), its experts' rows of a stacked [E, ...] tensor."""
    targets = hf_to_moetron(hf_name)
    if not targets or not targets[0][0].name.endswith(("experts.w1", "experts.w2", "experts.w3")):
        return slice(None)
    expert = targets[0][0].expert
    if expert is None:  # transformers >= 5's stacked experts
        return slice(experts.start, experts.stop)
    return slice(None) if expert in experts else None


def _load_expert_biases(model: Transformer, biases: dict[str, tuple[str, torch.Tensor]]) -> None:
    """The routers' selection biases: those stored, zero where none is (to_empty left them unset)."""
    buffers = {name: buffer for name, buffer in model.named_buffers() if name.endswith(_EXPERT_BIAS)}
    for buffer in buffers.values():
        buffer.zero_()
    for name, (hf_name, tensor) in biases.items():
        if name not in buffers:
            raise CheckpointError(f"unexpected tensor {hf_name!r}: the config has no MoE layer {name!r}")
        if tuple(tensor.shape) != tuple(buffers[name].shape):
            raise CheckpointError(
                f"shape mismatch for {hf_name}: checkpoint has {list(tensor.shape)}, "
                f"the config implies {list(buffers[name].shape)}"
            )
        with torch.no_grad():
            buffers[name].copy_(tensor)


def _complete(got: set[int | None], param: torch.Tensor, name: str) -> bool:
    if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
        return None in got or got == set(range(param.shape[0]))
    return bool(got)


def _copy_into(
    params: dict[str, torch.Tensor],
    target: Target,
    part: slice | None,
    tensor: torch.Tensor,
    hf_name: str,
    filled: dict[str, set[int | None]],
) -> None:
    if target.name not in params:
        raise CheckpointError(f"unexpected tensor {hf_name!r}: the config has no parameter {target.name!r}")
    dest = params[target.name]
    if target.expert is not None:
        if target.expert >= dest.shape[0]:
            raise CheckpointError(
                f"{hf_name}: expert {target.expert} but the config has {dest.shape[0]} experts"
            )
        dest = dest[target.expert]
    if part is not None:  # fused gate_up [E, 2I, D]: split along dim 1
        half = tensor.shape[1] // 2
        tensor = tensor[:, part.start * half : part.stop * half]
    if tuple(tensor.shape) != tuple(dest.shape):
        raise CheckpointError(
            f"shape mismatch for {hf_name}: checkpoint has {list(tensor.shape)}, "
            f"the config implies {list(dest.shape)} (moetron parameter {target.name!r})"
        )
    with torch.no_grad():
        dest.copy_(tensor)
    filled[target.name].add(target.expert)


# --- Saving -------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary sibling, fsync, then rename: a crash leaves the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _plan_shards(
    tensors: list[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> list[list[tuple[str, torch.Tensor]]]:
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    return shards


def save_pretrained(
    model: Transformer,
    path: str | Path,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_dir: str | Path | None = None,
) -> None:
    """Write an HF directory that `transformers` (Mixtral) and moetron load unchanged. Tokenizer
    files are copied from `tokenizer_dir`, or from the directory the model was loaded from."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    expert_bias = has_expert_bias(model)
    if expert_bias:
        warnings.warn(
            f"{directory}: the routers' selection bias is nonzero; it is written as "
            "...gate.e_score_correction_bias, which moetron reads and transformers' Mixtral ignores "
            "(its top-k choice will differ from moetron's where the bias changes it)",
            ExpertBiasExportWarning,
            stacklevel=2,
        )
    tensors = list(moetron_to_hf(model))
    dtype = tensors[0][1].dtype
    shards = _plan_shards(tensors, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    )
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        # one shard at a time: expert slices become contiguous copies only while being written
        contiguous = {hf: t.detach().contiguous().cpu() for hf, t in shard}
        _atomic_write(directory / name, lambda p, c=contiguous: save_file(c, p, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(contiguous, name))
    total_size = sum(t.numel() * t.element_size() for _, t in tensors)
    index = directory / SAFE_INDEX
    if len(shards) > 1:
        body = json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
        _atomic_write(index, lambda p: p.write_text(body))
    for stale in [*directory.glob("model*.safetensors"), index]:
        if stale.exists() and stale.name not in names and not (stale == index and len(shards) > 1):
            stale.unlink()
    body = json.dumps(to_hf_config(model.cfg, dtype, expert_bias), indent=2)
    _atomic_write(directory / "config.json", lambda p: p.write_text(body))

    source = tokenizer_dir or getattr(model, "name_or_path", None)
    if source and Path(source).resolve() != directory.resolve():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists():
                shutil.copyfile(Path(source) / name, directory / name)
