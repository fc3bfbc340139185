"""The model a job starts from (`model.from`): a Hugging Face directory, or one of our runs or
checkpoints, exported once on the driver to RUN_DIR/base/ (LoRA runs merged) and reused while
its source checkpoint is the same. Every task (pretrain, sft, dpo) resolves its base here."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from llmtrain import checkpoint
from llmtrain.config import JobConfig
from llmtrain.data.atomic import atomic_write_json
from llmtrain.errors import UserError
from llmtrain.export import export, pick_checkpoint
from llmtrain.model.hf import load_hf_config

BASE_MARKER = "llmtrain_base.json"


def resolve_base(cfg: JobConfig, run_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """(Hugging Face dir of the base, meta of our source checkpoint if the base is one of ours)."""
    if not cfg.model.from_:
        return None, None
    source = Path(cfg.model.from_).expanduser().resolve()
    base = export_base(source, run_dir / "base", "model.from")
    return base, (None if base == source else checkpoint.read_meta(pick_checkpoint(source)))


def base_dir(cfg: JobConfig) -> Optional[Path]:
    """Where a worker finds the base `resolve_base` made on the driver (exports nothing)."""
    if not cfg.model.from_:
        return None
    source = Path(cfg.model.from_).expanduser().resolve()
    return source if (source / "config.json").is_file() else Path(cfg.run.dir).resolve() / "base"


def export_base(source: Path, target: Path, key: str) -> Path:
    """A Hugging Face directory for `source`: itself, or (one of our runs or checkpoints) its
    checkpoint exported once to `target` (LoRA runs merged), reused while the source is the same."""
    if (source / "config.json").is_file():
        load_hf_config(source)  # unsupported architectures: one line, now
        return source
    if not source.is_dir() or not ((source / checkpoint.META).is_file() or (source / checkpoint.CHECKPOINTS).is_dir()):
        raise UserError(
            f"{key}={source}: not a Hugging Face model directory (config.json), one of our run directories "
            "or a checkpoint directory"
        )
    ckpt = pick_checkpoint(source)
    meta = checkpoint.read_meta(ckpt)
    marker = {"source": str(ckpt.resolve()), "step": meta["step"]}
    if (target / BASE_MARKER).is_file() and json.loads((target / BASE_MARKER).read_text()) == marker:
        return target
    shutil.rmtree(target, ignore_errors=True)
    lora_run = (meta.get("config") or {}).get("lora")
    print(f"llmtrain: exporting {key} {ckpt} to {target}" + (" (LoRA merged)" if lora_run else ""), file=sys.stderr)
    export(ckpt, target, merge=bool(lora_run), dtype="fp32")  # the next stage starts from the trained weights, not a rounding
    atomic_write_json(target / BASE_MARKER, marker)
    return target
