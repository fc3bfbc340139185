"""Fault-injection benchmark: N injected kills of a training worker during one pretraining run,
against the same run uninterrupted, measured side by side.

    .venv/bin/python benchmarks/fault_injection.py                 # N=3, embedded Ray runtime
    .venv/bin/python benchmarks/fault_injection.py --kills 5 --seed 1 --save-kill

The job: the tiny preset on a small prepared corpus, 2 Ray workers, ZeRO-2 (or --zero 3), fp32,
a checkpoint every 2 steps, cluster.max_failures = the number of kills. The injector
(tests/fault_support.py) SIGKILLs one worker process (rank and step a seeded random choice, each
after the previous restart and after the first checkpoint); with --save-kill one more kill lands
inside a checkpoint write (LLMTRAIN_TEST_SAVE_PAUSE, a test hook in llmtrain/checkpoint.py).
Ray Train restarts the worker group each time and training resumes from the newest complete
checkpoint. The reference is the same job uninterrupted (both workers on this machine, torchrun).

Prints, per failure, the step it hit, the checkpoint resumed from and the seconds to the next
start, then one line:

    N/N recovered, bitwise equal: yes|no, steps lost per failure: a, b, c (mean m)

"recovered": the workers started again, resumed from the newest complete checkpoint at the time
of the kill, and the run finished; "bitwise equal": the finished run's loss line and fp32
parameters are identical to the reference's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from fault_support import (  # noqa: E402
    PRETRAIN,
    PRETRAIN_CONFIG,
    Fault,
    Injector,
    bitwise_equal,
    env,
    final_parameters,
    kill_plan,
    losses,
    reference_runs,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=3, help="worker kills at random steps (default 3)")
    p.add_argument("--save-kill", action="store_true", help="one more kill while a checkpoint is being written")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill steps and ranks")
    p.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmtrain-faults-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        from runtime_support import tiny_data

        sys.path.insert(0, str(REPO / "tests"))
        os.environ.setdefault("LLMTRAIN_SHARED", str(REPO.parent / "shared"))
        data = tiny_data(work)

        faults = kill_plan(args.seed, args.kills, first=1, gap=(2, 3))  # from step 3: after the first checkpoint
        last = faults[-1].at if faults else 2
        pause = None
        if args.save_kill:
            save_step = last + 2 + (last % 2)  # the next even step (checkpoints every 2) after a gap
            faults.append(Fault("save", save_step, rank=args.seed % 2))
            pause = f"{save_step}:5"
            last = save_step
        max_steps = last + 4
        job = [
            *PRETRAIN,
            f"data.path={data}",
            f"train.max_steps={max_steps}",
            "checkpoint.every=2",
            "checkpoint.keep=2",
            f"zero.stage={args.zero}",
        ]

        t0 = time.time()
        reference = reference_runs(work, {"reference": ("pretrain", PRETRAIN_CONFIG, job)})["reference"]
        t_ref = time.time() - t0

        run_dir = work / "faulty"
        injector = Injector(run_dir, faults)
        run_env = env()
        if pause:
            run_env["LLMTRAIN_TEST_SAVE_PAUSE"] = pause
        cmd = [
            sys.executable,
            "-m",
            "llmtrain.cli",
            "pretrain",
            str(PRETRAIN_CONFIG),
            *job,
            f"run.dir={run_dir}",
            f"cluster.max_failures={len(faults)}",
        ]
        print(
            f"reference: {max_steps} steps uninterrupted in {t_ref:.0f} s; faulty run: {len(faults)} kills "
            f"(seed {args.seed}), cluster.max_failures={len(faults)}",
            flush=True,
        )
        t0 = time.time()
        injector.start()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env, cwd=REPO, timeout=1800)
        injector.join(timeout=30)
        injector.stop()
        t_run = time.time() - t0
        (work / "faulty.log").write_text(proc.stdout + proc.stderr)

        for i, f in enumerate(faults, 1):
            print(f"  failure {i}: {f.describe() if f.done else f'{f.kind}@{f.at}: not recovered'}")
        if injector.error is not None:
            print(f"  injector: {injector.error}")
        finished = proc.returncode == 0 and max(losses(run_dir), default=0) == max_steps
        if not finished:
            print(f"  the faulty run did not finish (exit {proc.returncode}); log: {work / 'faulty.log'}")
            print("\n".join(("    " + line) for line in (proc.stdout + proc.stderr).strip().splitlines()[-8:]))
        recovered = sum(1 for f in faults if f.done and f.resumed_from == f.newest_checkpoint) if finished else 0
        equal = (
            finished
            and losses(run_dir) == losses(reference)
            and bitwise_equal(final_parameters(run_dir), final_parameters(reference))
        )
        lost = [f.steps_lost for f in faults if f.done]
        mean = sum(lost) / len(lost) if lost else float("nan")
        print(f"faulty run: {t_run:.0f} s ({t_run / max(t_ref, 1e-9):.1f}x the reference's {t_ref:.0f} s)")
        print(
            f"{recovered}/{len(faults)} recovered, bitwise equal: {'yes' if equal else 'no'}, "
            f"steps lost per failure: {', '.join(map(str, lost)) or '-'} (mean {mean:.1f})"
        )
        return 0 if recovered == len(faults) and equal else 1


if __name__ == "__main__":
    sys.exit(main())
