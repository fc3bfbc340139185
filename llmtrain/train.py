"""The one training loop, for pretraining, SFT and LoRA alike (tasks differ only in their data
and in which parameters train; see llmtrain/tasks.py).

Runs once per worker: inside Ray Train (`llmtrain pretrain` -> launch.py), under torchrun, or as
a single process:

    torchrun --nproc-per-node 2 -m llmtrain.train configs/tiny-pretrain.yaml run.dir=runs/x

Per optimizer step each rank takes its micro-batches of the global batch. The loss is the sum
of token cross-entropies over supervised tokens divided by the number of supervised tokens in
the whole global batch (all micro-batches, all ranks), not a mean of per-batch means; gradients
are therefore the same whatever the split into micro-batches and ranks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from llmtrain import checkpoint
from llmtrain.config import JobConfig
from llmtrain.context import WorkerContext, exit_process
from llmtrain.engine import batch_layout, build_model, deepspeed_config, initialize, prepare_deepspeed_runtime, resolve_precision
from llmtrain.errors import UserError
from llmtrain.metrics import MetricsWriter, StartupClock, memory_gb, peak_flops
from llmtrain.tasks import TaskData, build_task

log = logging.getLogger("llmtrain")


def train_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's `train_loop_per_worker`: job = {"config": JobConfig dict, "task": name,
    "startup": the driver's StartupClock state}."""
    clock = StartupClock(**job["startup"]) if "startup" in job else StartupClock()
    clock.mark("workers_start")
    cfg = JobConfig.model_validate(job["config"])
    return run(cfg, job["task"], clock)


def run(cfg: JobConfig, task: str, clock: Optional[StartupClock] = None) -> dict[str, Any]:
    clock = clock or StartupClock()
    ctx = WorkerContext.start(cfg.cluster.use_gpu)
    _setup_logging(ctx)
    layout = batch_layout(cfg, ctx.world_size)
    precision = resolve_precision(cfg, ctx.on_gpu)
    prepare_deepspeed_runtime(ctx.on_gpu)
    _select_kernels(cfg)
    run_dir = Path(cfg.run.dir)
    _record_placement(ctx, run_dir)
    clock.mark("process_group")

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    data: TaskData = build_task(task, cfg, layout, ctx)
    clock.mark("data")
    ds_config = deepspeed_config(cfg, layout, precision, ctx.on_gpu, data.model_config.hidden_size)
    model = build_model(data.model_config, cfg, ds_config, init_weights=data.init_weights)
    data.prepare_model(model)
    clock.mark("model")
    engine, guard, grad_norm = initialize(model, cfg, ds_config)
    clock.mark("engine")

    step = 0
    # After a failure Ray Train restarts the worker group: continue from the newest complete
    # checkpoint of this run (the one Ray restores, or a newer one whose report was lost).
    restored = ctx.restored_checkpoint()
    resume_from = checkpoint.find_latest(run_dir) if restored else None
    if restored and ctx.is_main:
        log.warning("restarted after a failure: Ray Train restores %s; resuming from %s", restored, resume_from)
    if resume_from is None:
        resume_from = checkpoint.resolve_resume(cfg.train.resume, run_dir)
    model_shape = data.model_config.to_dict()
    if resume_from is not None:
        meta = checkpoint.read_meta(resume_from)
        checkpoint.check_compatible(meta, model_shape, ctx.world_size, cfg.zero.stage, resume_from)
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
        data.save_run_files(run_dir)

    fpt = data.flops_per_token
    peak = peak_flops(ctx.device, precision) * ctx.world_size
    tokens_per_step = layout.global_batch_size * data.seq_len
    if step == 0:
        data.start(engine, ctx, run_dir)
        _validate(engine, data, ctx, writer, step)
        clock.mark("validation")
    first_step = step + 1

    bad_in_a_row = skipped = 0
    window_t, window_steps = time.perf_counter(), 0
    trained = False
    last_step = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
    while step < last_step:
        trained = True
        loss, n_tokens, finite = train_step(engine, guard, data.train.next_step(), ctx)
        step += 1
        window_steps += 1
        if step == first_step:
            clock.mark("first_step")
            writer.write({"step": step - 1, "startup_s": clock.marks, "command_to_first_step_s": clock.total})
            if ctx.is_main:
                log.info("first optimizer step %.1f s after the command (%s)", clock.total,
                         ", ".join(f"{k} {v:.1f}" for k, v in clock.marks.items()))
        if not finite:
            skipped += 1
            bad_in_a_row += 1
            if ctx.is_main:
                log.warning("step %d: loss is %s; update skipped (%d in a row)", step, loss, bad_in_a_row)
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
                    "loss": loss,
                    "lr": engine.get_lr()[0],
                    "grad_norm": grad_norm(),
                    "tokens_per_s": tps,
                    "mfu": tps * fpt / peak,
                    "supervised_tokens": n_tokens,
                    "memory_gb": memory_gb(ctx.device),
                    "skipped_steps": skipped,
                }
            )
            window_t, window_steps = time.perf_counter(), 0
        if cfg.train.val_every and step % cfg.train.val_every == 0 and step != cfg.train.max_steps:
            _validate(engine, data, ctx, writer, step)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == last_step:
            t_save = time.perf_counter()
            _save(engine, data, cfg, ctx, step, model_shape, {"step": step, "loss": loss})
            window_t += time.perf_counter() - t_save  # keep checkpoint time out of tokens/s
    final_val = _validate(engine, data, ctx, writer, step) if trained and step == cfg.train.max_steps else None
    writer.close()
    if ctx.is_main:
        from llmtrain.metrics import plot_loss

        plot_loss(run_dir)
    data.finish(engine, ctx, run_dir)
    return {"step": step, "val_loss": final_val}


