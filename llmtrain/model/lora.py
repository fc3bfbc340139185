"""LoRA through `peft`: inject adapters into our decoder, save them in PEFT's format, load and
merge them.

    apply_lora(model, cfg.lora, model_config)          # in place; only adapter params train
    state = peft_adapter_state(model, tensors)         # PEFT keys (tensors: engine.trainable_state)
    write_adapter(state, lora_config, "out/adapter", base="ckpt/")   # adapter_model.safetensors + adapter_config.json
    load_adapter(model, "out/adapter")                 # checked against the base, then loaded

Our parameter names are Hugging Face's, so `peft.PeftModel.from_pretrained(
AutoModelForCausalLM.from_pretrained(base), adapter_dir)` reads the adapters we write.

Target modules (`lora.target_modules`): each entry is a module name or dotted suffix
("q_proj", "self_attn.o_proj") or a regular expression over full module names
(r"model\\.layers\\.[0-3]\\..*_proj"); each must match at least one Linear (or, untied, the
embedding). They resolve to the exact list of module names given to peft. Nothing here knows
about ZeRO: under ZeRO-3 the caller gathers the adapter first (llmtrain/engine.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from llmtrain.data.atomic import atomic_dir
from llmtrain.errors import UserError
from llmtrain.model.decoder import Decoder

PREFIX = "base_model.model."  # what PeftModel adds in front of the base model's names
ADAPTER_FILE = "adapter_model.safetensors"
SUPPORTED = (nn.Linear, nn.Embedding)


def _matches(entry: str, name: str) -> bool:
    if name == entry or name.endswith("." + entry):
        return True
    if re.escape(entry) == entry:  # a plain name: suffix matching only
        return False
    try:
        return re.fullmatch(entry, name) is not None
    except re.error:
        return False


def resolve_targets(model: nn.Module, section, tied: bool) -> list[str]:
    """Full names of the modules `section.target_modules` selects (each entry must select one)."""
    modules = dict(model.named_modules())
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
    chosen: set[str] = set()
    for entry in section.target_modules:
        hits = [n for n in modules if n and _matches(entry, n)]
        usable = [n for n in hits if isinstance(modules[n], SUPPORTED)]
        if not usable:
            seen = (
                f"it matches {hits[0]} ({type(modules[hits[0]]).__name__}), not a Linear layer"
                if hits
                else "it matches no module"
            )
            raise UserError(
                f"lora.target_modules: {entry!r} selects nothing to adapt ({seen}); "
                f"use names of the model's Linear layers: {', '.join(linear_names)}"
            )
        chosen.update(usable)
    for entry in section.modules_to_save:
        if not any(_matches(entry, n) for n in modules if n):
            raise UserError(
                f"lora.modules_to_save: {entry!r} matches no module of the model; use a module name such as embed_tokens"
            )
    if tied:
        embed = [n for n in [*chosen, *section.modules_to_save] if n.endswith("embed_tokens")]
        if embed:
            raise UserError(
                "lora: embed_tokens is tied to lm_head in this model, and adapting it alone would untie them; "
                "leave embed_tokens out of lora.target_modules / lora.modules_to_save (or fine-tune fully)"
            )
    return sorted(chosen)


def lora_config(section, targets: list[str], base: Optional[str] = None, inference: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        bias=section.bias,
        modules_to_save=list(section.modules_to_save) or None,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
        inference_mode=inference,
    )


def apply_lora(model: nn.Module, section, tied: bool, seed: int = 0):
    """Inject LoRA adapters in place (peft); everything but the adapters is frozen. The adapter
    initialisation is seeded, so every rank starts from the same weights. Returns the LoraConfig."""
    from peft import inject_adapter_in_model

    config = lora_config(section, resolve_targets(model, section, tied))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        inject_adapter_in_model(config, model)
    finally:
        torch.random.set_rng_state(state)
    return config


def peft_adapter_state(model: nn.Module, tensors: Optional[dict[str, torch.Tensor]]) -> Optional[dict[str, torch.Tensor]]:
    """The adapter as PEFT saves it (keys `base_model.model.<module>.lora_A.weight`, ...) from
    `tensors`, the adapted model's trainable parameters by name (None passes through)."""
    from peft import get_peft_model_state_dict

    if tensors is None:
        return None
    state = get_peft_model_state_dict(model, state_dict=tensors, save_embedding_layers=False)
    return {PREFIX + k: v.contiguous() for k, v in state.items()}


