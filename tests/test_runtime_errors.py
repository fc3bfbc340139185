"""Config/model/checkpoint mismatches: one clear line each, exit 2, before any cluster start-up;
a damaged newest checkpoint makes resume fall back to the previous complete one."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import need_shared
from runtime_support import BASE, CONFIG, llmtrain, losses, tiny_data, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    need_shared()
    return tiny_data(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def run_with_checkpoints(data, tmp_path_factory) -> Path:
    """A finished 2-step single-process run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    torchrun(1, [f"data.path={data}", f"run.dir={run}", "train.max_steps=2", "checkpoint.every=1", "zero.stage=1"])
    return run


def pretrain_error(*overrides: str) -> str:
    """Run `llmtrain pretrain` expecting a user error; return its single line."""
    t0 = time.perf_counter()
    proc = llmtrain("pretrain", str(CONFIG), *BASE, *overrides, timeout=120)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("llmtrain: error: "), proc.stderr
    assert time.perf_counter() - t0 < 60
    return lines[-1]


def test_tokenizer_vocab_differs_from_model_vocab(data, tmp_path):
    line = pretrain_error(f"data.path={data}", f"run.dir={tmp_path}/r", "model.vocab_size=1000")
    assert "model.vocab_size=1000 but the tokenizer has 512 tokens" in line


def test_seq_len_beyond_model_positions(data, tmp_path):
    line = pretrain_error(f"data.path={data}", f"run.dir={tmp_path}/r", "model.max_seq_len=32")
    assert "seq_len 64 is longer than the model's 32 positions" in line


def test_workers_must_divide_the_global_batch(data, tmp_path):
    line = pretrain_error(f"data.path={data}", f"run.dir={tmp_path}/r", "cluster.num_workers=3")
    assert "global_batch_size=8 is not divisible by train.micro_batch_size x workers = 2 x 3" in line


def test_missing_data(tmp_path):
    line = pretrain_error(f"data.path={tmp_path}/nothing", f"run.dir={tmp_path}/r")
    assert str(tmp_path / "nothing") in line


def test_checkpoint_of_another_model_shape(data, run_with_checkpoints):
    line = pretrain_error(
        f"data.path={data}", f"run.dir={run_with_checkpoints}", "model.max_seq_len=512", "cluster.num_workers=1"
    )
    assert "is from another model shape (max_position_embeddings: checkpoint 1024, config 512)" in line


def test_checkpoint_of_another_world_size(data, run_with_checkpoints):
    line = pretrain_error(f"data.path={data}", f"run.dir={run_with_checkpoints}", "cluster.num_workers=2")
    assert "written by 1 workers, this run has 2; resume with cluster.num_workers=1" in line


def test_resume_never_refuses_a_run_with_checkpoints(data, run_with_checkpoints):
    line = pretrain_error(f"data.path={data}", f"run.dir={run_with_checkpoints}", "cluster.num_workers=1", "train.resume=never")
    assert "already holds checkpoints and train.resume=never" in line


def test_unreachable_cluster_fails_within_seconds(data, tmp_path):
    t0 = time.perf_counter()
    line = pretrain_error(f"data.path={data}", f"run.dir={tmp_path}/r", "cluster.address=ray://127.0.0.1:9")
    assert "nothing answers at 127.0.0.1:9" in line
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_damaged_newest_checkpoint_falls_back_to_previous(data, run_with_checkpoints, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(run_with_checkpoints, run)
    optim = sorted((run / "checkpoints" / "step_00000002" / "ds").glob("*optim_states.pt"))[0]
    if damage == "truncate":
        with open(optim, "r+b") as f:
            f.truncate(os.path.getsize(optim) // 2)
    else:
        optim.unlink()
    proc = torchrun(1, [f"data.path={data}", f"run.dir={run}", "train.max_steps=3", "zero.stage=1"])
    out = proc.stdout + proc.stderr
    reason = "truncated" if damage == "truncate" else "missing"
    assert f"step_00000002 is incomplete ({'ds/' + optim.name} {reason}" in out
    assert "trying the previous one" in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000001'} at step 1" in out
    assert sorted(losses(run)) == [1, 2, 3]
    assert losses(run)[2] == losses(run_with_checkpoints)[2]  # step 2 recomputed identically
