"""Kernel benchmarks: our Triton kernels against their baselines, measured side by side in one run.

    .venv/bin/python benchmarks/kernels.py              # everything that applies to this machine
    .venv/bin/python benchmarks/kernels.py --no-aot     # skip the compile table

On CUDA:
  - attention (causal, head dim 128, bf16): forward and forward+backward TFLOP/s for sequence
    lengths 512..16384 at a fixed token count, against torch SDPA's flash backend and
    FlashAttention 2 (`flash_attn`, if installed); FLOPs counted as FlashAttention does
    (causal forward 2 * B * H * L^2 * D, backward 2.5x the forward);
  - fused AdamW against torch.optim.AdamW(fused=True) and (foreach=True), one step over a
    model-like set of fp32 tensors;
  - RMSNorm, SwiGLU and cross-entropy forward+backward against eager PyTorch and torch.compile.
  Every line prints the measured time and the ratio to the baseline of that line.

Without CUDA it says so (GPU speed is then unmeasured) and prints instead:
  - the ahead-of-time compile table (kernels/aot.py): every kernel and autotune config compiled
    for sm_80 and sm_90 with registers, spills, shared memory and tensor-core instructions;
  - the one kernel-level trade-off that is measurable here: the chunked fused linear +
    cross-entropy of the torch backend against materialised logits (time and peak memory).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kernels  # noqa: E402


def _mod(name: str):
    return importlib.import_module(f"kernels.{name}")


# ---- GPU -------------------------------------------------------------------------------------


def _bench(fn) -> float:
    """Median milliseconds of fn() on the GPU."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_attention(tokens: int = 16384, heads: int = 16, head_dim: int = 128) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    A = _mod("attention")
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    print(f"\nattention, causal, bf16, head dim {head_dim}, {heads} heads, {tokens} tokens per batch (TFLOP/s)")
    print(
        f"{'seq':>6} {'pass':>8} {'triton':>8} {'sdpa-flash':>11} {'ratio':>6}"
        + (f" {'flash_attn':>11} {'ratio':>6}" if flash_attn_func else "")
    )
    for L in (512, 1024, 2048, 4096, 8192, 16384):
        B = max(1, tokens // L)
        q, k, v = (torch.randn(B, heads, L, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        fwd_flops = 2 * B * heads * L * L * head_dim  # causal: half of 4 * B * H * L^2 * D
        impls = {"triton": lambda: A.attention(q, k, v, causal=True)}

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        impls["sdpa"] = sdpa
        if flash_attn_func:
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            impls["fa2"] = lambda: flash_attn_func(qt, kt, vt, causal=True).transpose(1, 2)
        for label, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
            tflops = {}
            for name, f in impls.items():
                if label == "fwd":
                    ms = _bench(lambda: f())
                else:
                    ms = _bench(lambda: f().backward(do))
                tflops[name] = flops / ms / 1e9
            line = f"{L:>6} {label:>8} {tflops['triton']:>8.1f} {tflops['sdpa']:>11.1f} {tflops['triton'] / tflops['sdpa']:>6.2f}"
            if "fa2" in tflops:
                line += f" {tflops['fa2']:>11.1f} {tflops['triton'] / tflops['fa2']:>6.2f}"
            print(line)


def bench_adamw(total: int = 100_000_000) -> None:
    AD = _mod("adamw")
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [4096 * 4096, 4096 * 11008, 4096] * max(1, total // (4096 * 15104 + 4096))
    print(f"\nAdamW step over {len(sizes)} fp32 tensors, {sum(sizes) / 1e6:.0f}M parameters (ms)")
    times = {}
    for name in ("triton", "torch-fused", "torch-foreach"):
        params = [torch.randn(n, device="cuda", generator=g).requires_grad_() for n in sizes]
        for p in params:
            p.grad = torch.randn_like(p)
        if name == "triton":
            opt = AD.FusedAdamW(params, lr=1e-4, weight_decay=0.1)
        else:
            opt = torch.optim.AdamW(
                params, lr=1e-4, weight_decay=0.1, fused=name == "torch-fused", foreach=name == "torch-foreach"
            )
        times[name] = _bench(opt.step)
        del params, opt
        torch.cuda.empty_cache()
    for name in ("torch-fused", "torch-foreach"):
        print(
            f"  triton {times['triton']:.2f}  {name} {times[name]:.2f}  ratio (baseline / triton) {times[name] / times['triton']:.2f}"
        )


def bench_elementwise(tokens: int = 16384, hidden: int = 4096, inter: int = 14336, vocab: int = 128256) -> None:
    R, S, C = _mod("rmsnorm"), _mod("swiglu"), _mod("cross_entropy")
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, hidden, device=dev, dtype=dt, requires_grad=True)
    w = torch.ones(hidden, device=dev, dtype=dt, requires_grad=True)
    gate, up = (torch.randn(tokens, inter, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    ce_tokens = 4096
    logits = torch.randn(ce_tokens, vocab, device=dev, dtype=dt, requires_grad=True)
    labels = torch.randint(0, vocab, (ce_tokens,), device=dev)
    cases = {
        f"rms_norm [{tokens}x{hidden}]": (lambda: R.rms_norm(x, w, 1e-5), lambda: R.rms_norm_reference(x, w, 1e-5)),
        f"swiglu [{tokens}x{inter}]": (lambda: S.swiglu(gate, up), lambda: S.swiglu_reference(gate, up)),
        f"cross_entropy [{ce_tokens}x{vocab}]": (
            lambda: C.cross_entropy(logits, labels),
            lambda: C.cross_entropy_reference(logits, labels),
        ),
    }
    print("\nforward+backward, bf16 (ms; ratio = baseline / triton)")
    for name, (ours, eager) in cases.items():
        compiled = torch.compile(eager)
        t = {
            k: _bench(lambda f=f: f().float().sum().backward())
            for k, f in (("triton", ours), ("eager", eager), ("compile", compiled))
        }
        print(
            f"  {name:<32} triton {t['triton']:.3f}  eager {t['eager']:.3f} ({t['eager'] / t['triton']:.2f}x)"
            f"  torch.compile {t['compile']:.3f} ({t['compile'] / t['triton']:.2f}x)"
        )


# ---- CPU: AOT table and the chunked cross-entropy ----------------------------------------------


def aot_table() -> int:
    from kernels import aot

    print(
        f"\nahead-of-time compile (sm_80 limit {aot.SHARED_LIMIT[80]} B shared, sm_90 {aot.SHARED_LIMIT[90]} B; "
        f"registers per thread <= {aot.REGISTER_LIMIT})"
    )
    print(f"{'kernel':<16} {'target':<6} {'config':<40} {'regs':>4} {'spill st/ld':>11} {'shared B':>9} {'mma':>5}  problems")
    bad = 0
    for case in aot.all_cases():
        r = aot.compile_case(case)
        bad += bool(r.problems)
        print(
            f"{case.kernel:<16} sm_{case.target:<3} {case.config:<40} {r.registers:>4} {r.spill_stores:>5}/{r.spill_loads:<5} "
            f"{r.shared:>9} {r.mma:>5}  {'; '.join(r.problems) or '-'}"
        )
    return bad


FLCE_WORKER = """
import resource, sys, time, importlib, torch
torch.set_num_threads(int(sys.argv[5]))
C = importlib.import_module("kernels.cross_entropy")
N, H, V = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
h = torch.randn(N, H, generator=g).requires_grad_()
w = (0.02 * torch.randn(V, H, generator=g)).requires_grad_()
y = torch.randint(0, V, (N,), generator=g)
impls = {"chunked": lambda: C.fused_linear_cross_entropy(h, w, y, chunk_loss=C.chunk_loss_torch),
         "materialised": lambda: C.fused_linear_cross_entropy_reference(h, w, y)}
if sys.argv[1] == "time":  # interleaved rounds, best of each: fair under a noisy, shared CPU
    best = {k: float("inf") for k in impls}
    for _ in range(5):
        for k, f in impls.items():
            h.grad = w.grad = None
            t = time.perf_counter()
            f().backward()
            best[k] = min(best[k], time.perf_counter() - t)
    print(best["materialised"], best["chunked"])
else:  # one implementation per process: the growth of its peak RSS
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    impls[sys.argv[1]]().backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def bench_flce_cpu(tokens: int = 4096, hidden: int = 512, vocab: int = 32000) -> None:
    threads = torch.get_num_threads()
    print(
        f"\nfused linear + cross-entropy on CPU, torch backend, fp32, {tokens} tokens x hidden {hidden} x vocab {vocab}, "
        f"forward+backward, {threads} threads (time: best of 5 interleaved rounds; peak: growth of max RSS once inputs exist)"
    )

    def worker(mode: str) -> list[float]:
        run = subprocess.run(
            [sys.executable, "-c", FLCE_WORKER, mode, str(tokens), str(hidden), str(vocab), str(threads)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        return [float(x) for x in run.stdout.split()]

    t_m, t_c = worker("time")
    peak = {mode: worker(mode)[0] for mode in ("materialised", "chunked")}
    for mode, t in (("materialised", t_m), ("chunked", t_c)):
        print(f"  {mode:<13} {t:7.3f} s   peak +{peak[mode] / 2**20:7.0f} MiB")
    print(
        f"  chunked / materialised: time {t_c / t_m:.2f}, peak memory {peak['chunked'] / peak['materialised']:.2f} "
        f"(the fp32 logits alone are {tokens * vocab * 4 / 2**20:.0f} MiB)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-aot", action="store_true", help="skip the ahead-of-time compile table (no CUDA only)")
    args = parser.parse_args()
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        print(f"CUDA device: {name}; kernels backend {kernels.backend()}")
        bench_attention()
        bench_adamw()
        bench_elementwise()
        return 0
    print("no CUDA device: GPU speed is unmeasured on this machine; printing the AOT compile table and CPU measurements")
    bad = 0 if args.no_aot else aot_table()
    bench_flce_cpu()
    if bad:
        print(f"\n{bad} compiled configurations exceed their target's limits")
    return 1 if bad else 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"\n({time.time() - t0:.0f} s)")
    sys.exit(code)
