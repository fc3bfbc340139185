"""Training throughput: llmtrain against a bare DeepSpeed script, Hugging Face Trainer and one
plain process, measured in one run; per-rank ZeRO model-state memory; command -> first step.

    .venv/bin/python benchmarks/train_throughput.py                  # a few minutes
    .venv/bin/python benchmarks/train_throughput.py --steps 60 --warmup-steps 10
    .venv/bin/python benchmarks/train_throughput.py --parts a,b      # only some parts

Everything uses the same model shape (llmtrain's `tiny` preset, vocabulary from the tokenizer:
a 4-layer Llama), the same data (a tokenizer and prepared token shards built once from
../shared/data/corpus into --work, reused afterwards), the same global batch, micro-batch and
sequence length, fp32, AdamW (torch), gradient clipping and a warm-up + cosine LR schedule:

(a) llmtrain: `llmtrain pretrain configs/tiny-pretrain.yaml ...` as a subprocess: embedded Ray,
    2 Ray Train workers, DeepSpeed ZeRO (--zero-stage, default 2). Tokens/s from
    RUN_DIR/metrics.jsonl (train.log_every = gcd(warm-up, steps); windows after the warm-up).
(b) benchmarks/baselines/bare_deepspeed.py: DeepSpeed alone (no Ray, no llmtrain) under torchrun,
    2 processes, the same ZeRO stage and ZeRO settings, transformers' LlamaForCausalLM with the
    identical config, a DataLoader + DistributedSampler over the same token rows.
(c) benchmarks/baselines/hf_trainer.py: Hugging Face `Trainer` + DeepSpeed (same ZeRO stage),
    2 processes under torchrun, use_cpu=True, gloo.
(d) benchmarks/baselines/single_process.py: one process, a plain PyTorch loop (all cores).
All four feed packed rows with position ids restarting at document starts, so every one keeps
attention inside documents (llmtrain always does; transformers derives the same mask from
position_ids); `--no-doc-mask` drops it from the baselines to show its cost.

Steady state: the first --warmup-steps optimizer steps of each run are left out; tokens/s =
tokens of the next --steps steps / their wall time. The two-process runs get one torch thread
per process (torchrun's and Ray's default), the single process all cores.

Also: model-state memory per rank for ZeRO 0/1/2/3 at 2 processes, counted from the tensors
DeepSpeed holds in llmtrain's engine (benchmarks/baselines/zero_memory.py), beside the ZeRO
paper's formula for fp32 Adam (4 bytes parameters + 4 gradients + 8 Adam states per parameter;
stage 1 partitions the optimizer states, 2 also the gradients, 3 also the parameters); and the
start-up breakdown that run (a) writes to metrics.jsonl (command -> first optimizer step).

Targets (issue 3 section 8): (a) >= 1.3x (c), (a) >= 0.9x (b), ZeRO-3 model states <= 0.55x
ZeRO-0. The CPU is shared on development machines: compare ratios from one run, and check the
load average printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASELINES = REPO / "benchmarks" / "baselines"
CONFIG = REPO / "configs" / "tiny-pretrain.yaml"
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "corpus"
DEFAULT_WORK = REPO / "benchmarks" / ".cache" / "train_throughput"
PARTS = ("a", "b", "c", "d", "memory")
MB = 2**20


# ---------------------------------------------------------------------------------------------
# Data: tokenizer + prepared shards (llmtrain.data), and the same rows exported for the baselines


def prepare_data(work: Path, corpus: Path, vocab_size: int, seq_len: int) -> tuple[Path, Path]:
    """(prepared dir, baseline dir), built once under `work` and reused."""
    from llmtrain.data.prepare import prepare
    from llmtrain.data.tokenizer_train import train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    ignore = work.parent / ".gitignore"
    if work.parent.name == ".cache" and not ignore.exists():
        ignore.write_text("*\n")
    tokenizer = work / f"tokenizer-v{vocab_size}"
    if not (tokenizer / "tokenizer.model").is_file():
        print(f"training a {vocab_size}-token tokenizer on {corpus} (once) ...", flush=True)
        shutil.rmtree(tokenizer, ignore_errors=True)
        train_tokenizer([str(corpus)], vocab_size, tokenizer)
    prepared = work / f"prepared-v{vocab_size}-s{seq_len}"
    prepare([str(corpus)], tokenizer=str(tokenizer), seq_len=seq_len, output=str(prepared))  # no-op when up to date
    baseline = work / f"baseline-v{vocab_size}-s{seq_len}"
    if not (baseline / "done").is_file():
        export_rows(prepared, baseline)
    return prepared, baseline


def export_rows(prepared: Path, out: Path) -> None:
    """The train split's rows as the baselines read them: input_ids and position_ids exactly as
    llmtrain's TokenLoader produces them (unshuffled), plus the model's transformers config."""
    import numpy as np

    from llmtrain.data.loader import TokenLoader
    from llmtrain.model.model_config import ModelConfig

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    chunk = 1024
    loader = TokenLoader(str(prepared), split="train", micro_batch_size=chunk, shuffle=False)
    rows = loader.num_rows
    dtype = np.uint16 if loader.vocab_size <= 1 << 16 else np.uint32
    ids = np.lib.format.open_memmap(out / "input_ids.npy", mode="w+", dtype=dtype, shape=(rows, loader.seq_len))
    pos = np.lib.format.open_memmap(out / "position_ids.npy", mode="w+", dtype=np.uint16, shape=(rows, loader.seq_len))
    for start in range(0, rows, chunk):
        (mb,) = loader.next_step()
        n = min(chunk, rows - start)  # the last call wraps into the next epoch: cut it
        ids[start : start + n] = mb["input_ids"][:n].numpy()
        pos[start : start + n] = mb["position_ids"][:n].numpy()
    ids.flush()
    pos.flush()
    config = ModelConfig.from_preset("tiny", vocab_size=loader.vocab_size).to_hf_config()
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "done").write_text(f"{rows} rows x {loader.seq_len}\n")


# ---------------------------------------------------------------------------------------------
# Runs


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run(cmd: list[str], name: str, timeout: float, log: Path) -> float:
    """Run `cmd`; its output goes to `log`. Returns the wall time; on failure raises with the tail."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return seconds


