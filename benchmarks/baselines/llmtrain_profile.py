"""One optimizer step of llmtrain's own training loop under torch.profiler (rank 0), for
benchmarks/finetune_throughput.py --profile: what bounds a step, measured, not guessed.

llmtrain runs here under torchrun (`python -m llmtrain.train`'s path: rank 0 prepares, every rank
trains) instead of Ray Train: the model, engine, loss and step are the same code
(`llmtrain.train.train_step`); only the launcher differs. By hand:

    DS_ACCELERATOR=cpu .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/baselines/llmtrain_profile.py \\
        --profile-step 2 --out /tmp/prof configs/tiny-lora.yaml model.from=BASE ... --task sft

Writes the operator profile of step --profile-step to --out .txt/.json (profile_ops.py).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from profile_ops import write_profile


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile-step", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args, rest = p.parse_known_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import llmtrain.train as train

    original = train.train_step
    calls = [0]

    def profiled_step(*a, **kw):
        calls[0] += 1
        if calls[0] != args.profile_step or int(os.environ.get("RANK", 0)) != 0:
            return original(*a, **kw)
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = original(*a, **kw)
        write_profile(prof, args.out, (time.perf_counter() - start) * 1e3)
        return result

    train.train_step = profiled_step
    return train.main(rest)


if __name__ == "__main__":
    from llmtrain.worker import exit_process

    exit_process(main())  # llmtrain.train's own ending (torch 2.13 can abort in interpreter teardown)
