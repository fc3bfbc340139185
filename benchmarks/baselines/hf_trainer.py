"""Baseline (c): Hugging Face `Trainer` with DeepSpeed ZeRO on N CPU processes (no llmtrain).

Measures steady-state training tokens/s of transformers' LlamaForCausalLM (the llmtrain `tiny`
shape), fp32, through `Trainer` with a DeepSpeed config of the given ZeRO stage (same ZeRO
settings as llmtrain generates), torch AdamW (`optim="adamw_torch"`, the Trainer's own optimizer
handed to DeepSpeed), `use_cpu=True, ddp_backend="gloo"`, the same token rows, global batch and
micro-batch. Needs `accelerate` (the `bench` extra). Run by benchmarks/train_throughput.py; by hand:

    DS_ACCELERATOR=cpu .venv/bin/torchrun --standalone --nproc-per-node 2 \
        benchmarks/baselines/hf_trainer.py --data WORK/baseline --out /tmp/hf.json --zero-stage 2

The first --warmup-steps optimizer steps are not measured (a TrainerCallback times each step's
end on rank 0); tokens/s covers the next --steps.
"""

from __future__ import annotations

import os
import tempfile

import torch.distributed as dist
from baseline_common import StepClock, TokenRows, avoid_deepspeed_jit, build_model, parse_args, write_result, zero_config


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], distributed=True)
    avoid_deepspeed_jit()
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    world = int(os.environ.get("WORLD_SIZE", 1))
    grad_accum = args.global_batch // (args.micro_batch * world)
    assert grad_accum * args.micro_batch * world == args.global_batch, "global batch must be micro x accum x world"
    total = args.warmup_steps + args.steps

    ds_config = zero_config(args.zero_stage, "auto", "auto", "auto", "auto")
    with tempfile.TemporaryDirectory(prefix="hf-trainer-bench-") as out_dir:
        training_args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=grad_accum,
            max_steps=total,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
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
            logging_steps=total,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        rows = TokenRows(args.data, doc_mask=not args.no_doc_mask)
        clock = StepClock(args.global_batch * rows.seq_len, args.warmup_steps, args.steps)

        class Timer(TrainerCallback):
            def on_step_end(self, _args, state, control, **kwargs):
                clock.step_done()

            def on_log(self, _args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    clock.losses.append(float(logs["loss"]))

        model = build_model(args.data, args.seed)
        trainer = Trainer(model=model, args=training_args, train_dataset=rows, callbacks=[Timer()])
        trainer.train()
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            mean_loss = clock.losses.pop() if clock.losses else None  # Trainer logs the mean over the run
            write_result(
                args.out,
                clock.result(
                    "HF Trainer + DeepSpeed",
                    zero_stage=args.zero_stage,
                    world_size=world,
                    grad_accum=grad_accum,
                    doc_mask=not args.no_doc_mask,
                    mean_loss=mean_loss,
                ),
            )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # without it ZeRO-3 runs sometimes aborted at exit (NOTES-cpu.md)


if __name__ == "__main__":
    main()
