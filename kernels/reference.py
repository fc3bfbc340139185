"""PyTorch reference implementations of every kernel (the `torch` backend)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def attention(q, k, v, doc_ids: Optional[torch.Tensor] = None, causal: bool = True, scale: Optional[float] = None):
    """Scaled dot-product attention, q [B,Hq,L,D], k/v [B,Hkv,L,D]; `doc_ids` [B,L] keeps
    attention inside each document of a packed row."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    L = q.shape[2]
    mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    if causal:
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def rms_norm(x, weight, eps: float):
    dtype = x.dtype
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    """Rotate-half RoPE (Hugging Face Llama convention). q/k [B,H,L,D]; cos/sin [B,L,D] or [L,D]."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu(gate, up):
    return F.silu(gate) * up


def cross_entropy(logits, labels, ignore_index: int = -100, reduction: str = "sum"):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index: int = -100, reduction: str = "sum"):
    """Reference: materialises the logits (the Triton path chunks them)."""
    logits = F.linear(hidden, weight, bias)
    return cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
