"""Fine-tuning throughput and memory at a released model's shape: `llmtrain sft` against Hugging
Face Trainer + peft + DeepSpeed, LoRA and full SFT, measured in one run (issue 12 section 1).

    .venv/bin/python benchmarks/finetune_throughput.py                  # ~15-25 min on 2 cores
    .venv/bin/python benchmarks/finetune_throughput.py --tiny           # plumbing, ~3 min
    .venv/bin/python benchmarks/finetune_throughput.py --parts a-lora,b-lora --steps 4
    .venv/bin/python benchmarks/finetune_throughput.py --parts a-lora,b-lora --bisect --cap-gib 8

Model: the published Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4,864, vocabulary 151,936, tied embeddings, qkv bias; `--tiny`: 2 layers, hidden
64, same vocabulary) at random init (speed and memory do not depend on the weights), saved once
as a Hugging Face directory under --work with stories260K's tokenizer (512 ids, which fit the
vocabulary; nothing is downloaded). Both sides load those files.

Data: ../shared/data/sft/gsm8k_train.jsonl (question/answer pairs) rendered with llmtrain's
`plain` chat template (loss on the answers and their EOS), seq 512, packed. llmtrain's own SFT
preparation (SFTTask.prepare, the cache under --work) tokenizes it once; every llmtrain run
reuses that cache (checked), and the HF side gets the same rows in llmtrain's global order
(step s = rows s*G .. s*G+G-1), labels unshifted for transformers, position ids restarting at
each example so transformers masks attention inside examples (padding-free packing).
Same global batch and micro-batch, fp32, 2 processes, ZeRO-2, AdamW (torch), grad clip 1.0.

Parts (--parts):
  a-lora  `llmtrain sft configs/tiny-lora.yaml ... lora.r=16` on every projection (Ray, 2 workers)
  b-lora  benchmarks/baselines/hf_trainer_sft.py under torchrun, peft LoRA r=16, same targets
  c-lora  (a) with `lora.quantize=nf4` (bitsandbytes 4-bit base); "not available: <error>" when
          llmtrain refuses the key
  a-full  `llmtrain sft configs/tiny-sft.yaml ...` (every parameter trains)
  b-full  the HF Trainer baseline without peft

Measured: steady-state tokens/s (rows x seq_len per optimizer step, the first --warmup-steps
left out: llmtrain's metrics.jsonl windows, the HF script's step end times); peak resident
memory per rank (VmHWM of each rank process, polled from /proc/PID/status by this script: the
Ray workers' pids from RUN_DIR/placement.json, the torchrun ranks' from pid files; for llmtrain
the value at its last training step, before the final checkpoint; the HF ranks also report
their own VmHWM); command -> first optimizer step (wall clock from launching the command);
with --bisect the largest micro-batch whose one-step peak RSS stays under --cap-gib on every
rank (a probe is stopped as soon as a rank passes the cap). Any run is stopped if the machine's
MemAvailable drops under --min-available-gib (the machine is shared).

Targets (issue 12): (a) >= 1.3x (b) tokens/s; (a) <= 0.6x (b) peak RSS at the same micro-batch;
(a)'s largest micro-batch >= 2x (b)'s. Every number lands in WORK/results/summary-<start time>.json
(results/summary.json: the latest).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASELINES = REPO / "benchmarks" / "baselines"
STORIES = REPO.parent / "shared" / "checkpoints" / "stories260K"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sft" / "gsm8k_train.jsonl"
DEFAULT_WORK = REPO / "benchmarks" / ".cache" / "finetune_throughput"
CONFIGS = {"lora": REPO / "configs" / "tiny-lora.yaml", "full": REPO / "configs" / "tiny-sft.yaml"}
PARTS = ("b-full", "a-full", "a-lora", "b-lora", "c-lora")  # the full runs first: they need most of the machine
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# The base model and the data


def qwen25_config(tiny: bool) -> dict:
    """Qwen2.5-0.5B's published shape (or the tiny plumbing shape), for transformers' Qwen2Config."""
    shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return dict(
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        use_sliding_window=False,
        bos_token_id=1,  # stories260K's tokenizer
        eos_token_id=2,
        **shape,
    )


def build_base(out: Path, tiny: bool) -> Path:
    """The Hugging Face directory both sides load: random weights, saved once."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    print(f"writing the random-init {'tiny' if tiny else 'Qwen2.5-0.5B'} shape to {out} (once) ...", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**qwen25_config(tiny))).float().save_pretrained(tmp)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(STORIES / f, tmp / f)
    tmp.rename(out)
    return out


