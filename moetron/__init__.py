"""moetron: plan, train and serve GPT-4-style sparse Mixture-of-Experts language models."""

from moetron.config import PRESETS, ConfigError, EngineConfig, ModelConfig, MoEConfig, RopeConfig, get_preset
from moetron.convert.hf import CheckpointError, from_pretrained, load_config, save_pretrained
from moetron.model.transformer import Transformer

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "EngineConfig",
    "MoEConfig",
    "ModelConfig",
    "RopeConfig",
    "Transformer",
    "from_pretrained",
    "get_preset",
    "load_config",
    "save_pretrained",
]
