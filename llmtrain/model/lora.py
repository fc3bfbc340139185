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
embedding). They resolve to the exact list of module names given to peft. Phi-3 checkpoints
fuse `qkv_proj` and `gate_up_proj`, which our decoder holds as separate projections: in a Phi-3
model those names (or dotted suffixes ending in them) select their parts (q/k/v_proj,
gate/up_proj). Their adapters are written in the checkpoint's layout (`fuse_adapter`: one
exact LoRA on qkv_proj / gate_up_proj, of rank the parts' ranks summed, so `peft` loads them on
transformers' Phi3ForCausalLM) and split again on load (`split_adapter`, which also takes
adapters trained with peft on transformers' Phi-3). Nothing here knows
about ZeRO: under ZeRO-3 the caller gathers the adapter first (llmtrain/engine.py).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from llmtrain.data.atomic import atomic_dir
from llmtrain.errors import UserError
from llmtrain.model.decoder import Decoder
from llmtrain.model.hf import fused_parts, load_hf_config
from llmtrain.model.model_config import ModelConfig
from llmtrain.model.quantize import quiet_bitsandbytes_probe

quiet_bitsandbytes_probe()  # before anything here imports peft, which imports bitsandbytes

PREFIX = "base_model.model."  # what PeftModel adds in front of the base model's names
ADAPTER_FILE = "adapter_model.safetensors"
SUPPORTED = (nn.Linear, nn.Embedding)
# Fused checkpoint modules (llmtrain/model/hf.py's state-dict adapter) -> our modules, per family.
FUSED_TARGETS = {"phi3": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}}


def _unfused(model: nn.Module, entry: str) -> list[str]:
    """`entry` itself, or the names of its parts when it names a fused module of this family."""
    family = getattr(getattr(model, "config", None), "family", None)
    head, _, leaf = entry.rpartition(".")
    parts = FUSED_TARGETS.get(family, {}).get(leaf)
    if parts is None:
        return [entry]
    return [f"{head}.{part}" if head else part for part in parts]


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
    linear_names = {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)}
    linear_names = sorted(linear_names | set(FUSED_TARGETS.get(getattr(getattr(model, "config", None), "family", None), {})))
    chosen: set[str] = set()
    for entry in section.target_modules:
        names = _unfused(model, entry)
        hits = [n for n in modules if n and any(_matches(e, n) for e in names)]
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
        use_rslora=section.rslora,
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
    model_config = _base_config(base)
    if model_config is not None:
        state, config = fuse_adapter(state, config, model_config)
    config.base_model_name_or_path = base
    config.inference_mode = True
    if isinstance(config.target_modules, (set, list)):  # peft keeps a set: its order varies with the hash seed
        config.target_modules = sorted(config.target_modules)
    with atomic_dir(output, replace=True) as tmp:
        save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    return Path(output)


# ---------------------------------------------------------------------------------------------
# Fused checkpoint layouts (Phi-3): adapters on our q/k/v (gate/up) <-> one adapter on the fused module

_A, _B = ".lora_A.weight", ".lora_B.weight"
_ADAPTER_SUFFIXES = (_A, _B, ".lora_embedding_A", ".lora_embedding_B")


def _adapted(name: str) -> tuple[str, Optional[str]]:
    """(module, suffix) of an adapter tensor's name (suffix None: not a LoRA weight)."""
    for suffix in _ADAPTER_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return "", None


def _base_config(base) -> Optional[ModelConfig]:
    """The ModelConfig of the base directory an adapter is written for, when it has a readable
    config.json of a family whose checkpoints fuse projections (else None: written as is)."""
    if base is None or not (Path(base) / "config.json").is_file():
        return None
    try:
        config = load_hf_config(base)
    except UserError:
        return None
    return config if config.family in FUSED_TARGETS else None


def _r_alpha(config, module: str) -> tuple[int, float]:
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return r, alpha


