"""Attention: FlashAttention-2-style Triton kernels (forward; backward dQ and dK/dV), its PyTorch
reference and the autograd wrapper.

Shapes: q [B, Hq, L, D], k/v [B, Hkv, Lk, D] with Hq % Hkv == 0 (grouped-query attention, any
integer ratio); Lk != L (a KV cache) is allowed without documents, and then `causal` aligns
query i with key i (top-left, as torch SDPA's is_causal). Optional `doc_ids` [B, L]: a packed
row's documents; attention never crosses a
change of id (a document is a maximal run of equal ids, so [0, 0, 1, 1, 0] holds three
documents), the same information the data pipeline produces as position restarts
(ids = cumsum(position_ids == 0)).

Algorithm (Dao, FlashAttention-2, 2023): the forward walks key blocks with an online softmax in
the log2 domain and stores the row log-sum-exp; the backward recomputes probabilities from it,
one kernel accumulating dK/dV per key block (looping over the query blocks of every query head
sharing that key/value head, so GQA needs no atomics), one accumulating dQ per query block.
Causal and document masks skip whole blocks outside [document start, document end) and the
causal frontier and mask the rest element-wise, so any sequence length works with any block.
Accumulation is fp32; `tl.dot` takes fp16/bf16 operands on a GPU (TF32 for fp32 inputs, see
`_runtime.dot_mode`; under the interpreter every dot is fp32 except fp16 operands).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from kernels._runtime import Launcher, dot_mode, next_power_of_2, triton
from kernels.aot import Case

if triton is not None:
    import triton.language as tl


def document_runs(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token (int32 [B, L] each): the index of its document (runs of equal ids), the first
    position of its document and one past its last position."""
    B, L = doc_ids.shape
    change = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.ones(B, 1, dtype=torch.bool, device=doc_ids.device)
    is_start = torch.cat([first, change], dim=1)
    is_end = torch.cat([change, first], dim=1)
    idx = torch.arange(L, device=doc_ids.device).expand(B, L)
    run = is_start.cumsum(1) - 1
    start = torch.where(is_start, idx, 0).cummax(1).values
    end = torch.where(is_end, idx + 1, L).flip(1).cummin(1).values.flip(1)
    return run.int().contiguous(), start.int().contiguous(), end.int().contiguous()


