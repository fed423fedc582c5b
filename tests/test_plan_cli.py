"""`moetron plan` through plan/cli.py: JSON, text, model sources (preset, TOML, config.json), bad input."""

from __future__ import annotations

import argparse
import builtins
import json
import os
from pathlib import Path

import pytest

from moetron.model.accounting import param_counts
from moetron.plan.cli import add_plan_parser, run_plan
from moetron.plan.planner import load_model

JSON_KEYS = {
    "total_params",
    "active_params",
    "flops_per_token",
    "train_flops",
    "train_days",
    "train_gpu_hours",
    "mfu",
    "layout",
    "memory_per_gpu_bytes",
    "inference",
}
INFERENCE_KEYS = {
    "gpus",
    "kv_bytes_per_token",
    "tokens_per_s",
    "monthly_cost_usd",
    "cost_per_million_tokens_usd",
}


def plan(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="moetron")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    code = args.func(args)
    assert args.func is run_plan
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_promised_keys(capsys) -> None:
    code, out, _ = plan(["mixtral-8x7b", "--gpu", "h100", "--gpus", "64", "--tokens", "1T", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert set(data) >= JSON_KEYS and set(data["inference"]) >= INFERENCE_KEYS
    assert {"tp", "pp", "ep", "dp"} <= set(data["layout"])
    layout = data["layout"]
    assert layout["tp"] * layout["pp"] * layout["dp"] == data["gpus_used"] <= 64
    assert data["total_params"] == param_counts(load_model("mixtral-8x7b").cfg).total
    assert data["tokens"] == 1e12 and 0 < data["mfu"] < 1
    assert data["train_gpu_hours"] == pytest.approx(data["train_days"] * 24 * 64)
    assert data["inference"]["kv_bytes_per_token"] == 131_072


def test_text_report(capsys) -> None:
    code, out, _ = plan(
        ["mixtral-8x7b", "--gpus", "128", "--tokens", "2e12", "--inference-gpus", "8"], capsys
    )
    assert code == 0
    for needle in (
        "Model (model/accounting.py)",
        "layout",
        "memory/GPU",
        "Inference on 8 ×",
        "Assumptions",
        "failures:",
    ):
        assert needle in out
    assert "Against the published figures (Jiang et al. 2024)" in out  # parameters only


def test_gpus_default_to_the_fewest_that_finish_in_time(capsys) -> None:
    code, out, _ = plan(["mixtral-8x7b", "--tokens", "1e12", "--days", "30", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["train_days"] <= 30
    half = data["num_gpus"] // 2
    _, out, _ = plan(["mixtral-8x7b", "--tokens", "1e12", "--gpus", str(half), "--json"], capsys)
    assert json.loads(out)["train_days"] > 30


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gpt5"], "unknown model 'gpt5': not a preset (tiny, small, small-fine, mixtral-8x7b, gpt4)"),
        (
            ["tiny", "--gpu", "v100"],
            "unknown GPU 'v100'; choose one of a100-40gb, a100-80gb, h100, h200, b200, h800, tpu-v4, cpu",
        ),
        (["gpt4", "--gpus", "64", "--tp", "3"], "--tp 3 must divide num_heads=128"),
        (["gpt4", "--gpus", "64", "--ep", "3"], "--ep 3 must divide num_experts=16"),
        (["tiny", "--seq-len", "4096"], "--seq-len 4096 must lie in [1, max_seq_len=256]"),
        (
            ["mixtral-8x7b", "--gpus", "64", "--inference-gpus", "1"],
            "inference: the 93.4 GB of bf16 weights do not fit on 1 × H100-SXM5-80GB, not 1; 2 GPUs would",
        ),
    ],
)
def test_bad_input_says_what_is_valid(argv, message, capsys) -> None:
    code, out, err = plan(argv, capsys)
    assert code == 2 and out == ""
    assert message in err


def test_nothing_fits_names_the_smallest_cluster(capsys) -> None:
    code, _, err = plan(["gpt4", "--gpu", "a100-80gb", "--gpus", "16", "--tokens", "1e12"], capsys)
    assert code == 2
    assert "nothing fits on 16 × A100-SXM4-80GB" in err and "GB are usable" in err
    assert "the smallest cluster that fits is 512 GPUs" in err


def test_hf_config_json_dense_and_moe(tmp_path: Path) -> None:
    llama3_8b = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128_256,
        "hidden_size": 4096, "intermediate_size": 14_336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131_072,
        "rope_theta": 500_000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
    }  # fmt: skip
    qwen15_moe = {
        "model_type": "qwen2_moe", "vocab_size": 151_936, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 8192, "tie_word_embeddings": False,
    }  # fmt: skip
    expected = {"llama": (8_030_261_248, 8_030_261_248), "qwen": (14_315_587_584, 2_688_976_896)}
    for name, config in (("llama", llama3_8b), ("qwen", qwen15_moe)):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        source = load_model(str(directory / "config.json"))
        counts = param_counts(source.cfg)
        assert (counts.total, counts.active) == expected[name]
        assert source.kind == "hf" and source.name == name
    # published: Llama 3 8B has 8.03B; Qwen1.5-MoE-A2.7B 14.3B total, 2.7B active
    qwen = load_model(str(tmp_path / "qwen"))
    assert any("q/k/v biases" in note for note in qwen.notes)
    moe = qwen.cfg.moe
    assert (moe.num_shared_experts, moe.shared_expert_hidden_dim, moe.normalize_top_k) == (1, 5632, False)


def test_moetron_toml(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npreset = "tiny"\nnum_layers = 3\n')
    source = load_model(str(toml))
    assert source.cfg.num_layers == 3 and source.cfg.dim == 64


def test_plot(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    code, out, _ = plan(["mixtral-8x7b", "--gpus", "64", "--tokens", "1e12", "--plot", str(png)], capsys)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in out


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch, capsys) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = plan(["tiny", "--gpus", "8", "--plot", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "pip install matplotlib" in err


def test_cpu_plan_measures_this_machine() -> None:
    # a fresh process: resident-set peaks mean nothing in a test process that already allocated
    # and freed a lot; one thread: two busy OpenMP pools on a 2-core machine slow each other down
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "moetron", "plan", "tiny", "--gpu", "cpu", "--json", "--measure", "--seq-len", "32"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["precision"] == "fp32" and data["num_gpus"] == 1 and data["layout"]["tp"] == 1
    loop = data["closed_loop"]
    assert loop["measured_step_s"] > 0 and loop["measured_peak_bytes"] > 0 and loop["predicted_step_s"] > 0
