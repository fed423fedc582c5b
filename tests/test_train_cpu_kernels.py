"""The CPU training kernels: the attention (kernels/attention_train_avx2.cpp, train/attention_cpu.py)
against torch's SDPA in fp32 on the same bf16 inputs, in every build this CPU runs, and installed
in a model against the same model on SDPA; the RMSNorm (train/norm_cpu.py) against a float64
reference. The loss's kernel is tested beside the fused loss (tests/test_model.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import torch_threads

from moetron.config import ModelConfig, MoEConfig
from moetron.kernels import cpu_kernels
from moetron.model.transformer import Attention, RMSNorm, Transformer, causal_sdpa
from moetron.train import attention_cpu, cpu_training_kernels, norm_cpu

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="moetron's CPU kernels are off here")

# Max |ours - fp32 reference| / max |reference|, per output. bf16 keeps 8 significant bits (0.4%);
# P and dS are rounded to bf16 before their products. Measured: <= 0.0074; torch's SDPA in bf16 on
# the same inputs: up to 0.021 (dK at 300 tokens). fp32 against float64: <= 6e-7 measured.
RELATIVE_TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
SHAPES = [  # B, T, H, G, d: MQA, GQA, MHA; T under, over and not a multiple of the 32-row blocks
    (1, 5, 2, 1, 16),
    (2, 37, 4, 2, 32),
    (1, 100, 3, 3, 48),
    (3, 64, 2, 1, 64),
    (2, 300, 4, 1, 128),
]


def _inputs(
    B: int, T: int, H: int, G: int, d: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, n, d, generator=gen).to(dtype) for n in (H, G, G, H)]  # q, k, v, dout


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> list[torch.Tensor]:
    """out, dq, dk, dv from float64 SDPA on the same values, in the kernel's [B, T, heads, d] rows."""
    q64, k64, v64 = (t.double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=True)
    out.backward(dout.double().transpose(1, 2))
    return [t.transpose(1, 2) for t in (out.detach(), q64.grad, k64.grad, v64.grad)]


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> list[torch.Tensor]:
    scale = q.shape[-1] ** -0.5
    out, lse = cpu_kernels.attention_train_forward(q, k, v, scale)
    return [out, *cpu_kernels.attention_train_backward(q, k, v, out, dout, lse, scale)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_float64_attention_in_every_build(
    shape: tuple[int, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, k, v, dout = _inputs(*shape, dtype=dtype)
    expected = _reference(q, k, v, dout)
    for isa in cpu_kernels.supported_isas():  # AVX512-BF16's dpbf16ps, and the FMA emulation of it
        monkeypatch.setenv("MOETRON_CPU_ISA", isa)
        got = _kernel(q, k, v, dout)
        for name, ours, ref in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
            assert ours.dtype == dtype and ours.shape == ref.shape, (isa, name)
            error = (ours.double() - ref).abs().max() / ref.abs().max()
            assert error < RELATIVE_TOLERANCE[dtype], (isa, name, float(error))


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_is_deterministic_and_its_forward_batch_invariant(threads: int) -> None:
    """The same bits every call, for one kv head per batch row (B=1: the tasks of one kv head
    shared by the threads, partial sums added in thread order) and several (each on one thread);
    a sequence's output and log-sum-exp are the same bits alone as in a batch."""
    with torch_threads(threads):
        for B, dtype in ((1, torch.bfloat16), (4, torch.bfloat16), (1, torch.float32), (4, torch.float32)):
            q, k, v, dout = _inputs(B, 77, 4, 1, 64, seed=B, dtype=dtype)
            first, again = _kernel(q, k, v, dout), _kernel(q, k, v, dout)
            assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
            scale = 64**-0.5
            out, lse = cpu_kernels.attention_train_forward(q, k, v, scale)
            for b in range(B):
                alone_out, alone_lse = cpu_kernels.attention_train_forward(
                    q[b : b + 1], k[b : b + 1], v[b : b + 1], scale
                )
                assert torch.equal(alone_out[0], out[b]) and torch.equal(alone_lse[0], lse[b])


def _model(dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, dim=64, num_layers=2, num_heads=4, num_kv_heads=1, max_seq_len=64,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=64),
    )  # fmt: skip
    model = Transformer(cfg)
    model.init_weights()
    return model.to(dtype)


def _loss_and_grads(model: Transformer, ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    targets = torch.roll(ids, -1, dims=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, targets_BT=targets)
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("setting", ["bf16 weights", "fp32 masters under bf16 autocast"])
def test_installed_kernel_trains_the_model_as_sdpa_does(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    autocast = setting.startswith("fp32")
    model = _model(torch.float32 if autocast else torch.bfloat16)
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    sdpa_loss, sdpa_grads = _loss_and_grads(model, ids, autocast)
    calls = []
    apply = attention_cpu.CausalAttention.apply
    monkeypatch.setattr(attention_cpu.CausalAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    assert attention_cpu.install(model) and model.default_attention is attention_cpu.causal_attention
    loss, grads = _loss_and_grads(model, ids, autocast)
    assert len(calls) == 2  # one per layer: the kernel ran, not SDPA
    fp32 = setting == "fp32"
    assert abs(loss.item() - sdpa_loss.item()) < (1e-5 if fp32 else 2e-2)
    for name, grad in sdpa_grads.items():
        error = (grads[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)
        assert error < (1e-4 if fp32 else 0.1), (name, float(error))  # bf16: rounding through two layers


@pytest.mark.parametrize(
    "dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)]
)
def test_rotary_kernel_matches_apply_rope_and_its_gradient(dtypes: tuple[torch.dtype, torch.dtype]) -> None:
    """x rotated and the gradient (the inverse rotation) against model/rope.py's ops; head_dim 20
    (a vector tail). In x's dtype (bf16 x with fp32 angles: apply_rope promotes to fp32; the
    kernel rounds to bf16 once)."""
    from moetron.model.rope import apply_rope

    x_dtype, angle_dtype = dtypes
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 17, 3, 20, generator=gen).to(x_dtype).transpose(1, 2)  # a projection's rows
    dout = torch.randn(2, 3, 17, 20, generator=gen)
    angles = 6 * torch.rand(2, 17, 20, generator=gen)
    cos, sin = angles.cos().to(angle_dtype), angles.sin().to(angle_dtype)
    results = []
    for rotate in (apply_rope, attention_cpu.rotate):
        xi = x.detach().requires_grad_()
        out = rotate(xi, cos, sin)
        out.backward(dout.to(out.dtype))
        results.append((out, xi.grad))
    (ref_out, ref_grad), (out, grad) = results
    assert out.dtype == grad.dtype == x_dtype
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "RopeRowsBackward"
    tol = {"rtol": 1e-6, "atol": 1e-6} if x_dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)


def test_attention_the_kernel_does_not_take_keeps_sdpa() -> None:
    half = [torch.randn(2, n, 9, 32).half() for n in (4, 1, 1)]
    assert torch.equal(attention_cpu.causal_attention(*half, 0), causal_sdpa(*half, 0))
    odd_width = [torch.randn(2, n, 9, 24).bfloat16() for n in (4, 1, 1)]  # d not a multiple of 16
    assert torch.equal(attention_cpu.causal_attention(*odd_width, 0), causal_sdpa(*odd_width, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_kernel_matches_float64_at_least_as_well_as_the_torch_ops(dtype: torch.dtype) -> None:
    """Output, input gradient and weight gradient against float64, width 13 (the vector tail) and
    512; the kernel rounds once, the module's ops several times, so its error is at most theirs
    (fp32: within rounding of it)."""
    gen = torch.Generator().manual_seed(5)
    for rows, dim in ((7, 13), (300, 512)):
        norm = RMSNorm(dim, 1e-5)
        norm.weight.data = 1 + 0.1 * torch.randn(dim, generator=gen)
        norm = norm.to(dtype)
        x, dy = (
            3 * torch.randn(rows, dim, generator=gen).to(dtype),
            torch.randn(rows, dim, generator=gen).to(dtype),
        )
        x64, w64 = x.double().requires_grad_(), norm.weight.detach().double().requires_grad_()
        (w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(dy.double())
        expected = [None, x64.grad, w64.grad]
        errors = {}
        for kernel in (None, norm_cpu.rms_norm):
            norm.kernel, norm.weight.grad = kernel, None
            xi = x.clone().requires_grad_()
            y = norm(xi)
            y.backward(dy)
            assert y.dtype == dtype and xi.grad.dtype == dtype and norm.weight.grad.dtype == dtype
            x64_out = (w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).detach()
            errors[kernel] = [
                float((got.detach().double() - ref).abs().max())
                for got, ref in zip((y, xi.grad, norm.weight.grad), [x64_out, *expected[1:]], strict=True)
            ]
        slack = 1.0 if dtype == torch.bfloat16 else 16.0  # fp32: both at rounding level
        for ours, torchs in zip(errors[norm_cpu.rms_norm], errors[None], strict=True):
            assert ours <= slack * torchs + 1e-6, (rows, dim, errors)


def test_install_puts_every_kernel_on_a_model_and_training_still_learns() -> None:
    model = _model(torch.bfloat16)
    assert cpu_training_kernels.install(model) == ["moe", "attention", "norm", "loss"]
    assert all(n.kernel is norm_cpu.rms_norm for n in model.modules() if isinstance(n, RMSNorm))
    assert all(a.rotate is attention_cpu.rotate for a in model.modules() if isinstance(a, Attention))
    ids = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, targets_BT=torch.roll(ids, -1, dims=1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # memorises one batch
