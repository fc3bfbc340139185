"""The single bridge between our decoder and Hugging Face checkpoint directories.

Parameter names are the same in our model and in Llama/Mistral/Qwen2/Qwen3/Gemma 3 checkpoints,
so the per-family differences live in `ModelConfig.from_hf_config` / `to_hf_config` and tensors
move by name. Phi-3 checkpoints fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj`: its
state-dict adapter (`fused_parts`) splits them on import (`iter_model_tensors`,
`check_model_files`) and `save_hf_checkpoint` fuses them back (our names go in, the family's
layout is written). Only safetensors are read (never pickles); nothing runs remote code.

    config = load_hf_config("ckpt/")                     # ModelConfig; UserError if unsupported
    model = load_hf_model("ckpt/")                       # Decoder with the weights, eval mode
    for name, tensor in iter_hf_tensors("ckpt/"): ...    # streamed, one tensor at a time
    for name, tensor in iter_model_tensors("ckpt/", config): ...   # the same, checked against config
    save_hf_checkpoint(model.state_dict().items(), config, "out/")   # transformers loads out/
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmtrain.data.atomic import atomic_dir
from llmtrain.errors import UserError
from llmtrain.model.decoder import Decoder
from llmtrain.model.model_config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that our model recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

Tensors = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def load_hf_config(model_dir: Union[str, os.PathLike]) -> ModelConfig:
    """`ModelConfig` of a Hugging Face checkpoint directory (its config.json)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json; pass a Hugging Face model directory (an export or a released checkpoint)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err.msg} at line {err.lineno}); restore the file") from None
    try:
        return ModelConfig.from_hf_config(hf)
    except UserError as err:
        raise UserError(f"{model_dir}: {err}") from None


