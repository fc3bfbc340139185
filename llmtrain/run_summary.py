"""What a finished run prints: where things are, how the loss moved, how fast it went."""

from __future__ import annotations

from pathlib import Path

from llmtrain import checkpoint
from llmtrain.metrics import read_metrics


def run_summary(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    entries = read_metrics(run_dir)
    train = [e for e in entries if "loss" in e]
    val = [e for e in entries if "val_loss" in e]
    steady = train[len(train) // 2 :] or train
    return {
        "run_dir": str(run_dir),
        "steps": train[-1]["step"] if train else 0,
        "first_loss": train[0]["loss"] if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "val_loss_start": val[0]["val_loss"] if val else None,
        "val_loss_end": val[-1]["val_loss"] if len(val) > 1 else None,
        "tokens_per_s": sum(e["tokens_per_s"] for e in steady) / len(steady) if steady else None,
        "checkpoint": str(checkpoint.find_latest(run_dir) or ""),
    }


def print_run_summary(run_dir: str | Path) -> dict:
    s = run_summary(run_dir)

    def fmt(x):
        return "-" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))

    print(f"run:         {s['run_dir']}  ({s['steps']} steps)")
    print(f"train loss:  {fmt(s['first_loss'])} -> {fmt(s['last_loss'])}")
    print(f"val loss:    {fmt(s['val_loss_start'])} -> {fmt(s['val_loss_end'])}")
    print(f"tokens/s:    {fmt(s['tokens_per_s'])} (second half of the run)")
    print(f"checkpoint:  {s['checkpoint'] or '-'}")
    print(f"metrics:     {Path(s['run_dir']) / 'metrics.jsonl'}, {Path(s['run_dir']) / 'loss.png'}")
    return s
