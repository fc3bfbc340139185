"""The GPU check: every kernel compiled on the GPU against its reference, the kernels' convergence
run, benchmarks/kernels.py, and the decoder at the 125M and 1B shapes, in one command and one table.

    bash benchmarks/gpu_check.sh                 # a CUDA machine: <= 8 min on one H100/H200
    python benchmarks/gpu_check.py --cpu-smoke   # the same driver on CPU at tiny shapes (what tests run)

Needs only torch, triton (and for kernels.py's FA2 column, flash_attn if present): ray, deepspeed
and datasets are blocked at import (a sys.meta_path finder; an attempt is a failure in the
table), and TRITON_INTERPRET is removed before triton loads, so on CUDA every kernel is
compiled and autotuned. The parts, in the order they run:

  (a) parity: each kernel (attention fwd+bwd with causal/GQA/documents/odd lengths, RMSNorm,
      RoPE, SwiGLU, cross-entropy, chunked linear + cross-entropy, FusedAdamW) on device tensors
      against its PyTorch reference evaluated in fp32/fp64 on the same rounded inputs; the
      tolerances of tests/test_kernels_*.py, except fp32 attention (TF32 dots on a GPU: 1e-2), and
      an output also passes when its error is at most twice the reference's own error in the
      input dtype (FlashAttention's criterion);
  (b) convergence: a 2-layer decoder trained 30 steps in fp32 with every Triton kernel vs the
      references (tests/test_kernels_convergence.py on the device): each step's loss within
      2e-4 relative on CPU, 1e-2 on a GPU (TF32 attention), and the loss falls by > 10%;
  (d) the decoder at the `125m` and `1b` presets, bf16 weights with fp32 master weights (what
      DeepSpeed's bf16 mode does), forward + backward + AdamW, 20 steps with kernels backend
      triton vs torch on the same data: tokens/s, MFU (6N + 12LHQT FLOPs per token, as
      llmtrain.metrics), peak memory, and loss parity (step 1 within 1e-2 relative, every step
      within 3e-2, both falling);
  (c) `benchmarks/kernels.py` in a subprocess with the same import block, given the time left:
      attention TFLOP/s vs SDPA-flash (and FA2), fused vs torch AdamW, RMSNorm/SwiGLU/CE vs eager
      and torch.compile; its output is printed and its ratios enter the table.

Exit status: 0 when every row passes, 1 on any failure (parity, an exception, a blocked import),
3 when the time budget cut a part short. Without CUDA (and without --cpu-smoke) it says so and
exits 0. The tolerances on a GPU are stated, not yet measured: no GPU has run this (see
kernels/README.md).
"""

from __future__ import annotations

import importlib.abc
import os
import sys

BLOCKED = ("ray", "deepspeed", "datasets")
ATTEMPTS: list[str] = []


class _Absent(importlib.abc.MetaPathFinder):
    """Makes ray/deepspeed/datasets absent, as on a bare CUDA machine, and records who asked."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            ATTEMPTS.append(name)
            raise ModuleNotFoundError(f"gpu_check: {name} is blocked (a bare CUDA machine has no {name})", name=name)
        return None


sys.meta_path.insert(0, _Absent())
os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels only (it must go before triton loads)
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]  # benchmarks/kernels.py would shadow kernels
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import importlib  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import runpy  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

import kernels  # noqa: E402
from llmtrain.metrics import peak_flops  # noqa: E402
from llmtrain.model.decoder import Decoder  # noqa: E402
from llmtrain.model.model_config import ModelConfig  # noqa: E402

BUDGET_S = 450.0  # the whole check; gpu_check.sh kills it at 480 s


@dataclass
class Row:
    part: str
    name: str
    value: str
    status: str  # "ok", "FAIL", "info", "SKIP"


ROWS: list[Row] = []


def row(part: str, name: str, value: str, status: str = "info") -> None:
    ROWS.append(Row(part, name, value, status))
    print(f"  [{status:>4}] {part} {name}: {value}", flush=True)


# ---- (a) kernel parity -------------------------------------------------------------------------

# (atol, rtol) of tests/test_kernels_*.py; on a GPU fp32 attention runs TF32 dots.
ATTN_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
ATTN_TOL_GPU_FP32 = (1e-2, 1e-2)
ELEM_TOL = {  # rmsnorm / rope / swiglu
    "rms_norm": {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)},
    "rope": {torch.float32: (1e-6, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)},
    "swiglu": {torch.float32: (1e-6, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)},
}


def _mod(name: str):
    return importlib.import_module(f"kernels.{name}")


def _grads(fn, inputs, grad_out):
    """(outputs..., grads of inputs) of fn at fresh leaf copies of inputs."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(list(outs), list(grad_out))
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.requires_grad]