def iter_hf_tensors(
    model_dir: Union[str, os.PathLike], names: Optional[Iterable[str]] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from model.safetensors or the shards of model.safetensors.index.json,
    one tensor at a time, in a fixed order (shard by shard). `names`: only these (each must exist)."""
    wanted = None if names is None else set(names)
    found: set[str] = set()
    for file, keys in _weight_files(Path(model_dir)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            present = set(f.keys())
            _check_listed(file, keys, present)
            for key in f.keys():
                if keys is not None and key not in keys:
                    continue
                if wanted is not None and key not in wanted:
                    continue
                found.add(key)
                yield key, f.get_tensor(key)
    if wanted is not None and wanted - found:
        raise UserError(f"{model_dir}: checkpoint has no tensor {sorted(wanted - found)[0]}; it does not match the model")


def _check_listed(file: Path, keys: Optional[set[str]], present) -> None:
    """Every tensor the index lists for `file` (`keys`; None: no index) is among `present`."""
    absent = sorted(k for k in keys if k not in present) if keys is not None else []
    if absent:
        raise UserError(
            f"{file}: tensor {absent[0]} listed in {INDEX_FILE} is missing; the shard is incomplete, re-download or re-export it"
        )


def _weight_files(model_dir: Path) -> list[tuple[Path, Optional[set[str]]]]:
    """[(safetensors file, names it holds per the index, or None = all)]."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{index}: not a valid safetensors index (no weight_map); re-download or re-export it") from None
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, set()).add(name)
        files = []
        for file in sorted(by_file):
            path = model_dir / file
            if not path.is_file():
                raise UserError(
                    f"{model_dir}: shard {file} listed in {INDEX_FILE} is missing; re-download or re-export the checkpoint"
                )
            files.append((path, by_file[file]))
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [(single, None)]
    if any((model_dir / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise UserError(
            f"{model_dir}: only pickled PyTorch weights (pytorch_model.bin); llmtrain reads safetensors only, "
            "convert them (e.g. save_pretrained(..., safe_serialization=True) in a trusted environment)"
        )
    raise UserError(
        f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; pass a Hugging Face model directory with safetensors weights"
    )


# ---------------------------------------------------------------------------------------------
# Per-architecture state-dict adapter: fused checkpoint tensors <-> our separate projections

_FUSED = {  # family -> (fused module, its parts in concatenation order along dim 0)
    "phi3": (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp.gate_up_proj", ("gate_proj", "up_proj"))),
}


def fused_parts(config: ModelConfig, name: str) -> Optional[list[tuple[str, int]]]:
    """For a checkpoint tensor that fuses several of our parameters (Phi-3's `qkv_proj` and
    `gate_up_proj`): [(our name, rows)] in concatenation order (dim 0); else None."""
    rows = {
        "q_proj": config.num_attention_heads * config.head_dim,
        "k_proj": config.num_key_value_heads * config.head_dim,
        "v_proj": config.num_key_value_heads * config.head_dim,
        "gate_proj": config.intermediate_size,
        "up_proj": config.intermediate_size,
    }
    for fused, parts in _FUSED.get(config.family, ()):
        suffix = f".{fused}.weight"
        if name.startswith("model.layers.") and name.endswith(suffix):
            base = name[: -len(suffix)] + "." + fused.split(".")[0] + "."
            return [(f"{base}{part}.weight", rows[part]) for part in parts]
    return None


def _fused_name(config: ModelConfig, name: str) -> Optional[str]:
    """The fused checkpoint tensor our parameter `name` is a part of (None: stored as is)."""
    for fused, parts in _FUSED.get(config.family, ()):
        module, _, _ = fused.partition(".")
        for part in parts:
            piece = f".{module}.{part}.weight"
            if name.startswith("model.layers.") and name.endswith(piece):
                return name[: -len(piece)] + f".{fused}.weight"
    return None


def _split(model_dir, config: ModelConfig, expected: dict, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple]]:
    """[(our name, shape)] of a checkpoint tensor: itself, or its parts when it is fused (the
    fused shape checked first, so a mismatch names the checkpoint's tensor)."""
    parts = fused_parts(config, name)
    if parts is None or parts[0][0] not in expected:
        return [(name, shape)]
    want = (sum(rows for _, rows in parts), *expected[parts[0][0]][1:])
    if shape != want:
        raise UserError(
            f"{model_dir}: tensor {name} has shape {shape} but config.json implies {want}; the weights do not belong to this config"
        )
    return [(part, (rows, *shape[1:])) for part, rows in parts]


def _fuse(config: ModelConfig, items: Iterable[tuple[str, torch.Tensor]], expected: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs in the checkpoint's layout: the parts of a fused tensor are held
    until all have come, then concatenated in `fused_parts` order (state dicts bring a layer's
    parts together, so about one layer's parts are held)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in items:
        fused = _fused_name(config, name)
        if fused is None:
            yield name, tensor
            continue
        if tuple(tensor.shape) != expected.get(name):
            raise ValueError(f"save_hf_checkpoint: {name} has shape {tuple(tensor.shape)}, config implies {expected.get(name)}")
        got = pending.setdefault(fused, {})
        if name in got:
            raise ValueError(f"save_hf_checkpoint: tensor {name} given twice")
        got[name] = tensor.detach()
        parts = [part for part, _ in fused_parts(config, fused)]
        if len(got) == len(parts):
            del pending[fused]
            yield fused, torch.cat([got[part] for part in parts], dim=0)
    if pending:
        fused, got = next(iter(pending.items()))
        missing = [part for part, _ in fused_parts(config, fused) if part not in got]
        raise ValueError(f"save_hf_checkpoint: missing tensor {missing[0]} (a part of {fused})")


def _checkpoint_shapes(config: ModelConfig, expected: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor as the family's checkpoints store it (fused where it fuses)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in expected.items():
        fused = _fused_name(config, name)
        if fused is None:
            out[name] = shape
        elif fused not in out:
            out[fused] = (sum(rows for _, rows in fused_parts(config, fused)), *shape[1:])
    return out


def iter_model_tensors(model_dir: Union[str, os.PathLike], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Exactly the parameters of `Decoder(config)` from a checkpoint directory, one at a time, in
    a fixed order: each name once with its expected shape (`lm_head.weight` skipped when tied,
    recomputed RoPE buffers skipped, fused tensors split into our parameters). Anything unexpected, misshapen or missing is a UserError.
    Use it to fill a model built elsewhere (e.g. partitioned under ZeRO-3)."""
    expected = _expected_shapes(config)
    seen: set[str] = set()
    for file_name, file_tensor in iter_hf_tensors(model_dir):
        parts = _split(model_dir, config, expected, file_name, tuple(file_tensor.shape))
        pieces = file_tensor.split([shape[0] for _, shape in parts]) if len(parts) > 1 else [file_tensor]
        for (name, shape), tensor in zip(parts, pieces):
            if _matches(model_dir, config, expected, name, shape):
                seen.add(name)
                yield name, tensor
    _all_present(model_dir, expected, seen)


def check_model_files(model_dir: Union[str, os.PathLike], config: ModelConfig) -> None:
    """What `iter_model_tensors` would find, from the safetensors headers alone (no tensor data
    read): every file complete (its size covers every tensor the header lists), names and shapes
    those of `Decoder(config)`. The driver runs it before any worker starts, so a truncated or
    mismatched download fails in a second with one line, not inside the workers."""
    expected = _expected_shapes(config)
    seen: set[str] = set()
    for file, keys in _weight_files(Path(model_dir)):
        header = _safetensors_header(file)
        _check_listed(file, keys, header)
        for file_name, (file_shape, _) in header.items():
            if keys is not None and file_name not in keys:
                continue
            for name, shape in _split(model_dir, config, expected, file_name, file_shape):
                if _matches(model_dir, config, expected, name, shape):
                    seen.add(name)
    _all_present(model_dir, expected, seen)


def stored_float_dtype(model_dir: Union[str, os.PathLike]) -> Optional[str]:
    """The safetensors dtype ("BF16", "F16", "F32", ...) of the first floating-point tensor of a
    checkpoint directory (files in order, names sorted), from the headers alone; None if none."""
    for file, keys in _weight_files(Path(model_dir)):
        header = _safetensors_header(file)
        for name in sorted(header):
            if (keys is None or name in keys) and header[name][1].startswith(("F", "BF")):
                return header[name][1]
    return None


def _safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} from a safetensors file's header (8-byte length, then JSON),
    after checking the file is as long as the header says."""
    size = file.stat().st_size
    damaged = f"{file}: not a complete safetensors file"
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise UserError(f"{damaged} ({size:,} bytes, header unreadable); re-download or re-export the checkpoint")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{damaged} (its header is not valid JSON); re-download or re-export the checkpoint") from None
    header.pop("__metadata__", None)
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
        tensors = {name: (tuple(int(d) for d in info["shape"]), str(info["dtype"])) for name, info in header.items()}
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{damaged} (malformed header); re-download or re-export the checkpoint") from None
    if 8 + n + end > size:
        raise UserError(
            f"{damaged}: {size:,} bytes where its header needs {8 + n + end:,} (truncated download or copy); "
            "re-download or re-export the checkpoint"
        )
    return tensors


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in Decoder(config).named_parameters()}


def _matches(model_dir, config: ModelConfig, expected: dict, name: str, shape: tuple[int, ...]) -> bool:
    """True for one of the model's parameters (of the right shape), False for a tensor we skip;
    anything else is a UserError."""
    if name in expected:
        if shape != expected[name]:
            hint = ""
            if name == "model.embed_tokens.weight" and shape[:1] != expected[name][:1]:
                hint = f" (config.json says vocab_size={config.vocab_size}, the embedding has {shape[0]} rows)"
            raise UserError(
                f"{model_dir}: tensor {name} has shape {shape} but config.json implies {expected[name]}{hint}; "
                "the weights do not belong to this config"
            )
        return True
    if (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith(_IGNORED_SUFFIXES):
        return False
    raise UserError(f"{model_dir}: unexpected tensor {name}; this checkpoint has parts llmtrain's {config.family} model lacks")


def _all_present(model_dir, expected: dict, seen: set[str]) -> None:
    missing = sorted(set(expected) - seen)
    if missing:
        raise UserError(
            f"{model_dir}: checkpoint lacks {missing[0]} ({len(missing)} tensors missing); the weights are incomplete"
        )


def load_hf_model(
    model_dir: Union[str, os.PathLike], dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"
) -> Decoder:
    """Build our Decoder from a Hugging Face directory (no random init: built on the meta device,
    then filled tensor by tensor). Returned in eval mode."""
    config = load_hf_config(model_dir)
    with torch.device("meta"):
        model = Decoder(config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in iter_model_tensors(model_dir, config):
            params[name].copy_(tensor)
    return model.eval()


def save_hf_checkpoint(
    tensors: Tensors,
    config: ModelConfig,
    out_dir: Union[str, os.PathLike],
    max_shard_bytes: int = 5 * 10**9,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    base_dir: Union[str, os.PathLike, None] = None,
) -> Path:
    """Write a Hugging Face directory: config.json, generation_config.json and safetensors
    (model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json).

    `tensors`: a state dict or an iterator of (name, tensor) — consumed once, holding at most
    one shard's worth of tensors here. Every parameter of `config`'s model must come exactly
    once with its shape (`lm_head.weight` is dropped when embeddings are tied). Written to a
    temporary directory and renamed into place when complete. `dtype`: cast floating-point
    tensors (e.g. torch.bfloat16); config.json's `dtype`/`torch_dtype` name what was written.
    `base_dir`: the Hugging Face directory the model was fine-tuned from: its config.json and
    generation_config.json fields travel (`_with_base_fields`). Tokenizer files are the
    caller's to copy."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} already exists and is not empty; choose another output directory or remove it")
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in Decoder(config).named_parameters()}
    if config.family in _FUSED:  # the family's checkpoint layout (Phi-3: fused projections)
        tensors = _fuse(config, tensors.items() if isinstance(tensors, Mapping) else tensors, expected)
        expected = _checkpoint_shapes(config, expected)
    with atomic_dir(out_dir, replace=overwrite) as tmp:
        weight_map, total_bytes, saved_dtype = _write_shards(tensors, config, expected, tmp, max_shard_bytes, dtype)
        if len(set(weight_map.values())) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        hf_config = config.to_hf_config(dtype=str(saved_dtype).removeprefix("torch."))
        generation = {
            k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(config, k) is not None
        }
        if base_dir is not None:
            hf_config, generation = _with_base_fields(Path(base_dir), config, hf_config, generation)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out_dir


# Fields a base's config.json keeps for itself: they describe the written files, not the model.
_WRITTEN_FIELDS = ("dtype", "torch_dtype")


def _with_base_fields(base_dir: Path, config: ModelConfig, ours: dict, generation: dict) -> tuple[dict, dict]:
    """(config.json, generation_config.json) for a model fine-tuned from `base_dir`: the base's
    fields first (sliding-window layout, rope scaling, anything transformers reads that our
    `ModelConfig` does not model), then ours; where both spell a field and the base's spelling
    means the same `ModelConfig`, the base's stays (e.g. Qwen2's unused `sliding_window`). The
    generation settings (sampling defaults) travel; the stop tokens are ours plus the base's."""
    base = _read_json(base_dir / "config.json")
    merged = {**base, **ours}
    for key, value in base.items():
        if key in _WRITTEN_FIELDS or merged[key] == value:
            continue
        trial = {**merged, key: value}
        try:
            same = ModelConfig.from_hf_config(trial) == config
        except (UserError, TypeError, ValueError, KeyError):
            same = False
        if same:
            merged = trial
    base_gen = _read_json(base_dir / "generation_config.json")
    gen = {**base_gen, **generation}
    ours_eos = _ids(generation.get("eos_token_id"))
    eos = ours_eos + [e for e in _ids(base_gen.get("eos_token_id")) if e not in ours_eos]
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return merged, gen


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err.msg} at line {err.lineno}); restore the file") from None
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _write_shards(
    tensors: Tensors,
    config: ModelConfig,
    expected: dict[str, tuple],
    tmp: Path,
    max_shard_bytes: int,
    dtype: Optional[torch.dtype],
) -> tuple[dict[str, str], int, torch.dtype]:
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    saved_dtype = dtype

    def flush() -> None:
        nonlocal shard, shard_bytes
        path = tmp / f"shard-{len(files):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append(path)
        for name in shard:
            weight_map[name] = path.name
        shard, shard_bytes = {}, 0

    for name, tensor in items:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name not in expected:
            raise ValueError(f"save_hf_checkpoint: unexpected tensor {name} for this {config.family} config")
        if name in weight_map or name in shard:
            raise ValueError(f"save_hf_checkpoint: tensor {name} given twice")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"save_hf_checkpoint: {name} has shape {tuple(tensor.shape)}, config implies {expected[name]}")
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        t = tensor.detach().to("cpu", dtype=cast).contiguous()
        if any(t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in shard.values()):
            t = t.clone()  # safetensors refuses tensors sharing memory
        saved_dtype = saved_dtype or t.dtype
        size = t.numel() * t.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = t
        shard_bytes += size
        total_bytes += size
    missing = sorted(set(expected) - set(weight_map) - set(shard))
    if missing:
        raise ValueError(f"save_hf_checkpoint: missing tensor {missing[0]} ({len(missing)} missing)")
    flush()

    if len(files) == 1:
        files[0].rename(tmp / SINGLE_FILE)
        return {n: SINGLE_FILE for n in weight_map}, total_bytes, saved_dtype
    names = {}
    for i, path in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        path.rename(tmp / final)
        names[path.name] = final
    return {n: names[f] for n, f in weight_map.items()}, total_bytes, saved_dtype
