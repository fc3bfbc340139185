"""Fault injection for tests/test_multinode.py and benchmarks/fault_injection.py.

- `reference_runs`: the uninterrupted jobs faulty or multi-node runs are compared with, both
  workers on this machine (one `torchrun` of 2 processes running the jobs in turn), built once
  per session under a lock and reused.
- `Injector`: a thread that watches a run directory while its job runs (on the embedded runtime
  or a cluster: only the shared run directory and process ids are needed) and injects a planned
  sequence of faults, each after the previous one has been recovered from. A fault fires
    step    once step `at` is logged, or
    save    while checkpoint `at` is being written: every rank's files are in
            checkpoints/.tmp-step_N/ and the ranks wait there (LLMTRAIN_TEST_SAVE_PAUSE, a hook
            in llmtrain/checkpoint.py) before it is made complete,
  and then SIGKILLs one training worker (its pid from RUN_DIR/placement.json) or calls its
  `action` (kill a node, stop the job's driver).
  For each fault it records the last step logged before it, the newest complete checkpoint
  then, and the step the next start resumed from (the start-up entry in metrics.jsonl).
- `final_parameters`, `losses`: what "bitwise equal" compares.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from runtime_support import subprocess_env

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = REPO / "configs" / "tiny-pretrain.yaml"
LORA_CONFIG = REPO / "configs" / "tiny-lora.yaml"

# Small settings that still mean something: the tiny preset at vocab 512, rows of 64 tokens,
# 8 rows per step, 2 workers (tests/runtime_support.py's BASE).
PRETRAIN = [
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
# LoRA on the released stories260K (tiny-lora.yaml), a slice of its pairs, rows of 128 tokens.
LORA = [
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.val_every=0",
    "checkpoint.every=0",
    "data.seq_len=128",
    "data.max_examples=400",
    "cluster.num_workers=2",
    "cluster.use_gpu=false",
]


def env() -> dict[str, str]:
    out = subprocess_env()
    out.setdefault("TOKENIZERS_PARALLELISM", "false")
    return out


# ---------------------------------------------------------------------------------------------
# Reference runs

_MULTI_JOB = """
import json, sys
from llmtrain.config import load_config
from llmtrain.worker import exit_process
from llmtrain.tasks import get_task
from llmtrain.train import run_torchrun
for task, config, overrides in json.loads(sys.argv[1]):
    run_torchrun(load_config(config, overrides), get_task(task))
exit_process(0)
"""


def reference_runs(base: Path, jobs: dict[str, tuple[str, Path, Sequence[str]]], timeout: int = 900) -> dict[str, Path]:
    """Run `jobs` (name -> (task, config, overrides without run.dir)) uninterrupted with both
    workers on this machine: one torchrun of 2 processes that runs them in turn (the process
    group is reused; each job builds its own engine). Returns name -> run directory. Built once
    under `base` for the same jobs; concurrent callers wait for it."""
    key = hashlib.sha256(json.dumps({k: [t, str(c), list(o)] for k, (t, c, o) in sorted(jobs.items())}).encode()).hexdigest()[:12]
    out = base / f"references-{key}"
    out.mkdir(parents=True, exist_ok=True)
    dirs = {name: out / name for name in jobs}
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").is_file():
            payload = json.dumps(
                [[task, str(config), [*overrides, f"run.dir={dirs[name]}"]] for name, (task, config, overrides) in jobs.items()]
            )
            (out / "driver.py").write_text(_MULTI_JOB)
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                str(out / "driver.py"),
                payload,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
            assert proc.returncode == 0, f"reference runs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            (out / "done").write_text("")
    return dirs


# ---------------------------------------------------------------------------------------------
# What runs are compared by


def losses(run_dir: Path) -> dict[int, float]:
    from llmtrain.metrics import read_metrics

    return {e["step"]: e["loss"] for e in read_metrics(run_dir) if "loss" in e}


def final_parameters(run_dir: Path) -> dict:
    """The fp32 parameters of the run's newest checkpoint (consolidated from the ZeRO shards)."""
    from llmtrain import checkpoint
    from llmtrain.export import consolidated_tensors

    latest = checkpoint.find_latest(run_dir)
    assert latest is not None, f"no complete checkpoint in {run_dir}"
    meta = checkpoint.read_meta(latest)
    return {name: t.clone() for name, t in consolidated_tensors(latest, meta["zero_stage"])}


def bitwise_equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Injection