def data_overrides(args, base: Path) -> list[str]:
    """The data settings of every llmtrain run (and of the one preparation): same cache key."""
    return [
        f"model.from={base}",
        f"data.path={args.data}",
        "data.format=pairs",
        "data.prompt_field=question",
        "data.response_field=answer",
        "data.chat_template=plain",
        f"data.seq_len={args.seq_len}",
        "data.packing=true",
        "data.truncation=drop",
        "data.val_fraction=0",  # no validation passes: only training steps are timed
        f"data.max_examples={args.max_examples}",
        f"data.cache_dir={args.work / 'sft-cache'}",
        "run.seed=0",
    ]


def prepare_rows(args, base: Path) -> tuple[Path, Path]:
    """llmtrain's SFT preparation (the cache), and its train rows exported for the HF side."""
    import numpy as np

    from llmtrain.config import load_config
    from llmtrain.data.sft import SFTSplit, read_meta
    from llmtrain.data.sft_batches import IGNORE, SFTBatches
    from llmtrain.engine import batch_layout
    from llmtrain.tasks import get_task

    prep = args.work / "prep"
    cfg = load_config(CONFIGS["lora"], [*data_overrides(args, base), f"run.dir={prep}"])
    get_task("sft").prepare(cfg, batch_layout(cfg, args.workers))
    info = json.loads((prep / "sft-data.json").read_text())
    cache = Path(info["cache"])
    rows_dir = args.work / f"rows-{cache.name}"
    if (rows_dir / "done").is_file():
        return cache, rows_dir
    split = SFTSplit.open(cache, "train")
    meta = read_meta(cache)
    n = split.num_rows
    batches = SFTBatches(split, info["seq_len"], meta["pad_id"], n, 1, 0, 1, cfg.run.seed)  # one epoch in llmtrain's order
    (mb,) = batches.next_step()
    shutil.rmtree(rows_dir, ignore_errors=True)
    rows_dir.mkdir(parents=True)
    labels = np.full(mb["labels"].shape, IGNORE, dtype=np.int32)
    labels[:, 1:] = mb["labels"][:, :-1].numpy()  # ours: labels[t] = token t+1; transformers shifts itself
    np.save(rows_dir / "input_ids.npy", mb["input_ids"].numpy().astype(np.int32))
    np.save(rows_dir / "labels.npy", labels)
    np.save(rows_dir / "position_ids.npy", mb["position_ids"].numpy().astype(np.int32))
    (rows_dir / "done").write_text(f"{n} rows x {info['seq_len']} from {cache}\n")
    return cache, rows_dir


# ---------------------------------------------------------------------------------------------
# Watching the rank processes' memory


def proc_kib(pid: int, field: str) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int) -> Optional[float]:
    """User + system CPU seconds of a process (all its threads), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


class RankWatch(threading.Thread):
    """Polls VmHWM/VmRSS of the rank processes (`pids()` -> {rank: pid}) every `every` s; stops
    the run (`stop()`) when a rank's RSS passes `cap_kib` or the machine runs low on memory."""

    def __init__(self, pids: Callable[[], dict], stop: Callable[[str], None], cap_kib: Optional[int], floor_gib: float):
        super().__init__(daemon=True)
        self.pids, self.stop_run, self.cap_kib, self.floor_gib = pids, stop, cap_kib, floor_gib
        self.samples: list[tuple[float, int, int, float]] = []  # (time, rank, VmHWM KiB, CPU s)
        self.anon: dict[int, int] = {}  # the largest RssAnon (KiB) seen per rank: RSS without file pages
        self.reason: Optional[str] = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            now = time.time()
            for rank, pid in sorted(self.pids().items()):
                hwm, rss, cpu = proc_kib(pid, "VmHWM"), proc_kib(pid, "VmRSS"), proc_cpu_s(pid)
                if hwm is None or rss is None or cpu is None:
                    continue
                self.samples.append((now, rank, hwm, cpu))
                self.anon[rank] = max(self.anon.get(rank, 0), proc_kib(pid, "RssAnon") or 0)
                if self.reason is None and self.cap_kib is not None and rss > self.cap_kib:
                    self.reason = f"rank {rank} passed the cap ({rss / 2**20:.2f} GiB resident)"
                    self.stop_run(self.reason)
            if self.reason is None and mem_available_gib() < self.floor_gib:
                self.reason = f"machine MemAvailable under {self.floor_gib} GiB"
                self.stop_run(self.reason)

    def peak_gib(self, until: Optional[float] = None) -> dict[int, float]:
        """Each rank's VmHWM (GiB), as last read at or before `until`."""
        out: dict[int, float] = {}
        for t, rank, hwm, _ in self.samples:
            if until is None or t <= until:
                out[rank] = max(out.get(rank, 0.0), hwm / 2**20)
        return out

    def cpu_s(self, start: float, end: float) -> dict[int, float]:
        """Each rank's CPU seconds between two wall-clock times (the samples nearest before them)."""
        at: dict[int, list[float]] = {}
        for t, rank, _, cpu in self.samples:
            marks = at.setdefault(rank, [float("nan"), float("nan")])
            if t <= start:
                marks[0] = cpu
            if t <= end:
                marks[1] = cpu
        return {rank: b - a for rank, (a, b) in at.items() if not math.isnan(a - b)}


