"""SwiGLU activation silu(gate) * up: Triton forward/backward kernel, the PyTorch reference and
the autograd wrapper.

Elementwise over the flattened inputs in fp32; the backward recomputes silu from the saved
inputs instead of keeping an activation (as Liger-Kernel's swiglu does):
    d_gate = dy * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  d_up = dy * silu(g).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._runtime import Launcher, triton
from kernels.aot import Case

if triton is not None:
    import triton.language as tl


def swiglu_reference(gate, up):
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _swiglu(G, U, DY, OUT, DG, DU, n, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.exp(-tl.abs(g))  # sigmoid without overflow for large |g|
        sig = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        silu = g * sig
        if BACKWARD:
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
            tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)
        else:
            tl.store(OUT + offs, (silu * u).to(OUT.dtype.element_ty), mask=mask)

    SWIGLU = Launcher(_swiglu)

GPU_SETTINGS = {"BLOCK": 1024, "num_warps": 4}
CPU_BLOCK = 1 << 16


def _meta(device: torch.device) -> dict:
    return dict(GPU_SETTINGS) if device.type == "cuda" else {"BLOCK": CPU_BLOCK}


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate, dtype=torch.result_type(gate, up))
        n = gate.numel()
        meta = _meta(gate.device)
        SWIGLU((triton.cdiv(n, meta["BLOCK"]),), gate.device, gate, up, gate, out, gate, gate, n, meta=dict(meta, BACKWARD=False))
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        meta = _meta(gate.device)
        SWIGLU((triton.cdiv(n, meta["BLOCK"]),), gate.device, gate, up, dy, dy, dg, du, n, meta=dict(meta, BACKWARD=True))
        return dg, du


def swiglu(gate, up):
    """Triton SwiGLU (differentiable in gate and up); same contract as `swiglu_reference`."""
    return _SwiGLU.apply(gate, up)


def aot_cases():
    """AOT compile cases: forward and backward at the GPU settings."""
    meta = dict(GPU_SETTINGS)
    warps = meta.pop("num_warps")
    for target in (80, 90):
        for dtype in (torch.bfloat16, torch.float32):
            for backward in (False, True):
                args = dict(G=dtype, U=dtype, DY=dtype, OUT=dtype, DG=dtype, DU=dtype, n=1 << 24)
                yield Case(
                    "swiglu_bwd" if backward else "swiglu_fwd",
                    target,
                    f"{str(dtype)[6:]} B{meta['BLOCK']} w{warps}",
                    SWIGLU.fn,
                    args,
                    dict(meta, BACKWARD=backward),
                    warps,
                    1,
                )