@dataclass
class Fault:
    kind: str  # "step" or "save": when it fires
    at: int  # the step logged (step) or being written (save)
    rank: int = 0  # which rank's process is killed (without an action)
    action: Optional[Callable[[], None]] = None  # instead of the kill
    # filled in by the injector
    done: bool = False
    killed_pid: Optional[int] = None
    last_step: Optional[int] = None  # last training step logged before the fault
    newest_checkpoint: Optional[int] = None  # newest complete checkpoint right after the fault
    resumed_from: Optional[int] = None  # the step the next start of the workers resumed from
    at_time: float = 0.0
    recovered_time: float = 0.0

    @property
    def steps_lost(self) -> Optional[int]:
        if self.last_step is None or self.resumed_from is None:
            return None
        return self.last_step - self.resumed_from

    def describe(self) -> str:
        what = f"{self.action.__name__}" if self.action else f"SIGKILL rank {self.rank}"
        what += f" after step {self.at}" if self.kind == "step" else f" while checkpoint {self.at} was written"
        return (
            f"{what}: last logged step {self.last_step}, newest complete checkpoint {self.newest_checkpoint}, "
            f"resumed from {self.resumed_from} ({self.steps_lost} steps lost, "
            f"{self.recovered_time - self.at_time:.1f} s to the next start)"
        )


class Injector(threading.Thread):
    def __init__(self, run_dir: Path, faults: list[Fault], world_size: int = 2, timeout_s: float = 600):
        super().__init__(daemon=True, name="fault-injector")
        self.run_dir, self.faults, self.world_size, self.timeout_s = Path(run_dir), faults, world_size, timeout_s
        self.poll_s = 0.05
        self.error: Optional[BaseException] = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            since = 0.0
            for fault in self.faults:
                self._trigger(fault, since)
                fault.resumed_from, since = self._next_start(fault)
                fault.recovered_time = since
                fault.done = True
        except BaseException as err:  # reported by the test through .error
            self.error = err

    # -- waiting for the moment of a fault

    def _trigger(self, fault: Fault, since: float) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self._stop_event.is_set():
                raise RuntimeError(f"stopped before the fault {fault.kind}@{fault.at}")
            if fault.kind == "save":
                ready = self._checkpoint_being_written(fault.at)
            else:
                ready = any(step >= fault.at for step, t in self._loss_lines() if t >= since)
            if ready:
                pids = self._pids()
                fault.last_step = max((s for s, t in self._loss_lines()), default=0)
                fault.at_time = time.time()
                if fault.action is not None:
                    fault.action()
                else:
                    fault.killed_pid = pids[fault.rank]
                    os.kill(fault.killed_pid, signal.SIGKILL)
                time.sleep(1.0)  # let the other rank notice before reading what is complete
                from llmtrain.checkpoint import find_latest

                latest = find_latest(self.run_dir)
                fault.newest_checkpoint = int(latest.name.split("_")[1]) if latest else 0
                return
            time.sleep(self.poll_s)
        raise TimeoutError(f"fault {fault.kind}@{fault.at} never triggered within {self.timeout_s:.0f} s")

    def _checkpoint_being_written(self, step: int) -> bool:
        rng = self.run_dir / "checkpoints" / f".tmp-step_{step:08d}" / "rng"
        try:
            return len(list(rng.iterdir())) >= self.world_size
        except OSError:
            return False

    def _loss_lines(self) -> list[tuple[int, float]]:
        try:
            text = (self.run_dir / "metrics.jsonl").read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if "loss" in entry:
                out.append((entry["step"], entry["time"]))
        return out

    def _pids(self) -> list[int]:
        placement = json.loads((self.run_dir / "placement.json").read_text())
        return [p["pid"] for p in sorted(placement, key=lambda p: p["rank"])]

    # -- waiting for the recovery

    def _next_start(self, fault: Fault) -> tuple[int, float]:
        """(resume step, time) of the first start of the workers after `fault`: the start-up
        entry train.py writes at its first step (its step is the step it resumed from)."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self._stop_event.is_set():
                raise RuntimeError(f"stopped while waiting for the recovery from {fault.kind}@{fault.at}")
            for entry in _entries(self.run_dir):
                if "startup_s" in entry and entry["time"] > fault.at_time:
                    return entry["step"], entry["time"]
            time.sleep(self.poll_s)
        raise TimeoutError(f"no restart within {self.timeout_s:.0f} s after {fault.kind}@{fault.at}")


def _entries(run_dir: Path) -> list[dict]:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def kill_plan(seed: int, n: int, first: int, gap: tuple[int, int], world_size: int = 2) -> list[Fault]:
    """`n` worker kills at seeded random steps: the first after step `first`, each next one
    `gap` steps (inclusive range) after the previous, on a random rank."""
    rng = random.Random(seed)
    faults, step = [], first
    for _ in range(n):
        step += rng.randint(*gap)
        faults.append(Fault("step", step, rank=rng.randrange(world_size)))
    return faults
