"""The per-layer functions the planner adds to model/accounting.py sum to the whole-model figures."""

from __future__ import annotations

import pytest

from moetron.config import PRESETS, get_preset
from moetron.model.accounting import (
    forward_flops_per_token,
    head_forward_flops_per_token,
    layer_forward_flops_per_token,
    layer_param_counts,
    param_counts,
)
from moetron.plan.published import PUBLISHED_MODELS

CONFIGS = {
    **{name: get_preset(name) for name in PRESETS},
    **{n: make() for n, make in PUBLISHED_MODELS.items()},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layers_sum_to_the_model(name: str) -> None:
    cfg = CONFIGS[name]
    whole = param_counts(cfg)
    layers = [layer_param_counts(cfg, i) for i in range(cfg.num_layers)]
    outside = whole.embedding + whole.output + cfg.dim  # final norm
    assert sum(c.total for c in layers) + outside == whole.total
    assert sum(c.active for c in layers) + outside == whole.active
    assert sum(c.routed_experts for c in layers) == whole.routed_experts
    seq = 2048
    per_layer = sum(layer_forward_flops_per_token(cfg, i, seq) for i in range(cfg.num_layers))
    assert per_layer + head_forward_flops_per_token(cfg) == pytest.approx(
        forward_flops_per_token(cfg, seq), rel=1e-12
    )


def test_layer_id_is_checked() -> None:
    with pytest.raises(ValueError, match="layer_id=2"):
        layer_param_counts(get_preset("tiny"), 2)
