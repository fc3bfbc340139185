"""Triton rotate-half RoPE vs the PyTorch reference and Hugging Face Llama's implementation,
under Triton's interpreter on CPU.

Tolerances: fp32 1e-6 abs + 1e-6 rel (fp32 math, the same operations as the reference);
fp16 2e-3 and bf16 1.6e-2 abs + rel, about two units in the last place at magnitude 1 (the
kernel rounds once from fp32, the reference rounds after each operation; the interpreter
truncates fp32->bf16).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")
R = importlib.import_module("kernels.rope")

TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def tables(L, D, base=10000.0, dtype=torch.float32):
    inv = 1.0 / base ** (torch.arange(0, D, 2).double() / D)
    freqs = torch.arange(L).double()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def run(fn, q, k, cos, sin, gq, gk):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    oq, ok = fn(q, k, cos, sin)
    ((oq.double() * gq.double()).sum() + (ok.double() * gk.double()).sum()).backward()
    return oq.detach(), ok.detach(), q.grad, k.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "B,Hq,Hkv,L,D,batched",
    [
        (1, 2, 2, 1, 64, False),
        (2, 4, 2, 17, 64, True),
        (3, 3, 1, 130, 32, False),
        (1, 2, 1, 257, 128, True),
        (2, 2, 1, 17, 96, False),
    ],
)
def test_parity(B, Hq, Hkv, L, D, batched, dtype):
    g = torch.Generator().manual_seed(L + D)
    q = torch.randn(B, L, Hq, D, generator=g).to(dtype).transpose(1, 2)  # the model's strided view
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    cos, sin = tables(L, D, dtype=dtype)
    if batched:  # per-row positions (packed documents restart them)
        pos = torch.randint(0, L, (B, L), generator=g)
        cos, sin = cos[pos], sin[pos]
    gq, gk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    got = run(R.apply_rope, q, k, cos, sin, gq, gk)
    want = run(R.apply_rope_reference, q.double(), k.double(), cos.double(), sin.double(), gq, gk)
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("q", "k", "dq", "dk"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_matches_hugging_face_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    B, H, L, D = 2, 4, 33, 64
    q, k = torch.randn(B, H, L, D), torch.randn(B, 2, L, D)
    cos, sin = tables(L, D)
    cos, sin = cos.expand(B, L, D), sin.expand(B, L, D)
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    oq, ok = R.apply_rope(q, k, cos, sin)
    torch.testing.assert_close(oq, hq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ok, hk, atol=1e-6, rtol=1e-6)


def test_tables_with_different_halves():
    """Both halves of cos/sin are read, as the reference reads them."""
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 9, 16)
    cos, sin = torch.randn(9, 16), torch.randn(9, 16)
    for a, b in zip(R.apply_rope(q, k, cos, sin), R.apply_rope_reference(q, k, cos, sin)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_bad_tables_are_one_clear_error():
    with pytest.raises(ValueError, match="cos/sin must be"):
        R.apply_rope(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(7, 16), torch.randn(7, 16))
