"""RMSNorm: Triton forward/backward kernels, the PyTorch reference and the autograd wrapper.

y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), computed in fp32 and normalised over the
last dimension, as Hugging Face Llama does (the normalised value is rounded to the input dtype
before the weight multiplies it; the output dtype is the promotion of weight's and x's).

Forward: one program normalises ROWS rows held whole in registers (BLOCK_N >= hidden size) and
keeps rstd per row for the backward. Backward: a persistent grid of programs each walks rows
with a stride, writes dx and accumulates its share of dweight in fp32; the partial rows are
summed on the host (as Liger-Kernel's rms_norm does).
"""

from __future__ import annotations

import torch

from kernels._runtime import Launcher, next_power_of_2, triton
from kernels.aot import Case

if triton is not None:
    import triton.language as tl

MAX_HIDDEN = 65536


def rms_norm_reference(x, weight, eps: float):
    dtype = x.dtype
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_fwd(X, W, Y, RSTD, s_x, s_y, R, N, eps, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        r_ok = rows < R
        mask = r_ok[:, None] & (cols < N)[None, :]
        x = tl.load(X + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, 1) / N + eps)
        normed = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(Y + rows[:, None] * s_y + cols[None, :], (w[None, :] * normed).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=r_ok)

    @triton.jit
    def _rms_norm_bwd(
        DY,
        X,
        W,
        RSTD,
        DX,
        DW_PART,
        s_dy,
        s_x,
        s_dx,
        R,
        N,
        BLOCK_N: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        step = tl.num_programs(0) * ROWS
        cols = tl.arange(0, BLOCK_N)
        c_ok = cols < N
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], tl.float32)
        for start in range(pid * ROWS, R, step):
            rows = start + tl.arange(0, ROWS)
            r_ok = rows < R
            mask = r_ok[:, None] & c_ok[None, :]
            x = tl.load(X + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * s_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)
            normed = x * rstd[:, None]
            dw += tl.sum(dy * normed.to(X.dtype.element_ty).to(tl.float32), 0)
            dn = dy * w[None, :]
            dx = rstd[:, None] * (dn - normed * (tl.sum(dn * normed, 1) / N)[:, None])
            tl.store(DX + rows[:, None] * s_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid * N + cols, dw, mask=c_ok)

    FWD = Launcher(_rms_norm_fwd)
    BWD = Launcher(_rms_norm_bwd)


def gpu_settings(n: int) -> dict:
    """Block size, rows per program and warps for a hidden size n on a GPU."""
    block = next_power_of_2(n)
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return {"BLOCK_N": block, "ROWS": max(1, 1024 // block), "num_warps": warps}


def _settings(n: int, rows: int, device: torch.device) -> dict:
    if device.type == "cuda":
        return gpu_settings(n)
    block = next_power_of_2(n)  # interpreter: whole tiles of up to 64K elements, few programs
    return {"BLOCK_N": block, "ROWS": min(next_power_of_2(rows), max(1, 65536 // block))}


def _backward_programs(rows: int, meta: dict, device: torch.device) -> int:
    tiles = triton.cdiv(rows, meta["ROWS"])
    if device.type == "cuda":
        return max(1, min(tiles, torch.cuda.get_device_properties(device).multi_processor_count * 2))
    return max(1, min(tiles, 2))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        N = x.shape[-1]
        if weight.shape != (N,):
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {N}")
        if N > MAX_HIDDEN:
            raise ValueError(
                f"rms_norm: hidden size {N} > {MAX_HIDDEN} is not supported by the Triton kernel; use LLMTRAIN_KERNELS=torch"
            )
        x2 = x.reshape(-1, N)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        R = x2.shape[0]
        y = torch.empty(R, N, dtype=torch.result_type(weight, x), device=x.device)
        rstd = torch.empty(R, dtype=torch.float32, device=x.device)
        meta = _settings(N, R, x.device)
        FWD(
            (triton.cdiv(R, meta["ROWS"]),), x.device, x2, weight, y, rstd, x2.stride(0), y.stride(0), R, N, float(eps), meta=meta
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        R, N = x2.shape
        dy2 = dy.reshape(-1, N)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        meta = _settings(N, R, x2.device)
        programs = _backward_programs(R, meta, x2.device)
        dw_part = torch.empty(programs, N, dtype=torch.float32, device=x2.device)
        BWD(
            (programs,), x2.device, dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0), R, N, meta=meta
        )
        return dx.view(ctx.x_shape), dw_part.sum(0).to(weight.dtype), None


def rms_norm(x, weight, eps: float):
    """Triton RMSNorm (differentiable in x and weight); same contract as `rms_norm_reference`."""
    return _RMSNorm.apply(x, weight, eps)


def aot_cases():
    """AOT compile cases: forward and backward at the GPU settings for common hidden sizes."""
    for target in (80, 90):
        for dtype in (torch.bfloat16, torch.float32):
            for n in (2048, 4096, 8192):
                meta = gpu_settings(n)
                warps = meta.pop("num_warps")
                tag = f"{str(dtype)[6:]} N{n} B{meta['BLOCK_N']} R{meta['ROWS']} w{warps}"
                yield Case(
                    "rms_norm_fwd",
                    target,
                    tag,
                    FWD.fn,
                    dict(X=dtype, W=dtype, Y=dtype, RSTD=torch.float32, s_x=n, s_y=n, R=8192, N=n, eps=1e-5),
                    meta,
                    warps,
                    1,
                )
                yield Case(
                    "rms_norm_bwd",
                    target,
                    tag,
                    BWD.fn,
                    dict(
                        DY=dtype,
                        X=dtype,
                        W=dtype,
                        RSTD=torch.float32,
                        DX=dtype,
                        DW_PART=torch.float32,
                        s_dy=n,
                        s_x=n,
                        s_dx=n,
                        R=8192,
                        N=n,
                    ),
                    meta,
                    warps,
                    1,
                )
