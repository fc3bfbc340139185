"""The one training loop, for every task (pretraining, SFT, preference tuning): the task comes in
as an argument (llmtrain/tasks/base.py) and says what differs; this file never imports one.

Runs once per worker: inside Ray Train (`llmtrain pretrain` -> launch.py), under torchrun, or as
a single process:

    torchrun --nproc-per-node 2 -m llmtrain.train configs/tiny-pretrain.yaml run.dir=runs/x

Per optimizer step each rank takes its micro-batches of the global batch. The loss is the sum
over the task's units (supervised tokens; preference pairs) divided by their number in the
whole global batch (all micro-batches, all ranks), not a mean of per-batch means; gradients are
therefore the same whatever the split into micro-batches and ranks.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

import kernels
from llmtrain import checkpoint
from llmtrain.config import JobConfig, load_config
from llmtrain.data.atomic import atomic_write_json
from llmtrain.engine import (
    batch_layout,
    build_model,
    deepspeed_config,
    frozen_model,
    initialize,
    prepare_deepspeed_runtime,
    resolve_precision,
)
from llmtrain.errors import UserError, run_main
from llmtrain.evaluate import count_labels, lm_loss, mean_loss
from llmtrain.metrics import MetricsWriter, StartupClock, memory_gb, peak_flops, plot_loss
from llmtrain.tasks import get_task
from llmtrain.tasks.base import Plan, Task
from llmtrain.worker import WorkerContext, exit_process

log = logging.getLogger("llmtrain")


def train_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's `train_loop_per_worker`: job = {"config": JobConfig dict, "task": name,
    "startup": the driver's StartupClock state}."""
    clock = StartupClock(**job["startup"]) if "startup" in job else StartupClock()
    clock.mark("workers_start")
    cfg = JobConfig.model_validate(job["config"])
    return run(cfg, get_task(job["task"]), clock)


