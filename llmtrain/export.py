"""Export a checkpoint (any ZeRO stage) as a Hugging Face model directory.

    llmtrain export runs/tiny --output exported/tiny        # newest checkpoint
    llmtrain export runs/tiny --step 200 --output exported/tiny-200

ZeRO-1/2/3 shards are consolidated with DeepSpeed's own zero_to_fp32 in lazy mode: the fp32
flat partitions are read once and each tensor is materialised only when its safetensors shard
is written, so memory stays at the model plus one shard. Stage 0 checkpoints hold the full
module state, memory-mapped. The output (config.json, generation_config.json, safetensors
shards + index, tokenizer files) is assembled in a temporary directory and renamed.

A LoRA fine-tuning run exports its adapter in PEFT's format instead, and with `--merge` the
base with the adapter merged in (`export_lora`, through llmtrain/model/lora.py; a QLoRA run
merges into its base dequantized from 4 bits, `qlora_merged`):

    llmtrain export runs/lora --output exported/adapter
    llmtrain export runs/lora --output exported/merged --merge

The weights are written in the base's dtype (`export_dtype`: a bf16 base fine-tuned by
`llmtrain sft model.from=BASE` exports bf16; runs without a base, fp32, the master weights
the checkpoint holds), or `--dtype bf16|fp16|fp32`. Checkpoints hold fp32 weights: a merge
happens in fp32 and the cast comes last. A fine-tuned model's config.json and
generation_config.json keep the base's fields (`save_hf_checkpoint(base_dir=...)`: sliding
window layout, rope scaling, sampling defaults); the tokenizer files, chat template included,
come from RUN_DIR/tokenizer. A PEFT adapter stays fp32 (as PEFT saves them) unless --dtype.

    llmtrain export runs/sft-qwen --output exported/sft-qwen-fp32 --dtype fp32
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from llmtrain import checkpoint
from llmtrain.config import LoraSection
from llmtrain.data.atomic import atomic_dir
from llmtrain.errors import UserError
from llmtrain.model.decoder import Decoder
from llmtrain.model.hf import save_hf_checkpoint, stored_float_dtype
from llmtrain.model.lora import PREFIX, copy_config, expected_shapes, lora_config, merged_model, resolve_targets, write_adapter
from llmtrain.model.model_config import ModelConfig
from llmtrain.safe_load import weights_only_loads


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
            steps = checkpoint.complete_steps(path)
            have = (
                f"its complete checkpoints are at steps {', '.join(map(str, steps))}"
                if steps
                else "it has no complete checkpoint"
            )
            raise UserError(f"{path}: no checkpoint for step {step}; {have}; pass one of them to --step")
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
    ds_dir = ckpt / checkpoint.DS_TAG
    if zero_stage == 0:
        with weights_only_loads(ckpt):
            state = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=True)
        for name, tensor in state["module"].items():
            yield name, tensor.float()
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # deepspeed: ~3 s, stage 0 needs none

    with weights_only_loads(ckpt):  # zero_to_fp32 reads every file with weights_only=False
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=checkpoint.DS_TAG, lazy_mode=True)
    for name in list(lazy):
        tensor = lazy.pop(name)
        yield name, tensor.contiguous() if not isinstance(tensor, torch.Tensor) else tensor


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export(
    run_dir: str | Path, output: str | Path, step: Optional[int] = None, merge: bool = False, dtype: Optional[str] = None
) -> Path:
    """A LoRA run (sft with a `lora:` section) exports its PEFT adapter, or with `merge` the
    base with the adapter merged (llmtrain/model/lora.py); any other run its full model.
    `dtype`: "bf16", "fp16" or "fp32"; None = the base's (`export_dtype`)."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: not a dtype llmtrain writes; choose one of {', '.join(DTYPES)}")
    ckpt = pick_checkpoint(run_dir, step)
    meta = checkpoint.read_meta(ckpt)
    config = ModelConfig.from_dict(meta["model_config"])
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise UserError(f"{output} exists and is not empty; choose a new --output directory")
    base = base_dir(ckpt, meta)
    written = DTYPES[dtype] if dtype is not None else None  # None: the base's (a PEFT adapter: as trained, fp32)
    if (meta.get("config") or {}).get("lora"):
        if merge and written is None:
            written = export_dtype(base)
        return export_lora(ckpt, meta, config, output, merge, _run_dir_of(ckpt) / "tokenizer", base, written)
    if merge:
        raise UserError(f"{ckpt}: --merge needs a LoRA run, and this checkpoint holds a full model; export it without --merge")
    tensors = consolidated_tensors(ckpt, meta["zero_stage"])
    if config.tie_word_embeddings:
        tensors = ((n, t) for n, t in tensors if n != "lm_head.weight")
    written = written if written is not None else export_dtype(base)
    _write_model(tensors, config, output, _run_dir_of(ckpt) / "tokenizer", written, base)
    return output


def base_dir(ckpt: Path, meta: dict) -> Optional[str]:
    """The Hugging Face directory a run was fine-tuned from (RUN_DIR/sft-data.json's base: the
    released directory, or RUN_DIR/base/ when the base is one of our runs), else `model.from`
    (pretraining continued from a Hugging Face directory); None for a run from scratch."""
    pointer = _run_dir_of(ckpt) / "sft-data.json"
    if pointer.is_file():
        return json.loads(pointer.read_text()).get("base")
    return ((meta.get("config") or {}).get("model") or {}).get("from")