def attention_reference(q, k, v, doc_ids: Optional[torch.Tensor] = None, causal: bool = True, scale: Optional[float] = None):
    """Scaled dot-product attention with the same masks, via torch SDPA (the `torch` backend)."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    L = q.shape[2]
    run = document_runs(doc_ids)[0]
    mask = run[:, None, :, None] == run[:, None, None, :]
    if causal:
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


if triton is not None:

    @triton.jit
    def _attn_fwd(
        Q,
        K,
        V,
        O,
        LSE,
        RUN,
        START,
        END,
        s_qb,
        s_qh,
        s_ql,
        s_kb,
        s_kh,
        s_kl,
        s_vb,
        s_vh,
        s_vl,
        s_ob,
        s_oh,
        s_ol,
        L,
        Lk,
        Hq,
        qk_scale,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        m_ok = offs_m < L
        d_ok = offs_d < HEAD_DIM
        q = tl.load(
            Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0
        ).to(DOT_DTYPE)

        lo = 0
        hi = Lk
        if CAUSAL:
            hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
        if HAS_DOCS:
            run_q = tl.load(RUN + b * L + offs_m, mask=m_ok, other=-1)
            lo = tl.load(START + b * L + pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
            if not CAUSAL:
                hi = tl.load(END + b * L + tl.minimum(L, (pid_m + 1) * BLOCK_M) - 1)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        k_base = K + b * s_kb + hk * s_kh
        v_base = V + b * s_vb + hk * s_vh
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < Lk
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * s_kl + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            keep = n_ok[None, :] & m_ok[:, None]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            if HAS_DOCS:
                run_k = tl.load(RUN + b * L + cols, mask=n_ok, other=-2)
                keep = keep & (run_q[:, None] == run_k[None, :])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * s_vl + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(DOT_DTYPE), v, acc, input_precision=PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        acc = acc / l_safe[:, None]
        tl.store(LSE + pid_bh * L + offs_m, m_i + tl.log2(l_safe), mask=m_ok)
        tl.store(
            O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :],
            acc.to(O.dtype.element_ty),
            mask=m_ok[:, None] & d_ok[None, :],
        )

    @triton.jit
    def _attn_bwd_delta(
        O,
        DO,
        DELTA,
        s_ob,
        s_oh,
        s_ol,
        s_db,
        s_dh,
        s_dl,
        R,
        L,
        Hq,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows (b, h, l), as DELTA's layout; R < 2^31
        b = (r // (Hq * L)).to(tl.int64)  # 32-bit division (64-bit needs a call and stack), 64-bit addresses
        h = ((r // L) % Hq).to(tl.int64)
        pos = (r % L).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        mask = (r < R)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(O + (b * s_ob + h * s_oh + pos * s_ol)[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + (b * s_db + h * s_dh + pos * s_dl)[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + r, tl.sum(o * do, 1), mask=r < R)

    @triton.jit
    def _attn_bwd_dkdv(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DK,
        DV,
        RUN,
        START,
        END,
        s_qb,
        s_qh,
        s_ql,
        s_kb,
        s_kh,
        s_kl,
        s_vb,
        s_vh,
        s_vl,
        s_db,
        s_dh,
        s_dl,
        s_dkb,
        s_dkh,
        s_dkl,
        s_dvb,
        s_dvh,
        s_dvl,
        L,
        Lk,
        Hq,
        Hkv,
        qk_scale,
        sm_scale,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        n_ok = offs_n < Lk
        d_ok = offs_d < HEAD_DIM
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kl + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vl + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)

        lo = 0
        hi = L
        if CAUSAL:
            lo = pid_n * BLOCK_N // BLOCK_M * BLOCK_M
        if HAS_DOCS:
            run_k = tl.load(RUN + b * L + offs_n, mask=n_ok, other=-2)
            if not CAUSAL:
                lo = tl.load(START + b * L + pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
            hi = tl.load(END + b * L + tl.minimum(L, (pid_n + 1) * BLOCK_N) - 1)

        for g in range(GROUP):
            h = hk * GROUP + g
            q_base = Q + b * s_qb + h * s_qh
            do_base = DO + b * s_db + h * s_dh
            row_base = (b * Hq + h) * L
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + offs_m0
                m_ok = offs_m < L
                qo_mask = m_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + offs_m[:, None] * s_ql + offs_d[None, :], mask=qo_mask, other=0.0).to(DOT_DTYPE)
                do = tl.load(do_base + offs_m[:, None] * s_dl + offs_d[None, :], mask=qo_mask, other=0.0).to(DOT_DTYPE)
                lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
                keep = n_ok[:, None] & m_ok[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[None, :] >= offs_n[:, None])
                if HAS_DOCS:
                    run_q = tl.load(RUN + b * L + offs_m, mask=m_ok, other=-1)
                    keep = keep & (run_k[:, None] == run_q[None, :])
                p_t = tl.where(keep, tl.exp2(s_t - lse[None, :]), 0.0)
                dv = tl.dot(p_t.to(DOT_DTYPE), do, dv, input_precision=PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = tl.dot(ds_t.to(DOT_DTYPE), q, dk, input_precision=PRECISION)

        dk = dk * sm_scale
        tl.store(
            DK + b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dkl + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask
        )
        tl.store(
            DV + b * s_dvb + hk * s_dvh + offs_n[:, None] * s_dvl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask
        )

    @triton.jit
    def _attn_bwd_dq(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DQ,
        RUN,
        START,
        END,
        s_qb,
        s_qh,
        s_ql,
        s_kb,
        s_kh,
        s_kl,
        s_vb,
        s_vh,
        s_vl,
        s_db,
        s_dh,
        s_dl,
        s_dqb,
        s_dqh,
        s_dql,
        L,
        Lk,
        Hq,
        qk_scale,
        sm_scale,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOCS: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        m_ok = offs_m < L
        d_ok = offs_d < HEAD_DIM
        qo_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :], mask=qo_mask, other=0.0).to(DOT_DTYPE)
        do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dl + offs_d[None, :], mask=qo_mask, other=0.0).to(DOT_DTYPE)
        lse = tl.load(LSE + pid_bh * L + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * L + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

        lo = 0
        hi = Lk
        if CAUSAL:
            hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
        if HAS_DOCS:
            run_q = tl.load(RUN + b * L + offs_m, mask=m_ok, other=-1)
            lo = tl.load(START + b * L + pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
            if not CAUSAL:
                hi = tl.load(END + b * L + tl.minimum(L, (pid_m + 1) * BLOCK_M) - 1)

        k_base = K + b * s_kb + hk * s_kh
        v_base = V + b * s_vb + hk * s_vh
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < Lk
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * s_kl + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
            v = tl.load(v_base + cols[:, None] * s_vl + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            keep = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            if HAS_DOCS:
                run_k = tl.load(RUN + b * L + cols, mask=n_ok, other=-2)
                keep = keep & (run_q[:, None] == run_k[None, :])
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=PRECISION)

        dq = dq * sm_scale
        tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dql + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qo_mask)


# Autotune candidates per target, as (BLOCK_M, BLOCK_N, num_warps, num_stages, classes): a config
# serves the classes it lists, "s" = fp16/bf16 with head dim <= 64, "l" = fp16/bf16 with head dim
# 65..128, "f" = fp32 inputs (TF32 dots, fp32 tiles). Every (config, class) pair is compiled for
# its target by tests/test_kernels_aot.py, which fails on register spills or shared memory over
# the limit; the lists below are the ones that passed (others were tried and dropped).
FWD_CONFIGS = {
    80: [
        (128, 64, 4, 3, "s"),
        (64, 64, 4, 3, "s"),
        (128, 32, 4, 4, "s"),
        (128, 64, 8, 2, "l"),
        (64, 64, 4, 2, "lf"),
        (128, 32, 8, 2, "lf"),
    ],
    90: [
        (128, 128, 8, 3, "s"),
        (128, 64, 4, 3, "s"),
        (64, 128, 4, 3, "s"),
        (128, 64, 8, 3, "l"),
        (128, 128, 8, 2, "l"),
        (64, 64, 4, 3, "l"),
        (64, 64, 8, 2, "f"),
        (128, 32, 8, 2, "f"),
        (64, 32, 4, 3, "f"),
    ],
}
BWD_CONFIGS = {  # dK/dV holds BLOCK_N keys and walks BLOCK_M queries
    80: [
        (32, 64, 4, 3, "s"),
        (64, 64, 8, 2, "sl"),
        (32, 128, 8, 2, "s"),
        (32, 64, 4, 2, "l"),
        (16, 64, 4, 2, "l"),
        (32, 64, 8, 2, "f"),
        (16, 64, 8, 2, "f"),
        (32, 32, 4, 2, "f"),
    ],
    90: [
        (64, 64, 8, 3, "s"),
        (64, 128, 8, 2, "s"),
        (32, 128, 8, 3, "s"),
        (64, 64, 8, 2, "l"),
        (32, 64, 4, 3, "l"),
        (32, 128, 8, 2, "l"),
        (16, 64, 4, 2, "f"),
        (32, 128, 8, 1, "f"),
    ],
}
DQ_CONFIGS = {  # dQ holds BLOCK_M queries and walks BLOCK_N keys
    80: [(64, 32, 4, 3, "s"), (64, 64, 8, 2, "sl"), (128, 32, 8, 2, "s"), (64, 32, 4, 2, "lf"), (64, 16, 4, 2, "lf")],
    90: [
        (64, 64, 4, 3, "s"),
        (128, 64, 8, 2, "sl"),
        (128, 32, 4, 3, "s"),
        (64, 64, 8, 2, "l"),
        (64, 32, 4, 3, "l"),
        (64, 32, 8, 2, "f"),
        (32, 32, 4, 3, "f"),
        (64, 16, 4, 2, "f"),
    ],
}
CPU_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64}
"""Under the interpreter: large blocks (fewer program instances); still smaller than the test
lengths 130 and 257, so partial and skipped blocks are exercised."""


def config_class(dtype: torch.dtype, head_dim: int) -> str:
    if dtype == torch.float32:
        return "f"
    return "l" if next_power_of_2(head_dim) > 64 else "s"


def _configs(table: dict) -> dict:
    if triton is None:
        return {}
    out = {}
    for target, rows in table.items():
        out[target] = []
        for bm, bn, warps, stages, classes in rows:
            c = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            c.classes = classes
            out[target].append(c)
    return out


def _pick(configs: list, named_args: dict) -> list:
    q = named_args["Q"]
    cls = config_class(q.dtype, q.shape[-1])
    return [c for c in configs if cls in c.classes]


_KEY = ["L", "Lk", "HEAD_DIM", "CAUSAL", "HAS_DOCS", "GROUP"]
if triton is not None:
    FWD = Launcher(_attn_fwd, _configs(FWD_CONFIGS), _KEY, CPU_BLOCKS, _pick)
    DKDV = Launcher(_attn_bwd_dkdv, _configs(BWD_CONFIGS), _KEY, CPU_BLOCKS, _pick)
    DQ = Launcher(_attn_bwd_dq, _configs(DQ_CONFIGS), _KEY, CPU_BLOCKS, _pick)
    DELTA = Launcher(_attn_bwd_delta)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q, k, v, doc_ids):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention wants q [B,Hq,L,D] and k/v [B,Hkv,Lk,D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, Hq, L, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1]:
        raise ValueError(f"attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (need equal B, D and Hq % Hkv == 0)")
    if doc_ids is not None and k.shape[2] != L:
        raise ValueError(f"attention: doc_ids need keys as long as queries, got L={L}, Lk={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q/k/v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if B * Hq * L >= 2**31:
        raise ValueError(f"attention: {B * Hq * L} query rows (batch x heads x length) exceed the kernel's 32-bit row index")
    if D > 256:
        raise ValueError(f"attention: head dim {D} > 256 is not supported by the Triton kernel; use LLMTRAIN_KERNELS=torch")
    if doc_ids is not None and tuple(doc_ids.shape) != (B, L):
        raise ValueError(f"attention: doc_ids must be [B, L] = {(B, L)}, got {tuple(doc_ids.shape)}")


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, causal, scale):
        _check(q, k, v, doc_ids)
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        B, Hq, L, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        if doc_ids is not None:
            runs = document_runs(doc_ids.to(q.device))
        else:
            runs = (q, q, q)  # unused placeholders: HAS_DOCS is a compile-time False
        o = torch.empty_like(q)
        lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
        dot_dtype, precision = dot_mode(q.dtype, q.device)
        common = dict(
            GROUP=Hq // Hkv,
            HEAD_DIM=D,
            HEAD_DIM_PAD=max(16, next_power_of_2(D)),
            CAUSAL=bool(causal),
            HAS_DOCS=doc_ids is not None,
            DOT_DTYPE=dot_dtype,
            PRECISION=precision,
        )
        FWD(
            lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * Hq),
            q.device,
            q,
            k,
            v,
            o,
            lse,
            *runs,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *o.stride()[:3],
            L,
            Lk,
            Hq,
            scale * 1.4426950408889634,
            **common,
        )
        ctx.save_for_backward(q, k, v, o, lse, *(runs if doc_ids is not None else ()))
        ctx.has_docs, ctx.scale, ctx.common = doc_ids is not None, scale, common
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *runs = ctx.saved_tensors
        if not runs:
            runs = (q, q, q)
        do = _last_dim_contiguous(do)
        B, Hq, L, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        delta = torch.empty_like(lse)
        rows, d_pad = B * Hq * L, max(16, next_power_of_2(D))
        block = 64 if q.is_cuda else min(next_power_of_2(rows), max(1, 32768 // d_pad))
        DELTA(
            (triton.cdiv(rows, block),),
            q.device,
            o,
            do,
            delta,
            *o.stride()[:3],
            *do.stride()[:3],
            rows,
            L,
            Hq,
            meta=dict(HEAD_DIM=D, HEAD_DIM_PAD=d_pad, BLOCK_M=block),
        )
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        qk_scale = ctx.scale * 1.4426950408889634
        DKDV(
            lambda m: (triton.cdiv(Lk, m["BLOCK_N"]), B * Hkv),
            q.device,
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            *runs,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *do.stride()[:3],
            *dk.stride()[:3],
            *dv.stride()[:3],
            L,
            Lk,
            Hq,
            Hkv,
            qk_scale,
            ctx.scale,
            **ctx.common,
        )
        DQ(
            lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * Hq),
            q.device,
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            *runs,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *do.stride()[:3],
            *dq.stride()[:3],
            L,
            Lk,
            Hq,
            qk_scale,
            ctx.scale,
            **ctx.common,
        )
        return dq, dk, dv, None, None, None


def attention(q, k, v, doc_ids: Optional[torch.Tensor] = None, causal: bool = True, scale: Optional[float] = None):
    """Triton attention (differentiable in q, k, v); same contract as `attention_reference`."""
    return _Attention.apply(q, k, v, doc_ids, causal, scale)


def aot_cases():
    """AOT compile cases (kernels/aot.py): every autotune config of each target for each class it
    serves (bf16 head dim 64 for "s", 128 for "l"; fp32 head dims 64 and 128 for "f"), causal with
    document masking and GQA (the most demanding variant). fp16 compiles to the same resource
    use as bf16 (measured for every config), so it is left out."""
    B, Hq, Hkv, L = 2, 32, 8, 4096
    variants = [("s", torch.bfloat16, 64), ("l", torch.bfloat16, 128), ("f", torch.float32, 64), ("f", torch.float32, 128)]
    for target in (80, 90):
        for cls, dtype, D in variants:
            dot = {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
            common = dict(
                GROUP=Hq // Hkv, HEAD_DIM=D, HEAD_DIM_PAD=D, CAUSAL=True, HAS_DOCS=True, DOT_DTYPE=dot, PRECISION="tf32"
            )
            q_str = (Hq * L * D, L * D, D)
            kv_str = (Hkv * L * D, L * D, D)
            args = dict(
                Q=dtype,
                K=dtype,
                V=dtype,
                O=dtype,
                DO=dtype,
                DQ=dtype,
                DK=dtype,
                DV=dtype,
                LSE=torch.float32,
                DELTA=torch.float32,
                RUN=torch.int32,
                START=torch.int32,
                END=torch.int32,
                L=L,
                Lk=L,
                R=B * Hq * L,
                Hq=Hq,
                Hkv=Hkv,
                qk_scale=0.125 * 1.4426950408889634,
                sm_scale=0.125,
            )
            for prefix, strides in dict(q=q_str, k=kv_str, v=kv_str, o=q_str, d=q_str, dq=q_str, dk=kv_str, dv=kv_str).items():
                args.update(zip((f"s_{prefix}b", f"s_{prefix}h", f"s_{prefix}l"), strides))
            tag = f"{str(dtype)[6:]} d{D}"
            for name, launcher in (("attn_fwd", FWD), ("attn_bwd_dkdv", DKDV), ("attn_bwd_dq", DQ)):
                for c in launcher.configs[target]:
                    if cls in c.classes:
                        label = f"{tag} M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                        yield Case(name, target, label, launcher.fn, args, dict(common, **c.kwargs), c.num_warps, c.num_stages)
            yield Case(
                "attn_bwd_delta", target, f"{tag} M64 w4", DELTA.fn, args, dict(HEAD_DIM=D, HEAD_DIM_PAD=D, BLOCK_M=64), 4, 3
            )