def run(cfg: JobConfig, task: Task, clock: Optional[StartupClock] = None) -> dict[str, Any]:
    """Train `task` as configured, from a fresh start or the newest compatible checkpoint. Its
    driver step (`task.prepare`) has run already: on the Ray driver, or `run_torchrun`'s rank 0."""
    clock = clock or StartupClock()
    ctx = WorkerContext.start(cfg.cluster.use_gpu)
    _setup_logging(ctx)
    layout = batch_layout(cfg, ctx.world_size)
    precision = resolve_precision(cfg, ctx.on_gpu)
    prepare_deepspeed_runtime(ctx.on_gpu)
    if "LLMTRAIN_KERNELS" not in os.environ:  # the environment overrides the config
        kernels.set_backend(cfg.kernels.backend)
    run_dir = Path(cfg.run.dir)
    _record_placement(ctx, run_dir)
    clock.mark("process_group")

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    data = task.build(cfg, layout, ctx)
    clock.mark("data")
    ds_config = deepspeed_config(cfg, layout, precision, ctx.on_gpu, data.model_config.hidden_size)
    model = build_model(data.model_config, cfg, ds_config, data.weights)
    clock.mark("model")  # built and loaded: what `from_pretrained` does
    task.select_trainable(model)
    clock.mark("trainable")  # LoRA / freezing (importing peft when LoRA is on)
    engine, guard, grad_norm = initialize(model, cfg, ds_config)
    task.setup(engine, ctx, lambda weights=None: frozen_model(data.model_config, cfg, ds_config, weights or data.weights))
    clock.mark("engine")

    step = 0
    model_shape = data.model_config.to_dict()
    restored = ctx.restored_checkpoint()
    if restored and ctx.is_main:
        log.warning("restarted after a failure: Ray Train restores %s; resuming from the newest complete checkpoint", restored)
    resume = checkpoint.resume_point(cfg.train.resume, run_dir, model_shape, ctx.world_size, cfg.zero.stage, bool(restored))
    if resume is not None:
        resume_from, meta = resume
        checkpoint.load(engine, resume_from, ctx.rank)
        data.train.load_state_dict(meta["loader"])
        step = meta["step"]
        if ctx.is_main:
            log.info("resumed from %s at step %d", resume_from, step)
    else:
        torch.manual_seed(cfg.run.seed + 1 + ctx.rank)  # per-rank stream for dropout etc.

    writer = MetricsWriter(run_dir, enabled=ctx.is_main)
    writer.truncate_after(step)
    if ctx.is_main:
        task.save_run_files(run_dir, data.tokenizer_dir)

    fpt = data.model_config.flops_per_token(data.seq_len)
    peak = peak_flops(ctx.device, precision) * ctx.world_size
    tokens_per_step = layout.global_batch_size * data.seq_len
    val_at_start = 0
    if step == 0:
        val_at_start = initial_validation(engine, task, ctx, writer, run_dir, cfg.train.val_at_start)
        clock.mark("validation")
    first_step = step + 1

    bad_in_a_row = skipped = 0
    window_t, window_steps = time.perf_counter(), 0
    trained = False
    last_step = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
    while step < last_step:
        trained = True
        result = train_step(engine, guard, data.train.next_step(), ctx, task)
        step += 1
        window_steps += 1
        if step == first_step:
            clock.mark("first_step")
            writer.write(
                {
                    "step": step - 1,
                    "startup_s": clock.marks,
                    "command_to_first_step_s": clock.total,
                    "val_micro_batches_at_start": val_at_start,
                }
            )
            if ctx.is_main:
                log.info(
                    "first optimizer step %.1f s after the command (%s; initial validation: %d micro-batches per rank)",
                    clock.total,
                    ", ".join(f"{k} {v:.1f}" for k, v in clock.marks.items()),
                    val_at_start,
                )
        if not result.finite:
            skipped += 1
            bad_in_a_row += 1
            if ctx.is_main:
                log.warning("step %d: loss is %s; update skipped (%d in a row)", step, result.loss, bad_in_a_row)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise UserError(
                    f"loss was not finite for {bad_in_a_row} steps in a row (last at step {step}); "
                    "lower train.lr, raise train.warmup_steps or check the data, then resume from the last checkpoint"
                )
        else:
            bad_in_a_row = 0
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            elapsed = time.perf_counter() - window_t
            tps = tokens_per_step * window_steps / elapsed
            writer.write(
                {
                    "step": step,
                    "loss": result.loss,
                    "lr": engine.get_lr()[0],
                    "grad_norm": grad_norm(),
                    "tokens_per_s": tps,
                    "mfu": tps * fpt / peak,
                    "supervised_tokens": result.count,
                    "memory_gb": memory_gb(ctx.device),
                    "skipped_steps": skipped,
                    **result.stats,
                }
            )
            window_t, window_steps = time.perf_counter(), 0
        if cfg.train.val_every and step % cfg.train.val_every == 0 and step != cfg.train.max_steps:
            _validate(engine, task, ctx, writer, step)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == last_step:
            t_save = time.perf_counter()
            _save(engine, data.train, task, cfg, ctx, step, model_shape, {"step": step, "loss": result.loss})
            window_t += time.perf_counter() - t_save  # keep checkpoint time out of tokens/s
    final_val = _validate(engine, task, ctx, writer, step) if trained and step == cfg.train.max_steps else None
    writer.close()
    if ctx.is_main:
        plot_loss(run_dir)
    task.finish(engine, ctx, run_dir, step)
    return {"step": step, "val_loss": final_val}


class StepResult(NamedTuple):
    loss: float  # over the global batch's units
    count: int  # the units (supervised tokens, pairs) in the global batch
    finite: bool  # False: the update was skipped
    stats: dict[str, float]  # the task's statistics, per unit, over the global batch


def train_step(
    engine, guard, micro_batches: list[dict[str, torch.Tensor]], ctx: WorkerContext, task: Optional[Task] = None
) -> StepResult:
    """One optimizer step over this rank's micro-batches (the language-model loss without a
    task). An update whose global loss is not finite is skipped."""
    loss_fn, count_fn = (task.loss, task.count) if task is not None else (lm_loss, count_labels)
    dev = ctx.device
    n_local = sum(count_fn(mb) for mb in micro_batches)
    (n_global,) = ctx.all_reduce_sum([n_local])
    scale = ctx.world_size / max(n_global, 1.0)  # DeepSpeed averages gradients over ranks
    sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), dtype=torch.float64, device=dev)}
    totals: dict[str, float] = {}
    for i, mb in enumerate(micro_batches):
        loss_sum, stats = loss_fn(engine, mb, dev)
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        for key, value in {"loss": loss_sum, **stats}.items():
            sums[key] = sums.get(key, 0) + value.detach().double()
        if i == len(micro_batches) - 1:
            keys = list(sums)
            totals = dict(zip(keys, ctx.all_reduce_sum([float(sums[k]) for k in keys])))
            guard.skip = not math.isfinite(totals["loss"])
        engine.step()
    guard.skip = False
    per_unit = {k: v / max(n_global, 1.0) for k, v in totals.items()}
    loss = per_unit.pop("loss")
    return StepResult(loss, int(n_global), math.isfinite(totals["loss"]), per_unit)