def export_dtype(base: Optional[str]) -> torch.dtype:
    """The dtype an export writes by default: the base's (its config.json `dtype`/`torch_dtype`,
    else the dtype its safetensors hold); fp32 without a base, or when the base is gone (said
    on stderr: pass --dtype)."""
    if base is None:
        return torch.float32
    path = Path(base)
    if not (path / "config.json").is_file():
        print(
            f"llmtrain: warning: the base {base} is gone, so its dtype is unknown; writing fp32 (pass --dtype to choose)",
            file=sys.stderr,
        )
        return torch.float32
    hf = json.loads((path / "config.json").read_text())
    named = hf.get("dtype") or hf.get("torch_dtype")
    if named in _HF_DTYPES:
        return _HF_DTYPES[named]
    stored = stored_float_dtype(path)  # from the safetensors headers: no tensor is read
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)


def _write_model(tensors, config, output: Path, tokenizer_dir: Optional[Path], dtype: torch.dtype, base: Optional[str]) -> None:
    """A Hugging Face model directory (weights, config, tokenizer files), complete or absent."""
    base = base if base is not None and (Path(base) / "config.json").is_file() else None
    with atomic_dir(output) as tmp:
        save_hf_checkpoint(tensors, config, tmp / "model", dtype=dtype, overwrite=True, base_dir=base)
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)


def qlora_merged(model_config, tensors, lora_cfg, section: LoraSection, base: Optional[str]) -> torch.nn.Module:
    """A QLoRA run merged: its checkpoint holds only the trainable tensors, so the base is read
    from its directory, each Linear weight quantized and dequantized as training did (the
    weights the adapters were trained against, not the base's full-precision ones), then the
    adapters merged in fp32 (peft's merge_and_unload)."""
    from peft.tuners.lora import LoraModel

    from llmtrain.model.hf import iter_model_tensors
    from llmtrain.model.quantize import dequantized

    if base is None or not (Path(base) / "config.json").is_file():
        raise UserError(
            f"--merge of a QLoRA run needs its base {base}, which is gone (its checkpoints hold only the adapters); "
            "restore the base there, or export the adapter without --merge"
        )
    with torch.device("meta"):
        model = Decoder(model_config)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    model = model.to_empty(device="cpu")
    state = {}
    for name, tensor in iter_model_tensors(base, model_config):
        tensor = tensor.float()
        state[name] = dequantized(tensor, section.quantize, section.double_quant) if name in linear else tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing in ([], ["lm_head.weight"]), (missing, unexpected)
    model.tie_weights()
    tuner = LoraModel(model, copy_config(lora_cfg), "default")
    trainable = {n for n, p in tuner.model.named_parameters() if p.requires_grad}
    adapters = {n: t for n, t in tensors if n in trainable}
    if adapters.keys() != trainable:
        lacking = sorted(trainable - adapters.keys())[0]
        raise UserError(f"checkpoint does not match its QLoRA model ({lacking} is missing); the checkpoint is damaged")
    tuner.model.load_state_dict(adapters, strict=False)
    return tuner.merge_and_unload().eval()


def _run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent  # RUN_DIR/checkpoints/step_N


def export_lora(
    ckpt: Path,
    meta: dict,
    model_config,
    output: Path,
    merge: bool,
    tokenizer_dir: Optional[Path],
    base: Optional[str],
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """A LoRA run's checkpoint -> its PEFT adapter directory, or (`merge`) a merged Hugging Face
    model directory. Tensors come from the consolidated checkpoint (any ZeRO stage), in fp32:
    the merge happens in fp32, `dtype` (None: fp32) is applied when writing."""
    section = LoraSection.model_validate(meta["config"]["lora"])
    with torch.device("meta"):
        targets = resolve_targets(Decoder(model_config), section, model_config.tie_word_embeddings)
    config = lora_config(section, targets)
    tensors = consolidated_tensors(ckpt, meta["zero_stage"])
    if merge and section.quantize is not None:
        model = qlora_merged(model_config, tensors, config, section, base)
        _write_model(model.state_dict().items(), model_config, output, tokenizer_dir, dtype or torch.float32, base)
        return Path(output)
    if merge:
        model = merged_model(model_config, tensors, config)
        _write_model(model.state_dict().items(), model_config, output, tokenizer_dir, dtype or torch.float32, base)
        return Path(output)
    from peft import get_peft_model_state_dict, inject_adapter_in_model  # ~3.7 s: only LoRA exports pay it

    with torch.device("meta"):
        shell = Decoder(model_config)
        inject_adapter_in_model(copy_config(config), shell)
    wanted = {n for n, p in shell.named_parameters() if p.requires_grad}
    state = {n: t for n, t in tensors if n in wanted}
    peft_state = {
        PREFIX + k: v.to(dtype or v.dtype).contiguous()
        for k, v in get_peft_model_state_dict(shell, state_dict=state, save_embedding_layers=False).items()
    }
    return write_adapter(peft_state, config, output, base, tokenizer_dir, expected=expected_shapes(model_config, config))