def llmtrain_cli() -> list[str]:
    script = Path(sys.executable).parent / "llmtrain"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llmtrain.cli"]


def run_llmtrain(args, prepared: Path, logs: Path) -> dict:
    """(a): `llmtrain pretrain` with metrics every gcd(warm-up, steps) steps."""
    from llmtrain.metrics import read_metrics

    run_dir = args.work / "runs" / f"llmtrain-zero{args.zero_stage}"
    shutil.rmtree(run_dir, ignore_errors=True)  # train.resume=auto would continue an old run
    every = math.gcd(args.warmup_steps, args.steps)
    total = args.warmup_steps + args.steps
    cmd = llmtrain_cli() + [
        "pretrain",
        str(CONFIG),
        f"run.dir={run_dir}",
        f"data.path={prepared}",
        f"train.max_steps={total}",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.lr={args.lr}",
        f"train.warmup_steps={args.lr_warmup}",
        "train.precision=fp32",
        f"train.log_every={every}",
        "train.val_every=0",
        "checkpoint.every=0",
        f"cluster.num_workers={args.workers}",
        "cluster.use_gpu=false",
        f"zero.stage={args.zero_stage}",
    ]
    wall = run(cmd, "(a) llmtrain pretrain", args.timeout, logs / "a_llmtrain.log")
    entries = read_metrics(run_dir)
    train = [e for e in entries if "loss" in e]
    measured = [e for e in train if e["step"] > args.warmup_steps]
    tokens_per_step = args.global_batch * seq_len_of(prepared)
    window_s = [every * tokens_per_step / e["tokens_per_s"] for e in measured]
    seconds = sum(window_s)
    if len(measured) * every != args.steps:
        raise RuntimeError(f"(a): expected {args.steps} measured steps in {run_dir}/metrics.jsonl, found {len(measured) * every}")
    # cross-check from the entries' wall-clock stamps (this also counts the metrics writes)
    stamps = {e["step"]: e["time"] for e in train}
    wallclock = args.steps * tokens_per_step / (stamps[total] - stamps[args.warmup_steps])
    startup = next(e for e in entries if "command_to_first_step_s" in e)
    first_step_line = next(
        (line.strip() for line in (logs / "a_llmtrain.log").read_text().splitlines() if "first optimizer step" in line), None
    )
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final checkpoint is not needed
    return {
        "name": "llmtrain",
        "tokens_per_s": args.steps * tokens_per_step / seconds,
        "tokens_per_s_from_timestamps": wallclock,
        "seconds": seconds,
        "measured_steps": args.steps,
        "step_s_median": statistics.median(window_s) / every,
        "first_loss": train[0]["loss"],
        "last_loss": train[-1]["loss"],
        "command_to_first_step_s": startup["command_to_first_step_s"],
        "startup_s": startup["startup_s"],
        "first_step_line": first_step_line,
        "wall_s": wall,
        "run_dir": str(run_dir),
        "command": ["llmtrain"] + [shorter(c) for c in cmd[len(llmtrain_cli()) :]],
    }


