"""Checkpoints are read as data, never as code (llmtrain/safe_load.py).

A checkpoint file carrying a malicious pickle (a `__reduce__` that would create a marker file)
is refused, with one line naming the file and what it asked for, on resume (DeepSpeed's
engine.load_checkpoint) and on export (DeepSpeed's zero_to_fp32), and the marker never appears;
an intact checkpoint still exports. The source reads pickles only with weights_only=True and
never trusts remote code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import need_shared
from runtime_support import subprocess_env, tiny_data

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-pretrain.yaml"
SMALL = [
    "train.global_batch_size=2",
    "train.micro_batch_size=2",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.val_every=0",
    "checkpoint.every=0",
    "cluster.num_workers=1",
    "cluster.use_gpu=false",
    "zero.stage=2",
]


class Payload:
    """Unpickling this runs `exec` (what a tampered checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _train(*overrides: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.train", str(CONFIG), *SMALL, *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


def _tamper(ckpt: Path, relative: str, marker: Path) -> Path:
    """Add the payload to one DeepSpeed file and fix meta.json's size for it, as an attacker
    who can write the checkpoint directory would: the checkpoint looks complete."""
    path = ckpt / relative
    state = torch.load(path, weights_only=False)  # our own, just written file
    state["extra"] = Payload(marker)
    torch.save(state, path)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][relative] = path.stat().st_size
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return path


def _tampered_copy(checkpoint_dir: Path, tmp_path: Path, relative: str) -> tuple[Path, Path, Path]:
    """(copy of the checkpoint, its tampered file, the marker the payload would create)."""
    ckpt = tmp_path / "step_00000001"
    shutil.copytree(checkpoint_dir, ckpt)
    marker = tmp_path / "payload-ran"
    return ckpt, _tamper(ckpt, relative, marker), marker


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    need_shared()
    data = tiny_data(tmp_path_factory.getbasetemp())
    run = tmp_path_factory.mktemp("safe-load") / "run"
    out = _train(f"data.path={data}", f"run.dir={run}", "train.max_steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    from llmtrain.checkpoint import find_latest

    return find_latest(run)


@pytest.mark.slow
def test_tampered_checkpoint_is_refused_on_resume(checkpoint_dir, tmp_path):
    # The ZeRO optimizer file: it also holds DeepSpeed's allowed state classes (LossScaler, ...),
    # so the refusal is about the payload, not about DeepSpeed's own content.
    ckpt, bad, marker = _tampered_copy(checkpoint_dir, tmp_path, "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    data = json.loads((ckpt / "meta.json").read_text())["config"]["data"]["path"]
    out = _train(f"data.path={data}", f"run.dir={tmp_path / 'resumed'}", "train.max_steps=2", f"train.resume={ckpt}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"llmtrain: error: refused to load checkpoint {ckpt}: {bad} asks to import builtins.exec; llmtrain reads "
        "checkpoints with torch.load(weights_only=True) only (tensors, containers and DeepSpeed's state classes), so "
        "this file was not written by llmtrain or was altered: do not use it; resume from or export an earlier checkpoint"
    )
    assert not marker.exists()
    assert (
        not (tmp_path / "resumed" / "metrics.jsonl").exists()
        or '"loss"' not in (tmp_path / "resumed" / "metrics.jsonl").read_text()
    )


@pytest.mark.slow
def test_tampered_checkpoint_is_refused_on_export_and_an_intact_one_exports(checkpoint_dir, tmp_path):
    from llmtrain.errors import UserError
    from llmtrain.export import export

    ckpt, bad, marker = _tampered_copy(checkpoint_dir, tmp_path, "ds/mp_rank_00_model_states.pt")
    with pytest.raises(UserError) as err:
        export(ckpt, tmp_path / "out")
    assert str(err.value).startswith(f"refused to load checkpoint {ckpt}: {bad} asks to import builtins.exec;")
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert not os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")  # the switch is scoped to the load
    good = export(checkpoint_dir, tmp_path / "good")
    assert (good / "model.safetensors").stat().st_size > 100_000


def test_sources_read_pickles_weights_only_and_trust_no_remote_code():
    offenders = []
    for path in sorted([*REPO.glob("llmtrain/**/*.py"), *REPO.glob("kernels/**/*.py")]):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in match.group(0):
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0)}")
        for match in re.finditer(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(", text):
            offenders.append(f"{path.relative_to(REPO)}: {match.group(0)}")
        for match in re.finditer(r"trust_remote_code\s*=\s*(\w+)", text):
            if match.group(1) != "False":
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0)}")
    assert offenders == []