def placement_pids(run_dir: Path) -> Callable[[], dict]:
    def pids() -> dict:
        try:
            return {p["rank"]: p["pid"] for p in json.loads((run_dir / "placement.json").read_text())}
        except (OSError, ValueError, KeyError):
            return {}

    return pids


def pid_file_pids(out: Path, workers: int) -> Callable[[], dict]:
    def pids() -> dict:
        found = {}
        for r in range(workers):
            f = out.with_name(out.stem + f".rank{r}.pid")
            try:
                found[r] = int(f.read_text())
            except (OSError, ValueError):
                pass
        return found

    return pids


# ---------------------------------------------------------------------------------------------
# Runs


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONWARNINGS"] = "ignore"
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # NOTES-cpu.md: report() polling
    return env


def run_watched(cmd: list[str], log: Path, timeout: float, pids, cap_kib, floor_gib) -> tuple[int, float, RankWatch, float]:
    """Run `cmd` in its own session with its ranks watched. (exit code, launch time, watch, wall s)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO, start_new_session=True)

        def stop(reason: str) -> None:
            print(f"  stopping the run: {reason}", flush=True)
            for pid in list(pids().values()):  # the ranks first: they hold the memory
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except OSError:
                pass

        watch = RankWatch(pids, stop, cap_kib, floor_gib)
        watch.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(f"timeout {timeout:.0f} s")
            code = proc.wait(timeout=60)
        watch.done.set()
        watch.join()
        if watch.reason is not None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return code, t0, watch, time.time() - t0


def error_line(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    for line in reversed(lines):
        if line.startswith("llmtrain: error:"):
            return line
    return next((x for x in reversed(lines) if "Error" in x), lines[-1] if lines else "no output")


def llmtrain_cli() -> list[str]:
    script = Path(sys.executable).parent / "llmtrain"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llmtrain.cli"]


def lr_for(mode: str, args) -> float:
    return args.lr_lora if mode == "lora" else args.lr_full


def llmtrain_overrides(args, base: Path, mode: str, micro: int, gbs: int, total: int, run_dir: Path,
                       quantize: Optional[str] = None) -> list[str]:  # fmt: skip
    """CONFIG and overrides of an `llmtrain sft` run (the same for the Ray runs and the profile)."""
    out = [
        str(CONFIGS[mode]),
        *data_overrides(args, base),
        f"run.dir={run_dir}",
        f"train.max_steps={total}",
        f"train.global_batch_size={gbs}",
        f"train.micro_batch_size={micro}",
        f"train.lr={lr_for(mode, args)}",
        "train.warmup_steps=0",
        "train.weight_decay=0.0",
        "train.precision=fp32",
        "train.log_every=1",
        "train.val_every=0",
        "checkpoint.every=0",
        f"cluster.num_workers={args.workers}",
        "cluster.use_gpu=false",
        "zero.stage=2",
    ]
    if mode == "lora":
        out += ["lora.r=16", "lora.alpha=32", "lora.dropout=0.0", f"lora.target_modules=[{', '.join(TARGETS)}]"]
        if quantize:
            out.append(f"lora.quantize={quantize}")
    else:
        out += ["lora=null"]
    return out


def run_llmtrain(args, base: Path, cache: Path, mode: str, micro: int, gbs: int, warmup: int, steps: int, tag: str,
                 quantize: Optional[str] = None, cap_kib: Optional[int] = None) -> dict:  # fmt: skip
    from llmtrain.metrics import read_metrics

    run_dir = args.work / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    total = warmup + steps
    cmd = llmtrain_cli() + ["sft", *llmtrain_overrides(args, base, mode, micro, gbs, total, run_dir, quantize)]
    log = args.work / "logs" / f"{tag}.log"
    code, t0, watch, wall = run_watched(cmd, log, args.timeout, placement_pids(run_dir), cap_kib, args.min_available_gib)
    shown = ["llmtrain"] + [shorter(c) for c in cmd[len(llmtrain_cli()) :]]
    if code != 0 or watch.reason:
        return {"error": watch.reason or error_line(log), "exit": code, "wall_s": wall, "command": shown, "log": str(log),
                "peak_rss_gib": watch.peak_gib()}  # fmt: skip
    entries = read_metrics(run_dir)
    train = [e for e in entries if "loss" in e]
    startup = next(e for e in entries if "command_to_first_step_s" in e)
    pointer = json.loads((run_dir / "sft-data.json").read_text())
    if Path(pointer["cache"]) != cache:
        raise RuntimeError(f"{tag}: llmtrain used cache {pointer['cache']}, not the prepared {cache}: the rows differ")
    last_step_t = max(e["time"] for e in train)
    peak = watch.peak_gib(until=last_step_t)
    first_step_began = startup["time"] - startup["startup_s"].get("first_step", 0.0)
    tokens_per_step = gbs * args.seq_len
    result = {
        "name": f"llmtrain sft ({mode}{', ' + quantize if quantize else ''})",
        "micro_batch": micro,
        "global_batch": gbs,
        "tokens_per_step": tokens_per_step,
        "losses": [e["loss"] for e in train],
        "supervised_tokens": [e["supervised_tokens"] for e in train],
        "peak_rss_gib": peak,
        "peak_rss_gib_whole_run": watch.peak_gib(),
        "peak_rss_before_first_step_gib": watch.peak_gib(until=first_step_began),
        "peak_rss_anon_gib_polled": {r: v / 2**20 for r, v in watch.anon.items()},
        "rank0_memory_gb_metrics": max(e.get("memory_gb", 0) for e in train),
        "first_step_s": startup["time"] - t0,
        "command_to_first_step_s": startup["command_to_first_step_s"],
        "startup_s": startup["startup_s"],
        "wall_s": wall,
        "command": shown,
        "log": str(log),
    }
    measured = [e for e in train if e["step"] > warmup]
    if steps and len(measured) == steps and warmup >= 1:
        seconds = sum(tokens_per_step / e["tokens_per_s"] for e in measured)
        result.update(tokens_per_s=steps * tokens_per_step / seconds, step_s=seconds / steps, measured_steps=steps)
        window = (next(e["time"] for e in train if e["step"] == warmup), measured[-1]["time"])
        result.update(cpu_use(watch, *window, steps * tokens_per_step))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final checkpoint is not needed
    return result


def run_hf(args, base: Path, rows: Path, mode: str, micro: int, gbs: int, warmup: int, steps: int, tag: str,
           cap_kib: Optional[int] = None, profile_step: int = 0) -> dict:  # fmt: skip
    out = args.work / "results" / f"{tag}.json"
    out.unlink(missing_ok=True)
    for r in range(args.workers):
        out.with_name(out.stem + f".rank{r}.pid").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.workers}",
           str(BASELINES / "hf_trainer_sft.py"), "--base", str(base), "--rows", str(rows), "--out", str(out),
           "--global-batch", str(gbs), "--micro-batch", str(micro), "--warmup-steps", str(warmup), "--steps", str(steps),
           "--lr", str(lr_for(mode, args)), "--zero-stage", "2", "--lora-r", "16" if mode == "lora" else "0",
           "--lora-alpha", "32", "--profile-step", str(profile_step)]  # fmt: skip
    log = args.work / "logs" / f"{tag}.log"
    code, t0, watch, wall = run_watched(cmd, log, args.timeout, pid_file_pids(out, args.workers), cap_kib, args.min_available_gib)
    shown = ["torchrun ... hf_trainer_sft.py"] + [shorter(c) for c in cmd[6:]]
    if code != 0 or watch.reason or not out.is_file():
        return {"error": watch.reason or error_line(log), "exit": code, "wall_s": wall, "command": shown, "log": str(log),
                "peak_rss_gib": watch.peak_gib()}  # fmt: skip
    r = json.loads(out.read_text())
    ends = r["step_end_times"]
    tokens_per_step = gbs * args.seq_len
    result = {
        "name": r["name"],
        "micro_batch": micro,
        "global_batch": gbs,
        "tokens_per_step": tokens_per_step,
        "losses": r["losses"],
        "supervised_tokens": r["supervised_tokens"],
        "peak_rss_gib": {x["rank"]: x["end_kib"] / 2**20 for x in r["ranks"]},
        "peak_rss_gib_polled": watch.peak_gib(),
        "peak_rss_before_first_step_gib": {x["rank"]: x["after_load_kib"] / 2**20 for x in r["ranks"]},
        "peak_rss_anon_gib_polled": {r: v / 2**20 for r, v in watch.anon.items()},
        "first_step_s": ends[0] - t0,
        "trainable_params": r["trainable_params"],
        "wall_s": wall,
        "command": shown,
        "log": str(log),
    }
    if steps and len(ends) >= warmup + steps and warmup >= 1:
        seconds = ends[warmup + steps - 1] - ends[warmup - 1]
        result.update(tokens_per_s=steps * tokens_per_step / seconds, step_s=seconds / steps, measured_steps=steps)
        result.update(cpu_use(watch, ends[warmup - 1], ends[warmup + steps - 1], steps * tokens_per_step))
    return result


def cpu_use(watch: RankWatch, start: float, end: float, tokens: int) -> dict:
    """The ranks' CPU seconds over the measured window, and tokens per CPU second of the busiest
    rank: what tokens/s would be with a core per rank, so it holds when others share the CPUs."""
    cpu = watch.cpu_s(start, end)
    if not cpu or end <= start:
        return {}
    return {"rank_cpu_s": cpu, "cpu_share": max(cpu.values()) / (end - start), "tokens_per_cpu_s": tokens / max(cpu.values())}


def run_part(args, part: str, base: Path, cache: Path, rows: Path, micro: int, gbs: int, warmup: int, steps: int,
             tag: str, cap_kib: Optional[int] = None) -> dict:  # fmt: skip
    side, mode = part.split("-")
    if side == "b":
        return run_hf(args, base, rows, mode, micro, gbs, warmup, steps, tag, cap_kib)
    quantize = "nf4" if side == "c" else None
    return run_llmtrain(args, base, cache, mode, micro, gbs, warmup, steps, tag, quantize, cap_kib)


def shorter(arg: str) -> str:
    return arg.replace(str(REPO) + os.sep, "")


# ---------------------------------------------------------------------------------------------
# Largest micro-batch under the cap


def bisect_micro_batch(args, part: str, base: Path, cache: Path, rows: Path, known: Optional[dict]) -> dict:
    """Largest m (<= --bisect-max) whose one optimizer step at micro-batch m (global m x workers)
    keeps every rank's peak RSS under --cap-gib: doubling, then bisection. Each probe is a new
    command (start-up + one step); one passing the cap is stopped there."""
    cap = args.cap_gib
    probes: dict[int, dict] = {}

    def fits(m: int) -> bool:
        if m == args.micro_batch and known is not None and "error" not in known:
            peak = max(known["peak_rss_gib"].values())
            probes[m] = {"peak_gib": peak, "fits": peak <= cap, "from": "main run"}
            return peak <= cap
        print(f"  bisect {part}: probing micro-batch {m} ...", flush=True)
        r = run_part(args, part, base, cache, rows, m, m * args.workers, 0, 1, f"{part}-probe-m{m}", int(cap * 2**20))
        peak = max(r.get("peak_rss_gib", {}).values(), default=float("nan"))
        ok = "error" not in r and peak <= cap
        probes[m] = {"peak_gib": peak, "fits": ok, "error": r.get("error"), "wall_s": r["wall_s"]}
        print(f"    m={m}: {'fits' if ok else 'does not fit'} (peak {peak:.2f} GiB{'; ' + r['error'] if 'error' in r else ''})")
        if "error" in r and "passed the cap" not in r["error"]:
            raise Inconclusive(f"m={m}: {r['error']}")
        return ok

    lo, hi = 0, None  # lo fits (0: nothing known), hi does not
    m = 1
    try:
        while m <= args.bisect_max:
            if fits(m):
                lo, m = m, m * 2
            else:
                hi = m
                break
        if hi is None:
            return {"largest": lo, "bounded_by": f"--bisect-max {args.bisect_max}", "probes": probes}
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
    except Inconclusive as err:  # e.g. the machine ran short of memory: not the cap's verdict
        return {"largest": lo, "bounded_by": f"inconclusive above {lo} ({err})", "probes": probes, "inconclusive": True}
    return {"largest": lo, "bounded_by": f"cap {cap} GiB", "probes": probes}


class Inconclusive(Exception):
    """A probe that failed for another reason than the cap."""


# ---------------------------------------------------------------------------------------------
# Profile: one step of each side under torch.profiler (rank 0)

CATEGORIES = (  # (category, substrings of operator names), first match wins
    ("matmul (mm/addmm/bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention (sdpa)", ("attention", "sdpa")),
    ("softmax / cross-entropy", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("communication (gloo)", ("allreduce", "all_reduce", "gloo", "record_param_comms", "broadcast", "reduce_scatter", "allgather")),
    ("copies / casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat", "aten::index")),
    ("optimizer (adam foreach)", ("_foreach", "addcdiv", "addcmul", "lerp")),
    ("elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::sigmoid", "aten::div", "aten::sub", "aten::pow", "aten::rsqrt",
                     "aten::mean", "aten::sum", "aten::fill_", "aten::zero_", "aten::neg", "aten::exp", "aten::where", "aten::threshold")),
)  # fmt: skip


def categorise(profile: Path) -> dict:
    data = json.loads(profile.read_text())
    out = {name: 0.0 for name, _ in CATEGORIES}
    out["other"] = 0.0
    for op in data["ops"]:
        name = op["name"]
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        out[cat] += op["self_ms"]
    top = [(o["name"], o["self_ms"], o["calls"]) for o in data["ops"][:8]]
    return {"wall_ms": data["wall_ms"], "self_ms": out, "top": top}


def run_profiles(args, base: Path, rows: Path, parts: list[str]) -> dict:
    """Step 2 of a 2-step run of each (a-*, b-*) part at --micro-batch (global --global-batch), rank 0."""
    results = {}
    for part in parts:
        side, mode = part.split("-")
        print(f"profiling ({part}) ...", flush=True)
        if side == "b":
            r = run_hf(args, base, rows, mode, args.micro_batch, args.global_batch, 1, 1, f"profile-b-{mode}", profile_step=2)
            prof = args.work / "results" / f"profile-b-{mode}-profile.json"
            results[part] = categorise(prof) if prof.is_file() else {"error": r.get("error", "no profile written")}
            continue
        out = args.work / "results" / f"profile-a-{mode}"
        run_dir = args.work / "runs" / f"profile-a-{mode}"
        shutil.rmtree(run_dir, ignore_errors=True)
        out.with_suffix(".json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.workers}",
               str(BASELINES / "llmtrain_profile.py"), "--profile-step", "2", "--out", str(out),
               *llmtrain_overrides(args, base, mode, args.micro_batch, args.global_batch, 2, run_dir), "--task", "sft"]  # fmt: skip
        log = args.work / "logs" / f"profile-a-{mode}.log"
        _, _, watch, _ = run_watched(cmd, log, args.timeout, dict, None, args.min_available_gib)
        if out.with_suffix(".json").is_file():
            results[part] = categorise(out.with_suffix(".json"))
        else:
            results[part] = {"error": watch.reason or error_line(log)}
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return results


def print_profiles(profiles: dict) -> None:
    print()
    print("Profile of one optimizer step, rank 0 (torch.profiler self CPU ms by operator category; wall ms of the step):")
    keys = [k for k in ("a-lora", "b-lora", "a-full", "b-full") if k in profiles and "error" not in profiles[k]]
    for k in (k for k in profiles if "error" in profiles[k]):
        print(f"  ({k}) profile failed: {profiles[k]['error']}")
    if not keys:
        return
    cats = [c for c, _ in CATEGORIES] + ["other"]
    print(f"  {'category':<30}" + "".join(f"{'(' + k + ')':>12}" for k in keys))
    for c in cats:
        print(f"  {c:<30}" + "".join(f"{profiles[k]['self_ms'][c]:>12.0f}" for k in keys))
    print(f"  {'sum of self times':<30}" + "".join(f"{sum(profiles[k]['self_ms'].values()):>12.0f}" for k in keys))
    print(f"  {'step wall':<30}" + "".join(f"{profiles[k]['wall_ms']:>12.0f}" for k in keys))
    for k in keys:
        top = "; ".join(f"{n} {ms:.0f} ms x{calls}" for n, ms, calls in profiles[k]["top"][:5])
        print(f"  top ({k}): {top}")


# ---------------------------------------------------------------------------------------------
# Report


def fmt_peak(r: dict) -> str:
    peaks = r.get("peak_rss_gib") or {}
    return "/".join(f"{peaks[k]:.2f}" for k in sorted(peaks)) if peaks else "-"


def print_report(results: dict, bisect: dict, args, checks: list) -> None:
    shape = "tiny (2 layers, hidden 64)" if args.tiny else "Qwen2.5-0.5B shape (494M params)"
    print()
    print(
        f"Fine-tuning throughput: {shape}, vocab 151,936, seq {args.seq_len} packed, global batch {args.global_batch} "
        f"(micro {args.micro_batch}), fp32, ZeRO-2 on {args.workers} processes; {args.global_batch * args.seq_len} "
        f"tokens/step; warm-up {args.warmup_steps} step(s) skipped, {args.steps} measured"
    )
    head = (
        f"{'run':<40}{'tokens/s':>9}{'s/step':>8}{'CPU use':>8}{'tok/CPU-s':>10}{'peak RSS GiB r0/r1':>20}"
        f"{'1st step s':>11}{'loss first->last':>19}{'sup tok/step':>13}{'wall s':>8}"
    )
    print(head)
    labels = {
        "a-lora": "(a) llmtrain sft, LoRA r=16",
        "b-lora": "(b) HF Trainer + peft LoRA r=16",
        "c-lora": "(c) llmtrain sft, LoRA r=16, nf4 base",
        "a-full": "(a) llmtrain sft, full",
        "b-full": "(b) HF Trainer, full",
    }
    for part, label in labels.items():
        r = results.get(part)
        if r is None:
            continue
        if "error" in r:
            what = "not available" if part == "c-lora" else "FAILED"
            print(f"{label:<40}{what}: {r['error']}")
            continue
        loss = f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}" if r["losses"] else "-"
        sup = r["supervised_tokens"]
        sup_text = f"{sum(sup) / len(sup):.0f}" if sup else "-"
        print(
            f"{label:<40}{r.get('tokens_per_s', float('nan')):>9.1f}{r.get('step_s', float('nan')):>8.1f}"
            f"{r.get('cpu_share', float('nan')):>8.2f}{r.get('tokens_per_cpu_s', float('nan')):>10.1f}{fmt_peak(r):>20}"
            f"{r['first_step_s']:>11.1f}{loss:>19}{sup_text:>13}{r['wall_s']:>8.0f}"
        )
    print(
        "CPU use: CPU seconds of the busiest rank / wall seconds over the measured steps (1.0 = a core of its own); "
        "tok/CPU-s: tokens / those CPU seconds (tokens/s with a core per rank)."
    )
    print()
    print(f"{'memory detail (GiB, rank 0/1)':<40}{'peak RSS':>14}{'peak before 1st step':>22}{'largest RssAnon':>17}")
    for part, label in labels.items():
        r = results.get(part)
        if r is None or "error" in r:
            continue

        def pair(key: str) -> str:
            v = r.get(key) or {}
            return "/".join(f"{v[k]:.2f}" for k in sorted(v)) if v else "-"

        print(
            f"{label:<40}{pair('peak_rss_gib'):>14}{pair('peak_rss_before_first_step_gib'):>22}"
            f"{pair('peak_rss_anon_gib_polled'):>17}"
        )
    print(
        "peak RSS: VmHWM at the last training step (llmtrain: polled; HF: the rank's own); before 1st step: after "
        "loading the model and building the engine; RssAnon: resident memory without file pages (mmap'd safetensors), "
        "largest polled value."
    )
    if bisect:
        print()
        print(f"Largest micro-batch with every rank's one-step peak RSS <= {args.cap_gib} GiB (probes: m -> peak GiB):")
        for part, b in bisect.items():
            probes = ", ".join(f"{m}->{p['peak_gib']:.2f}{'' if p['fits'] else ' X'}" for m, p in sorted(b["probes"].items()))
            print(f"  {labels[part]:<42} {b['largest']:>3}   ({b['bounded_by']}; {probes})")
    print()
    for line in checks:
        print(line)
    for part in ("a-lora", "a-full", "c-lora"):
        r = results.get(part)
        if r and "error" not in r:
            phases = ", ".join(f"{k} {v:.1f}" for k, v in r["startup_s"].items())
            print(
                f"{labels[part]}: command -> first step {r['first_step_s']:.1f} s (llmtrain's own clock {r['command_to_first_step_s']:.1f} s: {phases})"
            )
    a = results.get("a-lora") or results.get("a-full")
    if a:
        print(f"(a) command: {' '.join(a['command'])}")


def target_checks(results: dict, bisect: dict) -> tuple[list[str], list[dict]]:
    lines, rows = [], []

    def check(name: str, value: float, op: str, target: float) -> None:
        ok = value >= target if op == ">=" else value <= target
        rows.append({"check": name, "value": value, "target": f"{op} {target}", "met": ok})
        lines.append(f"{name:<62}{value:7.2f}x   target {op} {target}: {'met' if ok else 'NOT met'}")

    for mode in ("lora", "full"):
        a, b = results.get(f"a-{mode}"), results.get(f"b-{mode}")
        if not a or not b or "error" in a or "error" in b:
            continue
        if "tokens_per_s" in a and "tokens_per_s" in b:
            check(f"{mode}: tokens/s (a)/(b)", a["tokens_per_s"] / b["tokens_per_s"], ">=", 1.3)
        if "tokens_per_cpu_s" in a and "tokens_per_cpu_s" in b:
            check(
                f"{mode}: tokens per CPU second (a)/(b) (shared-CPU check)",
                a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"],
                ">=",
                1.3,
            )
            ca, cb = a["cpu_share"], b["cpu_share"]
            if abs(ca - cb) > 0.15 * max(ca, cb):
                lines.append(
                    f"  ^ {mode}: the two runs got different CPU shares ((a) {ca:.2f}, (b) {cb:.2f} of a core per rank): "
                    "others were using the CPUs, so the tokens/s ratio measures them; trust the per-CPU-second one"
                )
        pa, pb = max(a["peak_rss_gib"].values()), max(b["peak_rss_gib"].values())
        check(f"{mode}: peak RSS (a)/(b), max over ranks, micro {a['micro_batch']}", pa / pb, "<=", 0.6)
    for mode in ("lora", "full"):
        ba, bb = bisect.get(f"a-{mode}"), bisect.get(f"b-{mode}")
        if ba and bb and not ba.get("inconclusive") and not bb.get("inconclusive"):
            if ba["largest"] == bb["largest"] == 0:
                lines.append(
                    f"{mode}: largest micro-batch under the cap: neither side fits micro-batch 1   target >= 2x: NOT met"
                )
            elif bb["largest"] == 0:
                lines.append(f"{mode}: largest micro-batch under the cap: (a) {ba['largest']}, (b) none fits   target >= 2x: "
                             f"{'met' if ba['largest'] >= 1 else 'NOT met'}")  # fmt: skip
            else:
                check(f"{mode}: largest micro-batch under the cap (a)/(b)", ba["largest"] / bb["largest"], ">=", 2.0)
    c, b = results.get("c-lora"), results.get("b-lora")
    if c and b and "error" not in c and "error" not in b:
        if "tokens_per_s" in c and "tokens_per_s" in b:
            lines.append(f"{'lora: tokens/s (c)/(b) (no target)':<62}{c['tokens_per_s'] / b['tokens_per_s']:7.2f}x")
        lines.append(
            f"{'lora: peak RSS (c)/(b) (no target)':<62}{max(c['peak_rss_gib'].values()) / max(b['peak_rss_gib'].values()):7.2f}x"
        )
    for mode in ("lora", "full"):
        a, b = results.get(f"a-{mode}"), results.get(f"b-{mode}")
        if a and b and "error" not in a and "error" not in b:
            same = a["supervised_tokens"] == b["supervised_tokens"]
            lines.append(f"{mode}: supervised tokens per step (a) == (b): {'yes' if same else 'NO'} ({a['supervised_tokens']})")
    return lines, rows


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="base model, data cache, runs, logs, results")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--max-examples", type=int, default=2000, help="training examples tokenized (enough rows for the runs)")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64: the plumbing in a few minutes")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=1, help="optimizer steps left out of tokens/s")
    p.add_argument("--steps", type=int, default=2, help="measured optimizer steps after the warm-up")
    p.add_argument("--lr-lora", type=float, default=2e-3)
    p.add_argument("--lr-full", type=float, default=2e-4)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--bisect", action="store_true", help="also the largest micro-batch under --cap-gib (a and b parts)")
    p.add_argument("--cap-gib", type=float, default=8.0, help="per-rank peak RSS cap for --bisect")
    p.add_argument("--bisect-max", type=int, default=16, help="largest micro-batch a bisection tries")
    p.add_argument("--profile", action="store_true", help="also one step of each side (a, b) under torch.profiler")
    p.add_argument("--skip-runs", action="store_true", help="no throughput runs: only --profile / --bisect (of --parts)")
    p.add_argument("--min-available-gib", type=float, default=1.0, help="stop a run when the machine has less available")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.warmup_steps < 1 or args.steps < 1:
        p.error("--warmup-steps and --steps must be >= 1")
    if args.global_batch % (args.micro_batch * args.workers):
        p.error(f"--global-batch must be a multiple of micro-batch x workers = {args.micro_batch * args.workers}")
    args.work = (args.work / ("tiny" if args.tiny else "qwen25-0.5b")).resolve()
    args.data = args.data.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    ignore = args.work.parents[1] / ".gitignore"
    if args.work.parents[1].name == ".cache" and not ignore.exists():
        ignore.write_text("*\n")

    started = time.time()
    print(
        f"load average at start: {load_average()} ({os.cpu_count()} CPUs); MemAvailable {mem_available_gib():.1f} GiB", flush=True
    )
    base = build_base(args.work / "base", args.tiny)
    cache, rows = prepare_rows(args, base)
    import numpy as np

    n_rows = len(np.load(rows / "input_ids.npy", mmap_mode="r"))
    need = max((args.warmup_steps + args.steps) * args.global_batch, args.bisect_max * args.workers if args.bisect else 0)
    if need > n_rows:
        p.error(f"the runs need {need} rows but the data gives {n_rows}: raise --max-examples")
    results: dict[str, dict] = {}
    for part in [] if args.skip_runs else parts:
        print(f"running ({part}) ...", flush=True)
        r = run_part(args, part, base, cache, rows, args.micro_batch, args.global_batch, args.warmup_steps, args.steps, part)
        results[part] = r
        if "error" in r:
            print(f"  ({part}) {'not available' if part == 'c-lora' else 'FAILED'}: {r['error']}  [log {r['log']}]", flush=True)
        else:
            print(
                f"  ({part}) {r.get('tokens_per_s', float('nan')):.1f} tokens/s, peak RSS {fmt_peak(r)} GiB  [wall {r['wall_s']:.0f} s]",
                flush=True,
            )
    bisect: dict[str, dict] = {}
    if args.bisect:
        for part in (x for x in parts if x[0] in "ab"):
            bisect[part] = bisect_micro_batch(args, part, base, cache, rows, results.get(part))
    profiles: dict[str, dict] = {}
    if args.profile:
        profiles = run_profiles(args, base, rows, [x for x in parts if x[0] in "ab"])
    lines, checks = target_checks(results, bisect)
    print_report(results, bisect, args, lines)
    if profiles:
        print_profiles(profiles)
    total = time.time() - started
    print(f"load average at end: {load_average()}; total {total:.0f} s; logs in {args.work / 'logs'}")
    summary = args.work / "results" / f"summary-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "bisect": bisect, "checks": checks, "profiles": profiles,
             "total_s": total, "cache": str(cache), "rows": str(rows)},
            indent=1,
        )
    )  # fmt: skip
    latest = summary.with_name("summary.json")
    latest.unlink(missing_ok=True)
    latest.symlink_to(summary.name)
    print(f"numbers: {summary} (also results/summary.json, the latest)")
    failed = [x for x in results if x != "c-lora" and "error" in results[x]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
