"""Pipeline parallelism: stage cutting in-process, and pp=2 training on gloo (torchrun) against
single-process gradient accumulation over the same microbatches."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moetron.config import ModelConfig, MoEConfig
from moetron.model.transformer import Transformer
from moetron.parallel.pipeline import split_stage, stage_layer_ids

ROOT = Path(__file__).resolve().parents[1]


_spec = importlib.util.spec_from_file_location("harness", ROOT / "tests" / "dist" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


def tiny(num_layers: int = 4) -> Transformer:
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=24, num_dense_layers=1)
    cfg = ModelConfig(vocab_size=64, dim=32, num_layers=num_layers, num_heads=4, num_kv_heads=2, moe=moe)
    torch.manual_seed(0)
    return Transformer.from_config(cfg)


def test_stage_layer_ids_are_balanced_and_contiguous() -> None:
    assert [list(r) for r in stage_layer_ids(4, 2)] == [[0, 1], [2, 3]]
    assert [len(r) for r in stage_layer_ids(7, 3)] == [2, 3, 2]  # the last stage also runs the head
    assert [len(r) for r in stage_layer_ids(5, 2)] == [3, 2]
    assert [i for r in stage_layer_ids(10, 4) for i in r] == list(range(10))
    with pytest.raises(ValueError, match="at least one layer"):
        stage_layer_ids(2, 3)


def test_stages_chained_equal_the_whole_model_and_keep_its_names() -> None:
    model = tiny(num_layers=5)
    stages = [split_stage(copy.deepcopy(model), stage, 3) for stage in range(3)]
    assert stages[0].tok_embeddings is not None and stages[0].output is None
    assert stages[2].tok_embeddings is None and stages[2].output is not None
    names = [n for s in stages for n in s.state_dict()]
    assert sorted(names) == sorted(model.state_dict())  # every weight on exactly one stage, same name
    assert len(list(stages[1].moe_layers())) == 2
    ids_BT = torch.randint(0, 64, (2, 9))
    h = ids_BT
    for stage in stages:
        h = stage(h)
    torch.testing.assert_close(h, model(ids_BT), rtol=0, atol=0)


@pytest.mark.distributed
def test_pipeline_schedules_match_single_process_accumulation(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    harness.torchrun(2, [str(ROOT / "tests" / "dist" / "pipeline_step.py"), "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == {"gpipe", "1f1b", "interleaved_1f1b"}
    for schedule, r in results.items():
        assert len(r["pp_losses"]) == 3, schedule
        for ours, ref in zip(r["pp_losses"], r["ref_losses"], strict=True):
            assert ours == pytest.approx(ref, rel=1e-5), schedule
        assert r["grad_rel_diff"] <= 1e-5, schedule  # includes the router-loss gradients
        assert r["weight_rel_diff"] <= 1e-5, schedule
        assert r["eval_loss"] == pytest.approx(r["ref_eval_loss"], rel=1e-5), schedule  # forward only
    assert results["interleaved_1f1b"]["parts_per_rank"] == [2, 2]
