"""The operator profile of one training step, written the same way by both sides of
benchmarks/finetune_throughput.py --profile (llmtrain_profile.py, hf_trainer_sft.py):
`OUT.txt` (torch.profiler's table, top 40 by self CPU time) and `OUT.json` (every operator's self
CPU ms and calls, and the step's wall ms), which the benchmark groups into categories."""

from __future__ import annotations

import json
from pathlib import Path


def write_profile(prof, out: Path, wall_ms: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    events = prof.key_averages()
    out.with_suffix(".txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=40))
    ops = [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in events]
    ops.sort(key=lambda o: -o["self_ms"])
    out.with_suffix(".json").write_text(json.dumps({"wall_ms": wall_ms, "ops": ops}, indent=1))