def train_step(engine, guard, micro_batches: list[dict[str, torch.Tensor]], ctx: WorkerContext) -> tuple[float, int, bool]:
    """One optimizer step over this rank's micro-batches. Returns (mean loss over the global
    batch's supervised tokens, their count, whether the loss was finite; if not, no update)."""
    dev = ctx.device
    n_local = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
    (n_global,) = ctx.all_reduce_sum([n_local])
    scale = ctx.world_size / max(n_global, 1.0)  # DeepSpeed averages gradients over ranks
    loss_local = torch.zeros((), dtype=torch.float64, device=dev)
    total = finite = None
    for i, mb in enumerate(micro_batches):
        loss_sum = engine(mb["input_ids"].to(dev), position_ids=mb["position_ids"].to(dev), labels=mb["labels"].to(dev))
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        loss_local += loss_sum.detach().double()
        if i == len(micro_batches) - 1:
            (total,) = ctx.all_reduce_sum([float(loss_local)])
            finite = math.isfinite(total)
            guard.skip = not finite
        engine.step()
    guard.skip = False
    return total / max(n_global, 1.0), int(n_global), finite


@torch.no_grad()
def evaluate(engine, batches, ctx: WorkerContext) -> Optional[float]:
    """Token-weighted mean loss over `batches.next_step()` (one call), summed over all ranks."""
    engine.module.train(False)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    n = 0
    for mb in batches.next_step():
        dev = ctx.device
        loss_sum += engine(mb["input_ids"].to(dev), position_ids=mb["position_ids"].to(dev), labels=mb["labels"].to(dev)).double()
        n += int((mb["labels"] != -100).sum())
    engine.module.train(True)
    total, count = ctx.all_reduce_sum([float(loss_sum), n])
    return total / count if count else None


def _validate(engine, data: TaskData, ctx: WorkerContext, writer: MetricsWriter, step: int) -> Optional[float]:
    batches = data.make_val()
    if batches is None:
        return None
    val_loss = evaluate(engine, batches, ctx)
    if val_loss is not None:
        writer.write({"step": step, "val_loss": val_loss})
        if ctx.is_main:
            log.info("step %d: val_loss %.4f", step, val_loss)
    return val_loss


def _save(engine, data: TaskData, cfg: JobConfig, ctx: WorkerContext, step: int, model_shape: dict, metrics: dict) -> Path:
    meta = {
        "zero_stage": cfg.zero.stage,
        "model_config": model_shape,
        "loader": data.train.state_dict(),
        "task": data.name,
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
        log.info("rank %d -> node %d (%s, %s) pid %d %s", p["rank"], p["node_rank"], p["node_ip"], p["hostname"], p["pid"], p["device"])
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "placement.json.tmp"
    tmp.write_text(json.dumps(placement, indent=1))
    os.replace(tmp, run_dir / "placement.json")


def _select_kernels(cfg: JobConfig) -> None:
    import kernels

    if "LLMTRAIN_KERNELS" not in os.environ:  # the environment overrides the config
        kernels.set_backend(cfg.kernels.backend)


def _setup_logging(ctx: WorkerContext) -> None:
    """Our messages at INFO on rank 0 (WARNING elsewhere); libraries only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format=f"[rank {ctx.rank}] %(message)s", stream=sys.stdout, force=True)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's deprecated calls
    logging.getLogger("llmtrain").setLevel(logging.INFO if ctx.is_main else logging.WARNING)


def main(argv: Optional[list[str]] = None) -> int:
    """torchrun / single-process entry: python -m llmtrain.train CONFIG [key=value ...] [--task T]."""
    import argparse

    from llmtrain.config import load_config

    p = argparse.ArgumentParser(prog="python -m llmtrain.train")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--task", default="pretrain")
    args = p.parse_args(argv)
    try:
        run(load_config(args.config, args.overrides), args.task)
    except UserError as err:
        print(f"llmtrain: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    exit_process(main())
