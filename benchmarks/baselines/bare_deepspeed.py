"""Baseline (b): a bare DeepSpeed training script, no Ray and no llmtrain, on N processes.

Measures steady-state training tokens/s of transformers' LlamaForCausalLM (the llmtrain `tiny`
shape) under DeepSpeed ZeRO (stage from --zero-stage), fp32, torch AdamW as client optimizer,
a plain DataLoader + DistributedSampler over the prepared token rows. Run by
benchmarks/train_throughput.py; by hand:

    DS_ACCELERATOR=cpu .venv/bin/torchrun --standalone --nproc-per-node 2 \
        benchmarks/baselines/bare_deepspeed.py --data WORK/baseline --out /tmp/bare.json --zero-stage 2

The first --warmup-steps optimizer steps are not measured; tokens/s covers the next --steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from baseline_common import (
    StepClock,
    TokenRows,
    avoid_deepspeed_jit,
    build_model,
    lr_lambda,
    param_groups,
    parse_args,
    write_result,
    zero_config,
)


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], distributed=True)
    avoid_deepspeed_jit()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    world, rank = dist.get_world_size(), dist.get_rank()
    grad_accum = args.global_batch // (args.micro_batch * world)
    assert grad_accum * args.micro_batch * world == args.global_batch, "global batch must be micro x accum x world"

    model = build_model(args.data, args.seed)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    total = args.warmup_steps + args.steps
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.lr_warmup, total)),
        config=zero_config(args.zero_stage, args.global_batch, args.micro_batch, grad_accum, args.grad_clip),
        dist_init_required=False,
    )

    rows = TokenRows(args.data, doc_mask=not args.no_doc_mask)
    sampler = torch.utils.data.DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.micro_batch, sampler=sampler, drop_last=True)
    clock = StepClock(args.global_batch * rows.seq_len, args.warmup_steps, args.steps)
    batches, epoch = iter(loader), 0
    engine.train()
    for _ in range(total):
        for _ in range(grad_accum):
            try:
                batch = next(batches)
            except StopIteration:
                epoch += 1
                sampler.set_epoch(epoch)
                batches = iter(loader)
                batch = next(batches)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        clock.step_done(loss.item())

    if rank == 0:
        write_result(
            args.out,
            clock.result(
                "bare DeepSpeed",
                zero_stage=args.zero_stage,
                world_size=world,
                grad_accum=grad_accum,
                doc_mask=not args.no_doc_mask,
            ),
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
