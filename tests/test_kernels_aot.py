"""Every kernel and every autotune config compiles ahead of time for sm_80 and sm_90 (no GPU
needed), and the compiled kernel fits its target: no register spills (ptxas -v, the same ptxas
Triton uses), shared memory within the block limit (A100 163 KiB, H100 227 KiB), and the
attention dots on tensor cores (mma.sync on sm_80, wgmma or mma.sync on sm_90).

Cold, the ~150 compilations take a few minutes on 2 cores; Triton caches compiled kernels in
~/.triton/cache and kernels/aot.py caches ptxas reports in ~/.cache/llmtrain/aot, both keyed by
the kernel source / PTX, so any change to a kernel is recompiled and re-measured.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from kernels import aot  # noqa: E402

CASES = list(aot.all_cases())


def test_every_kernel_and_target_has_cases():
    kernels = {c.kernel for c in CASES}
    assert kernels >= {
        "attn_fwd",
        "attn_bwd_dkdv",
        "attn_bwd_dq",
        "attn_bwd_delta",
        "rms_norm_fwd",
        "rms_norm_bwd",
        "rope_fwd",
        "rope_bwd",
        "swiglu_fwd",
        "swiglu_bwd",
        "ce_fwd",
        "ce_bwd",
        "ce_fused_chunk",
        "adamw",
    }
    for k in kernels:
        assert {c.target for c in CASES if c.kernel == k} == {80, 90}, k
    import importlib

    attention = importlib.import_module("kernels.attention")
    for launcher, name in ((attention.FWD, "attn_fwd"), (attention.DKDV, "attn_bwd_dkdv"), (attention.DQ, "attn_bwd_dq")):
        for target, configs in launcher.configs.items():
            for c in configs:  # each autotune config appears for each class it serves
                label = f"M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                assert any(x.kernel == name and x.target == target and x.config.endswith(label) for x in CASES), (
                    name,
                    target,
                    label,
                )


@pytest.mark.parametrize("case", CASES, ids=[c.label.replace(" ", "-") for c in CASES])
def test_compiles_within_target_limits(case):
    report = aot.compile_case(case)
    assert 0 < report.registers <= aot.REGISTER_LIMIT
    assert not report.problems, f"{case.label}: {'; '.join(report.problems)}"
    if case.kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"):
        assert report.mma in (("mma",) if case.target == 80 else ("wgmma", "mma")), (case.label, report.mma)


def test_limits_are_detected():
    """A configuration known to spill (RMSNorm's 16K-wide row held by a single warp) is reported."""
    import importlib

    rms = importlib.import_module("kernels.rmsnorm")
    n = 16384
    case = aot.Case(
        "rms_norm_fwd",
        80,
        "one warp for a 16K row",
        rms.FWD.fn,
        dict(X=torch.float32, W=torch.float32, Y=torch.float32, RSTD=torch.float32, s_x=n, s_y=n, R=64, N=n, eps=1e-5),
        dict(BLOCK_N=n, ROWS=1),
        num_warps=1,
        num_stages=1,
    )
    report = aot.compile_case(case)
    assert report.spill_stores > 0 and any("spills" in p for p in report.problems)
    too_big = aot.Report(
        registers=64, spill_stores=0, spill_loads=0, stack=0, shared=aot.SHARED_LIMIT[90] + 1, target=90, mma="-"
    )
    assert any("shared memory" in p for p in too_big.problems)
