"""Reference (d): a single-process PyTorch training loop (no DeepSpeed, no Ray).

Measures steady-state training tokens/s of one process using all its torch threads:
transformers' LlamaForCausalLM (the llmtrain `tiny` shape; `--model llmtrain` uses llmtrain's own
Decoder instead, to separate the model's speed from the runtime's), fp32, torch AdamW, gradient
clipping, the same global batch as micro-batches x accumulation, over the same token rows.
Run by benchmarks/train_throughput.py; by hand:

    .venv/bin/python benchmarks/baselines/single_process.py --data WORK/baseline --out /tmp/single.json

The first --warmup-steps optimizer steps are not measured; tokens/s covers the next --steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from baseline_common import StepClock, TokenRows, build_model, lr_lambda, param_groups, parse_args, write_result


def llmtrain_model(data: Path, seed: int):
    """llmtrain's Decoder with the same shape (config.json is its own Hugging Face export)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import json

    from llmtrain.model.decoder import Decoder
    from llmtrain.model.model_config import ModelConfig

    torch.manual_seed(seed)
    return Decoder(ModelConfig.from_hf_config(json.loads((data / "config.json").read_text())))


def main() -> None:
    def model_flag(p):
        p.add_argument("--model", choices=["hf", "llmtrain"], default="hf", help="transformers' Llama or llmtrain's Decoder")

    args = parse_args(__doc__.split("\n")[0], distributed=False, extra=model_flag)
    model_kind = args.model
    grad_accum = args.global_batch // args.micro_batch
    assert grad_accum * args.micro_batch == args.global_batch, "global batch must be a multiple of the micro-batch"
    total = args.warmup_steps + args.steps

    if model_kind == "llmtrain":
        model = llmtrain_model(args.data, args.seed)

        def loss_of(batch):  # llmtrain's model returns the summed loss over already-shifted labels
            labels = torch.cat([batch["input_ids"][:, 1:], torch.full_like(batch["input_ids"][:, :1], -100)], dim=1)
            pos = batch.get("position_ids")
            return model(batch["input_ids"], position_ids=pos, labels=labels) / (labels != -100).sum()
    else:
        model = build_model(args.data, args.seed)

        def loss_of(batch):
            return model(**batch).loss

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_warmup, total))
    rows = TokenRows(args.data, doc_mask=not args.no_doc_mask)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.micro_batch, shuffle=True, drop_last=True, generator=generator)
    clock = StepClock(args.global_batch * rows.seq_len, args.warmup_steps, args.steps)
    batches = iter(loader)
    model.train()
    for _ in range(total):
        step_loss = 0.0
        for _ in range(grad_accum):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            loss = loss_of(batch) / grad_accum
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_done(step_loss)

    name = "single process" + (" (llmtrain model)" if model_kind == "llmtrain" else "")
    write_result(
        args.out, clock.result(name, world_size=1, grad_accum=grad_accum, model=model_kind, doc_mask=not args.no_doc_mask)
    )


if __name__ == "__main__":
    main()