def shorter(arg: str) -> str:
    """An argument with this checkout's path made relative (for printing)."""
    return arg.replace(str(REPO) + os.sep, "")


def seq_len_of(prepared: Path) -> int:
    return int(json.loads((prepared / "manifest.json").read_text())["seq_len"])


def baseline_args(args, baseline: Path, out: Path) -> list[str]:
    flags = [
        "--data",
        str(baseline),
        "--out",
        str(out),
        "--global-batch",
        str(args.global_batch),
        "--micro-batch",
        str(args.micro_batch),
        "--warmup-steps",
        str(args.warmup_steps),
        "--steps",
        str(args.steps),
        "--lr",
        str(args.lr),
        "--lr-warmup",
        str(args.lr_warmup),
    ]
    return flags + (["--no-doc-mask"] if args.no_doc_mask else [])


def torchrun(args, script: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.workers}",
        str(BASELINES / script),
    ]


def run_baseline(args, part: str, baseline: Path, logs: Path) -> dict:
    out = args.work / "results" / f"{part}.json"
    out.unlink(missing_ok=True)
    common = baseline_args(args, baseline, out)
    if part == "b":
        cmd = torchrun(args, "bare_deepspeed.py") + common + ["--zero-stage", str(args.zero_stage)]
    elif part == "c":
        cmd = torchrun(args, "hf_trainer.py") + common + ["--zero-stage", str(args.zero_stage)]
    elif part == "d":
        cmd = [sys.executable, str(BASELINES / "single_process.py")] + common
    elif part == "d-llmtrain-model":
        cmd = [sys.executable, str(BASELINES / "single_process.py")] + common + ["--model", "llmtrain"]
    else:
        raise ValueError(part)
    wall = run(cmd, f"({part})", args.timeout, logs / f"{part}.log")
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


def run_memory(args, prepared: Path, logs: Path) -> dict:
    out = args.work / "results" / "memory.json"
    out.unlink(missing_ok=True)
    cmd = torchrun(args, "zero_memory.py") + [
        "--data",
        str(prepared),
        "--out",
        str(out),
        "--stages",
        args.memory_stages,
        "--micro-batch",
        str(args.micro_batch),
        "--global-batch",
        str(args.global_batch),
    ]
    if args.memory_persistence_threshold is not None:
        cmd += ["--persistence-threshold", str(args.memory_persistence_threshold)]
    run(cmd, "(memory)", args.timeout, logs / "memory.log")
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# Report


def zero_formula_bytes(stage: int, psi: int, nd: int) -> float:
    """The ZeRO paper's model states per rank for fp32 Adam: 4 params + 4 grads + 8 Adam bytes
    per parameter; stage >= 1 partitions the Adam states, >= 2 the gradients, 3 the parameters."""
    params = 4 * psi / (nd if stage >= 3 else 1)
    grads = 4 * psi / (nd if stage >= 2 else 1)
    adam = 8 * psi / (nd if stage >= 1 else 1)
    return params + grads + adam


