"""Baseline (b) of benchmarks/finetune_throughput.py: SFT with Hugging Face `Trainer` + `peft`
(LoRA) or full fine-tuning, DeepSpeed ZeRO on N CPU processes under torchrun (no llmtrain).

The model is `AutoModelForCausalLM.from_pretrained(--base)` (fp32, SDPA attention): the same
Hugging Face directory llmtrain loads. The data are the token rows llmtrain's SFT preparation
made, exported by the benchmark in llmtrain's global order (step s = rows s*G .. s*G+G-1):

    ROWS/input_ids.npy     int32 [rows, seq_len]  packed examples, padded with the pad id
    ROWS/labels.npy        int32 [rows, seq_len]  transformers' convention (unshifted): the token
                                                  where it is an assistant token, else -100
    ROWS/position_ids.npy  int32 [rows, seq_len]  restarting at 0 at every example start, so
                                                  transformers masks attention across examples
                                                  (padding-free packing, as llmtrain does)

A sequential sampler keeps that order, so every optimizer step trains on the same rows as
llmtrain's step. By hand:

    DS_ACCELERATOR=cpu .venv/bin/torchrun --standalone --nproc-per-node 2 \\
        benchmarks/baselines/hf_trainer_sft.py --base WORK/base --rows WORK/rows --out /tmp/hf.json --lora-r 16

Writes one JSON (rank 0): step end times (tokens/s after --warmup-steps), per-step losses and
supervised tokens (summed over ranks), and each rank's peak RSS (/proc/self/status VmHWM) after
loading the model and at the end of training. `--profile-step K` runs step K under
torch.profiler on rank 0 and writes its operator profile beside --out (profile_ops.py).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from baseline_common import avoid_deepspeed_jit, write_result, zero_config
from profile_ops import write_profile

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def proc_status_kib(field: str) -> int:
    """A /proc/self/status memory field (VmHWM: peak RSS, VmRSS: current), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows: Path):
        self.ids = np.load(rows / "input_ids.npy", mmap_mode="r")
        self.labels = np.load(rows / "labels.npy", mmap_mode="r")
        self.pos = np.load(rows / "position_ids.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        as_long = lambda a: torch.from_numpy(np.asarray(a[i], dtype=np.int64))  # noqa: E731
        return {"input_ids": as_long(self.ids), "labels": as_long(self.labels), "position_ids": as_long(self.pos)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, required=True, help="Hugging Face model directory")
    p.add_argument("--rows", type=Path, required=True, help="input_ids.npy, labels.npy, position_ids.npy")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-warmup", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--profile-step", type=int, default=0, help="profile this optimizer step on rank 0 (0: none)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    avoid_deepspeed_jit()
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    grad_accum = args.global_batch // (args.micro_batch * world)
    assert grad_accum * args.micro_batch * world == args.global_batch, "global batch must be micro x accum x world"
    total = args.warmup_steps + args.steps
    pid_file = args.out.with_name(args.out.stem + f".rank{rank}.pid")
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))  # the benchmark watches this process's RSS

    ds_config = zero_config(args.zero_stage, "auto", "auto", "auto", "auto")
    rows = Rows(args.rows)
    ends: list[float] = []
    losses: list[float] = []
    supervised: list[int] = []
    local_count = [0]
    hwm = {}

    with tempfile.TemporaryDirectory(prefix="hf-sft-bench-") as out_dir:
        training_args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=grad_accum,
            max_steps=total,
            learning_rate=args.lr,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_epsilon=1e-8,
            max_grad_norm=args.grad_clip,
            lr_scheduler_type="cosine",
            warmup_steps=args.lr_warmup,
            optim="adamw_torch",
            deepspeed=ds_config,
            use_cpu=True,
            ddp_backend="gloo",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            seed=args.seed,
        )
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, attn_implementation="sdpa")
        if args.lora_r:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none")
            model = get_peft_model(model, lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        profiler = [None]
        profile_start = [0.0]

        class Probe(TrainerCallback):
            def on_train_begin(self, _args, state, control, **kwargs):
                hwm["after_load_kib"] = proc_status_kib("VmHWM")

            def on_step_begin(self, _args, state, control, **kwargs):
                if rank == 0 and args.profile_step and state.global_step + 1 == args.profile_step:
                    profiler[0] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    profiler[0].__enter__()
                    profile_start[0] = time.perf_counter()

            def on_step_end(self, _args, state, control, **kwargs):
                ends.append(time.time())
                count = torch.tensor([local_count[0]], dtype=torch.int64)
                if dist.is_initialized():
                    dist.all_reduce(count)
                supervised.append(int(count))
                local_count[0] = 0
                if profiler[0] is not None:
                    profiler[0].__exit__(None, None, None)
                    wall_ms = (time.perf_counter() - profile_start[0]) * 1e3
                    write_profile(profiler[0], args.out.with_name(args.out.stem + "-profile"), wall_ms)
                    profiler[0] = None

            def on_log(self, _args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs and "train_runtime" not in logs:
                    losses.append(float(logs["loss"]))

        class CountingTrainer(Trainer):
            def compute_loss(self, model, inputs, *a, **kw):
                local_count[0] += int((inputs["labels"][:, 1:] != -100).sum())
                return super().compute_loss(model, inputs, *a, **kw)

        trainer = CountingTrainer(model=model, args=training_args, train_dataset=rows, callbacks=[Probe()])
        trainer.train()
    hwm["end_kib"] = proc_status_kib("VmHWM")
    hwm["rss_end_kib"] = proc_status_kib("VmRSS")
    hwm["rank"] = rank
    everyone = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(everyone, hwm)
    else:
        everyone = [hwm]
    if rank == 0:
        write_result(
            args.out,
            {
                "name": "HF Trainer + peft + DeepSpeed" if args.lora_r else "HF Trainer + DeepSpeed",
                "step_end_times": ends,
                "losses": losses,
                "supervised_tokens": supervised,
                "trainable_params": trainable,
                "ranks": everyone,
                "world_size": world,
                "grad_accum": grad_accum,
                "torch_threads": torch.get_num_threads(),
            },
        )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # without it ZeRO-3 runs sometimes aborted at exit (NOTES-cpu.md)


if __name__ == "__main__":
    main()
