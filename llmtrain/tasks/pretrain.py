"""The `pretrain` task: next-token prediction on prepared token shards (`llmtrain prepare`).

    llmtrain pretrain configs/tiny-pretrain.yaml data.path=data/ run.dir=runs/tiny
    llmtrain pretrain configs/tiny-pretrain.yaml data.path=domain/ model.from=runs/tiny run.dir=runs/tiny-domain

`data.path` (or a weighted `data.mixture`: prepared directories, or their s3:// URIs read through
each node's shard cache) is read by the deterministic, rank-sharded loader
(llmtrain/data/loader.py); the model is `model.preset` at random init, or, for continued
(domain-adaptive) pretraining, the weights of `model.from`: one of our runs or checkpoints
(exported once to RUN_DIR/base/) or a released Hugging Face directory. The data must be prepared
with that model's tokenizer; the loader starts at the new data's beginning, the optimizer fresh,
and the LR schedule fresh (warmup again) unless `train.schedule_offset` continues the base's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from llmtrain.config import JobConfig
from llmtrain.data.loader import TokenLoader
from llmtrain.data.shards import check_fits_model
from llmtrain.engine import Layout
from llmtrain.errors import UserError
from llmtrain.tasks.base import Batches, Plan, Task, TaskData, model_source
from llmtrain.tasks.base_model import base_dir, resolve_base
from llmtrain.worker import WorkerContext


class PretrainTask(Task):
    name = "pretrain"

    def prepare(self, cfg: JobConfig, layout: Layout) -> Plan:
        # rank 0's view of the training data, kept for check_resume
        self._driver_train = train = self._loader(
            cfg, "train", True, layout.grad_accum, 0, layout.world_size, layout.micro_batch_size
        )
        base, _ = resolve_base(cfg, Path(cfg.run.dir))  # one of our runs: exported to RUN_DIR/base/ once
        model_config, _ = model_source(cfg, train.vocab_size, train.seq_len, base)
        # Before any worker starts: the model's vocabulary (and model.from's tokenizer) against every source.
        model = f"model.from={cfg.model.from_}" if base is not None else f"model.preset={cfg.model.preset}"
        fix = f"prepare the data with --tokenizer {base}" if base is not None else "re-run `llmtrain prepare ... --force`"
        for data in train.data:
            check_fits_model(data, model_config.vocab_size, model, base, fix)
        return Plan(model_config)

    def driver_batches(self, cfg: JobConfig, layout: Layout) -> Batches:
        return self._driver_train

    def build(self, cfg: JobConfig, layout: Layout, ctx: WorkerContext) -> TaskData:
        self._val = None
        train = self._loader(cfg, "train", True, layout.grad_accum, ctx.rank, ctx.world_size, layout.micro_batch_size)
        if train.has_split("val"):
            # val_batches global batches, split over ranks like training: the same rows at any world size
            self._val = (cfg, cfg.train.val_batches * layout.grad_accum, ctx.rank, ctx.world_size, layout.micro_batch_size)
        model_config, weights = model_source(cfg, train.vocab_size, train.seq_len, base_dir(cfg))
        return TaskData(model_config, train, train.seq_len, Path(train.tokenizer_dir), weights)

    def validation(self) -> Optional[Batches]:
        if self._val is None:
            return None
        cfg, grad_accum, rank, world, micro = self._val
        return self._loader(cfg, "val", False, grad_accum, rank, world, micro)

    @staticmethod
    def _loader(cfg: JobConfig, split: str, shuffle: bool, grad_accum: int, rank: int, world: int, micro: int) -> TokenLoader:
        sources: Union[str, list[tuple[str, float]]]
        if cfg.data.mixture:
            sources = [(str(m.path), m.weight) for m in cfg.data.mixture]
        elif cfg.data.path is not None:
            sources = str(cfg.data.path)
        else:
            raise UserError("no training data: set data.path=PREPARED_DIR (or s3://..., from `llmtrain prepare`) or data.mixture")
        return TokenLoader(
            sources,
            split=split,
            micro_batch_size=micro,
            grad_accum=grad_accum,
            rank=rank,
            world_size=world,
            seed=cfg.run.seed,
            shuffle=shuffle,
            cache_dir=cfg.data.cache_dir,  # data in object storage: this node's shard cache
            cache_bytes=int(cfg.data.cache_bytes),
        )
