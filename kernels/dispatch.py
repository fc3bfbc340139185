"""The single dispatch point between callers (model, engine) and kernel implementations.

`auto` (default) = the Triton kernels for tensors on a CUDA device (when triton is installed),
the PyTorch references otherwise. `triton` forces the Triton kernels: on CPU tensors they run
under Triton's interpreter (slow, for tests; see kernels/_runtime.py). `torch` forces the
references. `LLMTRAIN_KERNELS=name` sets the default at import; `set_backend(name)` overrides it.

Shapes used throughout: attention q [B, Hq, L, D], k/v [B, Hkv, L, D] (Hq % Hkv == 0);
`doc_ids` [B, L] integer document ids (attention never crosses a change of id).

`fused_linear_cross_entropy` is chunked on both backends (it never materialises the
[tokens, vocab] logits); the torch backend computes each chunk's loss with PyTorch ops.
"""

from __future__ import annotations

import importlib
import os
from typing import Iterable, Optional

import torch

from kernels._runtime import require_triton, triton

# By module path: the package re-exports functions named like three of these modules
# (kernels.attention, kernels.swiglu, kernels.cross_entropy are the dispatch functions).
_adamw, _attention, _cross_entropy, _rmsnorm, _rope, _swiglu = (
    importlib.import_module(f"kernels.{name}") for name in ("adamw", "attention", "cross_entropy", "rmsnorm", "rope", "swiglu")
)

_VALID = ("auto", "triton", "torch")


def _parse(name: str, source: str) -> str:
    if name not in _VALID:
        raise ValueError(f"unknown kernels backend {name!r} from {source}; choose one of {', '.join(_VALID)}")
    return name


_backend = _parse(os.environ.get("LLMTRAIN_KERNELS", "auto"), "LLMTRAIN_KERNELS")


def set_backend(name: str) -> None:
    global _backend
    _parse(name, "set_backend()")
    if name == "triton":
        require_triton()
    _backend = name


def backend() -> str:
    """The backend in effect for CUDA tensors on this machine: 'triton' or 'torch' (CPU tensors
    take the references under `auto`)."""
    if _backend == "auto":
        return "triton" if torch.cuda.is_available() and triton is not None else "torch"
    return _backend


def _use_triton(x: torch.Tensor) -> bool:
    if _backend == "auto":
        return x.is_cuda and triton is not None
    return _backend == "triton"


def attention(q, k, v, doc_ids: Optional[torch.Tensor] = None, causal: bool = True, scale: Optional[float] = None):
    impl = _attention.attention if _use_triton(q) else _attention.attention_reference
    return impl(q, k, v, doc_ids=doc_ids, causal=causal, scale=scale)


def rms_norm(x, weight, eps: float):
    impl = _rmsnorm.rms_norm if _use_triton(x) else _rmsnorm.rms_norm_reference
    return impl(x, weight, eps)


def apply_rope(q, k, cos, sin):
    impl = _rope.apply_rope if _use_triton(q) else _rope.apply_rope_reference
    return impl(q, k, cos, sin)


def swiglu(gate, up):
    impl = _swiglu.swiglu if _use_triton(gate) else _swiglu.swiglu_reference
    return impl(gate, up)


def cross_entropy(logits, labels, ignore_index: int = -100, reduction: str = "sum"):
    impl = _cross_entropy.cross_entropy if _use_triton(logits) else _cross_entropy.cross_entropy_reference
    return impl(logits, labels, ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index: int = -100, reduction: str = "sum"):
    chunk_loss = _cross_entropy.chunk_loss_triton if _use_triton(hidden) else _cross_entropy.chunk_loss_torch
    return _cross_entropy.fused_linear_cross_entropy(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction, chunk_loss=chunk_loss
    )


def adamw_optimizer(
    param_groups: Iterable, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """AdamW for `param_groups` (tensors or dicts; a group's own "weight_decay" wins): the fused
    Triton optimizer when the parameters are on CUDA under `auto` (always under `triton`),
    torch.optim.AdamW otherwise."""
    groups = list(param_groups)
    first = next((p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])), None)
    if first is not None and _use_triton(first):
        return _adamw.FusedAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return _adamw.adamw_reference(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