def print_throughput(results: dict, args, tokens_per_step: int) -> None:
    print()
    print(
        f"Throughput: tiny preset, seq {args.seq_len}, global batch {args.global_batch} "
        f"(micro {args.micro_batch}), fp32, ZeRO-{args.zero_stage} on {args.workers} processes; "
        f"{tokens_per_step} tokens/step; warm-up {args.warmup_steps} steps skipped, {args.steps} measured; "
        f"doc mask {'off in the baselines' if args.no_doc_mask else 'on everywhere'}"
    )
    labels = {
        "a": f"(a) llmtrain pretrain (Ray, {args.workers} workers, ZeRO-{args.zero_stage})",
        "b": f"(b) bare DeepSpeed (torchrun, {args.workers} procs, ZeRO-{args.zero_stage})",
        "c": f"(c) HF Trainer + DeepSpeed ({args.workers} procs, ZeRO-{args.zero_stage})",
        "d": "(d) single process PyTorch loop",
        "d-llmtrain-model": "(d') single process, llmtrain's Decoder",
    }
    print(f"{'run':<58}{'tokens/s':>10}{'s/step':>9}{'threads':>9}{'loss (sanity)':>20}{'wall s':>9}")
    for key, label in labels.items():
        r = results.get(key)
        if r is None:
            continue
        step_s = r.get("step_s_median", r["seconds"] / r["measured_steps"])
        threads = r.get("torch_threads", "1^" if key == "a" else "-")
        if r.get("first_loss") is not None:
            loss = f"{r['first_loss']:.3f}->{r['last_loss']:.3f}"
        else:
            loss = f"mean {r['mean_loss']:.3f}" if r.get("mean_loss") is not None else "-"
        print(f"{label:<58}{r['tokens_per_s']:>10.0f}{step_s:>9.2f}{threads!s:>9}{loss:>20}{r['wall_s']:>9.0f}")
    a = results.get("a")
    if a is None:
        return
    print(
        "^ Ray sets OMP_NUM_THREADS (torch threads) to the worker's CPUs: cluster.cpus_per_worker=1; torchrun sets 1 per process."
    )
    print(f"(a) command: {' '.join(a['command'])}")
    print()
    for key, target, what in (("c", 1.3, "HF Trainer"), ("b", 0.9, "bare DeepSpeed"), ("d", None, "single process")):
        if key in results:
            ratio = a["tokens_per_s"] / results[key]["tokens_per_s"]
            verdict = "" if target is None else f"   target >= {target:.1f}: {'met' if ratio >= target else 'NOT met'}"
            print(f"(a)/({key}) llmtrain / {what:<16}{ratio:7.2f}x{verdict}")


def print_memory(memory: dict) -> Optional[float]:
    nd = memory["world_size"]
    rows = sorted(memory["results"], key=lambda r: (r["stage"], r["rank"]))
    psi = rows[0]["num_params"]
    print()
    print(
        f"Model-state memory per rank, llmtrain engine, fp32, {nd} processes, {psi:,} parameters (MiB; "
        f"formula: ZeRO paper, fp32 Adam = 4 params + 4 grads + 8 Adam bytes/param)"
    )
    head = (
        f"{'stage':<7}{'rank':>5}"
        + "".join(f"{c:>13}" for c in ("params", "grads", "fp32 master", "Adam"))
        + f"{'model states':>14}{'formula':>10}{'/formula':>10}{'buffers*':>11}{'persistent':>12}"
    )
    print(head)
    totals: dict[int, list[float]] = {}
    no_master: dict[int, list[float]] = {}
    for r in rows:
        b = r["bytes"]
        states = sum(b.get(c, 0) for c in ("parameters", "gradients", "fp32 master", "optimizer"))
        formula = zero_formula_bytes(r["stage"], psi, nd)
        totals.setdefault(r["stage"], []).append(states)
        no_master.setdefault(r["stage"], []).append(states - b.get("fp32 master", 0))
        print(
            f"{r['stage']:<7}{r['rank']:>5}"
            + "".join(f"{b.get(c, 0) / MB:>13.2f}" for c in ("parameters", "gradients", "fp32 master", "optimizer"))
            + f"{states / MB:>14.2f}{formula / MB:>10.2f}{states / formula:>10.2f}{b.get('buffers', 0) / MB:>11.1f}"
            + f"{r.get('persistent_params', 0):>12,}"
        )
    print("* buffers: DeepSpeed work space reachable from its optimizer (reduce buckets etc.), allocated size; not model states.")
    threshold = next((r.get("persistence_threshold") for r in rows if r["stage"] == 3), None)
    print(f"  persistent: ZeRO-3 parameters below stage3_param_persistence_threshold ({threshold}), kept whole on every rank.")
    if 0 in totals and 3 in totals:
        measured = max(totals[3]) / max(totals[0])
        formula = zero_formula_bytes(3, psi, nd) / zero_formula_bytes(0, psi, nd)
        print(
            f"ZeRO-3 / ZeRO-0 model states (max over ranks): measured {measured:.3f}, formula {formula:.3f}   "
            f"target <= 0.55: {'met' if measured <= 0.55 else 'NOT met'}"
        )
        print(
            f"  the same without DeepSpeed's separate fp32 master copy of the partition (fp32 training needs none): "
            f"{max(no_master[3]) / max(no_master[0]):.3f}"
        )
        return measured
    return None


