"""Triton attention vs the PyTorch reference, under Triton's interpreter on CPU.

The Triton kernels run on CPU tensors through the interpreter (kernels/_runtime.py), so these
tests need no TRITON_INTERPRET and change nothing for other test files.

Tolerances (max abs error vs the reference evaluated in fp32/fp64 on the same rounded inputs):
  fp32: 2e-5 abs + 2e-5 rel      (measured ~1e-6)
  fp16: 4e-3 abs + 4e-3 rel      (fp16 tl.dot operands as on a GPU, output rounded to fp16)
  bf16: 3e-2 abs + 3e-2 rel      (bf16 in the interpreter: inputs and outputs are bf16 but the
        arithmetic is fp32 — the interpreter's bf16 math is wrong, see kernels/_runtime.py — and
        its fp32->bf16 conversion truncates; so this checks the kernel's algorithm and memory
        layout on bf16 tensors, not bf16 rounding on hardware, which is unmeasured)
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")
A = importlib.import_module("kernels.attention")

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def uneven_docs(B: int, L: int, seed: int) -> torch.Tensor:
    """Per-row document ids (cumsum of restarts) with uneven lengths, like the data pipeline's."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, L, generator=g) < 0.04
    starts[:, 0] = True
    if L > 5:
        starts[0, 3] = True  # a very short document
    return starts.long().cumsum(1) - 1


def run(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, **kw)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def check(dtype, B, Hq, Hkv, L, D, causal, docs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    do = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    doc_ids = uneven_docs(B, L, seed) if docs else None
    got = run(A.attention, q, k, v, do, doc_ids=doc_ids, causal=causal)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    want = run(
        A.attention_reference, q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), do.to(ref_dtype), doc_ids=doc_ids, causal=causal
    )
    atol, rtol = TOL[dtype]
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.dtype == dtype and x.shape == y.shape, name
        torch.testing.assert_close(x.to(ref_dtype), y, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# (B, Hq, Hkv, L, D, causal, docs): seq 1/17/130/257, batch 1-3, GQA ratios 1-4, head dims 16-128
SHAPES = [
    (1, 2, 2, 1, 64, True, False),
    (2, 4, 2, 17, 64, True, True),
    (3, 3, 1, 130, 32, True, True),
    (1, 4, 1, 257, 64, True, True),
    (2, 2, 2, 130, 16, False, False),
    (1, 4, 2, 257, 32, False, True),
    (1, 2, 1, 130, 128, True, False),
    (2, 6, 2, 17, 96, True, True),
]


@pytest.mark.parametrize(
    "shape",
    SHAPES,
    ids=lambda s: "B{}-H{}/{}-L{}-D{}-{}-{}".format(*s[:5], "causal" if s[5] else "full", "docs" if s[6] else "nodocs"),
)
def test_fp32_parity(shape):
    check(torch.float32, *shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[6]], ids=["L17-gqa2-docs", "L257-gqa4-docs", "L130-D128"])
def test_low_precision_parity(dtype, shape):
    check(dtype, *shape)


def test_packed_row_equals_documents_separately():
    """One packed row of uneven documents == each document attended on its own (outputs and grads)."""
    torch.manual_seed(1)
    lengths = [5, 40, 1, 71, 13]
    L, Hq, Hkv, D = sum(lengths), 4, 2, 32
    q, k, v, do = torch.randn(1, Hq, L, D), torch.randn(1, Hkv, L, D), torch.randn(1, Hkv, L, D), torch.randn(1, Hq, L, D)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    packed = run(A.attention, q, k, v, do, doc_ids=doc_ids)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = run(A.attention, q[:, :, sl], k[:, :, sl], v[:, :, sl], do[:, :, sl])
        for name, x, y in zip(("out", "dq", "dk", "dv"), packed, alone):
            torch.testing.assert_close(x[:, :, sl], y, atol=2e-5, rtol=2e-5, msg=lambda m: f"doc of {n} at {start}, {name}: {m}")
        start += n


def test_document_is_a_run_of_equal_ids():
    """Ids that repeat after a change start a new document ([0,0,1,1,0,0] = three documents),
    in the kernel and in the reference alike."""
    ids = torch.tensor([[0, 0, 1, 1, 0, 0, 0]])
    run_ids, start, end = A.document_runs(ids)
    assert run_ids.tolist() == [[0, 0, 1, 1, 2, 2, 2]]
    assert start.tolist() == [[0, 0, 2, 2, 4, 4, 4]] and end.tolist() == [[2, 2, 4, 4, 7, 7, 7]]
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    o = A.attention(q, k, v, doc_ids=ids, causal=False)
    torch.testing.assert_close(o, A.attention_reference(q, k, v, doc_ids=ids, causal=False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        o[:, :, 4:], A.attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], causal=False), atol=1e-5, rtol=1e-5
    )


def test_strided_inputs_and_scale():
    """q as a transposed view of [B, L, H, D] (what a model's projection gives) and a custom scale."""
    torch.manual_seed(3)
    B, L, Hq, Hkv, D = 2, 33, 4, 2, 32
    q = torch.randn(B, L, Hq, D).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D).transpose(1, 2)
    v = torch.randn(B, Hkv, L, D)
    do = torch.randn(B, Hq, L, D)
    got = run(A.attention, q, k, v, do, scale=0.3)
    want = run(A.attention_reference, q, k, v, do, scale=0.3)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("L,Lk,causal", [(1, 37, False), (5, 70, True), (70, 5, False)])
def test_keys_longer_or_shorter_than_queries(L, Lk, causal):
    """A KV cache: one new query against the cached keys (non-causal), and top-left causal
    alignment (query i sees keys <= i, as torch SDPA's is_causal) when lengths differ."""
    g = torch.Generator().manual_seed(L + Lk)
    q, do = torch.randn(2, 4, L, 32, generator=g), torch.randn(2, 4, L, 32, generator=g)
    k, v = torch.randn(2, 2, Lk, 32, generator=g), torch.randn(2, 2, Lk, 32, generator=g)
    got = run(A.attention, q, k, v, do, causal=causal)
    want = run(A.attention_reference, q.double(), k.double(), v.double(), do.double(), causal=causal)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(x.double(), y, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")


def test_bad_shapes_are_one_clear_error():
    q = torch.randn(1, 3, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        A.attention(q, k, k)
    with pytest.raises(ValueError, match="doc_ids must be"):
        A.attention(q, q, q, doc_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids need keys as long as queries"):
        A.attention(q, q[:, :, :5], q[:, :, :5], doc_ids=torch.zeros(1, 8, dtype=torch.long))
