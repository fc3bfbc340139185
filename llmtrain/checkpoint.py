"""Checkpoints: DeepSpeed state + loader state + RNG states + step/config, complete or absent.

Layout of one checkpoint (RUN_DIR/checkpoints/step_00000010/):
    ds/            DeepSpeed's files (model states; ZeRO optimizer partitions, one per rank)
    rng/rank_N.pt  each rank's torch / CUDA / numpy / Python RNG states (tensors and strings only)
    meta.json      step, world size, ZeRO stage, model config, loader state, job config, and the
                   size of every file above; written last

All ranks write into `.tmp-step_00000010/`; after a barrier rank 0 lists every file with its
size into meta.json and renames the directory. A directory named `step_*` is therefore complete
unless a file was later truncated or removed, which `find_latest` detects (sizes against
meta.json) and skips with a warning, falling back to the previous complete checkpoint.

`run.dir` must be on storage every node sees (local disk for one node; NFS/Lustre for several),
as for DeepSpeed's own checkpoints. The directory is then handed to `ray.train.report` without
copying (Ray Train keeps it as the run's checkpoint and restores it after a worker failure).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from llmtrain.errors import UserError
from llmtrain.model.quantize import holds_quantized
from llmtrain.safe_load import weights_only_loads

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
META = "meta.json"
DS_TAG = "ds"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# Saving


def save(engine, run_dir: Path, step: int, rank: int, world_size: int, meta: dict[str, Any], keep: int, barrier) -> Path:
    """Write checkpoint `step` collectively (every rank calls this). Returns the final path."""
    root = checkpoint_root(run_dir)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a run that died while writing
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / "rng").mkdir()
    barrier()
    # A 4-bit base (QLoRA) is not saved: it is the base quantized again on resume (deterministic).
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=holds_quantized(engine.module))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    _test_hook_pause(step)
    barrier()
    if rank == 0:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        full_meta = dict(meta, step=step, world_size=world_size, files=files)
        _write_json_durably(tmp / META, full_meta)
        if final.exists():  # a stale copy of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    barrier()
    return final


def _test_hook_pause(step: int) -> None:
    """Test hook, off unless LLMTRAIN_TEST_SAVE_PAUSE=STEP:SECONDS[,STEP:SECONDS...] is set:
    every rank waits SECONDS after writing its files of checkpoint STEP, before it is made
    complete, so the fault-injection tests (tests/test_multinode.py,
    benchmarks/fault_injection.py) can kill a worker in the middle of a checkpoint write."""
    for item in os.environ.get("LLMTRAIN_TEST_SAVE_PAUSE", "").split(","):
        step_s, _, seconds = item.partition(":")
        if step_s.strip() == str(step):
            time.sleep(float(seconds or 0))


def _prune(root: Path, keep: int) -> None:
    complete = [p for p in sorted(root.glob("step_*")) if (p / META).is_file()]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _write_json_durably(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Finding and loading


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def incomplete_reason(path: Path) -> Optional[str]:
    """None when `path` is a complete checkpoint, else what is wrong with it."""
    meta_path = path / META
    if not meta_path.is_file():
        return f"{META} missing"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{META} unreadable ({err})"
    for rel, size in meta.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} missing"
        if f.stat().st_size != size:
            return f"{rel} truncated ({f.stat().st_size} of {size} bytes)"
    return None


def find_latest(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint under RUN_DIR/checkpoints, skipping (and reporting)
    incomplete ones."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    candidates = sorted(root.glob("step_*"), reverse=True)
    for i, path in enumerate(candidates):
        reason = incomplete_reason(path)
        if reason is None:
            return path
        then = "trying the previous one" if i + 1 < len(candidates) else "there is no earlier checkpoint, so none is used"
        log.warning("checkpoint %s is incomplete (%s); %s", path, reason, then)
    return None


def complete_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps of RUN_DIR's complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    paths = sorted(root.glob("step_*")) if root.is_dir() else []
    return [
        int(p.name.removeprefix("step_"))
        for p in paths
        if p.name.removeprefix("step_").isdigit() and incomplete_reason(p) is None
    ]


def resolve_resume(resume: str, run_dir: Path) -> Optional[Path]:
    """Apply `train.resume`: auto | never | a checkpoint path."""
    if resume == "auto":
        return find_latest(run_dir)
    if resume == "never":
        if find_latest(run_dir) is not None:
            raise UserError(
                f"{run_dir} already holds checkpoints and train.resume=never; use a new run.dir, or train.resume=auto to continue"
            )
        return None
    path = Path(resume)
    if (path / CHECKPOINTS).is_dir():  # a run directory
        found = find_latest(path)
        if found is None:
            raise UserError(f"train.resume={resume}: no complete checkpoint in that run directory")
        return found
    if not path.is_dir():
        raise UserError(f"train.resume={resume}: no such checkpoint directory; use auto, never or a checkpoint path")
    reason = incomplete_reason(path)
    if reason is not None:
        raise UserError(f"train.resume={resume}: checkpoint is incomplete ({reason}); pick an earlier one")
    return path


def check_compatible(meta: dict[str, Any], model_config: dict[str, Any], world_size: int, zero_stage: int, path: Path) -> None:
    """Refuse to resume into a different model shape, world size or ZeRO stage."""
    saved = meta.get("model_config", {})
    diffs = [k for k in sorted(set(saved) | set(model_config)) if saved.get(k) != model_config.get(k)]
    if diffs:
        k = diffs[0]
        raise UserError(
            f"checkpoint {path} is from another model shape ({k}: checkpoint {saved.get(k)!r}, config {model_config.get(k)!r}); "
            "use the model settings of that run or a new run.dir"
        )
    if meta["world_size"] != world_size:
        raise UserError(
            f"checkpoint {path} was written by {meta['world_size']} workers, this run has {world_size}; "
            f"resume with cluster.num_workers={meta['world_size']} (or export it and start a new run with model.from=...)"
        )
    if meta["zero_stage"] != zero_stage:
        raise UserError(f"checkpoint {path} was written with zero.stage={meta['zero_stage']}; resume with that stage")


def resume_point(
    resume: str, run_dir: Path, model_config: dict[str, Any], world_size: int, zero_stage: int, after_failure: bool = False
) -> Optional[tuple[Path, dict[str, Any]]]:
    """(checkpoint, its meta) a run continues from, checked against this run's model shape,
    world size and ZeRO stage; None for a fresh start. After a failure (Ray Train restarted
    the workers) the newest complete checkpoint, whatever `train.resume` says."""
    path = find_latest(run_dir) if after_failure else None
    if path is None:
        path = resolve_resume(resume, run_dir)
    if path is None:
        return None
    meta = read_meta(path)
    check_compatible(meta, model_config, world_size, zero_stage, path)
    return path, meta


def load(engine, path: Path, rank: int) -> dict[str, Any]:
    """Restore DeepSpeed state and this rank's RNG from checkpoint `path`; returns its meta."""
    meta = read_meta(path)
    custom = _trainable_loader(path) if holds_quantized(engine.module) else None
    with weights_only_loads(path):  # DeepSpeed's own reads say weights_only=False
        load_path, _ = engine.load_checkpoint(
            str(path),
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=True,
            custom_load_fn=custom,
        )
    if load_path is None:
        raise UserError(f"checkpoint {path}: DeepSpeed could not load {DS_TAG}/; the checkpoint is damaged, pick an earlier one")
    rng_file = path / "rng" / f"rank_{rank:05d}.pt"
    _set_rng_state(torch.load(rng_file, weights_only=True))
    return meta


def _trainable_loader(path: Path):
    """DeepSpeed's `custom_load_fn` for a model on a 4-bit base, whose checkpoints hold only the
    trainable tensors (and the 4-bit layers' small quantization state, not read): each
    trainable parameter is loaded, strictly (a missing one is a damaged checkpoint); the
    frozen base stays as built from the base's files."""

    def load_trainable(src: dict, dst: torch.nn.Module) -> None:
        for name, param in dst.named_parameters():
            if not param.requires_grad:
                continue
            if name not in src or tuple(src[name].shape) != tuple(param.shape):
                raise UserError(
                    f"checkpoint {path}: {name} is missing or of another shape; the checkpoint is damaged, pick an earlier one"
                )
            with torch.no_grad():
                param.copy_(src[name])

    return load_trainable


# ---------------------------------------------------------------------------------------------
# RNG


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps(_numpy_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
