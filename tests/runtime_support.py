"""Helpers for runtime tests: a tiny prepared dataset (built once per session and shared), and
drivers that run real jobs in subprocesses — torchrun for fast multi-process runs without
Ray, and a Ray driver that runs several jobs in one embedded Ray session."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-pretrain.yaml"

# Small and fast on 2 cores: the tiny preset at vocab 512, rows of 64 tokens, 8 rows per step.
BASE = [
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.val_every=0",
    "train.val_batches=2",
    "checkpoint.every=0",
    "cluster.num_workers=2",
    "cluster.use_gpu=false",
]


def benchmark(name: str):
    """A module of benchmarks/ loaded by path: benchmarks/ never goes on sys.path, where its
    kernels.py would shadow the kernels package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_data(base: Path) -> Path:
    """Tokenizer (vocab 512) + prepared shards (seq 64) from the TinyStories subset in ../shared.
    Built once under `base` (a lock makes concurrent callers wait, then reuse it)."""
    from conftest import CORPUS

    out = base / "tiny-data"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = out / "data"
        if not (data / "manifest.json").is_file():
            from llmtrain.data.prepare import prepare
            from llmtrain.data.tokenizer_train import train_tokenizer

            corpus = str(CORPUS / "tinystories_val_subset.txt")
            train_tokenizer([corpus], 512, str(out / "tok"))
            prepare([corpus], tokenizer=str(out / "tok"), seq_len=64, output=str(data), val_fraction=0.02)
    return data


def torchrun(nproc: int, overrides: Sequence[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m llmtrain.train CONFIG ...` (no Ray)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "llmtrain.train",
        str(CONFIG),
        *BASE,
        f"cluster.num_workers={nproc}",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


_RAY_DRIVER = """
import json, sys
from llmtrain.config import load_config
from llmtrain.launch import launch
jobs = json.loads(sys.argv[1])
for task, config, overrides in jobs:
    launch(load_config(config, overrides), task)
"""


def ray_jobs(
    jobs: Sequence[Sequence[str]], task: str = "pretrain", config: Path = CONFIG, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run several jobs (lists of overrides on top of BASE) one after another in one embedded
    Ray session, exactly as `llmtrain pretrain` launches them."""
    payload = json.dumps([[task, str(config), [*BASE, *job]] for job in jobs])
    proc = subprocess.run(
        [sys.executable, "-c", _RAY_DRIVER, payload],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
        cwd=REPO,
    )
    assert proc.returncode == 0, f"ray driver failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def llmtrain(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The `llmtrain` CLI in a subprocess (returns whatever happened; callers assert)."""
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
        cwd=REPO,
    )


def losses(run_dir: Path) -> dict[int, float]:
    from llmtrain.metrics import read_metrics

    return {e["step"]: e["loss"] for e in read_metrics(run_dir) if "loss" in e}


DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child job, without any process-group rendezvous settings
    an in-process test left behind (a child must pick its own free port)."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(extra)
    return env
