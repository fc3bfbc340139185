"""Training metrics: RUN_DIR/metrics.jsonl, TensorBoard, MFU, memory, and RUN_DIR/loss.png.

MFU (model FLOPs utilisation, as in PaLM appendix B / nanoGPT's estimate_mfu):

    MFU = tokens_per_second x flops_per_token / (peak_flops_per_device x devices)
    flops_per_token = 6 N + 12 L H Q T          (ModelConfig.flops_per_token)

with N the parameters used in matrix multiplies (blocks + LM head; forward 2N + backward 4N),
L layers, H heads, Q head dim and T sequence length (attention scores and values, forward and
backward; the causal mask is not discounted). Peak: a table of known GPUs' dense bf16/fp16 peak; on CPU the fp32 matmul
rate measured at start-up on this machine (so CPU MFU says how close we run to the matmul roof).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch

from llmtrain.data.atomic import atomic_file, atomic_write_text

# Dense tensor-core peak FLOP/s per device for bf16/fp16 (vendor datasheets).
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; PCIe is 756e12
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A6000": 155e12,
    "V100": 125e12,
    "4090": 165e12,
    "3090": 71e12,
}


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one device: datasheet for known GPUs, measured fp32 matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value if precision in ("bf16", "fp16") else value / 2  # tf32 is half of bf16
        return float("nan")
    return measured_matmul_flops()


def measured_matmul_flops(n: int = 512, seconds: float = 0.2) -> float:
    """fp32 matmul FLOP/s of this process's CPU threads (a short measurement)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocated CUDA memory on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StartupClock:
    """Wall-clock phases from the command's start to the first optimizer step. The driver marks
    its phases and hands `state()` to the workers, which continue the same clock."""

    def __init__(self, start: Optional[float] = None, marks: Optional[dict] = None, last: Optional[float] = None):
        self.start = start if start is not None else time.time()
        self.marks: dict[str, float] = dict(marks or {})
        self.last = last if last is not None else self.start

    def mark(self, phase: str) -> None:
        now = time.time()
        self.marks[phase] = round(now - self.last, 2)
        self.last = now

    def state(self) -> dict:
        return {"start": self.start, "marks": self.marks, "last": self.last}

    @property
    def total(self) -> float:
        return round(self.last - self.start, 2)


class MetricsWriter:
    """Rank 0's writer of RUN_DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop entries beyond `step` (a resumed run rewrites them, keeping one line per step)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        entry = {**entry, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        step = entry.get("step", 0)
        for key, value in entry.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir: str | os.PathLike) -> Optional[Path]:
    """RUN_DIR/loss.png: training (and validation) loss and tokens/s over steps."""
    entries = read_metrics(run_dir)
    train = [e for e in entries if "loss" in e]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [e for e in entries if "val_loss" in e]
    fig, (ax_loss, ax_tps) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_loss.plot([e["step"] for e in train], [e["loss"] for e in train], label="train")
    if val:
        ax_loss.plot([e["step"] for e in val], [e["val_loss"] for e in val], "o-", label="validation")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_tps.plot([e["step"] for e in train], [e.get("tokens_per_s", 0) for e in train])
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_xlabel("step")
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
