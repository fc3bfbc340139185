"""What differs between tasks: their data, their model source, and which parameters train.

`build_task(name, cfg, layout, ctx)` returns a `TaskData` that the one training loop
(llmtrain/train.py) consumes. Pretraining reads prepared token shards; the fine-tuning tasks
add chat/pair/label data and LoRA or freezing, through the same fields.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from llmtrain.config import JobConfig
from llmtrain.context import WorkerContext
from llmtrain.engine import Layout, load_weights
from llmtrain.errors import UserError


@dataclass
class TaskData:
    name: str
    model_config: Any  # llmtrain.model.config.ModelConfig
    train: Any  # next_step() -> list of micro-batch dicts; state_dict(); load_state_dict()
    seq_len: int
    tokenizer_dir: Path
    make_val: Callable[[], Optional[Any]] = lambda: None
    init_weights: Optional[Callable] = None  # init_weights(model): load base weights
    prepare_model: Callable = lambda model: None  # e.g. LoRA wrapping, freezing
    start: Callable = lambda engine, ctx, run_dir: None  # before the first step of a fresh run (e.g. baseline metrics)
    finish: Callable = lambda engine, ctx, run_dir: None  # e.g. a fine-tuning report
    extra: dict = field(default_factory=dict)

    @property
    def flops_per_token(self) -> float:
        return self.model_config.flops_per_token(self.seq_len)

    def save_run_files(self, run_dir: Path) -> None:
        """Keep the tokenizer beside the run, so exports carry it."""
        target = Path(run_dir) / "tokenizer"
        if target.exists() or not self.tokenizer_dir.is_dir():
            return
        tmp = Path(run_dir) / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.tokenizer_dir, tmp)
        tmp.rename(target)


def build_task(name: str, cfg: JobConfig, layout: Layout, ctx: WorkerContext) -> TaskData:
    if name == "pretrain":
        return pretrain_task(cfg, layout, ctx)
    if name == "sft":
        from llmtrain.finetune import sft_task

        return sft_task(cfg, layout, ctx)
    raise UserError(f"unknown task {name!r}; choose pretrain or sft")


def model_source(cfg: JobConfig, vocab_size: int, seq_len: int, rank: int):
    """(ModelConfig, init_weights) from `model.from` (a Hugging Face directory) or `model.preset`."""
    from llmtrain.model.config import ModelConfig

    if cfg.model.from_:
        from llmtrain.model.hf import iter_model_tensors, load_hf_config

        base = Path(cfg.model.from_)
        model_config = load_hf_config(base)
        if model_config.vocab_size < vocab_size:
            raise UserError(
                f"the tokenizer has {vocab_size} tokens but model {base} only {model_config.vocab_size}; "
                "use the tokenizer that came with the model"
            )

        def init_weights(model) -> None:
            load_weights(model, iter_model_tensors(base, model_config), zero_stage=cfg.zero.stage, rank=rank)

    else:
        if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab_size:
            raise UserError(
                f"model.vocab_size={cfg.model.vocab_size} but the tokenizer has {vocab_size} tokens; "
                "remove model.vocab_size (it defaults to the tokenizer's) or prepare the data with a matching tokenizer"
            )
        overrides = {"vocab_size": vocab_size}
        if cfg.model.max_seq_len is not None:
            overrides["max_position_embeddings"] = cfg.model.max_seq_len
        model_config = ModelConfig.from_preset(cfg.model.preset, **overrides)
        init_weights = None
    if seq_len > model_config.max_position_embeddings:
        raise UserError(
            f"data seq_len {seq_len} is longer than the model's {model_config.max_position_embeddings} positions; "
            f"prepare with --seq-len <= {model_config.max_position_embeddings} or set model.max_seq_len"
        )
    return model_config, init_weights


def pretrain_task(cfg: JobConfig, layout: Layout, ctx: WorkerContext) -> TaskData:
    from llmtrain.data.loader import TokenLoader

    if cfg.data.mixture:
        sources: Any = [(str(m.path), m.weight) for m in cfg.data.mixture]
    elif cfg.data.path is not None:
        sources = str(cfg.data.path)
    else:
        raise UserError("no training data: set data.path=PREPARED_DIR (from `llmtrain prepare`) or data.mixture")

    def loader(split: str, shuffle: bool, grad_accum: int):
        return TokenLoader(
            sources,
            split=split,
            micro_batch_size=layout.micro_batch_size,
            grad_accum=grad_accum,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=cfg.run.seed,
            shuffle=shuffle,
        )

    train = loader("train", True, layout.grad_accum)
    model_config, init_weights = model_source(cfg, train.vocab_size, train.seq_len, ctx.rank)

    def make_val():
        if not train.has_split("val"):
            return None
        # val_batches global batches, split over ranks like training: the same rows at any world size
        return loader("val", False, cfg.train.val_batches * layout.grad_accum)

    return TaskData(
        name="pretrain",
        model_config=model_config,
        train=train,
        seq_len=train.seq_len,
        tokenizer_dir=Path(train.tokenizer_dir),
        make_val=make_val,
        init_weights=init_weights,
    )
