"""Fused AdamW: one Triton launch updates many tensors (a multi-tensor apply over pointer tables),
the PyTorch reference (`torch.optim.AdamW`) and the optimizer class.

`FusedAdamW` is a `torch.optim.Optimizer`: per parameter group, the tensors that share dtypes
and step count go to one launch. Each program updates BLOCK elements of one tensor; the tensor
and offset of every program come from small tables built on the host, and the addresses of
parameters, gradients and states from int64 pointer tables (as apex's multi_tensor_apply does
with its chunk lists). The update is decoupled weight decay plus bias-corrected Adam, in the
same order of operations as torch.optim.AdamW:

    p  <- p * (1 - lr * wd)
    m  <- fma(1 - b1, g - m, m)                  (torch's lerp_)
    v  <- fma((1 - b2) * g, g, v * b2)           (torch's mul_ then addcmul_)
    p  <- p + (-lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)   (addcdiv_)

with the scalars computed in double on the host as torch does. On CPU (the interpreter) the
moments are then bit-identical to torch.optim.AdamW's single-tensor path; parameters differ by
about one float32 ulp where torch's vectorised CPU sqrt is not correctly rounded (measured:
~17% of elements; sqrt_rn here is IEEE), which the tests bound.

Parameters may be fp32, or bf16/fp16 with an fp32 master copy kept in the state (`master`):
the update runs on the master and the parameter receives its rounding. Moments are fp32.
`max_grad_norm` (clip the global gradient norm) and `step(grad_scale=...)` (e.g. 1/loss scale)
scale the gradients inside the kernel, without a pass over them: the scale is a device tensor,
so nothing synchronises with the host.

Under DeepSpeed ZeRO-1/2 the optimizer sees one flat fp32 partition per group (one tensor, one
launch); under ZeRO-3 a few flat fp32 sub-group partitions; state_dict/load_state_dict are the
base class's, with torch.optim.AdamW's state names (step, exp_avg, exp_avg_sq).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from kernels._runtime import Launcher, triton
from kernels.aot import Case

if triton is not None:
    import triton.language as tl


def adamw_reference(
    params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01
) -> torch.optim.Optimizer:
    """The `torch` backend's optimizer."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


