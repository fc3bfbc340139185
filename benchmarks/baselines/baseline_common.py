"""Shared pieces of the baseline training scripts (bare DeepSpeed, HF Trainer, single process).

Deliberately free of llmtrain imports: the baselines see only what benchmarks/train_throughput.py
exported into its work directory,

    WORK/baseline/config.json      a transformers LlamaConfig (llmtrain's `tiny` preset, its
                                   vocabulary from the tokenizer; llmtrain exports this format)
    WORK/baseline/input_ids.npy    uint16 [rows, seq_len]: the prepared train split's token rows
    WORK/baseline/position_ids.npy uint16 [rows, seq_len]: positions restarting at 0 at every
                                   document start (transformers then masks attention across
                                   documents, as llmtrain does)

and each writes one JSON result (tokens/s over the steps after the warm-up, losses, threads).
Not run directly; see benchmarks/train_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def parse_args(description: str, distributed: bool, extra=None) -> argparse.Namespace:
    """The flags every baseline takes; `extra(parser)` adds a script's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, required=True, help="WORK/baseline (config.json, input_ids.npy, position_ids.npy)")
    p.add_argument("--out", type=Path, required=True, help="JSON result file (written by rank 0)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--warmup-steps", type=int, default=5, help="optimizer steps left out of tokens/s")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps after the warm-up")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-warmup", type=int, default=20, help="LR warm-up steps of the schedule")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-doc-mask", action="store_true", help="no position_ids: plain causal attention across documents")
    if distributed:
        p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    if extra is not None:
        extra(p)
    return p.parse_args()


class TokenRows(torch.utils.data.Dataset):
    """Rows of the prepared train split: input_ids, labels (= input_ids; transformers shifts them)
    and, unless disabled, position_ids restarting at each document start."""

    def __init__(self, data: Path, doc_mask: bool = True):
        self.input_ids = np.load(data / "input_ids.npy", mmap_mode="r")
        self.position_ids = np.load(data / "position_ids.npy", mmap_mode="r") if doc_mask else None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        ids = torch.from_numpy(self.input_ids[i].astype(np.int64))
        item = {"input_ids": ids, "labels": ids}
        if self.position_ids is not None:
            item["position_ids"] = torch.from_numpy(self.position_ids[i].astype(np.int64))
        return item

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def build_model(data: Path, seed: int):
    """transformers' LlamaForCausalLM from WORK/baseline/config.json, fp32, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_json_file(str(data / "config.json"))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; no decay for norms, biases and embeddings (as llmtrain does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name or "embed_tokens" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    """Linear warm-up then cosine decay to min_ratio (llmtrain's default schedule shape)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class StepClock:
    """Wall time at the end of every optimizer step; tokens/s over the steps after the warm-up."""

    def __init__(self, tokens_per_step: int, warmup_steps: int, steps: int):
        self.tokens_per_step, self.warmup_steps, self.steps = tokens_per_step, warmup_steps, steps
        self.ends: list[float] = []
        self.losses: list[float] = []

    def step_done(self, loss: Optional[float] = None) -> None:
        self.ends.append(time.perf_counter())
        if loss is not None:
            self.losses.append(float(loss))

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    def result(self, name: str, **extra) -> dict:
        if len(self.ends) < self.total_steps:
            raise RuntimeError(f"{name}: only {len(self.ends)} of {self.total_steps} steps ran")
        w = self.warmup_steps
        seconds = self.ends[self.total_steps - 1] - self.ends[w - 1] if w > 0 else None
        if seconds is None:
            raise RuntimeError("--warmup-steps must be >= 1 (the first step's end starts the clock)")
        step_times = np.diff(self.ends[w - 1 : self.total_steps])
        return {
            "name": name,
            "tokens_per_s": self.tokens_per_step * self.steps / seconds,
            "measured_steps": self.steps,
            "warmup_steps": w,
            "seconds": seconds,
            "step_s_median": float(np.median(step_times)),
            "tokens_per_step": self.tokens_per_step,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            **extra,
        }


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def zero_config(stage: int, global_batch: int, micro_batch: int, grad_accum: int, grad_clip: float) -> dict:
    """The ZeRO section llmtrain generates on CPU (llmtrain/engine.py deepspeed_config), so the
    DeepSpeed settings are the same in (a), (b) and (c)."""
    zero = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False, "reduce_bucket_size": 50_000_000}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=50_000_000, stage3_param_persistence_threshold=100_000)
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def avoid_deepspeed_jit() -> None:
    """On CPU, keep DeepSpeed from JIT-compiling its shared-memory comm op at init_distributed
    (~56 s; gloo does not need it). ../shared/NOTES-cpu.md; llmtrain does the same."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
