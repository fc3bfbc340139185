"""Triton SwiGLU vs the PyTorch reference, under Triton's interpreter on CPU.

Tolerances vs the reference in fp64 on the same rounded inputs: fp32 1e-6 abs + 1e-5 rel;
fp16 2e-3 abs + 2e-3 rel; bf16 1.6e-2 abs + 1.6e-2 rel (interpreter bf16 caveats as in
tests/test_kernels_attention.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")
S = importlib.import_module("kernels.swiglu")

TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def run(fn, gate, up, dy):
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = fn(gate, up)
    out.backward(dy)
    return out.detach(), gate.grad, up.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 7), (2, 17, 96), (3, 130, 352), (1, 257, 64)], ids=str)
def test_parity(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    gate = (4 * torch.randn(*shape, generator=g)).to(dtype)
    up, dy = torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)
    got = run(S.swiglu, gate, up, dy)
    want = run(S.swiglu_reference, gate.double(), up.double(), dy.double())
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("out", "dgate", "dup"), got, want):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_extreme_gates_stay_finite():
    gate = torch.tensor([-1000.0, -80.0, 0.0, 80.0, 1000.0])
    up = torch.ones(5)
    got = run(S.swiglu, gate, up, torch.ones(5))
    want = run(S.swiglu_reference, gate, up, torch.ones(5))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