def print_startup(a: dict) -> None:
    print()
    print(f"Start-up of (a): command -> first optimizer step {a['command_to_first_step_s']:.1f} s (target <= 20 s)")
    for phase, seconds in a["startup_s"].items():
        print(f"  {phase:<16}{seconds:>7.2f} s")
    if a.get("first_step_line"):
        print(f"  log: {a['first_step_line']}")
    print(f"  whole `llmtrain pretrain` command: {a['wall_s']:.1f} s (includes final validation, checkpoint and Ray shutdown)")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache of tokenizer/prepared data, runs, logs")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary (the tiny preset's default)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--warmup-steps", type=int, default=5, help="optimizer steps left out of tokens/s")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps after the warm-up")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-warmup", type=int, default=20, help="LR schedule warm-up steps (same in every run)")
    p.add_argument("--parts", default="a,b,c,d,memory", help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--memory-stages", default="0,1,2,3")
    p.add_argument(
        "--memory-persistence-threshold",
        type=int,
        default=None,
        help="what-if: ZeRO-3 stage3_param_persistence_threshold for the memory part (default: llmtrain's)",
    )
    p.add_argument("--no-doc-mask", action="store_true", help="baselines without position ids (cross-document attention)")
    p.add_argument(
        "--llmtrain-model",
        action="store_true",
        help="also (d'): the single-process loop with llmtrain's Decoder (model vs runtime cost)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.warmup_steps < 1 or args.steps < 1:
        p.error("--warmup-steps and --steps must be >= 1")
    if args.global_batch % (args.micro_batch * args.workers):
        p.error(
            f"--global-batch {args.global_batch} must be a multiple of micro-batch x workers = {args.micro_batch * args.workers}"
        )
    args.work = args.work.resolve()
    if "c" in parts:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            p.error("(c) needs accelerate for the Hugging Face Trainer: pip install -e '.[bench]' (or leave c out of --parts)")

    started = time.time()
    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs)", flush=True)
    prepared, baseline = prepare_data(args.work, args.corpus, args.vocab_size, args.seq_len)
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tokens_per_step = args.global_batch * args.seq_len
    results: dict[str, dict] = {}
    order = [x for x in ("a", "b", "c", "d") if x in parts]
    if args.llmtrain_model:
        order.append("d-llmtrain-model")
    for part in order:
        print(f"running ({part}) ...", flush=True)
        results[part] = run_llmtrain(args, prepared, logs) if part == "a" else run_baseline(args, part, baseline, logs)
        print(f"  ({part}) {results[part]['tokens_per_s']:.0f} tokens/s  [wall {results[part]['wall_s']:.0f} s]", flush=True)
    memory = None
    if "memory" in parts:
        print("running (memory) ...", flush=True)
        memory = run_memory(args, prepared, logs)

    print_throughput(results, args, tokens_per_step)
    if memory is not None:
        print_memory(memory)
    if "a" in results:
        print_startup(results["a"])
    print()
    print(f"load average at end: {load_average()}; total {time.time() - started:.0f} s; logs in {logs}")
    summary = args.work / "results" / "summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "memory": memory}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
