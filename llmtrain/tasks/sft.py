"""The `sft` task: supervised fine-tuning, full or LoRA, on the one training loop.

    llmtrain sft configs/tiny-sft.yaml model.from=runs/tiny-pretrain data.path=chat.jsonl run.dir=runs/sft
    llmtrain sft configs/tiny-lora.yaml model.from=../shared/checkpoints/stories260K run.dir=runs/lora

What fine-tuning adds to the one loop, through the Task interface (llmtrain/tasks/base.py):
- the base (`model.from`): a Hugging Face directory is used as is; one of our runs or
  checkpoints is exported once, on the driver, to RUN_DIR/base/ (llmtrain/export.py, LoRA runs
  merged) and loaded from there by every worker;
- the data: the tokenized cache (llmtrain/data/sft.py), built on the driver before Ray starts
  (or by rank 0 under torchrun) and named in RUN_DIR/sft-data.json; every rank memory-maps it;
- which parameters train (`select_trainable`): LoRA adapters only (llmtrain/model/lora.py; with
  `lora.quantize`, QLoRA, on a base held in 4 bits: llmtrain/model/quantize.py), or all
  but the frozen ones (`finetune.freeze` patterns, `finetune.freeze_layers`), optionally with
  layer-wise LR decay (each parameter's `lr_scale`, grouped by llmtrain/engine.py);
- measurements before the first step and after the last: the task's accuracy (labelled data),
  the base's pretraining validation loss (catastrophic forgetting, measured); with the task's
  validation loss from metrics.jsonl they form RUN_DIR/finetune_report.json. LoRA runs also
  leave RUN_DIR/adapter/ in PEFT's format (gathered under ZeRO-3).

Full fine-tuning advice (the seeds'): a learning rate several times below pretraining's, with
warmup; the driver warns when the configured one is not.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from llmtrain.config import JobConfig
from llmtrain.data.atomic import atomic_write_json
from llmtrain.data.chat import resolve_template
from llmtrain.data.sft import Choices, SFTSplit, build_cache, read_meta
from llmtrain.data.sft_batches import SFTBatches
from llmtrain.data.shards import open_prepared
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.engine import Layout, param_counts, resolve_precision, trainable_state
from llmtrain.errors import UserError
from llmtrain.evaluate import choice_scores, format_report, prepared_val_loss
from llmtrain.export import DTYPES
from llmtrain.metrics import read_metrics
from llmtrain.model.decoder import Decoder
from llmtrain.model.lora import apply_lora, expected_shapes, peft_adapter_state, resolve_targets, write_adapter
from llmtrain.model.quantize import check_bitsandbytes, quantize_base, quantized_bytes
from llmtrain.tasks.base import Plan, Task, TaskData, model_source
from llmtrain.tasks.base_model import resolve_base
from llmtrain.worker import WorkerContext

log = logging.getLogger("llmtrain")

POINTER = "sft-data.json"
REPORT = "finetune_report.json"
BEFORE = "finetune_before.json"


# ---------------------------------------------------------------------------------------------
# The task


class SFTTask(Task):
    name = "sft"
    split_class, batches_class = SFTSplit, SFTBatches  # the tokenized cache's reader and its batches

    # Driver side: base model, tokenized data -> RUN_DIR/sft-data.json

    def prepare(self, cfg: JobConfig, layout: Layout) -> Plan:
        """Export the base if needed, build the data cache, write RUN_DIR/sft-data.json."""
        run_dir = Path(cfg.run.dir)
        base, source_meta = resolve_base(cfg, run_dir)
        tok_dir = cfg.data.tokenizer or base
        if tok_dir is None:
            raise UserError(
                "sft needs a base: set model.from=MODEL (a Hugging Face dir, one of our runs or checkpoints), "
                "or data.tokenizer=DIR to train model.preset from scratch"
            )
        tokenizer = load_tokenizer(tok_dir)
        model_config, _ = model_source(cfg, tokenizer.vocab_size, 0, base)
        seq_len = cfg.data.seq_len or min(model_config.max_position_embeddings, 2048)
        if seq_len > model_config.max_position_embeddings:
            raise UserError(
                f"data.seq_len={seq_len} is longer than the model's {model_config.max_position_embeddings} positions; "
                f"set data.seq_len <= {model_config.max_position_embeddings}"
            )
        check_plan(cfg, model_config)
        template = resolve_template(
            cfg.data.chat_template, tokenizer, eos_list(model_config.eos_token_id) + _generation_eos(base)
        )
        cache = self.build_cache(cfg, tokenizer, template, seq_len, run_dir)
        base_val, note = _base_validation(cfg, source_meta, tokenizer)
        _advise(cfg, base, source_meta)
        info = {
            "base": None if base is None else str(base),
            "cache": str(cache),
            "seq_len": seq_len,
            "base_val": None if base_val is None else str(base_val),
            "base_val_note": note,
            "stop_ids": self.read_cache_meta(cache)["stop_ids"],
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / POINTER, info)
        self._driver_info = info
        return Plan(self._model(cfg, info))

    def build_cache(self, cfg: JobConfig, tokenizer, template, seq_len: int, run_dir: Path) -> Path:
        if cfg.data.format == "preference":
            raise UserError(
                "data.format=preference is preference data: train it with `llmtrain dpo`, or give sft "
                "chat, pairs or labelled records"
            )
        return build_cache(cfg.data, tokenizer, template, seq_len, cfg.run.seed, cfg.data.cache_dir or run_dir / "sft-cache")

    def read_cache_meta(self, cache: Path) -> dict:
        return read_meta(cache)

    def _model(self, cfg: JobConfig, info: dict):
        """The model every worker builds: the base (or preset) with the template's stop ids as EOS."""
        vocab = load_tokenizer(Path(info["cache"]) / "tokenizer").vocab_size
        base = Path(info["base"]) if info["base"] else None
        model_config, self._weights = model_source(cfg, vocab, info["seq_len"], base)
        stops = sorted(set(eos_list(model_config.eos_token_id)) | set(info["stop_ids"]))
        model_config.eos_token_id = stops[0] if len(stops) == 1 else stops  # exports stop at the end-of-turn token
        return model_config

    # Worker side

    def build(self, cfg: JobConfig, layout: Layout, ctx: WorkerContext) -> TaskData:
        self.cfg, self.layout, self.ctx = cfg, layout, ctx
        pointer = Path(cfg.run.dir) / POINTER
        if not pointer.is_file():
            raise UserError(
                f"{pointer} is missing: the {self.name} data is prepared by `llmtrain {self.name}` before workers "
                "start; launch through it (or torchrun, where rank 0 prepares it)"
            )
        self.info = json.loads(pointer.read_text())
        self.cache = Path(self.info["cache"])
        self.meta = self.read_cache_meta(self.cache)
        self.model_config = self._model(cfg, self.info)
        train = self.batches(self.open_split("train"), layout.grad_accum, shuffle=True, wrap=True)
        self._val_split = self.open_split("val")
        return TaskData(self.model_config, train, self.info["seq_len"], self.cache / "tokenizer", self._weights)

    def driver_batches(self, cfg: JobConfig, layout: Layout):
        info = self._driver_info  # what prepare wrote to RUN_DIR/sft-data.json
        meta = self.read_cache_meta(Path(info["cache"]))
        split = self.split_class.open(Path(info["cache"]), "train")
        return self.batches_class(
            split, info["seq_len"], meta["pad_id"], layout.micro_batch_size, layout.grad_accum, 0, layout.world_size, cfg.run.seed
        )

    def open_split(self, name: str):
        return self.split_class.open(self.cache, name)

    def batches(self, split, grad_accum: int, shuffle: bool, wrap: bool):
        layout, ctx = self.layout, self.ctx
        return self.batches_class(
            split,
            self.info["seq_len"],
            self.meta["pad_id"],
            layout.micro_batch_size,
            grad_accum,
            ctx.rank,
            ctx.world_size,
            self.cfg.run.seed,
            shuffle=shuffle,
            wrap=wrap,
        )

    def validation(self):
        split = self._val_split
        if split is None or split.num_rows == 0:
            return None
        per_pass = self.layout.micro_batch_size * self.ctx.world_size
        passes = min(math.ceil(split.num_rows / per_pass), self.cfg.train.val_batches * self.layout.grad_accum)
        return self.batches(split, passes, shuffle=False, wrap=False)

    def select_trainable(self, model: torch.nn.Module) -> None:
        lora = self.cfg.lora
        if lora is not None and lora.quantize is not None:
            compute = DTYPES[resolve_precision(self.cfg, self.ctx.on_gpu)]
            layers = quantize_base(model, lora.quantize, lora.double_quant, compute, self.ctx.device)
            if self.cfg.model.activation_checkpointing is None:
                model.gradient_checkpointing = True  # as peft's prepare_model_for_kbit_training
            held, params = quantized_bytes(model)
            if self.ctx.is_main:
                log.info(
                    "QLoRA: %d Linear layers in %s (%s), %.1f MB for %.1fM parameters (%.3f bytes each)",
                    layers,
                    lora.quantize,
                    "double quantisation" if lora.double_quant else "fp32 scales",
                    held / 2**20,
                    params / 1e6,
                    held / params,
                )
        self.lora = select_trainable(model, self.cfg, self.model_config, seed=self.cfg.run.seed)
        self.params = dict(zip(("trainable", "total"), param_counts(model)))

    def measure(self, engine, ctx: WorkerContext) -> dict[str, Optional[float]]:
        """Task accuracy (labelled data) and the base's pretraining validation loss (forgetting)."""
        layout = self.layout
        engine.module.train(False)
        scores = choice_scores(
            lambda ids: engine(ids),
            Choices.open(self.cache),
            self.cfg.finetune.eval_examples,
            ctx.rank,
            ctx.world_size,
            layout.micro_batch_size,
            self.meta["pad_id"],
            ctx.device,
            ctx.all_reduce_sum,
        )
        engine.module.train(True)
        base_val = None
        if self.info["base_val"] is not None:
            base_val = prepared_val_loss(
                engine,
                Path(self.info["base_val"]),
                layout.micro_batch_size,
                self.cfg.train.val_batches * layout.grad_accum,
                ctx,
                self.cfg.run.seed,
            )
        return {**(scores or {"accuracy": None}), "base_val_loss": base_val}

    def start(self, engine, ctx: WorkerContext, run_dir: Path) -> None:
        before = self.measure(engine, ctx)
        if ctx.is_main:
            atomic_write_json(Path(run_dir) / BEFORE, before)

    def finish(self, engine, ctx: WorkerContext, run_dir: Path, step: int) -> None:
        if step < self.cfg.train.max_steps:
            return  # stopped early (train.stop_at_step): the run continues later
        run_dir = Path(run_dir)
        if self.lora is not None:
            tensors = trainable_state(engine, ctx.rank)
            if ctx.is_main:
                write_adapter(
                    peft_adapter_state(engine.module, tensors),
                    self.lora,
                    run_dir / "adapter",
                    self.info["base"],
                    tokenizer_dir=run_dir / "tokenizer",
                    expected=expected_shapes(self.model_config, self.lora),
                )
                log.info("LoRA adapter (PEFT format): %s", run_dir / "adapter")
        after = self.measure(engine, ctx)
        if ctx.is_main:
            atomic_write_json(run_dir / REPORT, self.report(run_dir, after))
        ctx.barrier()

    def report(self, run_dir: Path, after: dict) -> dict:
        cfg = self.cfg
        before = json.loads((run_dir / BEFORE).read_text()) if (run_dir / BEFORE).is_file() else {}
        val = [e for e in read_metrics(run_dir) if "val_loss" in e]
        before["val_loss"] = next((e["val_loss"] for e in val if e["step"] == 0), None)
        after["val_loss"] = next((e["val_loss"] for e in reversed(val) if e["step"] == cfg.train.max_steps), None)
        report = {
            "report": str(run_dir / REPORT),
            "task": self.name,
            "base": self.info["base"],
            "data": str(cfg.data.path),
            "format": self.meta["format"],
            "template": self.meta["template"],
            "steps": cfg.train.max_steps,
            "lora": cfg.lora is not None,
            "params": self.params,
            "before": before,
            "after": after,
        }
        if self.info.get("base_val_note"):
            report["base_val_note"] = self.info["base_val_note"]
        if before.get("base_val_loss") is not None and after.get("base_val_loss") is not None:
            report["forgetting"] = after["base_val_loss"] - before["base_val_loss"]
        return report


