"""The engine installs its kernels into the model from outside (moetron/infer/serving_kernels.py):
module classes are swapped, parameters and names stay, training numerics come back on restore, and
the model package depends on no serving code."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moetron.config import ModelConfig, MoEConfig
from moetron.infer import fused_layers, serving_kernels
from moetron.infer.batch_invariant import invariant_linear
from moetron.infer.paged_attention import KEY_TILE, invariant_attention
from moetron.kernels import cpu_kernels
from moetron.model import Transformer
from moetron.model.moe import FeedForward, GroupedExperts, MoELayer
from moetron.model.ops import Linear
from moetron.model.transformer import Block, RMSNorm

ROOT = Path(__file__).resolve().parents[1] / "moetron"
CFG = ModelConfig(
    vocab_size=61, dim=32, num_layers=2, num_heads=4, num_kv_heads=1, max_seq_len=64,
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=24, num_shared_experts=1),
)  # fmt: skip
needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="needs moetron's CPU kernels")


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer.from_config(CFG).eval()


def _classes(model: torch.nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


@pytest.mark.parametrize("kernels", [serving_kernels.INVARIANT, serving_kernels.FAST], ids=lambda k: k.name)
def test_install_swaps_classes_and_keeps_parameters(model: Transformer, kernels) -> None:
    before = {name: p for name, p in model.named_parameters()}
    serving_kernels.install(model, kernels)
    assert serving_kernels.installed(model) is kernels
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    swapped = {type(m).__name__ for m in model.modules() if isinstance(m, serving_kernels.ServingModule)}
    assert {"KernelRMSNorm", "KernelMoELayer"} <= swapped
    assert ("InvariantLinear" if kernels is serving_kernels.INVARIANT else "FastLinear") in swapped
    # every swapped module is still what the model's code and the parallel plans look for
    for module in model.modules():
        if isinstance(module, serving_kernels.ServingModule):
            assert isinstance(module, Linear | RMSNorm | FeedForward | GroupedExperts | MoELayer)


def test_restore_brings_back_training_numerics(model: Transformer) -> None:
    reference = copy.deepcopy(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    classes = _classes(model)
    serving_kernels.install(model, serving_kernels.INVARIANT)
    serving_kernels.install(model, serving_kernels.FAST)  # re-installing starts from the model classes
    serving_kernels.restore(model)
    assert _classes(model) == classes and serving_kernels.installed(model) is None
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


@needs_kernels
def test_small_products_go_to_the_kernel_in_both_modes(model: Transformer) -> None:
    x = torch.randn(3, CFG.dim)
    expected = cpu_kernels.linear_f32(x, model.output.weight)
    for kernels in (serving_kernels.INVARIANT, serving_kernels.FAST):
        serving_kernels.install(model, kernels)
        with torch.no_grad():
            assert torch.equal(model.output(x), expected)


@needs_kernels
def test_served_forward_is_the_invariant_kernels_forward(model: Transformer) -> None:
    """The module path is the model's own forward with the kernels swapped in: its logits match the
    training forward closely and a row's bits do not depend on the rows beside it."""
    reference = copy.deepcopy(model)
    serving_kernels.install(model, serving_kernels.INVARIANT)
    ids = torch.randint(0, CFG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))

    # The engine's batch-invariant attention (one sequence); PyTorch's causal SDPA, the training
    # backend, gives a row bits that depend on the sequence's length on some CPUs (an AMD EPYC).
    def attention(q_BHTd, k_BGTd, v_BGTd, layer_id):
        pad = (0, 0, 0, -k_BGTd.shape[2] % KEY_TILE)  # the cache's key tiles (masked past each row)
        return invariant_attention(q_BHTd[0], F.pad(k_BGTd[0], pad), F.pad(v_BGTd[0], pad), 0)[None]

    with torch.no_grad():
        served, trained = model(ids, attention_backend=attention), reference(ids)
        alone = model(ids[:, :5], attention_backend=attention)
    torch.testing.assert_close(served, trained, rtol=1e-4, atol=1e-5)
    assert torch.equal(served[:, :5], alone)  # causal prefix computed alone: the same bits
    assert torch.equal(
        model.output(torch.ones(2, CFG.dim)), invariant_linear(torch.ones(2, CFG.dim), model.output.weight)
    )


@needs_kernels
def test_fused_install_swaps_every_block() -> None:
    cfg = ModelConfig(
        vocab_size=61, dim=32, num_layers=2, num_heads=4, num_kv_heads=1, max_seq_len=64,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=24),
    )  # fmt: skip
    model = Transformer.from_config(cfg).eval()
    assert fused_layers.supports(model)
    kernels = fused_layers.fused_kernels(model, serving_kernels.INVARIANT)
    serving_kernels.install(model, kernels)
    assert all(type(layer) is fused_layers.FusedBlock for layer in model.layers)
    serving_kernels.restore(model)
    assert all(type(layer) is Block for layer in model.layers)


def _imports(path: Path) -> set[str]:
    """Every moetron module `path` imports, at any depth in the file (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("moetron")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_model_package_knows_nothing_of_its_callers() -> None:
    for path in (ROOT / "model").glob("*.py"):
        for name in _imports(path):
            assert not name.startswith(
                ("moetron.infer", "moetron.kernels", "moetron.serve", "moetron.convert", "moetron.train")
            ), f"{path.name} imports {name}"


def test_no_import_cycles() -> None:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {
        name: {m for m in _imports(path) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }
    # A package's __init__ re-exporting its modules is not a cycle of theirs: drop package -> child.
    graph = {name: {m for m in deps if not m.startswith(name + ".")} for name, deps in graph.items()}
    visiting, done, cycles = set(), set(), []

    def visit(node: str, stack: list[str]) -> None:
        visiting.add(node)
        for dep in sorted(graph[node]):
            if dep in visiting:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in done:
                visit(dep, [*stack, dep])
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not cycles, cycles
