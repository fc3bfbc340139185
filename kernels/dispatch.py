"""The single dispatch point between callers (model, engine) and kernel implementations.

`auto` (default) = Triton when CUDA is available, PyTorch reference otherwise. `triton` forces
the Triton kernels (on CPU they need TRITON_INTERPRET=1, set before Triton is imported);
`torch` forces the references. Set by `set_backend(name)` or `LLMTRAIN_KERNELS=name`.

Shapes used throughout: attention q [B, Hq, L, D], k/v [B, Hkv, L, D] (Hq % Hkv == 0);
`doc_ids` [B, L] integer document ids (attention never crosses a change of id).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from kernels import reference

_VALID = ("auto", "triton", "torch")
_backend = os.environ.get("LLMTRAIN_KERNELS", "auto")


def set_backend(name: str) -> None:
    global _backend
    if name not in _VALID:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of {', '.join(_VALID)}")
    _backend = name


def backend() -> str:
    """The backend in effect: 'triton' or 'torch'."""
    if _backend == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    return _backend


def attention(q, k, v, doc_ids: Optional[torch.Tensor] = None, causal: bool = True, scale: Optional[float] = None):
    return reference.attention(q, k, v, doc_ids=doc_ids, causal=causal, scale=scale)


def rms_norm(x, weight, eps: float):
    return reference.rms_norm(x, weight, eps)


def apply_rope(q, k, cos, sin):
    return reference.apply_rope(q, k, cos, sin)


def swiglu(gate, up):
    return reference.swiglu(gate, up)


def cross_entropy(logits, labels, ignore_index: int = -100, reduction: str = "sum"):
    return reference.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index: int = -100, reduction: str = "sum"):
    return reference.fused_linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction)