def _scaling(config, r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def fuse_adapter(state: dict[str, torch.Tensor], config, model_config: ModelConfig):
    """(state, LoraConfig) in the checkpoint's layout: the adapters of a fused module's parts
    become one adapter on it, exactly: A = [A_p; ...] (rank R = the parts' ranks summed),
    B = the B_p * scaling_p placed block-diagonally (zero rows for parts not adapted), with
    alpha chosen so that its scaling is 1. Other tensors pass unchanged; a new config is returned."""
    groups = FUSED_TARGETS.get(model_config.family, {})
    part_of = {part: fused for fused, parts in groups.items() for part in parts}
    kept: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # fused module -> part module -> {A, B}
    targets: set[str] = set()  # the exact adapted modules (peft may have shortened target_modules)
    for key, tensor in state.items():
        module, suffix = _adapted(key.removeprefix(PREFIX))
        head, _, leaf = module.rpartition(".")
        if suffix in (_A, _B) and leaf in part_of:
            fused.setdefault(f"{head}.{part_of[leaf]}", {}).setdefault(module, {})[suffix] = tensor
            continue
        kept[key] = tensor
        if suffix is not None:
            targets.add(module)
    if not fused:
        return state, config
    config = copy_config(config)
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for module, parts in fused.items():
        layout = [(name.removesuffix(".weight"), rows) for name, rows in fused_parts(model_config, module + ".weight")]
        rank = sum(t[_A].shape[0] for t in parts.values())
        a_blocks, b = [], None
        row, col = 0, 0
        for part, rows in layout:
            if part in parts:
                a, bp = parts[part][_A], parts[part][_B]
                r = a.shape[0]
                if b is None:
                    b = bp.new_zeros(sum(n for _, n in layout), rank)
                b[row : row + rows, col : col + r] = bp * _scaling(config, *_r_alpha(config, part))
                a_blocks.append(a)
                col += r
            row += rows
        kept[f"{PREFIX}{module}{_A}"] = torch.cat(a_blocks, dim=0).contiguous()
        kept[f"{PREFIX}{module}{_B}"] = b.contiguous()
        targets.add(module)
        rank_pattern[re.escape(module)] = rank
        alpha_pattern[re.escape(module)] = math.sqrt(rank) if config.use_rslora else float(rank)
    config.target_modules = sorted(targets)
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    return kept, config


def split_adapter(state: dict[str, torch.Tensor], config, model_config: ModelConfig):
    """The inverse of `fuse_adapter` for our decoder: an adapter on a fused module (ours, or one
    peft trained on transformers' Phi-3) becomes one per part, exactly: A_p = A, B_p = B's rows
    of part p, each with the fused module's rank and alpha. Returns (state, LoraConfig) whose
    target_modules are the exact adapted module names."""
    kept: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    rank_pattern, alpha_pattern = {}, {}
    for key, tensor in state.items():
        module, suffix = _adapted(key.removeprefix(PREFIX))
        if suffix is None:
            kept[key] = tensor
            continue
        parts = fused_parts(model_config, module + ".weight") if suffix in (_A, _B) else None
        if parts is None:
            kept[key] = tensor
            modules.add(module)
            rank_pattern[re.escape(module)], alpha_pattern[re.escape(module)] = _r_alpha(config, module)
            continue
        row = 0
        for part, rows in parts:
            part = part.removesuffix(".weight")
            kept[f"{PREFIX}{part}{suffix}"] = tensor.clone() if suffix == _A else tensor[row : row + rows].clone()
            row += rows
            modules.add(part)
            rank_pattern[re.escape(part)], alpha_pattern[re.escape(part)] = _r_alpha(config, module)
    if kept.keys() == state.keys():
        return state, config
    config = copy_config(config)
    config.target_modules = sorted(modules)
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    return kept, config


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
    model_config = getattr(model, "config", None)
    if isinstance(model_config, ModelConfig) and model_config.family in FUSED_TARGETS:
        state, config = split_adapter(state, config, model_config)
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