def compare(got, want, in_dtype_ref, atol: float, rtol: float, atol_scale: Optional[list[float]] = None):
    """(passed, worst fraction of the tolerance used, worst |error|) over paired tensors: each
    within atol + rtol * |want|, or (with `in_dtype_ref`, the reference run in the input dtype)
    at most twice as far from `want` as that reference is."""
    worst_frac, worst_err, passed = 0.0, 0.0, True
    for i, (x, y) in enumerate(zip(got, want)):
        x, y = x.detach().double(), y.detach().double()
        a = atol * (atol_scale[i] if atol_scale else 1.0)
        err = (x - y).abs()
        frac = float((err / (a + rtol * y.abs())).max())
        worst_frac, worst_err = max(worst_frac, frac), max(worst_err, float(err.max()))
        if frac > 1.0:
            ref_err = float((in_dtype_ref[i].double() - y).abs().max()) if in_dtype_ref is not None else 0.0
            if not float(err.max()) <= 2 * ref_err + 1e-6:
                passed = False
    return passed, worst_frac, worst_err


def _report(name: str, result) -> None:
    passed, frac, err = result
    row("a", name, f"max err {err:.2e} ({frac:.2f} of tol)", "ok" if passed else "FAIL")


def parity(device: torch.device, small: bool) -> None:
    A, R, P, S, C, AD = (_mod(m) for m in ("attention", "rmsnorm", "rope", "swiglu", "cross_entropy", "adamw"))
    gpu = device.type == "cuda"
    kernels.set_backend("triton")  # FusedAdamW takes the kernel for CPU tensors only when forced
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    # attention: (dtype, B, Hq, Hkv, L, D, causal, documents)
    cases = (
        [(torch.float32, 1, 2, 1, 70, 16, True, True), (torch.float16, 1, 2, 2, 33, 16, False, False)]
        if small
        else [
            (torch.bfloat16, 2, 8, 2, 1000, 128, True, True),
            (torch.bfloat16, 1, 4, 4, 257, 64, True, False),
            (torch.bfloat16, 1, 4, 1, 17, 80, False, False),
            (torch.float16, 2, 4, 2, 130, 128, True, True),
            (torch.float32, 1, 4, 2, 257, 64, True, True),
        ]
    )
    for dtype, B, Hq, Hkv, L, D, causal, docs in cases:
        q, k, v = randn(B, Hq, L, D, dtype=dtype), randn(B, Hkv, L, D, dtype=dtype), randn(B, Hkv, L, D, dtype=dtype)
        do = randn(B, Hq, L, D, dtype=dtype)
        doc_ids = None
        if docs:
            starts = torch.rand(B, L, generator=g) < 0.04
            starts[:, 0] = True
            doc_ids = (starts.long().cumsum(1) - 1).to(device)
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        got = _grads(lambda q, k, v: A.attention(q, k, v, doc_ids=doc_ids, causal=causal), (q, k, v), (do,))
        want = _grads(
            lambda q, k, v: A.attention_reference(q, k, v, doc_ids=doc_ids, causal=causal),
            (q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype)),
            (do.to(ref_dtype),),
        )
        same_dtype = _grads(lambda q, k, v: A.attention_reference(q, k, v, doc_ids=doc_ids, causal=causal), (q, k, v), (do,))
        tol = ATTN_TOL_GPU_FP32 if gpu and dtype == torch.float32 else ATTN_TOL[dtype]
        name = f"attention {str(dtype)[6:]} B{B} H{Hq}/{Hkv} L{L} D{D}{' causal' if causal else ''}{' docs' if docs else ''}"
        _report(name, compare(got, want, same_dtype, *tol))

    rows, hidden, inter = (37, 96, 160) if small else (1000, 4096, 11008)
    for dtype in (torch.float32, torch.bfloat16) if not small else (torch.float32,):
        x, w = randn(rows, hidden, dtype=dtype), (1 + randn(hidden, scale=0.1)).to(dtype)
        dy = randn(rows, hidden, dtype=dtype)
        got = _grads(lambda x, w: R.rms_norm(x, w, 1e-5), (x, w), (dy,))
        want = _grads(lambda x, w: R.rms_norm_reference(x, w, 1e-5), (x.double(), w.double()), (dy.double(),))
        same = _grads(lambda x, w: R.rms_norm_reference(x, w, 1e-5), (x, w), (dy,))
        atol, rtol = ELEM_TOL["rms_norm"][dtype]
        _report(f"rms_norm {str(dtype)[6:]} [{rows}x{hidden}]", compare(got, want, same, atol, rtol, [1, 1, rows**0.5]))

        Bq, H, L, D = (1, 2, 19, 16) if small else (2, 16, 1000, 128)
        qr, kr = randn(Bq, H, L, D, dtype=dtype), randn(Bq, max(1, H // 4), L, D, dtype=dtype)
        freqs = torch.arange(L, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(0, D, 2).float() / D))
        emb = torch.cat((freqs, freqs), dim=-1).to(device)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        dq, dk = randn(*qr.shape, dtype=dtype), randn(*kr.shape, dtype=dtype)
        got = _grads(lambda a, b: P.apply_rope(a, b, cos, sin), (qr, kr), (dq, dk))
        want = _grads(
            lambda a, b: P.apply_rope_reference(a, b, cos.double(), sin.double()),
            (qr.double(), kr.double()),
            (dq.double(), dk.double()),
        )
        same = _grads(lambda a, b: P.apply_rope_reference(a, b, cos, sin), (qr, kr), (dq, dk))
        _report(f"apply_rope {str(dtype)[6:]} [{Bq},{H},{L},{D}]", compare(got, want, same, *ELEM_TOL["rope"][dtype]))

        gate, up, dy = randn(rows, inter, dtype=dtype), randn(rows, inter, dtype=dtype), randn(rows, inter, dtype=dtype)
        got = _grads(S.swiglu, (gate, up), (dy,))
        want = _grads(S.swiglu_reference, (gate.double(), up.double()), (dy.double(),))
        same = _grads(S.swiglu_reference, (gate, up), (dy,))
        _report(f"swiglu {str(dtype)[6:]} [{rows}x{inter}]", compare(got, want, same, *ELEM_TOL["swiglu"][dtype]))

    N, H, V = (50, 32, 300) if small else (4096, 2048, 128256)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    labels = labels.to(device)
    one = torch.ones((), device=device)
    for dtype in (torch.float32, torch.bfloat16) if not small else (torch.float32,):
        logits = randn(N, V, dtype=dtype, scale=2.0)
        got = _grads(lambda z: C.cross_entropy(z, labels), (logits,), (one,))
        want = _grads(lambda z: C.cross_entropy_reference(z, labels), (logits.float(),), (one,))
        tol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
        loss_ok = abs(float(got[0]) - float(want[0])) <= (1e-5 if dtype == torch.float32 else 1e-4) * abs(float(want[0])) + 1e-5
        passed, frac, err = compare(got[1:], want[1:], None, *tol)
        _report(f"cross_entropy {str(dtype)[6:]} [{N}x{V}]", (passed and loss_ok, frac, err))

        h, w = randn(N, H, dtype=dtype), randn(V, H, dtype=dtype, scale=0.02)
        got = _grads(lambda h, w: C.fused_linear_cross_entropy(h, w, labels), (h, w), (one,))
        want = _grads(lambda h, w: C.fused_linear_cross_entropy_reference(h, w, labels), (h.float(), w.float()), (one,))
        tol = (1e-5, 1e-5) if dtype == torch.float32 else (5e-2, 5e-2)
        loss_ok = abs(float(got[0]) - float(want[0])) <= (1e-5 if dtype == torch.float32 else 1e-3) * abs(float(want[0])) + 1e-5
        passed, frac, err = compare(got[1:], want[1:], None, *tol)
        _report(f"fused_linear_cross_entropy {str(dtype)[6:]} [{N}x{H}]x[{V}]", (passed and loss_ok, frac, err))

    shapes = [(17,), (64, 33), (5, 7, 3), (70001,)] if small else [(17,), (4096, 4097), (5, 7, 3), (11008, 4096)]
    start = [randn(*s) for s in shapes]
    ours, theirs = [p.clone().requires_grad_() for p in start], [p.clone().requires_grad_() for p in start]
    opt_a = AD.FusedAdamW(ours, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt_b = torch.optim.AdamW(theirs, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(10):
        for a, b in zip(ours, theirs):
            a.grad = randn(*a.shape)
            b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
    _report("FusedAdamW fp32, 10 steps vs torch.optim.AdamW", compare(ours, theirs, None, 1e-7, 1e-5))


# ---- (b) convergence ---------------------------------------------------------------------------

CONV = dict(
    vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def bigram_batches(vocab: int, seq: int, batch: int, steps: int, device, seed: int = 0):
    """Packed rows of documents from a peaked random bigram table: (ids, positions, labels) per step."""
    g = torch.Generator().manual_seed(seed)
    table = torch.softmax(3 * torch.randn(vocab, vocab, generator=g), dim=-1)
    out = []
    for _ in range(steps):
        n_docs = seq // 16 + 2
        lengths = torch.randint(8, 40, (batch, n_docs), generator=g)
        first = torch.randint(0, vocab, (batch * n_docs,), generator=g)
        total = int(lengths.sum(1).max()) + 1
        toks = torch.empty(batch * n_docs, 40, dtype=torch.long)
        toks[:, 0] = first
        for t in range(1, 40):
            toks[:, t] = torch.multinomial(table[toks[:, t - 1]], 1, generator=g)[:, 0]
        ids, pos = torch.zeros(batch, total, dtype=torch.long), torch.zeros(batch, total, dtype=torch.long)
        for b in range(batch):
            at = 0
            for d in range(n_docs):
                n = int(lengths[b, d])
                ids[b, at : at + n], pos[b, at : at + n] = toks[b * n_docs + d, :n], torch.arange(n)
                at += n
        x, p = ids[:, : seq + 1], pos[:, : seq + 1]
        y = x[:, 1:].clone()
        y[p[:, 1:] == 0] = -100
        out.append((x[:, :seq].to(device), p[:, :seq].to(device), y.to(device)))
    return out


def convergence(device: torch.device, small: bool) -> None:
    steps = 5 if small else 30
    data = bigram_batches(256, 64, 2, steps, device)
    curves = {}
    for name in ("torch", "triton"):
        kernels.set_backend(name)
        torch.manual_seed(0)
        model = Decoder(ModelConfig.from_preset("tiny", **CONV, max_position_embeddings=64)).to(device)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        opt = kernels.adamw_optimizer(
            [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95)
        )
        losses = []
        for ids, pos, labels in data:
            loss = model(ids, position_ids=pos, labels=labels) / (labels != -100).sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[name] = losses
    tol = 1e-2 if device.type == "cuda" else 2e-4
    gap = max(abs(a - b) / b for a, b in zip(curves["triton"], curves["torch"]))
    fell = curves["triton"][-1] < (0.9 if not small else 0.99) * curves["triton"][0]
    row(
        "b",
        f"convergence, {steps} steps fp32, all kernels vs references",
        f"loss {curves['torch'][0]:.3f} -> {curves['torch'][-1]:.3f}; max rel gap {gap:.1e} (tol {tol:.0e})",
        "ok" if gap <= tol and fell else "FAIL",
    )


# ---- (d) the decoder at 125M and 1B -----------------------------------------------------------


def lm_batches(vocab: int, seq: int, batch: int, steps: int, device, seed: int = 0):
    """Learnable rows: each token follows the previous by a fixed random map over 4096 ids with
    probability 0.9; documents of 128..1024 tokens packed with restarting positions."""
    g = torch.Generator().manual_seed(seed)
    k = min(4096, vocab)
    ids_of = torch.randperm(vocab, generator=g)[:k]
    follow = torch.randint(0, k, (k,), generator=g)
    out = []
    for _ in range(steps):
        idx = torch.empty(batch, seq + 1, dtype=torch.long)
        idx[:, 0] = torch.randint(0, k, (batch,), generator=g)
        jump = torch.rand(batch, seq + 1, generator=g) < 0.1
        fresh = torch.randint(0, k, (batch, seq + 1), generator=g)
        for t in range(1, seq + 1):
            idx[:, t] = torch.where(jump[:, t], fresh[:, t], follow[idx[:, t - 1]])
        pos = torch.zeros(batch, seq + 1, dtype=torch.long)
        for b in range(batch):
            at = 0
            while at < seq + 1:
                n = int(torch.randint(max(2, min(128, seq // 4)), max(3, min(1024, seq)), (1,), generator=g))
                pos[b, at : at + n] = torch.arange(min(n, seq + 1 - at))
                at += n
        x = ids_of[idx]
        y = x[:, 1:].clone()
        y[pos[:, 1:] == 0] = -100
        out.append((x[:, :seq].to(device), pos[:, :seq].to(device), y.to(device)))
    return out


def decoder_run(config: ModelConfig, init: dict, data, dtype: torch.dtype, backend: str, lr: float, device) -> dict:
    """One backend: `dtype` weights, fp32 masters stepped by kernels.adamw_optimizer, like DeepSpeed's bf16."""
    kernels.set_backend(backend)
    with torch.device("meta"):
        model = Decoder(config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init[name])
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone() for p in params]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [m for m, n in zip(masters, names) if m.dim() >= 2 and "embed" not in n], "weight_decay": 0.1},
        {"params": [m for m, n in zip(masters, names) if not (m.dim() >= 2 and "embed" not in n)], "weight_decay": 0.0},
    ]
    opt = kernels.adamw_optimizer(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    losses, times, tokens = [], [], data[0][0].numel()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for i, (ids, pos, labels) in enumerate(data):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (i + 1) / 5)
        loss = model(ids, position_ids=pos, labels=labels) / (labels != -100).sum()
        loss.backward()
        with torch.no_grad():
            for m, p in zip(masters, params):
                m.grad = p.grad.float()
                p.grad = None
            opt.step()
            for m, p in zip(masters, params):
                p.copy_(m)
                m.grad = None
        losses.append(loss.item())  # synchronises
        times.append(time.perf_counter() - t0)
    steady = times[min(5, len(times) - 1) :]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return {"losses": losses, "tokens_per_s": tokens * len(steady) / sum(steady), "peak_gib": peak}


def decoder(device: torch.device, small: bool, deadline: float) -> None:
    if small:
        shapes = [
            ("tiny-cpu", ModelConfig.from_preset("tiny", **CONV, max_position_embeddings=64), torch.float32, 2, 64, 3, 3e-3)
        ]
    else:
        shapes = [
            ("125m", ModelConfig.from_preset("125m"), torch.bfloat16, 8, 2048, 20, 6e-4),
            ("1b", ModelConfig.from_preset("1b"), torch.bfloat16, 4, 2048, 20, 3e-4),
        ]
    precision = "bf16" if not small else "fp32"
    peak = peak_flops(device, precision)
    for name, config, dtype, batch, seq, steps, lr in shapes:
        if time.monotonic() > deadline:
            row("d", f"decoder {name}", "skipped: time budget spent", "SKIP")
            continue
        try:
            torch.manual_seed(0)
            with torch.device(device):  # initialised once, kept on the host: both backends start from it
                init = {n: p.detach().to("cpu", dtype) for n, p in Decoder(config).named_parameters()}
            data = lm_batches(config.vocab_size, seq, batch, steps, device)
            runs = {}
            for backend in ("torch", "triton"):
                runs[backend] = decoder_run(config, init, data, dtype, backend, lr, device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del init
        except Exception as err:  # e.g. out of memory: this row fails, the rest still run
            traceback.print_exc()
            row("d", f"decoder {name}", f"{type(err).__name__}: {str(err).splitlines()[0][:120]}", "FAIL")
            continue
        flops = config.flops_per_token(seq)
        for b, r in runs.items():
            mfu = r["tokens_per_s"] * flops / peak if peak == peak else float("nan")
            row(
                "d",
                f"decoder {name} {str(dtype)[6:]} {b}",
                f"{r['tokens_per_s']:,.0f} tok/s, MFU {mfu:.1%}, peak {r['peak_gib']:.1f} GiB (batch {batch} x seq {seq})",
            )
        a, t = runs["torch"]["losses"], runs["triton"]["losses"]
        first, worst = abs(t[0] - a[0]) / a[0], max(abs(x - y) / y for x, y in zip(t, a))
        tol_first, tol_all = (1e-2, 3e-2) if dtype != torch.float32 else (2e-4, 2e-4)
        fell = t[-1] < 0.95 * t[0] and a[-1] < 0.95 * a[0] if not small else True
        ok = first <= tol_first and worst <= tol_all and fell and all(math.isfinite(x) for x in t + a)
        row(
            "d",
            f"decoder {name} loss parity over {steps} steps",
            f"torch {a[0]:.3f} -> {a[-1]:.3f}, triton {t[0]:.3f} -> {t[-1]:.3f}; step 1 gap {first:.1e} (tol {tol_first:.0e}), "
            f"max {worst:.1e} (tol {tol_all:.0e})",
            "ok" if ok else "FAIL",
        )
        ratio = runs["triton"]["tokens_per_s"] / runs["torch"]["tokens_per_s"]
        row("d", f"decoder {name} speed triton / torch", f"{ratio:.2f}x")


# ---- (c) benchmarks/kernels.py -----------------------------------------------------------------

ATTN_LINE = re.compile(r"^\s*(\d+)\s+(fwd\+bwd|fwd)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)(?:\s+([\d.]+)\s+([\d.]+))?\s*$")
ADAMW_LINE = re.compile(r"triton ([\d.]+)\s+(torch-\w+) ([\d.]+)\s+ratio \(baseline / triton\) ([\d.]+)")
ELEM_LINE = re.compile(
    r"^\s+(\S+) \[[^\]]*\]\s+triton ([\d.]+)\s+eager ([\d.]+) \(([\d.]+)x\)\s+torch.compile ([\d.]+) \(([\d.]+)x\)"
)


def kernel_bench_rows(output: str) -> list[tuple[str, str]]:
    """(name, value) rows from benchmarks/kernels.py's CUDA output (see its print formats)."""
    rows = []
    for line in output.splitlines():
        m = ATTN_LINE.match(line)
        if m:
            seq, kind, ours, sdpa, ratio, fa2, fa2_ratio = m.groups()
            value = f"triton {ours} TFLOP/s, sdpa-flash {sdpa} ({ratio}x)"
            if fa2:
                value += f", FA2 {fa2} ({fa2_ratio}x)"
            rows.append((f"attention seq {seq} {kind}", value))
            continue
        m = ADAMW_LINE.search(line)
        if m:
            rows.append((f"AdamW vs {m.group(2)}", f"triton {m.group(1)} ms, {m.group(2)} {m.group(3)} ms ({m.group(4)}x)"))
            continue
        m = ELEM_LINE.match(line)
        if m:
            name, ours, eager, r_eager, comp, r_comp = m.groups()
            rows.append((f"{name} fwd+bwd", f"triton {ours} ms; eager {r_eager}x, torch.compile {r_comp}x slower"))
    return rows


def kernel_bench(timeout: float) -> None:
    if timeout < 30:
        row("c", "benchmarks/kernels.py", "skipped: time budget spent", "SKIP")
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--kernels-bench"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        print(out)
        for name, value in kernel_bench_rows(out):
            row("c", name, value)
        row("c", "benchmarks/kernels.py", f"cut short after {timeout:.0f} s (time budget)", "SKIP")
        return
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
    for name, value in kernel_bench_rows(proc.stdout):
        row("c", name, value)
    blocked = re.findall(r"gpu_check: (\S+) is blocked", proc.stderr)
    status = "ok" if proc.returncode == 0 and not blocked else "FAIL"
    row(
        "c", "benchmarks/kernels.py", f"exit {proc.returncode}" + (f"; blocked import of {blocked[0]}" if blocked else ""), status
    )


# ---- driver ------------------------------------------------------------------------------------

CUDA_PATH_MODULES = (  # what the CUDA path imports beyond this file's own imports
    "kernels.attention",
    "kernels.rmsnorm",
    "kernels.rope",
    "kernels.swiglu",
    "kernels.cross_entropy",
    "kernels.adamw",
    "triton.testing",
    "torch.nn.attention",
    "torch._dynamo",
    "torch._inductor.compile_fx",
)


def import_check() -> int:
    """Import every module the CUDA path uses (benchmarks/kernels.py's body included, by path) and
    report any attempt to import ray/deepspeed/datasets, or any of them loaded anyway."""
    for name in CUDA_PATH_MODULES:
        importlib.import_module(name)
    runpy.run_path(os.path.join(HERE, "kernels.py"), run_name="benchmarks_kernels")
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(f"imported {len(sys.modules)} modules; blocked attempts: {sorted(set(ATTEMPTS)) or 'none'}; loaded: {loaded or 'none'}")
    return 1 if ATTEMPTS or loaded else 0


def table() -> str:
    widths = [
        max(len(getattr(r, f)) for r in ROWS + [Row("part", "check", "result", "status")])
        for f in ("part", "name", "value", "status")
    ]
    line = lambda r: f"{r.part:<{widths[0]}}  {r.name:<{widths[1]}}  {r.status:<{widths[3]}}  {r.value}"  # noqa: E731
    order = {"a": 0, "b": 1, "c": 2, "d": 3}
    rows = sorted(ROWS, key=lambda r: order.get(r.part, 9))
    return "\n".join([line(Row("part", "check", "result", "status")), *map(line, rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="run (a), (b), (d) at tiny shapes on CPU (interpreter)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    parser.add_argument("--parts", default="abcd", help="which parts to run (default: abcd)")
    parser.add_argument("--imports", action="store_true", help="import what the CUDA path runs, list blocked attempts")
    parser.add_argument("--kernels-bench", action="store_true", help=argparse.SUPPRESS)  # the (c) subprocess
    args = parser.parse_args(argv)
    if args.kernels_bench:
        sys.argv = [os.path.join(HERE, "kernels.py"), "--no-aot"]
        runpy.run_path(os.path.join(HERE, "kernels.py"), run_name="__main__")
        return 0
    if args.imports:
        return import_check()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("gpu_check: no CUDA device on this machine: nothing to check here (run it on a GPU); exit 0")
        return 0
    start = time.monotonic()
    deadline = start + args.budget
    device = torch.device("cuda" if cuda and not args.cpu_smoke else "cpu")
    small = device.type == "cpu"
    import triton

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter, tiny shapes)"
    print(f"gpu_check on {where}: torch {torch.__version__}, triton {triton.__version__}", flush=True)

    def bench() -> None:
        if device.type == "cuda":
            kernel_bench(deadline - time.monotonic())
        else:
            row("c", "benchmarks/kernels.py", "not run: CUDA only (on CPU it prints the AOT table, ~3 min cold)", "SKIP")

    parts = [  # (c) last: the least predictable in time, and measuring rather than checking
        ("a", "kernel parity", lambda: parity(device, small)),
        ("b", "convergence", lambda: convergence(device, small)),
        ("d", "decoder", lambda: decoder(device, small, deadline - (90 if not small else 0))),
        ("c", "benchmarks/kernels.py", bench),
    ]
    for part, name, fn in [p for p in parts if p[0] in args.parts]:
        if time.monotonic() > deadline:
            row(part, name, "skipped: time budget spent", "SKIP")
            continue
        print(f"\n({part}) {name}", flush=True)
        try:
            fn()
        except KeyboardInterrupt:  # gpu_check.sh's time limit: the table of what ran still prints
            row(part, name, "interrupted (time limit)", "SKIP")
            break
        except Exception as err:
            traceback.print_exc()
            row(part, name, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}", "FAIL")
    row("-", "imports of ray/deepspeed/datasets", ", ".join(sorted(set(ATTEMPTS))) or "none", "FAIL" if ATTEMPTS else "ok")
    print(f"\ngpu_check: {where}, {time.monotonic() - start:.0f} s\n" + table())
    if any(r.status == "FAIL" for r in ROWS):
        return 1
    if any(r.status == "SKIP" for r in ROWS if r.part != "c" or device.type == "cuda"):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