def eos_list(eos) -> list[int]:
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _generation_eos(base: Optional[Path]) -> list[int]:
    path = None if base is None else base / "generation_config.json"
    if path is None or not path.is_file():
        return []
    try:
        return eos_list(json.loads(path.read_text()).get("eos_token_id"))
    except json.JSONDecodeError:
        return []


def _base_validation(cfg: JobConfig, source_meta: Optional[dict], tokenizer) -> tuple[Optional[Path], Optional[str]]:
    """The prepared pretraining data whose validation loss measures forgetting (or why none)."""
    path = cfg.finetune.base_val_path
    if path is None and source_meta is not None:
        data = (source_meta.get("config") or {}).get("data") or {}
        path = Path(data["path"]) if data.get("path") and (Path(data["path"]) / "manifest.json").is_file() else None
    if path is None:
        return None, "no pretraining validation set known for this base (set finetune.base_val_path=PREPARED_DIR)"
    prepared = open_prepared(path)
    if not prepared.has_split("val"):
        return None, f"{path} has no validation split"
    if prepared.fingerprint != tokenizer.fingerprint:
        if cfg.finetune.base_val_path is not None:
            raise UserError(
                f"finetune.base_val_path={path} was tokenized with another tokenizer than the fine-tuning one; "
                "give data prepared with the base model's tokenizer"
            )
        return None, f"{path} was tokenized with another tokenizer"
    return path, None


