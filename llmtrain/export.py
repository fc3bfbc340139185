"""Export a checkpoint (any ZeRO stage) as a Hugging Face model directory.

    llmtrain export runs/tiny --output exported/tiny        # newest checkpoint
    llmtrain export runs/tiny --step 200 --output exported/tiny-200

ZeRO-1/2/3 shards are consolidated with DeepSpeed's own zero_to_fp32 in lazy mode: the fp32
flat partitions are read once and each tensor is materialised only when its safetensors shard
is written, so memory stays at the model plus one shard. Stage 0 checkpoints hold the full
module state, memory-mapped. The output (config.json, generation_config.json, safetensors
shards + index, tokenizer files) is assembled in a temporary directory and renamed.

A LoRA fine-tuning run exports its adapter in PEFT's format instead, and with `--merge` the
base with the adapter merged in (llmtrain/model/lora.py):

    llmtrain export runs/lora --output exported/adapter
    llmtrain export runs/lora --output exported/merged --merge
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch

from llmtrain import checkpoint
from llmtrain.errors import UserError


def pick_checkpoint(path: str | Path, step: Optional[int] = None) -> Path:
    """A checkpoint directory from a run directory (newest, or `step`) or a checkpoint path."""
    path = Path(path)
    if (path / checkpoint.META).is_file():
        reason = checkpoint.incomplete_reason(path)
        if reason:
            raise UserError(f"{path}: checkpoint is incomplete ({reason}); pick another step")
        return path
    if step is not None:
        chosen = checkpoint.checkpoint_root(path) / checkpoint.step_name(step)
        if not chosen.is_dir():
            raise UserError(f"{path}: no checkpoint for step {step}; see {checkpoint.checkpoint_root(path)}")
        reason = checkpoint.incomplete_reason(chosen)
        if reason:
            raise UserError(f"{chosen}: checkpoint is incomplete ({reason}); pick another step")
        return chosen
    latest = checkpoint.find_latest(path)
    if latest is None:
        raise UserError(f"{path}: no complete checkpoint found; pass a run directory that has {checkpoint.CHECKPOINTS}/step_*")
    return latest


def consolidated_tensors(ckpt: Path, zero_stage: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) for every saved model tensor, one at a time."""
    from llmtrain.safe_load import weights_only_loads

    ds_dir = ckpt / checkpoint.DS_TAG
    if zero_stage == 0:
        with weights_only_loads(ckpt):
            state = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=True)
        for name, tensor in state["module"].items():
            yield name, tensor.float()
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads(ckpt):  # zero_to_fp32 reads every file with weights_only=False
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=checkpoint.DS_TAG, lazy_mode=True)
    for name in list(lazy):
        tensor = lazy.pop(name)
        yield name, tensor.contiguous() if not isinstance(tensor, torch.Tensor) else tensor


def export(run_dir: str | Path, output: str | Path, step: Optional[int] = None, merge: bool = False) -> Path:
    """A LoRA run (sft with a `lora:` section) exports its PEFT adapter, or with `merge` the
    base with the adapter merged (llmtrain/model/lora.py); any other run its full model."""
    from llmtrain.model.config import ModelConfig
    from llmtrain.model.hf import save_hf_checkpoint

    ckpt = pick_checkpoint(run_dir, step)
    meta = checkpoint.read_meta(ckpt)
    config = ModelConfig.from_dict(meta["model_config"])
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise UserError(f"{output} exists and is not empty; choose a new --output directory")
    if meta.get("task") == "sft" and (meta.get("config") or {}).get("lora"):
        from llmtrain.model.lora import export_lora

        run = _run_dir_of(ckpt)
        pointer = run / "sft-data.json"
        base = json.loads(pointer.read_text())["base"] if pointer.is_file() else meta["config"]["model"].get("from")
        return export_lora(ckpt, meta, config, output, merge, run / "tokenizer", base)
    if merge:
        raise UserError(f"{ckpt}: --merge needs a LoRA run, and this checkpoint holds a full model; export it without --merge")
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = consolidated_tensors(ckpt, meta["zero_stage"])
    if config.tie_word_embeddings:
        tensors = ((n, t) for n, t in tensors if n != "lm_head.weight")
    save_hf_checkpoint(tensors, config, tmp)
    tokenizer = _run_dir_of(ckpt) / "tokenizer"
    if tokenizer.is_dir():
        for f in tokenizer.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    if output.exists():
        output.rmdir()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(output)
    return output


def _run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent  # RUN_DIR/checkpoints/step_N
