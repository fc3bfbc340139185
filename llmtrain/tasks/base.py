"""The interface between the one training loop (llmtrain/train.py) and a task.

A task says what differs between pretraining, SFT and preference tuning; the loop calls these
methods by name and never imports a task:

    plan = task.prepare(cfg, layout)            # the driver, once, before any worker starts
    task.check_resume(cfg, layout, path, meta)  # the driver, when continuing from a checkpoint
    data = task.build(cfg, layout, ctx)         # each worker: model shape, base weights, batches
    task.select_trainable(model)                # LoRA / freezing, before the optimizer exists
    task.setup(engine, ctx, frozen_copy)        # every (re)start: e.g. a frozen reference model
    n = task.count(micro_batch)                 # units the loss is normalised by (tokens, pairs)
    loss_sum, stats = task.loss(model, micro_batch, device)
    task.validation()                           # held-out batches, or None
    task.start(engine, ctx, run_dir)            # before the first step of a fresh run
    task.finish(engine, ctx, run_dir, step)     # after the last step (reports, adapters)

`loss` returns the SUM over the micro-batch's units and named sums (`stats`) that the loop
adds over micro-batches and ranks and divides by the global count, like the loss.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Protocol

import torch

from llmtrain.config import JobConfig
from llmtrain.data.atomic import atomic_dir
from llmtrain.engine import Layout
from llmtrain.errors import UserError
from llmtrain.evaluate import count_labels, lm_loss
from llmtrain.model.hf import check_model_files, iter_model_tensors, load_hf_config
from llmtrain.model.model_config import ModelConfig
from llmtrain.worker import WorkerContext

Tensors = Callable[[], Iterator[tuple[str, torch.Tensor]]]  # a fresh iterator over (name, tensor) each call
MicroBatch = dict[str, torch.Tensor]


class Batches(Protocol):
    """What the loop draws from: one optimizer step's micro-batches at a time, resumable."""

    def next_step(self) -> list[MicroBatch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Plan:
    """What the driver step found: the model the workers will build (for the resume check)."""

    model_config: ModelConfig


@dataclass
class TaskData:
    """What a worker trains on."""

    model_config: ModelConfig
    train: Batches
    seq_len: int
    tokenizer_dir: Path
    weights: Optional[Tensors] = None  # the base's weights; None: the preset's random init


class Task(ABC):
    """One task of the loop. An instance lives in one process; `build` keeps what the other
    worker-side methods need on `self`."""

    name: ClassVar[str]

    @abstractmethod
    def prepare(self, cfg: JobConfig, layout: Layout) -> Plan:
        """Driver side, before workers start (rank 0 under torchrun): check the inputs, build
        caches, export a base once. Raise UserError for anything the user must fix."""

    @abstractmethod
    def build(self, cfg: JobConfig, layout: Layout, ctx: WorkerContext) -> TaskData:
        """Worker side: the model shape, base weights and training batches."""

    def check_resume(self, cfg: JobConfig, layout: Layout, path: Path, meta: dict) -> None:
        """Driver side, after `prepare`, when the run continues from checkpoint `path` (its `meta`):
        refuse one this run cannot continue, e.g. a data position from other data. Default: the
        training batches (rank 0's view) take the checkpoint's position."""
        try:
            self.driver_batches(cfg, layout).load_state_dict(meta["loader"])
        except UserError as err:
            raise UserError(f"{cfg.run.dir} holds checkpoint {path.name} of another run: {err}") from None

    def driver_batches(self, cfg: JobConfig, layout: Layout) -> Batches:
        """The training batches as rank 0 would draw them, built on the driver after `prepare`."""
        raise NotImplementedError

    def validation(self) -> Optional[Batches]:
        return None

    def select_trainable(self, model: torch.nn.Module) -> None:
        """Which parameters train (default: all)."""

    def count(self, micro_batch: MicroBatch) -> int:
        return count_labels(micro_batch)

    def loss(self, model, micro_batch: MicroBatch, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return lm_loss(model, micro_batch, device)

    def setup(self, engine, ctx: WorkerContext, frozen_copy: Callable[..., torch.nn.Module]) -> None:
        """After the engine exists, before a resumed run loads its checkpoint. `frozen_copy(weights=None)`
        builds a frozen copy of the model (the base's weights, or `weights()`), handled by the run's
        ZeRO stage: for tasks that need a reference model."""

    def start(self, engine, ctx: WorkerContext, run_dir: Path) -> None:
        """Before the first step of a fresh run (e.g. metrics of the base)."""

    def finish(self, engine, ctx: WorkerContext, run_dir: Path, step: int) -> None:
        """After the run's last step, `step` (every rank calls it; `train.stop_at_step` may end a
        run before `train.max_steps`)."""

    def save_run_files(self, run_dir: Path, tokenizer_dir: Path) -> None:
        """Keep the tokenizer beside the run, so exports carry it (rank 0)."""
        target = Path(run_dir) / "tokenizer"
        if target.exists() or not tokenizer_dir.is_dir():
            return
        with atomic_dir(target) as tmp:
            shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True)


def model_source(
    cfg: JobConfig, vocab_size: int, seq_len: int, base: Optional[Path] = None
) -> tuple[ModelConfig, Optional[Tensors]]:
    """(ModelConfig, base weights) from a Hugging Face directory (`base`, default `model.from`)
    or from `model.preset` (random init). Refuses a model that cannot hold the tokenizer's ids
    or the data's rows."""
    base = base if base is not None else (Path(cfg.model.from_) if cfg.model.from_ else None)
    weights: Optional[Tensors] = None
    if base is not None:
        model_config = load_hf_config(base)
        if model_config.vocab_size < vocab_size:
            raise UserError(
                f"the tokenizer has {vocab_size} tokens but model {base} only {model_config.vocab_size}; "
                "use the tokenizer that came with the model"
            )

        check_model_files(base, model_config)  # headers and sizes: a truncated download fails here, in a second

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            return iter_model_tensors(base, model_config)

    else:
        if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab_size:
            raise UserError(
                f"model.vocab_size={cfg.model.vocab_size} but the tokenizer has {vocab_size} tokens; "
                "remove model.vocab_size (it defaults to the tokenizer's) or prepare the data with a matching tokenizer"
            )
        overrides: dict = {"vocab_size": vocab_size}
        if cfg.model.max_seq_len is not None:
            overrides["max_position_embeddings"] = cfg.model.max_seq_len
        model_config = ModelConfig.from_preset(cfg.model.preset, **overrides)
    if seq_len > model_config.max_position_embeddings:
        raise UserError(
            f"data seq_len {seq_len} is longer than the model's {model_config.max_position_embeddings} positions; "
            f"use a sequence length <= {model_config.max_position_embeddings} or set model.max_seq_len"
        )
    return model_config, weights