def initial_validation(engine, task: Task, ctx: WorkerContext, writer: MetricsWriter, run_dir: Path, enabled: bool) -> int:
    """Before the first step of a fresh run: the task's measurements and the step-0 validation
    (`train.val_at_start`), at most `train.val_batches` global batches (the task bounds it).
    Returns the micro-batches this rank evaluated (0: skipped), for the start-up record."""
    if not enabled:
        if ctx.is_main:
            log.info("initial validation skipped (train.val_at_start=false)")
        return 0
    task.start(engine, ctx, run_dir)
    counted: list[int] = []
    _validate(engine, task, ctx, writer, 0, counted)
    return sum(counted)


class _Counted:
    """Batches that count the micro-batches drawn from them (into `counts`)."""

    def __init__(self, batches, counts: list[int]):
        self.batches, self.counts = batches, counts

    def next_step(self):
        micro_batches = list(self.batches.next_step())
        self.counts.append(len(micro_batches))
        return micro_batches


def _validate(
    engine, task: Task, ctx: WorkerContext, writer: MetricsWriter, step: int, counts: Optional[list[int]] = None
) -> Optional[float]:
    batches = task.validation()
    if batches is None:
        return None
    if counts is not None:
        batches = _Counted(batches, counts)
    result = mean_loss(engine, batches, ctx, task.loss, task.count)
    if result is None:
        return None
    val_loss = result.pop("loss")
    writer.write({"step": step, "val_loss": val_loss, **{f"val_{k}": v for k, v in result.items()}})
    if ctx.is_main:
        log.info("step %d: val_loss %.4f", step, val_loss)
    return val_loss


def _save(
    engine, train_batches, task: Task, cfg: JobConfig, ctx: WorkerContext, step: int, model_shape: dict, metrics: dict
) -> Path:
    meta = {
        "zero_stage": cfg.zero.stage,
        "model_config": model_shape,
        "loader": train_batches.state_dict(),
        "task": task.name,
        "config": cfg.to_dict(),
    }
    path = checkpoint.save(engine, Path(cfg.run.dir), step, ctx.rank, ctx.world_size, meta, cfg.checkpoint.keep, ctx.barrier)
    ctx.report(metrics, str(path))
    return path


def _record_placement(ctx: WorkerContext, run_dir: Path) -> None:
    """Log the rank -> node mapping and keep it in RUN_DIR/placement.json."""
    placement = ctx.placement()
    if not ctx.is_main:
        return
    for p in placement:
        log.info(
            "rank %d -> node %d (%s, %s) pid %d %s", p["rank"], p["node_rank"], p["node_ip"], p["hostname"], p["pid"], p["device"]
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "placement.json", placement)


def _setup_logging(ctx: WorkerContext) -> None:
    """Our messages at INFO on rank 0 (WARNING elsewhere); libraries only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format=f"[rank {ctx.rank}] %(message)s", stream=sys.stdout, force=True)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's deprecated calls
    logging.getLogger("llmtrain").setLevel(logging.INFO if ctx.is_main else logging.WARNING)


def driver_step(cfg: JobConfig, task: Task, world_size: int) -> Plan:
    """What runs once before any worker trains: the task's `prepare` (inputs checked, caches
    built), then, if the run continues from a checkpoint, that checkpoint checked against this
    run's model, world size, ZeRO stage and data position."""
    layout = batch_layout(cfg, world_size)
    plan = task.prepare(cfg, layout)
    resume = checkpoint.resume_point(cfg.train.resume, Path(cfg.run.dir), plan.model_config.to_dict(), world_size, cfg.zero.stage)
    if resume is not None:
        task.check_resume(cfg, layout, *resume)
    return plan


def run_torchrun(cfg: JobConfig, task: Task) -> dict[str, Any]:
    """Without Ray (torchrun or one process): rank 0 runs the driver step, then all train."""
    ctx = WorkerContext.start(cfg.cluster.use_gpu)
    ctx.run_on_main(lambda: driver_step(cfg, task, ctx.world_size))
    return run(cfg, task)


def main(argv: Optional[list[str]] = None) -> int:
    """torchrun / single-process entry: python -m llmtrain.train CONFIG [key=value ...] [--task T]."""
    p = argparse.ArgumentParser(prog="python -m llmtrain.train")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--task", default="pretrain")
    args = p.parse_args(argv)
    return run_main(lambda: run_torchrun(load_config(args.config, args.overrides), get_task(args.task)))


if __name__ == "__main__":
    exit_process(main())
