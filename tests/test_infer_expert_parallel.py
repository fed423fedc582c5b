"""Expert- and tensor-parallel serving's pieces in one process: the MoE block split into route /
expert outputs / combine gives the fused block's bits whatever the shard count and the order the
shards' outputs are summed in (the argument of infer/expert_parallel.py, checked directly); a rank loads only its
experts; bad layouts are refused at start, naming the flags; the planner's per-rank weights.
The processes themselves: test_serve_distributed.py."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from moetron.config import EngineConfig, get_preset
from moetron.convert.hf import from_pretrained
from moetron.infer.data_parallel import check_layout
from moetron.kernels import cpu_kernels
from moetron.quant import ggml_blocks

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason="moetron's CPU kernels need an AVX2 CPU and a C++ compiler"
)


def _expert_stack(fmt: str, num_experts: int, rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(num_experts, rows, width, generator=gen) * 0.05
    if fmt == "f32":
        return w
    return torch.stack([ggml_blocks.quantize(w[e], fmt) for e in range(num_experts)])


@needs_kernels
@pytest.mark.parametrize("fmt", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("top_k", [2, 3])
def test_route_expert_outputs_combine_equal_the_fused_block_for_any_shards(fmt: str, top_k: int) -> None:
    lib = cpu_kernels.library()
    gen = torch.Generator().manual_seed(top_k)
    num_tokens, dim, hidden, num_experts = 11, 64, 96, 8
    code = cpu_kernels.FORMAT_CODES["f32" if fmt == "f32" else fmt]
    w1 = _expert_stack(fmt, num_experts, hidden, dim, gen)
    w3 = _expert_stack(fmt, num_experts, hidden, dim, gen)
    w2 = _expert_stack(fmt, num_experts, dim, hidden, gen)
    gate = torch.randn(num_experts, dim, generator=gen)
    bias = torch.zeros(num_experts)
    bias[3] = 0.05  # the selection bias takes part in routing
    norm = torch.rand(dim, generator=gen) + 0.5
    h = torch.randn(num_tokens, dim, generator=gen)
    threads = torch.get_num_threads()

    fused, fused_counts = h.clone(), torch.zeros(num_experts, dtype=torch.int64)
    lib.moetron_moe_block(
        fused.data_ptr(), norm.data_ptr(), 1e-5, gate.data_ptr(), 0, bias.data_ptr(), top_k, 1, w1.data_ptr(),
        code, w3.data_ptr(), code, w2.data_ptr(), code, fused_counts.data_ptr(), num_tokens, dim, hidden,
        num_experts, threads,
    )  # fmt: skip

    xn = torch.empty(num_tokens, dim)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64)
    weights = torch.empty(num_tokens, top_k)
    counts = torch.zeros(num_experts, dtype=torch.int64)
    lib.moetron_moe_route(
        h.data_ptr(), norm.data_ptr(), 1e-5, gate.data_ptr(), 0, bias.data_ptr(), top_k, 1, xn.data_ptr(),
        ids.data_ptr(), weights.data_ptr(), counts.data_ptr(), num_tokens, dim, num_experts, threads,
    )  # fmt: skip
    assert torch.equal(counts, fused_counts)
    for world in (1, 2, 4, 8):
        local = num_experts // world
        shards = []
        for rank in range(world):
            y = torch.full((num_tokens, top_k, dim), -0.0)
            experts = slice(rank * local, (rank + 1) * local)
            lib.moetron_moe_expert_outputs(
                xn.data_ptr(), ids.data_ptr(), rank * local, w1[experts].contiguous().data_ptr(), code,
                w3[experts].contiguous().data_ptr(), code, w2[experts].contiguous().data_ptr(), code,
                y.data_ptr(), num_tokens, top_k, dim, hidden, local, threads,
            )  # fmt: skip
            shards.append(y)
        # Each pair was computed by exactly one rank (the others left -0.0)...
        computed = sum((s != 0) | ~torch.signbit(s) for s in shards)
        assert computed.amax() <= 1
        orders = list(itertools.permutations(range(world)))[:6]
        for order in orders:  # ...so the sum is the same bits in any reduction order
            total = torch.full_like(shards[0], -0.0)
            for rank in order:
                total = total + shards[rank]
            combined = h.clone()
            lib.moetron_moe_combine(
                combined.data_ptr(), total.data_ptr(), weights.data_ptr(), num_tokens, top_k, dim
            )
            assert torch.equal(combined, fused), (world, order)


def test_a_shard_loads_only_its_experts(tiny_model_dir) -> None:
    whole = from_pretrained(tiny_model_dir)
    shard = from_pretrained(tiny_model_dir, experts=range(2, 4))
    shard_params = dict(shard.named_parameters())
    for name, param in whole.named_parameters():
        if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            assert torch.equal(shard_params[name], param[2:4]), name
        else:
            assert torch.equal(shard_params[name], param), name
    assert sum(p.numel() for p in shard.parameters()) < sum(p.numel() for p in whole.parameters())


@pytest.mark.parametrize(
    "layout, model_change, message",
    [
        ({"data_parallel_size": 3, "enable_expert_parallel": True}, {}, "must divide the model's 4 experts"),
        (
            {"data_parallel_size": 8, "enable_expert_parallel": True},
            {},
            "more ranks than the model's 4 experts",
        ),
        ({"tensor_parallel_size": 2}, {"num_kv_heads": 1}, "one KV head (multi-query attention)"),
        ({"tensor_parallel_size": 4}, {}, "must divide the model's 2 KV heads"),
        ({"data_parallel_size": 2, "enable_expert_parallel": True}, {"dense": 1}, "dense layers"),
    ],
)
def test_bad_layouts_are_refused_naming_the_flags(layout: dict, model_change: dict, message: str) -> None:
    model, change = get_preset("tiny"), dict(model_change)
    if change.pop("dense", 0):
        model.moe = dataclasses.replace(model.moe, num_dense_layers=1)
    model = dataclasses.replace(model, **change)
    with pytest.raises(ValueError, match=r"--(data|tensor)-parallel-size|--enable-expert-parallel") as info:
        check_layout(EngineConfig(**layout), model)
    assert message in str(info.value)


def test_bad_node_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of --nnodes"):
        EngineConfig(data_parallel_size=3, nnodes=2, master_port=29500)
    EngineConfig(
        data_parallel_size=3, tensor_parallel_size=2, nnodes=2, master_port=29500
    )  # 6 ranks: 3 a node
    with pytest.raises(ValueError, match="--master-port"):
        EngineConfig(data_parallel_size=2, nnodes=2)
    with pytest.raises(ValueError, match="node_rank"):
        EngineConfig(data_parallel_size=2, nnodes=2, node_rank=2, master_port=29500)


def test_the_planner_predicts_a_ranks_weights_exactly(tiny_model_dir) -> None:
    from moetron.convert.hf import load_config
    from moetron.plan.hardware import get_accelerator
    from moetron.plan.inference import engine_layout

    cfg = load_config(tiny_model_dir)
    layout = engine_layout(cfg, get_accelerator("h100"), 2, context=64, concurrency=4, weight_dtype="fp32")
    assert layout.ranks == 2 and layout.expert_parallel and layout.fits and layout.nodes == 1
    assert layout.flags == "--data-parallel-size 2 --enable-expert-parallel"
    shard = from_pretrained(tiny_model_dir, experts=range(0, 2))
    assert layout.weights_per_rank_bytes == sum(p.numel() * p.element_size() for p in shard.parameters())


def test_the_planner_says_when_the_engine_cannot_serve_gpt4() -> None:
    from moetron.plan.hardware import get_accelerator
    from moetron.plan.inference import engine_layout

    layout = engine_layout(get_preset("gpt4"), get_accelerator("a100-80gb"), 128, 32_768, 128)
    assert (layout.ranks, layout.nodes, layout.fits) == (16, 2, False)
    assert "--nnodes 2" in layout.flags and "uses 16 of 128 devices" in layout.note
    assert "tensor-parallel experts, pipeline stages" in layout.note