def _advise(cfg: JobConfig, base: Optional[Path], source_meta: Optional[dict]) -> None:
    """Full fine-tuning of a pretrained model: lower LR than pretraining, with warmup."""
    if cfg.lora is not None or base is None:
        return
    pre_lr = ((source_meta or {}).get("config") or {}).get("train", {}).get("lr")
    if pre_lr is not None and cfg.train.lr > 0.5 * pre_lr:
        print(
            f"llmtrain: note: full fine-tuning at train.lr={cfg.train.lr:g}, close to the base's pretraining lr {pre_lr:g}; "
            "fine-tuning keeps more of the base at 3-10x lower (e.g. train.lr="
            f"{pre_lr / 5:.1e}) with warmup",
            file=sys.stderr,
        )
    if cfg.train.warmup_steps == 0:
        print(
            "llmtrain: note: full fine-tuning without warmup; a few percent of the steps (train.warmup_steps) "
            "avoid a large first update to the pretrained weights",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------
# Which parameters train


def parse_layers(spec: Optional[str], num_layers: int) -> set[int]:
    if spec is None:
        return set()
    layers: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        if lo > hi or hi >= num_layers:
            raise UserError(
                f"finetune.freeze_layers={spec}: the model has {num_layers} blocks (0-{num_layers - 1}); "
                "give indices in that range, low-high"
            )
        layers.update(range(lo, hi + 1))
    return layers


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> Optional[int]:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def select_trainable(model: torch.nn.Module, cfg: JobConfig, model_config, seed: int = 0):
    """LoRA (if configured), freezing and layer-wise LR decay, in place. Returns the LoraConfig or None."""
    lora_cfg = None
    if cfg.lora is not None:
        lora_cfg = apply_lora(model, cfg.lora, model_config.tie_word_embeddings, seed)
        if cfg.lora.loraplus_lr_ratio != 1:
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.lr_scale = cfg.lora.loraplus_lr_ratio  # its own optimizer group (engine.param_groups)
    ft = cfg.finetune
    n = model_config.num_hidden_layers
    frozen_layers = parse_layers(ft.freeze_layers, n)
    named = list(model.named_parameters())
    for pattern in ft.freeze:
        hits = [p for name, p in named if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            shown = ", ".join(name for name, _ in named[:3])
            raise UserError(
                f"finetune.freeze: {pattern!r} matches no parameter (names look like {shown}, ...); "
                "use an fnmatch pattern over parameter names, e.g. 'model.embed_tokens.*'"
            )
        for p in hits:
            p.requires_grad_(False)
    for name, p in named:
        if layer_of(name) in frozen_layers:
            p.requires_grad_(False)
        if ft.layer_lr_decay < 1:
            depth = 0 if "embed_tokens" in name else (layer_of(name) + 1 if layer_of(name) is not None else n + 1)
            p.lr_scale = getattr(p, "lr_scale", 1.0) * ft.layer_lr_decay ** (n + 1 - depth)
    if not any(p.requires_grad for _, p in named):
        raise UserError("every parameter is frozen (finetune.freeze / freeze_layers); leave something to train")
    return lora_cfg


def check_plan(cfg: JobConfig, model_config) -> None:
    """Pattern mistakes surface on the driver, on a meta-device model: LoRA's target modules
    through our own resolver (importing peft to inject them costs the driver 4-10 s, workers pay
    it anyway), freezing through `select_trainable` itself."""
    if cfg.lora is not None and cfg.lora.quantize is not None:
        check_bitsandbytes()  # installed? (a one-line error before workers start)
    with torch.device("meta"):
        model = Decoder(model_config)
    if cfg.lora is not None and not (cfg.finetune.freeze or cfg.finetune.freeze_layers):
        resolve_targets(model, cfg.lora, model_config.tie_word_embeddings)
        return
    select_trainable(model, cfg, model_config)


def print_report(run_dir: str | Path) -> Optional[dict]:
    """Print RUN_DIR/finetune_report.json as a table (the driver, after the run)."""
    path = Path(run_dir) / REPORT
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    print(format_report(report))
    if report.get("lora"):
        print(f"adapter:     {Path(run_dir) / 'adapter'} (PEFT format)")
    return report
