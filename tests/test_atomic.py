"""Complete-or-absent outputs (llmtrain/data/atomic.py): a failed block leaves a directory as it was."""

from __future__ import annotations

import os

import pytest

from llmtrain.data.atomic import atomic_dir, unchanged_on_error
from llmtrain.errors import UserError


def test_unchanged_on_error_removes_a_run_dir_it_created(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    with pytest.raises(UserError), unchanged_on_error(run):
        (run / "sft-cache" / "key").mkdir(parents=True)
        (run / "config.yaml").write_text("new")
        raise UserError("a check failed")
    assert not (tmp_path / "a").exists()  # parents it made go too


def test_unchanged_on_error_restores_an_existing_run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001" / "meta.json").write_text("{}")
    (run / "config.yaml").write_text("old config")
    big = run / "big.bin"
    big.write_bytes(b"x" * 100)
    with pytest.raises(UserError), unchanged_on_error(run, keep_bytes=50):
        (run / "config.yaml").write_text("rejected config")
        (run / "sft-data.json").write_text("{}")
        (run / "checkpoints" / "step_00000001" / "extra").write_text("?")
        (run / "base").mkdir()
        raise UserError("a check failed")
    assert (run / "config.yaml").read_text() == "old config"
    assert sorted(p.name for p in run.iterdir()) == ["big.bin", "checkpoints", "config.yaml"]
    assert [p.name for p in (run / "checkpoints" / "step_00000001").iterdir()] == ["meta.json"]


def test_unchanged_on_error_keeps_what_a_successful_block_wrote(tmp_path):
    run = tmp_path / "run"
    with unchanged_on_error(run):
        run.mkdir()
        (run / "config.yaml").write_text("kept")
    assert (run / "config.yaml").read_text() == "kept"


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(UserError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "part").write_text("half")
        raise UserError("stop")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_runs_temp_dir_is_removed_by_the_next_run_and_live_or_foreign_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    orphan = tmp_path / f".out.tmp-{int(dead.stdout)}@{host}-abc123_x"
    live = tmp_path / f".out.tmp-{os.getpid()}@{host}-def456_y"
    foreign = tmp_path / f".out.tmp-{int(dead.stdout)}@another-host-ghi789_z"
    other_target = tmp_path / f".outx.tmp-{int(dead.stdout)}@{host}-jkl012_w"
    for d in (orphan, live, foreign, other_target):
        d.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not orphan.exists() and live.exists() and foreign.exists() and other_target.exists()
    assert (tmp_path / "out" / "f").read_text() == "x"
