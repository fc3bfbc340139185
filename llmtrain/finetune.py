"""The `sft` task: supervised fine-tuning, full or LoRA, on the one training loop.

    llmtrain sft configs/tiny-sft.yaml model.from=runs/tiny-pretrain data.path=chat.jsonl run.dir=runs/sft
    llmtrain sft configs/tiny-lora.yaml model.from=../shared/checkpoints/stories260K run.dir=runs/lora

What fine-tuning adds to the runtime, through `TaskData` (llmtrain/tasks.py):
- the base (`model.from`): a Hugging Face directory is used as is; one of our runs or
  checkpoints is exported once, on the driver, to RUN_DIR/base/ (llmtrain/export.py, LoRA runs
  merged) and loaded from there by every worker;
- the data: the tokenized cache (llmtrain/data/sft.py), built on the driver before Ray starts
  (or by rank 0 under torchrun) and named in RUN_DIR/sft-data.json; every rank memory-maps it;
- which parameters train (`prepare_model`): LoRA adapters only (llmtrain/model/lora.py), or all
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
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from llmtrain.config import JobConfig
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")

POINTER = "sft-data.json"
REPORT = "finetune_report.json"
BEFORE = "finetune_before.json"
BASE_MARKER = "llmtrain_base.json"


# ---------------------------------------------------------------------------------------------
# Driver side: base model, tokenized data


def prepare_inputs(cfg: JobConfig) -> dict[str, Any]:
    """Export the base if needed, build the data cache, write RUN_DIR/sft-data.json."""
    from llmtrain.data.chat import resolve_template
    from llmtrain.data.sft import build_cache, read_meta
    from llmtrain.data.tokenizer import load_tokenizer

    run_dir = Path(cfg.run.dir)
    base, source_meta = resolve_base(cfg, run_dir)
    tok_dir = cfg.data.tokenizer or base
    if tok_dir is None:
        raise UserError("sft needs a base: set model.from=MODEL (a Hugging Face dir, one of our runs or checkpoints), "
                        "or data.tokenizer=DIR to train model.preset from scratch")
    tokenizer = load_tokenizer(tok_dir)
    model_config = _model_config(cfg, base, tokenizer.vocab_size)
    seq_len = cfg.data.seq_len or min(model_config.max_position_embeddings, 2048)
    if seq_len > model_config.max_position_embeddings:
        raise UserError(f"data.seq_len={seq_len} is longer than the model's {model_config.max_position_embeddings} positions; "
                        f"set data.seq_len <= {model_config.max_position_embeddings}")
    check_plan(cfg, model_config)
    template = resolve_template(cfg.data.chat_template, tokenizer, _eos_list(model_config.eos_token_id) + _generation_eos(base))
    cache = build_cache(cfg.data, tokenizer, template, seq_len, cfg.run.seed, cfg.data.cache_dir or run_dir / "sft-cache")
    base_val, note = _base_validation(cfg, source_meta, tokenizer)
    _advise(cfg, base, source_meta)
    info = {"base": None if base is None else str(base), "cache": str(cache), "seq_len": seq_len,
            "base_val": None if base_val is None else str(base_val), "base_val_note": note,
            "stop_ids": read_meta(cache)["stop_ids"]}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{POINTER}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, run_dir / POINTER)
    return info


def resolve_base(cfg: JobConfig, run_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """(Hugging Face dir of the base, meta of our source checkpoint if the base is one of ours)."""
    if not cfg.model.from_:
        return None, None
    source = Path(cfg.model.from_).expanduser().resolve()
    if (source / "config.json").is_file():
        from llmtrain.model.hf import load_hf_config

        load_hf_config(source)  # unsupported architectures: one line, now
        return source, None
    from llmtrain import checkpoint
    from llmtrain.export import export, pick_checkpoint

    if not source.is_dir() or not ((source / checkpoint.META).is_file() or (source / checkpoint.CHECKPOINTS).is_dir()):
        raise UserError(f"model.from={source}: not a Hugging Face model directory (config.json), one of our run directories "
                        "or a checkpoint directory")
    ckpt = pick_checkpoint(source)
    meta = checkpoint.read_meta(ckpt)
    target = run_dir / "base"
    marker = {"source": str(ckpt.resolve()), "step": meta["step"]}
    if (target / BASE_MARKER).is_file() and json.loads((target / BASE_MARKER).read_text()) == marker:
        return target, meta
    shutil.rmtree(target, ignore_errors=True)
    lora_run = meta.get("task") == "sft" and (meta.get("config") or {}).get("lora")
    print(f"llmtrain: exporting the base {ckpt} to {target}" + (" (LoRA merged)" if lora_run else ""), file=sys.stderr)
    export(ckpt, target, merge=bool(lora_run))
    (target / BASE_MARKER).write_text(json.dumps(marker) + "\n")
    return target, meta


def _model_config(cfg: JobConfig, base: Optional[Path], vocab_size: int):
    from llmtrain.model.config import ModelConfig
    from llmtrain.model.hf import load_hf_config

    if base is not None:
        config = load_hf_config(base)
        if config.vocab_size < vocab_size:
            raise UserError(f"the tokenizer has {vocab_size} tokens but model {base} only {config.vocab_size}; "
                            "use the tokenizer that came with the model (drop data.tokenizer)")
        return config
    overrides: dict[str, Any] = {"vocab_size": vocab_size}
    if cfg.model.max_seq_len is not None:
        overrides["max_position_embeddings"] = cfg.model.max_seq_len
    return ModelConfig.from_preset(cfg.model.preset, **overrides)


def _eos_list(eos) -> list[int]:
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _generation_eos(base: Optional[Path]) -> list[int]:
    path = None if base is None else base / "generation_config.json"
    if path is None or not path.is_file():
        return []
    try:
        return _eos_list(json.loads(path.read_text()).get("eos_token_id"))
    except json.JSONDecodeError:
        return []


def _base_validation(cfg: JobConfig, source_meta: Optional[dict], tokenizer) -> tuple[Optional[Path], Optional[str]]:
    """The prepared pretraining data whose validation loss measures forgetting (or why none)."""
    from llmtrain.data.shards import open_prepared

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
            raise UserError(f"finetune.base_val_path={path} was tokenized with another tokenizer than the fine-tuning one; "
                            "give data prepared with the base model's tokenizer")
        return None, f"{path} was tokenized with another tokenizer"
    return path, None


def _advise(cfg: JobConfig, base: Optional[Path], source_meta: Optional[dict]) -> None:
    """Full fine-tuning of a pretrained model: lower LR than pretraining, with warmup."""
    if cfg.lora is not None or base is None:
        return
    pre_lr = ((source_meta or {}).get("config") or {}).get("train", {}).get("lr")
    if pre_lr is not None and cfg.train.lr > 0.5 * pre_lr:
        print(f"llmtrain: note: full fine-tuning at train.lr={cfg.train.lr:g}, close to the base's pretraining lr {pre_lr:g}; "
              "fine-tuning keeps more of the base at 3-10x lower (e.g. train.lr="
              f"{pre_lr / 5:.1e}) with warmup", file=sys.stderr)
    if cfg.train.warmup_steps == 0:
        print("llmtrain: note: full fine-tuning without warmup; a few percent of the steps (train.warmup_steps) "
              "avoid a large first update to the pretrained weights", file=sys.stderr)


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
            raise UserError(f"finetune.freeze_layers={spec}: the model has {num_layers} blocks (0-{num_layers - 1}); "
                            "give indices in that range, low-high")
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
        from llmtrain.model.lora import apply_lora

        lora_cfg = apply_lora(model, cfg.lora, model_config.tie_word_embeddings, seed)
    ft = cfg.finetune
    n = model_config.num_hidden_layers
    frozen_layers = parse_layers(ft.freeze_layers, n)
    named = list(model.named_parameters())
    for pattern in ft.freeze:
        hits = [p for name, p in named if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            shown = ", ".join(name for name, _ in named[:3])
            raise UserError(f"finetune.freeze: {pattern!r} matches no parameter (names look like {shown}, ...); "
                            "use an fnmatch pattern over parameter names, e.g. 'model.embed_tokens.*'")
        for p in hits:
            p.requires_grad_(False)
    for name, p in named:
        if layer_of(name) in frozen_layers:
            p.requires_grad_(False)
        if ft.layer_lr_decay < 1:
            depth = 0 if "embed_tokens" in name else (layer_of(name) + 1 if layer_of(name) is not None else n + 1)
            p.lr_scale = ft.layer_lr_decay ** (n + 1 - depth)
    if not any(p.requires_grad for _, p in named):
        raise UserError("every parameter is frozen (finetune.freeze / freeze_layers); leave something to train")
    return lora_cfg


def check_plan(cfg: JobConfig, model_config) -> None:
    """Run `select_trainable` on a meta-device model: pattern mistakes surface on the driver."""
    from llmtrain.model.decoder import Decoder

    with torch.device("meta"):
        select_trainable(Decoder(model_config), cfg, model_config)


# ---------------------------------------------------------------------------------------------
# The task


def sft_task(cfg: JobConfig, layout, ctx):
    from llmtrain.data.sft import SFTSplit, read_meta
    from llmtrain.data.sft_pack import SFTBatches
    from llmtrain.tasks import TaskData, model_source

    run_dir = Path(cfg.run.dir)
    if ctx.rank == 0 and not getattr(ctx, "in_ray", False):  # the driver, or rank 0 under torchrun
        info = prepare_inputs(cfg)
    if hasattr(ctx, "barrier"):
        ctx.barrier()
    if ctx.rank != 0 or getattr(ctx, "in_ray", False):
        pointer = run_dir / POINTER
        if not pointer.is_file():
            raise UserError(f"{pointer} is missing: the SFT data is prepared by `llmtrain sft` before workers start; "
                            "launch through it (or torchrun, where rank 0 prepares it)")
        info = json.loads(pointer.read_text())
    cache = Path(info["cache"])
    meta = read_meta(cache)
    seq_len = info["seq_len"]
    base_cfg = cfg.model_copy(deep=True)
    base_cfg.model.from_ = info["base"]
    tokenizer_dir = cache / "tokenizer"
    from llmtrain.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_dir).vocab_size
    model_config, init_weights = model_source(base_cfg, vocab, seq_len, ctx.rank)
    stops = sorted(set(_eos_list(model_config.eos_token_id)) | set(info["stop_ids"]))
    model_config.eos_token_id = stops[0] if len(stops) == 1 else stops  # exports stop at the end-of-turn token

    def batches(split, grad_accum: int, shuffle: bool, wrap: bool):
        return SFTBatches(split, seq_len, meta["pad_id"], layout.micro_batch_size, grad_accum, ctx.rank, ctx.world_size,
                          cfg.run.seed, shuffle=shuffle, wrap=wrap)

    train = batches(SFTSplit.open(cache, "train"), layout.grad_accum, True, True)
    val_split = SFTSplit.open(cache, "val")

    def make_val():
        if val_split is None or val_split.num_rows == 0:
            return None
        per_pass = layout.micro_batch_size * ctx.world_size
        return batches(val_split, min(math.ceil(val_split.num_rows / per_pass), cfg.train.val_batches * layout.grad_accum),
                       False, False)

    state: dict[str, Any] = {}

    def prepare_model(model) -> None:
        from llmtrain.model.lora import param_counts

        state["lora"] = select_trainable(model, cfg, model_config, seed=cfg.run.seed)
        state["params"] = dict(zip(("trainable", "total"), param_counts(model)))

    def measure(engine, ctx) -> dict[str, Optional[float]]:
        from llmtrain.data.sft import Choices
        from llmtrain.evaluate import choice_accuracy, prepared_val_loss

        engine.module.train(False)
        acc = choice_accuracy(lambda ids: engine(ids), Choices.open(cache), cfg.finetune.eval_examples, ctx.rank,
                              ctx.world_size, layout.micro_batch_size, meta["pad_id"], ctx.device, ctx.all_reduce_sum)
        engine.module.train(True)
        base_val = None
        if info["base_val"] is not None:
            base_val = prepared_val_loss(engine, Path(info["base_val"]), layout.micro_batch_size,
                                         cfg.train.val_batches * layout.grad_accum, ctx, cfg.run.seed)
        return {"accuracy": acc, "base_val_loss": base_val}

    def start(engine, ctx, run_dir: Path) -> None:
        before = measure(engine, ctx)
        if ctx.is_main:
            _write_json(Path(run_dir) / BEFORE, before)

    def finish(engine, ctx, run_dir: Path) -> None:
        if train.state_dict()["sample"] < cfg.train.max_steps * layout.global_batch_size:
            return  # stopped early (train.stop_at_step): the run continues later
        run_dir = Path(run_dir)
        if state.get("lora") is not None:
            _save_adapter(engine, ctx, cfg, run_dir, state["lora"], model_config, info["base"])
        after = measure(engine, ctx)
        if ctx.is_main:
            report = _report(run_dir, cfg, meta, info, state, after)
            _write_json(run_dir / REPORT, report)
        ctx.barrier()

    return TaskData(
        name="sft",
        model_config=model_config,
        train=train,
        seq_len=seq_len,
        tokenizer_dir=tokenizer_dir,
        make_val=make_val,
        init_weights=init_weights,
        prepare_model=prepare_model,
        start=start,
        finish=finish,
    )


def _save_adapter(engine, ctx, cfg: JobConfig, run_dir: Path, lora_cfg, model_config, base: Optional[str]) -> None:
    from llmtrain.model.lora import adapter_state, expected_shapes, write_adapter

    tensors = adapter_state(engine.module, cfg.zero.stage, ctx.rank)
    if ctx.is_main:
        write_adapter(tensors, lora_cfg, run_dir / "adapter", base, tokenizer_dir=run_dir / "tokenizer",
                      expected=expected_shapes(model_config, lora_cfg))
        log.info("LoRA adapter (PEFT format): %s", run_dir / "adapter")


def _report(run_dir: Path, cfg: JobConfig, meta: dict, info: dict, state: dict, after: dict) -> dict:
    from llmtrain.metrics import read_metrics

    before = json.loads((run_dir / BEFORE).read_text()) if (run_dir / BEFORE).is_file() else {}
    val = [e for e in read_metrics(run_dir) if "val_loss" in e]
    before["val_loss"] = next((e["val_loss"] for e in val if e["step"] == 0), None)
    after["val_loss"] = next((e["val_loss"] for e in reversed(val) if e["step"] == cfg.train.max_steps), None)
    report = {
        "report": str(run_dir / REPORT),
        "base": info["base"],
        "data": str(cfg.data.path),
        "format": meta["format"],
        "template": meta["template"],
        "steps": cfg.train.max_steps,
        "lora": cfg.lora is not None,
        "params": state["params"],
        "before": before,
        "after": after,
    }
    if info.get("base_val_note"):
        report["base_val_note"] = info["base_val_note"]
    if "base_val_loss" in before and before.get("base_val_loss") is not None and after.get("base_val_loss") is not None:
        report["forgetting"] = after["base_val_loss"] - before["base_val_loss"]
    return report


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def print_report(run_dir: str | Path) -> Optional[dict]:
    """Print RUN_DIR/finetune_report.json as a table (the driver, after the run)."""
    from llmtrain.evaluate import format_report

    path = Path(run_dir) / REPORT
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    print(format_report(report))
    if report.get("lora"):
        print(f"adapter:     {Path(run_dir) / 'adapter'} (PEFT format)")
    return report
