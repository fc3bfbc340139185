"""Checkpoints are data, never code: every pickle llmtrain reads goes through torch's
weights-only unpickler.

Our own reads already say `torch.load(..., weights_only=True)` (RNG states, stage-0 model
states) and model weights are safetensors. DeepSpeed 0.19.8 reads its checkpoint files with
`weights_only=False` in two places we call: `engine.load_checkpoint` (its checkpoint engine,
on resume) and `zero_to_fp32` (consolidating ZeRO shards, on export). A tampered file there
could run arbitrary code (a `__reduce__` calling `os.system`) on every worker that resumes.

`weights_only_loads(path)` closes both: inside it, torch's own switch
`TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` (which overrides an explicit `weights_only=False`) makes every
`torch.load` weights-only, and the unpickler allows, besides tensors, containers and primitive
values, exactly the DeepSpeed state classes its checkpoints hold (`DEEPSPEED_STATE_CLASSES`,
found with `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 0-3 checkpoints,
fp32 and bf16, with and without offload). A file that asks for anything else is refused with
one line naming the file and what it asked for; nothing from it runs.
"""

from __future__ import annotations

import importlib
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from llmtrain.errors import UserError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"

# Classes (module.qualname) DeepSpeed pickles into its checkpoint files; plain data holders.
DEEPSPEED_STATE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed() -> list:
    classes = []
    for name in DEEPSPEED_STATE_CLASSES:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    return classes


@contextmanager
def weights_only_loads(checkpoint: str | os.PathLike) -> Iterator[None]:
    """Every torch.load in this block is weights-only (DeepSpeed's included); a refused file
    becomes a UserError naming it. `checkpoint`: the directory being read, for the message."""
    previous = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(_allowed()):
            yield
    except pickle.UnpicklingError as err:
        raise UserError(refusal(Path(checkpoint), err)) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous


def unsafe_globals(path: Path) -> list[str]:
    """What a pickle file would import beyond the weights-only set and our allowlist, read from
    its opcodes without unpickling it."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a zip checkpoint, or unreadable: say so rather than guess
        return [f"(unreadable: {' '.join(str(err).split())[:120]})"]
    return [g for g in found if g not in DEEPSPEED_STATE_CLASSES]


def refusal(checkpoint: Path, err: Optional[BaseException] = None) -> str:
    culprit = ""
    files = sorted(checkpoint.rglob("*.pt")) if checkpoint.is_dir() else [checkpoint]
    for f in files:
        bad = unsafe_globals(f)
        if bad:
            culprit = f"{f} asks to import {', '.join(bad)}"
            break
    if not culprit:
        culprit = " ".join(str(err).split()).split(" Check the documentation")[0][:300] if err else "unknown reason"
    return (
        f"refused to load checkpoint {checkpoint}: {culprit}; llmtrain reads checkpoints with "
        "torch.load(weights_only=True) only (tensors, containers and DeepSpeed's state classes), so this file "
        "was not written by llmtrain or was altered: do not use it; resume from or export an earlier checkpoint"
    )
