"""Rotary position embedding (rotate-half, the Hugging Face Llama convention): Triton kernel, the
PyTorch reference and the autograd wrapper.

With x = [x1, x2] split at D/2 and cos/sin of shape [B, L, D] or [L, D]:
    out = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1]
i.e. out1 = x1*cos1 - x2*sin1, out2 = x2*cos2 + x1*sin2 (both halves of cos/sin are read, so
tables whose halves differ are handled exactly as the reference does). The backward is the
transposed rotation: dx1 = d1*cos1 + d2*sin2, dx2 = d2*cos2 - d1*sin1. Gradients flow to q and
k only (cos/sin are position tables, not trained).

One program rotates BLOCK_R rows (a row = one position of one head of one sequence, any
strides, so the model's transposed q/k views need no copy), in fp32; q and k are two launches
of the same kernel. The output dtype is the promotion of q's and cos's, as in the
reference.
"""

from __future__ import annotations

import torch

from kernels._runtime import Launcher, next_power_of_2, triton
from kernels.aot import Case

if triton is not None:
    import triton.language as tl


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """Rotate-half RoPE (Hugging Face Llama convention). q/k [B,H,L,D]; cos/sin [B,L,D] or [L,D]."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


if triton is not None:

    @triton.jit
    def _rope(
        X,
        COS,
        SIN,
        OUT,
        s_xb,
        s_xh,
        s_xl,
        s_ob,
        s_oh,
        s_ol,
        s_cb,
        s_cl,
        R,
        H,
        L,
        HALF: tl.constexpr,
        HALF_PAD: tl.constexpr,
        BACKWARD: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows (b, h, l) of x; R < 2^31
        b = (r // (H * L)).to(tl.int64)  # 32-bit division (64-bit needs a call and stack), 64-bit addresses
        h = ((r // L) % H).to(tl.int64)
        pos = (r % L).to(tl.int64)
        d = tl.arange(0, HALF_PAD)
        mask = (r < R)[:, None] & (d < HALF)[None, :]
        x_ptr = X + (b * s_xb + h * s_xh + pos * s_xl)[:, None] + d[None, :]
        c_off = (b * s_cb + pos * s_cl)[:, None] + d[None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(COS + c_off, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + c_off, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        o_ptr = OUT + (b * s_ob + h * s_oh + pos * s_ol)[:, None] + d[None, :]
        tl.store(o_ptr, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptr + HALF, o2.to(OUT.dtype.element_ty), mask=mask)

    ROPE = Launcher(_rope)


def gpu_settings(head_dim: int) -> dict:
    half = next_power_of_2(head_dim // 2)
    return {"BLOCK_R": max(1, 2048 // half), "num_warps": 4}


def _rotate(x, cos, sin, out_dtype, backward: bool):
    B, H, L, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(B, H, L, D, dtype=out_dtype, device=x.device)
    s_cb = cos.stride(0) if cos.dim() == 3 else 0
    half_pad = next_power_of_2(D // 2)
    rows = B * H * L
    if rows >= 2**31:
        raise ValueError(f"apply_rope: {rows} rows (batch x heads x length) exceed the kernel's 32-bit row index")
    if x.device.type == "cuda":
        meta = gpu_settings(D)
    else:  # interpreter: tiles of up to 32K elements, few programs
        meta = {"BLOCK_R": min(next_power_of_2(rows), max(1, 32768 // half_pad))}
    meta.update(HALF=D // 2, HALF_PAD=half_pad, BACKWARD=backward)
    ROPE(
        lambda m: (triton.cdiv(rows, m["BLOCK_R"]),),
        x.device,
        x,
        cos,
        sin,
        out,
        *x.stride()[:3],
        *out.stride()[:3],
        s_cb,
        cos.stride(-2),
        rows,
        H,
        L,
        meta=meta,
    )
    return out


def _tables(cos, sin, q):
    B, _, L, D = q.shape
    if cos.shape != sin.shape or cos.shape[-2:] != (L, D) or cos.dim() not in (2, 3) or (cos.dim() == 3 and cos.shape[0] != B):
        raise ValueError(
            f"apply_rope: cos/sin must be [L, D] or [B, L, D] = {(B, L, D)}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if D % 2:
        raise ValueError(f"apply_rope: head dim {D} must be even")
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
            raise ValueError(f"apply_rope: q/k must be [B,H,L,D] with equal B, L, D, got {tuple(q.shape)} and {tuple(k.shape)}")
        cos, sin = _tables(cos, sin, q)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return (_rotate(q, cos, sin, torch.result_type(q, cos), False), _rotate(k, cos, sin, torch.result_type(k, cos), False))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = None if dq is None else _rotate(dq, cos, sin, ctx.dtypes[0], True)
        dk = None if dk is None else _rotate(dk, cos, sin, ctx.dtypes[1], True)
        return dq, dk, None, None


def apply_rope(q, k, cos, sin):
    """Triton rotate-half RoPE (differentiable in q and k); same contract as `apply_rope_reference`."""
    return _Rope.apply(q, k, cos, sin)


def aot_cases():
    """AOT compile cases: forward and backward rotation at the GPU settings for head dims 64 and 128."""
    B, H, L = 2, 32, 4096
    for target in (80, 90):
        for dtype in (torch.bfloat16, torch.float32):
            for D in (64, 128):
                meta = gpu_settings(D)
                warps = meta.pop("num_warps")
                for backward in (False, True):
                    args = dict(
                        X=dtype,
                        COS=dtype,
                        SIN=dtype,
                        OUT=dtype,
                        s_xb=H * L * D,
                        s_xh=D,
                        s_xl=H * D,
                        s_ob=H * L * D,
                        s_oh=L * D,
                        s_ol=D,
                        s_cb=L * D,
                        s_cl=D,
                        R=B * H * L,
                        H=H,
                        L=L,
                    )
                    yield Case(
                        "rope_bwd" if backward else "rope_fwd",
                        target,
                        f"{str(dtype)[6:]} d{D} BR{meta['BLOCK_R']} w{warps}",
                        ROPE.fn,
                        args,
                        dict(meta, HALF=D // 2, HALF_PAD=D // 2, BACKWARD=backward),
                        warps,
                        1,
                    )