def write_adapter(
    state: dict[str, torch.Tensor],
    config,
    output: Path,
    base: Optional[str],
    tokenizer_dir: Optional[Path] = None,
    expected: Optional[dict[str, tuple]] = None,
) -> Path:
    """Write a PEFT adapter directory (complete or absent). `expected`: shape of every tensor,
    checked before anything is written (a partitioned tensor would be (0,))."""
    from safetensors.torch import save_file

    if expected is not None:
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name]):
                raise RuntimeError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name])}")
    config.base_model_name_or_path = base
    config.inference_mode = True
    with atomic_dir(output, replace=True) as tmp:
        save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    return Path(output)


def expected_shapes(model_config, config) -> dict[str, tuple]:
    """PEFT key -> shape of each adapter tensor for `model_config` (built on the meta device)."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    with torch.device("meta"):
        model = Decoder(model_config)
        inject_adapter_in_model(copy_config(config), model)
    return {PREFIX + k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def copy_config(config):
    """A fresh LoraConfig with the same settings (peft mutates the one it injects)."""
    from peft import LoraConfig

    return LoraConfig(**{k: v for k, v in config.to_dict().items() if k in LoraConfig.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# Loading and merging


def read_adapter(adapter_dir: str | Path) -> tuple[object, dict[str, torch.Tensor]]:
    """(LoraConfig, PEFT-keyed tensors) of an adapter directory."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file() or not (adapter_dir / ADAPTER_FILE).is_file():
        raise UserError(f"{adapter_dir}: not a PEFT adapter directory (needs adapter_config.json and {ADAPTER_FILE})")
    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    if raw.get("peft_type") != "LORA":
        raise UserError(f"{adapter_dir}: adapter type {raw.get('peft_type')!r} is not supported; llmtrain loads LoRA adapters")
    return LoraConfig.from_pretrained(str(adapter_dir)), load_file(str(adapter_dir / ADAPTER_FILE))


def check_adapter_fits(model: nn.Module, config, state: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Refuse an adapter trained for another base model (missing modules or other shapes)."""
    modules = dict(model.named_modules())
    trained_for = f"adapter_config.json names base {config.base_model_name_or_path!r}"
    for key, tensor in state.items():
        name = key.removeprefix(PREFIX)
        for part in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
            if name.endswith(part):
                module_name = name[: -len(part)]
                module = modules.get(module_name)
                if module is None:
                    raise UserError(
                        f"{adapter_dir} was trained for another base model: it adapts {module_name}, which this "
                        f"model lacks ({trained_for}); load it with its own base"
                    )
                size = (
                    module.in_features if part == ".lora_A.weight" else module.out_features if part == ".lora_B.weight" else None
                )
                dim = tensor.shape[1] if part == ".lora_A.weight" else tensor.shape[0]
                if size is not None and dim != size:
                    raise UserError(
                        f"{adapter_dir} was trained for another base model: {module_name} has "
                        f"{size} {'inputs' if part == '.lora_A.weight' else 'outputs'} here, the adapter expects {dim} "
                        f"({trained_for}); load it with its own base"
                    )


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Inject the adapter of `adapter_dir` into our decoder (in place) and load its weights."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    config, state = read_adapter(adapter_dir)
    check_adapter_fits(model, config, state, Path(adapter_dir))
    inject_adapter_in_model(config, model)
    result = set_peft_model_state_dict(model, {k.removeprefix(PREFIX): v for k, v in state.items()})
    unexpected = [k for k in result.unexpected_keys if "lora_" in k or "modules_to_save" in k]
    if unexpected:
        raise UserError(f"{adapter_dir}: tensor {unexpected[0]} does not fit this base model; load the adapter with its own base")
    return model.eval()


def merged_model(model_config, tensors, lora_cfg) -> nn.Module:
    """Our decoder with the LoRA weights merged (peft's merge_and_unload). `tensors`: every
    parameter of the adapted model, named as in training (e.g. a consolidated checkpoint)."""
    from peft.tuners.lora import LoraModel

    with torch.device("meta"):
        model = Decoder(model_config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    tuner = LoraModel(model, copy_config(lora_cfg), "default")
    missing, unexpected = tuner.model.load_state_dict(dict(tensors), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model_config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"checkpoint does not match its LoRA model ({(missing or unexpected)[0]}); the checkpoint is damaged")
    return tuner.merge_and_unload().eval()
