"""Triton RMSNorm vs the PyTorch reference, under Triton's interpreter on CPU.

Tolerances vs the reference evaluated in fp64 on the same rounded inputs (outputs and grads):
  fp32: 1e-5 abs + 1e-5 rel; fp16: 4e-3 abs + 4e-3 rel;
  bf16: 3e-2 abs + 3e-2 rel (interpreter: fp32 math on bf16 loads, truncating fp32->bf16
        conversion; bf16 rounding on hardware is unmeasured — see tests/test_kernels_attention.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")
M = importlib.import_module("kernels.rmsnorm")

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def run(fn, x, w, dy, eps):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 17, 96), (3, 130, 64), (1, 257, 128), (5, 1000)], ids=str)
def test_parity(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(*shape, generator=g).to(dtype)
    got = run(M.rms_norm, x, w, dy, 1e-5)
    want = run(M.rms_norm_reference, x.double(), w.double(), dy.double(), 1e-5)
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert a.dtype == dtype, name
        # dw sums over all rows: scale its tolerance with the row count
        scale = x.numel() // shape[-1] if name == "dw" and dtype != torch.float32 else 1
        torch.testing.assert_close(a.double(), b, atol=atol * scale**0.5, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_mixed_dtypes_promote_like_the_reference():
    """bf16 activations with an fp32 weight give an fp32 output, as `weight * y.to(bf16)` does."""
    x = torch.randn(4, 33, 64).bfloat16()
    w = torch.rand(64) + 0.5
    y = M.rms_norm(x, w, 1e-6)
    ref = M.rms_norm_reference(x, w, 1e-6)
    assert y.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=3e-2, rtol=3e-2)


def test_strided_input():
    x = torch.randn(17, 3, 64).transpose(0, 1)  # non-contiguous rows
    w = torch.rand(64) + 0.5
    torch.testing.assert_close(M.rms_norm(x, w, 1e-5), M.rms_norm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)


def test_wrong_weight_is_one_clear_error():
    with pytest.raises(ValueError, match="does not match hidden size"):
        M.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
