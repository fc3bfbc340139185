"""The dispatch point: backend selection (auto / triton / torch, set_backend and
LLMTRAIN_KERNELS), routing of every entry point, and the kernels under TRITON_INTERPRET=1 (the
mode a worker gets when the variable is passed through; the tests here otherwise rely on the
kernels interpreting themselves on CPU tensors, see kernels/_runtime.py)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]


def small_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def grad_fns(outputs) -> list[str]:
    return [type(o.grad_fn).__name__ for o in outputs]


def routed():
    q, k, v = small_inputs()
    x = torch.randn(2, 9, 16, requires_grad=True)
    cos, sin = torch.randn(9, 16), torch.randn(9, 16)
    labels = torch.randint(0, 16, (2, 9))
    return grad_fns(
        [
            kernels.attention(q, k, v, doc_ids=torch.zeros(1, 9, dtype=torch.long)),
            kernels.rms_norm(x, torch.ones(16), 1e-5),
            kernels.apply_rope(q, k, cos, sin)[0],
            kernels.swiglu(x, x),
            kernels.cross_entropy(x, labels),
        ]
    )


def test_torch_and_auto_on_cpu_use_the_references(backend):
    backend("torch")
    assert kernels.backend() == "torch"
    names = routed()
    assert not any(n.startswith("_") for n in names), names
    backend("auto")
    assert kernels.backend() == ("triton" if torch.cuda.is_available() else "torch")
    assert routed() == names


def test_triton_routes_every_entry_point_to_a_kernel(backend, monkeypatch):
    backend("triton")
    assert kernels.backend() == "triton"
    assert routed() == ["_AttentionBackward", "_RMSNormBackward", "_RopeBackward", "_SwiGLUBackward", "_CrossEntropyBackward"]
    C = importlib.import_module("kernels.cross_entropy")
    calls = []
    real = C.chunk_loss_triton
    monkeypatch.setattr(C, "chunk_loss_triton", lambda *a: calls.append(1) or real(*a))
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    loss = kernels.fused_linear_cross_entropy(h, w, torch.randint(0, 20, (6,)))
    loss.backward()
    assert calls and type(loss.grad_fn).__name__ == "_FusedLinearCrossEntropyBackward"
    backend("torch")
    calls.clear()
    loss = kernels.fused_linear_cross_entropy(h, w, torch.randint(0, 20, (6,)))
    assert not calls and type(loss.grad_fn).__name__ == "_FusedLinearCrossEntropyBackward"  # chunked on torch too


def test_unknown_backend_is_one_clear_error(backend):
    with pytest.raises(ValueError, match="unknown kernels backend 'cuda'.*auto, triton, torch"):
        backend("cuda")
    env = dict(os.environ, LLMTRAIN_KERNELS="fast")
    run = subprocess.run([sys.executable, "-c", "import kernels"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode != 0 and "unknown kernels backend 'fast' from LLMTRAIN_KERNELS" in run.stderr


INTERPRET_SCRIPT = """
import importlib, torch, kernels
from triton.runtime.interpreter import InterpretedFunction
A = importlib.import_module("kernels.attention")
assert isinstance(A.FWD.fn, InterpretedFunction)  # TRITON_INTERPRET=1 was set before triton's import
assert kernels.backend() == "triton"
torch.manual_seed(0)
q, k, v = torch.randn(2, 4, 70, 32, requires_grad=True), torch.randn(2, 2, 70, 32), torch.randn(2, 2, 70, 32)
ids = torch.cat([torch.zeros(2, 30), torch.ones(2, 40)], 1).long()
o = kernels.attention(q, k, v, doc_ids=ids)
o.sum().backward()
ref = A.attention_reference(q.detach().requires_grad_(), k, v, doc_ids=ids)
assert type(o.grad_fn).__name__ == "_AttentionBackward"
torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5)
x, w = torch.randn(3, 17, 64), torch.rand(64) + 0.5
torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), importlib.import_module("kernels.rmsnorm").rms_norm_reference(x, w, 1e-5))
p = [torch.randn(100, requires_grad=True)]
p[0].grad = torch.randn(100)
opt = kernels.adamw_optimizer(p, lr=1e-2)
assert type(opt).__name__ == "FusedAdamW"
opt.step()
print("INTERPRET-OK")
"""


def test_kernels_under_triton_interpret(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", LLMTRAIN_KERNELS="triton")
    run = subprocess.run(
        [sys.executable, "-c", INTERPRET_SCRIPT], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert run.returncode == 0 and "INTERPRET-OK" in run.stdout, run.stderr[-3000:]
