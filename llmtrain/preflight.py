"""Checks the driver runs before starting Ray, so a mistake costs a second, not a cluster start-up.

Everything checked here is checked again where it is used (the workers); this only moves the
common mistakes in front: missing data, a global batch the workers cannot split, a model that
does not fit the data, or a checkpoint from another model shape, world size or ZeRO stage.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from llmtrain import checkpoint
from llmtrain.config import JobConfig
from llmtrain.engine import batch_layout
from llmtrain.tasks import build_task


def preflight(cfg: JobConfig, task: str) -> None:
    world = cfg.cluster.num_workers
    layout = batch_layout(cfg, world)
    ctx = SimpleNamespace(rank=0, world_size=world, is_main=True)
    data = build_task(task, cfg, layout, ctx)
    resume_from = checkpoint.resolve_resume(cfg.train.resume, Path(cfg.run.dir))
    if resume_from is not None:
        meta = checkpoint.read_meta(resume_from)
        checkpoint.check_compatible(meta, data.model_config.to_dict(), world, cfg.zero.stage, resume_from)
