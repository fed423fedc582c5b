"""Rotary position embedding with linear and YaRN context extension.

Computed exactly as Hugging Face does (half-split rotation, fp32 angles, YaRN's attention factor
folded into cos/sin) so converted checkpoints give the same logits.
Legend: B batch, T tokens, H heads, d head_dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moetron.config import RopeConfig


def rope_inverse_frequencies(cfg: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [d/2] fp32 on the CPU, attention_factor) for the configured scaling.
    Explicit CPU device: models are built under `torch.device("meta")`."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    pos_freqs = cfg.theta**exponents
    inv_freq = 1.0 / pos_freqs
    if cfg.scaling == "linear":
        return inv_freq / cfg.factor, 1.0
    if cfg.scaling == "none":
        return inv_freq, 1.0

    # YaRN: dimensions that rotate fast (many turns within the original context) keep their
    # frequency, slow ones are interpolated by `factor`, with a linear ramp in between.
    assert cfg.original_max_seq_len is not None  # validated in RopeConfig

    def correction_dim(num_rotations: float) -> float:
        ratio = cfg.original_max_seq_len / (num_rotations * 2 * math.pi)
        return head_dim * math.log(ratio) / (2 * math.log(cfg.theta))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep frequency), 0: interpolate
    inv_freq = (inv_freq / cfg.factor) * (1 - keep) + inv_freq * keep
    attention_factor = 0.1 * math.log(cfg.factor) + 1.0 if cfg.factor > 1 else 1.0
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Maps positions to (cos, sin). The frequencies are a pure function of the config, kept in
    fp32 outside the state dict so `model.to(bfloat16)` cannot round them."""

    def __init__(self, cfg: RopeConfig, head_dim: int) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inverse_frequencies(cfg, head_dim)
        self._inv_freq_by_device = {inv_freq.device: inv_freq}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = next(iter(self._inv_freq_by_device.values())).to(device)
        return self._inv_freq_by_device[device]

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos_BTd, sin_BTd) in `dtype`."""
        angles_BTh = positions_BT.float()[..., None] * self.inv_freq(positions_BT.device)
        angles_BTd = torch.cat((angles_BTh, angles_BTh), dim=-1)
        cos = angles_BTd.cos() * self.attention_factor
        sin = angles_BTd.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat((-x_BHTd[..., half:], x_BHTd[..., :half]), dim=-1)
    return x_BHTd * cos_BTd[:, None] + rotated * sin_BTd[:, None]
