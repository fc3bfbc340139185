"""Per-rank model-state memory of llmtrain's DeepSpeed engine for ZeRO stages 0-3 (N processes).

Not a baseline: this measures llmtrain itself (llmtrain.engine build_model / initialize with the
config llmtrain generates), launched by benchmarks/train_throughput.py; by hand:

    DS_ACCELERATOR=cpu .venv/bin/torchrun --standalone --nproc-per-node 2 \
        benchmarks/baselines/zero_memory.py --data PREPARED_DIR --out /tmp/mem.json --stages 0,1,2,3

For each stage (one after another in the same processes): build the engine, run one full
optimizer step (so Adam's moments exist), then run the next step's forward/backward passes and,
before its optimizer step, count the bytes of the tensors each rank holds, by category:

    parameters   model parameters: stage 0-2 the parameter storage (ZeRO-1/2: DeepSpeed's flat
                 buffer the parameters are views of); stage 3 each parameter's partition
                 (`ds_tensor`) plus the full data of parameters currently gathered (the
                 "persistent" ones below stage3_param_persistence_threshold)
    gradients    `.grad` of the parameters, ZeRO-1/2's gradient partition buffers
                 (`grads_in_partition`, `averaged_gradients`, the fp32 partition's `.grad`;
                 DeepSpeed sizes that buffer by the whole numel of every parameter overlapping
                 the rank's partition, so a large parameter straddling the boundary - here the
                 embedding - is held whole), ZeRO-3's flat gradient partition buffer
    fp32 master  ZeRO-1/2's fp32 copy of this rank's parameter partition
                 (`single_partition_of_fp32_groups`), ZeRO-3's `fp32_partitioned_groups_flat`
                 when it is a separate copy (for fp32 training it is the parameter partition
                 itself and counts once, under parameters)
    optimizer    the Adam states (exp_avg, exp_avg_sq, step) of the inner torch optimizer
    buffers      any other tensor reachable from DeepSpeed's optimizer object (communication
                 buckets etc.): work space, not a model state; its allocated size (torch.empty
                 pages are only resident once written)

Every tensor is counted by its storage, once (views of one flat buffer count the buffer once,
with its alignment padding). Model states = parameters + gradients + fp32 master + optimizer.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "tiny-pretrain.yaml"
CATEGORIES = ("parameters", "gradients", "fp32 master", "optimizer", "buffers")


class Tally:
    """Bytes per category, each storage counted once (in the first category that claims it)."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = defaultdict(int)

    def add(self, category: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":  # meta tensors hold no memory
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[category] += storage.nbytes()

    def add_all(self, category: str, obj) -> None:
        """Tensors inside lists / tuples / dicts (nested)."""
        if isinstance(obj, torch.Tensor):
            self.add(category, obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                self.add_all(category, v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self.add_all(category, v)

    def sweep(self, category: str, root, depth: int = 5) -> None:
        """Every tensor reachable from `root` through containers and DeepSpeed objects."""
        stack, visited = [(root, 0)], set()
        while stack:
            obj, d = stack.pop()
            if id(obj) in visited or d > depth:
                continue
            visited.add(id(obj))
            if isinstance(obj, torch.Tensor):
                self.add(category, obj)
                continue
            if isinstance(obj, torch.nn.Module):
                continue
            if isinstance(obj, dict):
                children = list(obj.values())
            elif isinstance(obj, (list, tuple, set)):
                children = list(obj)
            elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
                children = list(vars(obj).values())
            else:
                continue
            stack.extend((c, d + 1) for c in children)


def count_model_states(engine, model: torch.nn.Module, stage: int) -> dict:
    opt = engine.optimizer
    inner = opt.optimizer if stage > 0 else opt
    tally = Tally()
    params = list(model.parameters())
    persistent = 0
    for p in params:  # parameters first: a storage shared with a master copy counts here
        if stage == 3:
            tally.add("parameters", p.ds_tensor)
            if p.data.numel() > 0:
                tally.add("parameters", p.data)
                persistent += p.ds_numel
        else:
            tally.add("parameters", p.data)
    for p in params:
        tally.add("gradients", p.grad)
    if stage in (1, 2):
        tally.add("gradients", getattr(opt, "grads_in_partition", None))
        tally.add_all("gradients", getattr(opt, "averaged_gradients", None))
        for master in opt.single_partition_of_fp32_groups:
            tally.add("gradients", master.grad)
        tally.add_all("fp32 master", opt.single_partition_of_fp32_groups)
    if stage == 3:
        tally.add("gradients", opt.grad_partitions_flat_buffer)
        for master in opt.fp32_partitioned_groups_flat:
            tally.add("gradients", master.grad)
        tally.add_all("fp32 master", opt.fp32_partitioned_groups_flat)
    for state in inner.state.values():
        tally.add_all("optimizer", state)
    if stage > 0:
        tally.sweep("buffers", opt)
    numel = sum(p.ds_numel if stage == 3 else p.numel() for p in params)
    return {"bytes": dict(tally.bytes), "num_params": numel, "persistent_params": persistent}


def measure(stage: int, data: Path, micro_batch: int, global_batch: int, ctx, persistence: int | None = None) -> dict:
    from llmtrain.config import load_config
    from llmtrain.engine import batch_layout, build_model, deepspeed_config, initialize
    from llmtrain.tasks.pretrain import PretrainTask
    from llmtrain.train import train_step

    overrides = [
        f"data.path={data}",
        f"zero.stage={stage}",
        "train.precision=fp32",
        "cluster.use_gpu=false",
        f"cluster.num_workers={ctx.world_size}",
        f"train.global_batch_size={global_batch}",
        f"train.micro_batch_size={micro_batch}",
    ]
    cfg = load_config(CONFIG, overrides)
    layout = batch_layout(cfg, ctx.world_size)
    torch.manual_seed(cfg.run.seed)
    task = PretrainTask().build(cfg, layout, ctx)
    ds_config = deepspeed_config(cfg, layout, "fp32", on_gpu=False)
    if persistence is not None and stage == 3:  # what-if: another persistence threshold than llmtrain's
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
    counted_threshold = ds_config["zero_optimization"].get("stage3_param_persistence_threshold")
    model = build_model(task.model_config, cfg, ds_config)
    engine, guard, _ = initialize(model, cfg, ds_config)
    train_step(engine, guard, task.train.next_step(), ctx)  # Adam's moments now exist
    micro_batches = task.train.next_step()
    for i, mb in enumerate(micro_batches):
        loss = engine(mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"])
        engine.backward(loss / mb["labels"].numel(), scale_wrt_gas=False)
        if i == len(micro_batches) - 1:
            counted = count_model_states(engine, model, stage)  # before the boundary step
        engine.step()
    counted["stage"] = stage
    counted["persistence_threshold"] = counted_threshold
    counted["rank"] = ctx.rank
    del engine, model, guard
    gc.collect()
    return counted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="prepared directory")
    p.add_argument("--out", type=Path, required=True, help="JSON result (rank 0 writes it)")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument(
        "--persistence-threshold",
        type=int,
        default=None,
        help="ZeRO-3 stage3_param_persistence_threshold instead of llmtrain's (a what-if)",
    )
    args = p.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from llmtrain.engine import prepare_deepspeed_runtime
    from llmtrain.worker import WorkerContext

    ctx = WorkerContext.start(use_gpu=False)
    prepare_deepspeed_runtime(on_gpu=False)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    results = []
    for stage in sorted(int(s) for s in args.stages.split(",")):  # ZeRO-3 last: zero.Init patches torch
        mine = measure(stage, args.data, args.micro_batch, args.global_batch, ctx, args.persistence_threshold)
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, mine)
        results.extend(everyone)
    if ctx.is_main:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"world_size": ctx.world_size, "results": results}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
