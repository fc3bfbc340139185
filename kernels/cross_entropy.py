"""Cross-entropy over the vocabulary (Triton kernel, PyTorch reference, autograd wrapper) and the
chunked fused linear + cross-entropy that never materialises the [tokens, vocab] logits.

`cross_entropy(logits [..., V], labels [...])`: per row an online log-sum-exp over vocabulary
blocks in fp32, loss = lse - logit[label]; rows whose label is `ignore_index` contribute 0 loss
and 0 gradient; reduction "sum" (the training loop's: summed over supervised tokens, divided by
the global count outside), "mean" (over supervised tokens) or "none". Labels must lie in
[0, V) or equal ignore_index (the kernel does not check; the reference raises).

`fused_linear_cross_entropy(hidden [..., H], weight [V, H], labels)`: the tokens are processed
in chunks of C rows (C ~ tokens * H / V, Liger-Kernel's choice, so a chunk's logits take about
as much memory as the hidden states; at least ~2^24 logits per chunk, see `chunk_rows`). Per chunk: logits = hidden_c @ weight.T (+ bias) with the
framework's matmul, then one kernel pass computes the loss and overwrites the chunk's logits
with d(loss)/d(logits); grad_hidden_c = dlogits @ weight and grad_weight += dlogits.T @ hidden_c
follow immediately, so peak extra memory is one chunk, not [tokens, V]. For "sum"/"mean" the
gradients are computed in the forward and scaled by the incoming gradient in the backward (as
Liger-Kernel does); for "none" the backward recomputes each chunk with the per-token gradient.
grad_weight accumulates in the weight's dtype. The `torch` backend runs the same chunking with
a PyTorch per-chunk loss (`chunk_loss_torch`), so the memory bound holds on CPU too.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kernels._runtime import Launcher, next_power_of_2, triton
from kernels.aot import Case

if triton is not None:
    import triton.language as tl

_REDUCTIONS = ("sum", "mean", "none")


def cross_entropy_reference(logits, labels, ignore_index: int = -100, reduction: str = "sum"):
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )


def fused_linear_cross_entropy_reference(hidden, weight, labels, bias=None, ignore_index: int = -100, reduction: str = "sum"):
    """Materialises the full logits (the test oracle; the backends chunk)."""
    return cross_entropy_reference(F.linear(hidden, weight, bias), labels, ignore_index=ignore_index, reduction=reduction)


if triton is not None:

    @triton.jit
    def _cross_entropy(
        LOGITS,
        LABELS,
        LOSS,
        LSE,
        SCALE,
        GRAD,
        s_row,
        s_grad,
        R,
        V,
        ignore_index,
        LOSS_PASS: tl.constexpr,
        GRAD_PASS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        r_ok = rows < R
        label = tl.load(LABELS + rows, mask=r_ok, other=ignore_index).to(tl.int32)
        base = LOGITS + rows.to(tl.int64)[:, None] * s_row
        if LOSS_PASS:
            m = tl.full([ROWS], float("-inf"), tl.float32)
            s = tl.zeros([ROWS], tl.float32)
            target = tl.zeros([ROWS], tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = r_ok[:, None] & (cols < V)[None, :]
                x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
                m = m_new
                target += tl.sum(tl.where(cols[None, :] == label[:, None], x, 0.0), 1)
            lse = tl.where(r_ok, m + tl.log(tl.where(r_ok, s, 1.0)), 0.0)
            valid = r_ok & (label != ignore_index)
            tl.store(LOSS + rows, tl.where(valid, lse - target, 0.0), mask=r_ok)
            tl.store(LSE + rows, lse, mask=r_ok)
        else:
            lse = tl.load(LSE + rows, mask=r_ok, other=0.0)
        if GRAD_PASS:
            scale = tl.load(SCALE + rows, mask=r_ok, other=0.0)
            gbase = GRAD + rows.to(tl.int64)[:, None] * s_grad
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = r_ok[:, None] & (cols < V)[None, :]
                x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
                tl.store(gbase + cols[None, :], (p * scale[:, None]).to(GRAD.dtype.element_ty), mask=mask)

    CE = Launcher(_cross_entropy)


def gpu_settings(vocab: int) -> dict:
    return {"BLOCK_V": min(8192, next_power_of_2(vocab)), "ROWS": 1, "num_warps": 16 if vocab >= 8192 else 8}


def _meta(rows: int, vocab: int, device: torch.device) -> dict:
    if device.type == "cuda":
        return gpu_settings(vocab)
    block = min(1 << 15, next_power_of_2(vocab))  # interpreter: large tiles, few programs
    return {"BLOCK_V": block, "ROWS": min(next_power_of_2(rows), max(1, (1 << 15) // block))}


def _launch(logits2, labels1, loss, lse, scale, grad, ignore_index: int, loss_pass: bool, grad_pass: bool):
    R, V = logits2.shape
    meta = _meta(R, V, logits2.device)
    meta.update(LOSS_PASS=loss_pass, GRAD_PASS=grad_pass)
    CE(
        (triton.cdiv(R, meta["ROWS"]),),
        logits2.device,
        logits2,
        labels1,
        loss,
        lse,
        scale,
        grad,
        logits2.stride(0),
        grad.stride(0),
        R,
        V,
        int(ignore_index),
        meta=meta,
    )


def _rows(logits, labels):
    V = logits.shape[-1]
    logits2 = logits.reshape(-1, V)
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    labels1 = labels.reshape(-1)
    if labels1.shape[0] != logits2.shape[0]:
        raise ValueError(f"cross_entropy: {labels1.shape[0]} labels for {logits2.shape[0]} rows of logits")
    return logits2, labels1.contiguous()


def _reduce(loss_rows, valid, reduction):
    if reduction == "sum":
        return loss_rows.sum()
    if reduction == "mean":
        return loss_rows.sum() / valid.sum()
    return loss_rows


def _row_scale(grad_out, valid, reduction):
    """d(reduced loss)/d(row loss) times the incoming gradient, 0 on ignored rows (fp32 [R])."""
    if reduction == "none":
        g = grad_out.reshape(-1).float()
    elif reduction == "mean":
        g = grad_out.float() / valid.sum().clamp(min=1)
    else:
        g = grad_out.float()
    return torch.where(valid, g, torch.zeros((), device=valid.device)).contiguous()


def _check_reduction(reduction: str, name: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: unknown reduction {reduction!r}; choose one of {', '.join(_REDUCTIONS)}")


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction):
        logits2, labels1 = _rows(logits, labels)
        R = logits2.shape[0]
        loss = torch.empty(R, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        _launch(logits2, labels1, loss, lse, loss, loss, ignore_index, True, False)
        valid = labels1 != ignore_index
        ctx.save_for_backward(logits2, labels1, lse, valid)
        ctx.ignore_index, ctx.reduction, ctx.shape = ignore_index, reduction, logits.shape
        return _reduce(loss, valid, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        logits2, labels1, lse, valid = ctx.saved_tensors
        grad = torch.empty_like(logits2)
        scale = _row_scale(grad_out, valid, ctx.reduction)
        _launch(logits2, labels1, lse, lse, scale, grad, ctx.ignore_index, False, True)
        return grad.view(ctx.shape), None, None, None


def cross_entropy(logits, labels, ignore_index: int = -100, reduction: str = "sum"):
    """Triton cross-entropy (differentiable in logits); same contract as `cross_entropy_reference`."""
    _check_reduction(reduction, "cross_entropy")
    return _CrossEntropy.apply(logits, labels, ignore_index, reduction)


# ---- chunked fused linear + cross-entropy -------------------------------------------------

ChunkLoss = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int], torch.Tensor]
"""(logits [C, V], labels [C], row scale [C] or None, ignore_index) -> loss per row fp32 [C].
With a scale, the logits are overwritten in place by scale * d(row loss)/d(logits)."""


def chunk_loss_triton(logits, labels, scale, ignore_index: int):
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    grad_pass = scale is not None
    _launch(logits, labels, loss, lse, scale if grad_pass else loss, logits, ignore_index, True, grad_pass)
    return loss


def chunk_loss_torch(logits, labels, scale, ignore_index: int):
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = torch.where(valid, lse - x.gather(1, safe[:, None]).squeeze(1), 0.0)
    if scale is not None:
        p = x.sub_(lse[:, None]).exp_()  # in place: x is the chunk's logits when they are fp32
        p[torch.arange(len(labels), device=labels.device), safe] -= valid.to(p.dtype)
        p.mul_(scale[:, None])
        if p is not logits:
            logits.copy_(p)
    return loss


MIN_CHUNK_ELEMENTS = 1 << 24
"""A chunk holds at least this many logits (64 MiB in fp32): smaller chunks made the matmuls
slow on CPU (measured: 4096 tokens, hidden 512, vocab 32000 took 2-4x longer with 128-row
chunks than materialised; 512-row chunks matched it)."""


def chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: about tokens * hidden / vocab (a chunk's logits ~ the hidden states, as
    Liger-Kernel chooses), at least MIN_CHUNK_ELEMENTS / vocab."""
    factor = -(-vocab // hidden)
    floor = 1 << max(0, (MIN_CHUNK_ELEMENTS // vocab).bit_length() - 1)  # a power of two <= 2^24 / V
    rows = max(next_power_of_2(-(-tokens // factor)), floor)
    return max(1, min(tokens, rows))


def _chunks(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, reduction, chunk_loss: ChunkLoss, chunk: Optional[int]):
        H = hidden.shape[-1]
        V = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != H or (bias is not None and bias.shape != (V,)):
            raise ValueError(
                f"fused_linear_cross_entropy: weight {tuple(weight.shape)} / bias {None if bias is None else tuple(bias.shape)} do not fit hidden size {H}"
            )
        h2 = hidden.reshape(-1, H)
        y = labels.reshape(-1).contiguous()
        if y.shape[0] != h2.shape[0]:
            raise ValueError(f"fused_linear_cross_entropy: {y.shape[0]} labels for {h2.shape[0]} tokens")
        N = h2.shape[0]
        valid = y != ignore_index
        size = chunk or chunk_rows(N, H, V)
        loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        ctx.reduction, ctx.ignore_index, ctx.chunk_loss, ctx.size, ctx.hidden_shape = (
            reduction,
            ignore_index,
            chunk_loss,
            size,
            hidden.shape,
        )
        if reduction == "none":  # the backward needs per-token gradients: recompute there
            with torch.no_grad():
                for s, e in _chunks(N, size):
                    loss_rows[s:e] = chunk_loss(F.linear(h2[s:e], weight, bias), y[s:e], None, ignore_index)
            ctx.save_for_backward(h2, weight, bias, y, valid)
            return loss_rows
        scale = torch.where(valid, 1.0 / valid.sum().clamp(min=1) if reduction == "mean" else 1.0, 0.0).float()
        grad_h = torch.empty_like(h2) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        with torch.no_grad():
            for s, e in _chunks(N, size):
                logits = F.linear(h2[s:e], weight, bias)
                loss_rows[s:e] = chunk_loss(logits, y[s:e], scale[s:e], ignore_index)
                _accumulate(logits, h2[s:e], weight, grad_h, grad_w, grad_b, s, e)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return _reduce(loss_rows, valid, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction != "none":
            grad_h, grad_w, grad_b = ctx.saved_tensors
            g = grad_out.float()
            grads = [None if t is None else (t * g).to(t.dtype) for t in (grad_h, grad_w, grad_b)]
        else:
            h2, weight, bias, y, valid = ctx.saved_tensors
            need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
            scale = _row_scale(grad_out, valid, "none")
            grads = [
                torch.empty_like(h2) if need_h else None,
                torch.zeros_like(weight) if need_w else None,
                torch.zeros_like(bias) if need_b else None,
            ]
            with torch.no_grad():
                for s, e in _chunks(h2.shape[0], ctx.size):
                    logits = F.linear(h2[s:e], weight, bias)
                    ctx.chunk_loss(logits, y[s:e], scale[s:e], ctx.ignore_index)
                    _accumulate(logits, h2[s:e], weight, *grads, s, e)
        grad_h, grad_w, grad_b = grads
        if grad_h is not None:
            grad_h = grad_h.view(ctx.hidden_shape)
        return grad_h, grad_w, None, grad_b, None, None, None, None


def _accumulate(dlogits, h, weight, grad_h, grad_w, grad_b, s, e):
    if grad_h is not None:
        torch.matmul(dlogits, weight, out=grad_h[s:e])
    if grad_w is not None:
        grad_w.addmm_(dlogits.t(), h)
    if grad_b is not None:
        grad_b.add_(dlogits.sum(0))


def fused_linear_cross_entropy(
    hidden,
    weight,
    labels,
    bias=None,
    ignore_index: int = -100,
    reduction: str = "sum",
    chunk_loss: Optional[ChunkLoss] = None,
    chunk: Optional[int] = None,
):
    """Chunked linear + cross-entropy (differentiable in hidden, weight and bias); same contract as
    `fused_linear_cross_entropy_reference`. `chunk_loss` defaults to the Triton kernel; `chunk`
    overrides the rows per chunk."""
    _check_reduction(reduction, "fused_linear_cross_entropy")
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, labels, bias, ignore_index, reduction, chunk_loss or chunk_loss_triton, chunk
    )


def aot_cases():
    """AOT compile cases: the forward (loss), backward (gradient) and fused chunk (loss and
    in-place gradient) variants at both GPU settings (vocab < 8192: 8 warps; larger: 16)."""
    for target in (80, 90):
        for dtype in (torch.bfloat16, torch.float32):
            for vocab in (5000, 128256):
                meta = gpu_settings(vocab)
                warps = meta.pop("num_warps")
                args = dict(
                    LOGITS=dtype,
                    LABELS=torch.int64,
                    LOSS=torch.float32,
                    LSE=torch.float32,
                    SCALE=torch.float32,
                    GRAD=dtype,
                    s_row=vocab,
                    s_grad=vocab,
                    R=8192,
                    V=vocab,
                    ignore_index=-100,
                )
                for name, loss_pass, grad_pass in (
                    ("ce_fwd", True, False),
                    ("ce_bwd", False, True),
                    ("ce_fused_chunk", True, True),
                ):
                    yield Case(
                        name,
                        target,
                        f"{str(dtype)[6:]} V{vocab} BV{meta['BLOCK_V']} w{warps}",
                        CE.fn,
                        args,
                        dict(meta, LOSS_PASS=loss_pass, GRAD_PASS=grad_pass),
                        warps,
                        1,
                    )