if triton is not None:

    @triton.jit
    def _adamw(
        PARAMS,
        GRADS,
        EXP_AVGS,
        EXP_AVG_SQS,
        MASTERS,
        NUMELS,
        BLOCK_TENSOR,
        BLOCK_START,
        GRAD_SCALE,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        eps,
        decay,
        neg_step_size,
        bias_correction2_sqrt,
        PARAM_DTYPE: tl.constexpr,
        GRAD_DTYPE: tl.constexpr,
        HAS_MASTER: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(BLOCK_TENSOR + pid)
        start = tl.load(BLOCK_START + pid).to(tl.int64)
        n = tl.load(NUMELS + t)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        param = tl.load(PARAMS + t).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(GRADS + t).to(tl.pointer_type(GRAD_DTYPE))
        m_ptr = tl.load(EXP_AVGS + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(EXP_AVG_SQS + t).to(tl.pointer_type(tl.float32))
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * tl.load(GRAD_SCALE)
        if HAS_MASTER:
            master = tl.load(MASTERS + t).to(tl.pointer_type(tl.float32))
            p = tl.load(master + offs, mask=mask, other=0.0)
        else:
            p = tl.load(param + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        p = p * decay
        m = tl.fma(one_minus_beta1, g - m, m)  # torch's CPU lerp_ and addcmul_ round like these fmas
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        denom = tl.sqrt_rn(v) / bias_correction2_sqrt + eps
        p = p + neg_step_size * m / denom
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_MASTER:
            tl.store(master + offs, p, mask=mask)
        tl.store(param + offs, p.to(PARAM_DTYPE), mask=mask)

    ADAMW = Launcher(_adamw)

GPU_SETTINGS = {"BLOCK": 2048, "num_warps": 4}
CPU_BLOCK = 1 << 16


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def fused_adamw_update(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    masters,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: Optional[torch.Tensor] = None,
) -> None:
    """One launch updating every tensor in `params` (same dtype, same device, same step count);
    `masters` is None or the fp32 master copies of low-precision params."""
    if not params:
        return
    device = params[0].device
    block = GPU_SETTINGS["BLOCK"] if device.type == "cuda" else CPU_BLOCK
    tensors, starts, numels = [], [], []
    for i, p in enumerate(params):
        n = p.numel()
        numels.append(n)
        for s in range(0, n, block):
            tensors.append(i)
            starts.append(s)
    if not tensors:
        return

    def table(ts):
        return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device)

    as_int = lambda xs, dtype: torch.tensor(xs, dtype=dtype, device=device)  # noqa: E731
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    meta = dict(GPU_SETTINGS) if device.type == "cuda" else {"BLOCK": CPU_BLOCK}
    meta.update(
        PARAM_DTYPE=_tl_dtype(params[0].dtype),
        GRAD_DTYPE=_tl_dtype(grads[0].dtype),
        HAS_MASTER=masters is not None,
        HAS_SCALE=grad_scale is not None,
    )
    pointers = table(params)
    ADAMW(
        (len(tensors),),
        device,
        pointers,
        table(grads),
        table(exp_avgs),
        table(exp_avg_sqs),
        table(masters) if masters is not None else pointers,
        as_int(numels, torch.int64),
        as_int(tensors, torch.int32),
        as_int(starts, torch.int64),
        grad_scale if grad_scale is not None else pointers,
        1.0 - beta1,
        float(beta2),
        1.0 - beta2,
        float(eps),
        1.0 - lr * weight_decay,
        -(lr / bias_correction1),
        bias_correction2**0.5,
        meta=meta,
    )


def torch_adamw_update(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    masters,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: Optional[torch.Tensor] = None,
) -> None:
    """The same update with torch.optim.AdamW's single-tensor operations (its CPU path), for
    parameters on the CPU when the Triton backend is not forced (e.g. ZeRO-Offload partitions)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        target = masters[i] if masters is not None else p
        g = g.float() if grad_scale is None else g.float() * grad_scale
        target.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        target.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(eps), value=-(lr / bias_correction1))
        if masters is not None:
            p.copy_(target)


def _kernel_for(device: torch.device) -> bool:
    """The Triton kernel for CUDA tensors; for CPU tensors only when the `triton` backend is forced
    (it then runs under the interpreter, for tests)."""
    from kernels import dispatch  # here: dispatch imports this module when it loads

    return device.type == "cuda" or dispatch._backend == "triton"


class FusedAdamW(torch.optim.Optimizer):
    """AdamW with the Triton multi-tensor kernel; equals torch.optim.AdamW in fp32.

    CPU parameters (ZeRO-Offload hands the optimizer CPU partitions) take torch's operations
    instead unless the `triton` backend is forced: the interpreter is far too slow to train with.

    Low-precision (bf16/fp16) parameters get an fp32 master copy in their state. `max_grad_norm`
    (> 0) clips by the global L2 norm of all gradients; `step(grad_scale=s)` multiplies the
    gradients by `s` (a float or a 0-dim tensor) first. Neither reads a value back to the host.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        max_grad_norm: float = 0.0,
    ):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"FusedAdamW: invalid hyper-parameters lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.max_grad_norm = float(max_grad_norm)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)  # like torch.optim.AdamW: a CPU float tensor
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            if p.dtype != torch.float32:
                state["master"] = p.detach().float()
        return state

    def _grad_scale(self, grad_scale, device) -> Optional[torch.Tensor]:
        scale = None
        if grad_scale is not None:
            scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=device).reshape(())
        if self.max_grad_norm > 0:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.float()) for x in grads]))
                if scale is not None:
                    norm = norm * scale.abs()
                clip = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
                scale = clip if scale is None else scale * clip
        return scale

    @torch.no_grad()
    def step(self, closure=None, grad_scale=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scales = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            buckets: dict = {}
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1
                key = (p.device, p.dtype, p.grad.dtype, int(state["step"].item()))
                buckets.setdefault(key, []).append(p)
            for (device, _, _, step), ps in buckets.items():
                if device not in scales:
                    scales[device] = self._grad_scale(grad_scale, device)
                states = [self.state[p] for p in ps]
                update = fused_adamw_update if _kernel_for(device) else torch_adamw_update
                update(
                    ps,
                    [p.grad for p in ps],
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [s["master"] for s in states] if "master" in states[0] else None,
                    step=step,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    grad_scale=scales[device],
                )
        return loss


def aot_cases():
    """AOT compile cases: fp32 params, and bf16 params with fp32 masters, with and without a scale."""
    meta = dict(GPU_SETTINGS)
    warps = meta.pop("num_warps")
    for target in (80, 90):
        for pdtype, master in ((torch.float32, False), (torch.bfloat16, True)):
            for scale in (False, True):
                args = dict(
                    PARAMS=torch.int64,
                    GRADS=torch.int64,
                    EXP_AVGS=torch.int64,
                    EXP_AVG_SQS=torch.int64,
                    MASTERS=torch.int64,
                    NUMELS=torch.int64,
                    BLOCK_TENSOR=torch.int32,
                    BLOCK_START=torch.int64,
                    GRAD_SCALE=torch.float32,
                    one_minus_beta1=0.1,
                    beta2=0.95,
                    one_minus_beta2=0.05,
                    eps=1e-8,
                    decay=0.9999,
                    neg_step_size=-1e-3,
                    bias_correction2_sqrt=0.5,
                )
                yield Case(
                    "adamw",
                    target,
                    f"{str(pdtype)[6:]} params{' +master' if master else ''}{' +scale' if scale else ''} B{meta['BLOCK']} w{warps}",
                    ADAMW.fn,
                    args,
                    dict(meta, PARAM_DTYPE=_tl_dtype(pdtype), GRAD_DTYPE=_tl_dtype(pdtype), HAS_MASTER=master, HAS_SCALE=scale),
                    warps,
                    1,
                )
