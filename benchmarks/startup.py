"""Start-up of a real-size base: every phase from the command to the first optimizer step.

    python benchmarks/startup.py                 # build the 0.5B base once, then measure
    python benchmarks/startup.py --skip-tiny     # without train_throughput's tiny start-up

A random-initialised Hugging Face directory at the published Qwen2.5-0.5B shape (hidden 896,
24 layers, 14 heads / 2 KV heads, intermediate 4864, vocab 151,936, tied embeddings, qkv bias;
494M parameters, stored bf16 like the released checkpoint) is written once under
benchmarks/.cache/startup/ (git-ignored). The tokenizer is stories260K's 512-token one (ids
fit the 151,936-row embedding; only the data path's token count depends on it, not the model
load being measured). Then:

1. llmtrain's `build_model` and `AutoModelForCausalLM.from_pretrained` of that directory (fp32,
   what llmtrain trains in on CPU; and dtype="auto", bf16 as stored), interleaved in one fresh
   process: the model-load reference.
2. `llmtrain sft` LoRA r=8 on every projection, 2 Ray workers, ZeRO-2, chat pairs at seq 384,
   global batch 4, once with the initial validation and once with `train.val_at_start=false`.
3. (optional) benchmarks/train_throughput.py part (a)'s tiny start-up.

Each phase (RUN_DIR/metrics.jsonl `startup_s`) is printed with the targets of issue 12
section 2, met or NOT met. The tokenized chat data is cached under the work directory
(`data.cache_dir`), so only the very first job's driver phase includes tokenizing. Each job
is interrupted once its first step is recorded. Timings on a shared 2-core machine are noisy:
compare phases, and rerun for a range.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / ".cache" / "startup"
TOKENIZER = REPO.parent / "shared" / "checkpoints" / "stories260K"
CHAT = REPO.parent / "shared" / "data" / "sft" / "chatterbot_english_pairs.json"
QWEN25_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
TARGETS = {"driver": 5.0, "load_ratio": 1.2, "with_val": 60.0, "without_val": 40.0, "tiny": 20.0}


def build_base(work: Path) -> Path:
    """The 0.5B Hugging Face directory, built once (about a minute) and reused."""
    base = work / "qwen2.5-0.5b-shape"
    if (base / "done").is_file():
        return base
    work.mkdir(parents=True, exist_ok=True)
    ignore = work.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    print(f"writing a random 0.5B Qwen2-shape model to {base} (once) ...", flush=True)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shutil.rmtree(base, ignore_errors=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(torch.bfloat16)
    model.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, base / name)
    (base / "done").write_text("ok\n")
    return base


LOAD_CODE = """
import json, statistics, sys, time, torch, deepspeed, transformers
import transformers.models.qwen2.modeling_qwen2
from transformers import AutoModelForCausalLM
from llmtrain.config import load_config
from llmtrain.engine import build_model
from llmtrain.model.hf import iter_model_tensors, load_hf_config
base, config, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(config, [f"model.from={base}"])
mc = load_hf_config(base)
open(base + "/model.safetensors", "rb").read()  # the file in the page cache for both
ways = {
    "llmtrain": lambda: build_model(mc, cfg, {}, lambda: iter_model_tensors(base, mc)),
    "fp32": lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
    "auto": lambda: AutoModelForCausalLM.from_pretrained(base, dtype="auto"),
}
times = {name: [] for name in ways}
for _ in range(rounds):  # interleaved: the shared machine's load changes under all alike
    for name, load in ways.items():
        t = time.perf_counter()
        model = load()
        times[name].append(time.perf_counter() - t)
        del model
print(json.dumps({name: [round(x, 2) for x in xs] for name, xs in times.items()}))
"""


def time_model_loads(base: Path, rounds: int = 3) -> dict:
    """llmtrain's `build_model` (the ZeRO-2 path, with the base's weights) and
    `AutoModelForCausalLM.from_pretrained` (fp32, what llmtrain trains in on CPU; and
    dtype="auto", bf16 as stored, which leaves the tensors memory-mapped and converts nothing),
    interleaved `rounds` times in one fresh process with the file in the page cache (each call
    alone: transformers, the Qwen2 module and DeepSpeed imported first). {way: [seconds]}."""
    cmd = [sys.executable, "-c", LOAD_CODE, str(base), str(REPO / "configs" / "tiny-lora.yaml"), str(rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"model loads failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import os

    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return env


def run_job(base: Path, work: Path, name: str, extra: list[str], timeout: float) -> dict:
    """`llmtrain sft` until its first optimizer step is recorded, then interrupted (what follows,
    the final validation and checkpoint, is not start-up). Returns RUN_DIR's start-up entry."""
    import os
    import signal

    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        str(Path(sys.executable).parent / "llmtrain"),
        "sft",
        str(REPO / "configs" / "tiny-lora.yaml"),
        f"model.from={base}",
        f"data.path={CHAT}",
        f"data.cache_dir={work / 'sft-cache'}",  # tokenized once: the second job measures a cached driver
        "data.seq_len=384",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.max_steps=2",
        "train.val_every=0",
        "checkpoint.every=0",
        "cluster.num_workers=2",
        "zero.stage=2",
        f"run.dir={run_dir}",
        *extra,
    ]
    log = work / f"{name}.log"
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=REPO, start_new_session=True)
    entry = None
    try:
        while time.time() - start < timeout and proc.poll() is None:
            time.sleep(1)
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file():
                entry = next((json.loads(x) for x in metrics.read_text().splitlines() if "startup_s" in x), None)
                if entry is not None:
                    break
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the driver stops Ray on its way out
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of this job still running
        except ProcessLookupError:
            pass
    if entry is None:
        raise RuntimeError(f"{name}: no start-up entry in {run_dir}/metrics.jsonl; log {log}:\n{log.read_text()[-3000:]}")
    entry["command"] = "llmtrain " + " ".join(c.replace(str(REPO) + "/", "") for c in cmd[1:])
    return entry


def verdict(value: float, target: float) -> str:
    return f"{'met' if value <= target else 'NOT met'} (target <= {target:g})"


def print_job(title: str, entry: dict, target: float) -> None:
    print(
        f"\n{title}: command -> first optimizer step {entry['command_to_first_step_s']:.1f} s, {verdict(entry['command_to_first_step_s'], target)}"
    )
    for phase, seconds in entry["startup_s"].items():
        print(f"  {phase:<16}{seconds:>7.2f} s")
    print(f"  initial validation: {entry.get('val_micro_batches_at_start', '?')} micro-batches per rank")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--skip-tiny", action="store_true", help="leave out train_throughput.py part (a)'s tiny start-up")
    p.add_argument("--timeout", type=float, default=900, help="seconds per job")
    args = p.parse_args()
    work = args.work.resolve()
    base = build_base(work)
    results: dict = {"load_average_start": _load()}

    print("timing build_model and from_pretrained (interleaved) ...", flush=True)
    results["loads_s"] = time_model_loads(base)
    print("running llmtrain sft with the initial validation ...", flush=True)
    results["with_val"] = run_job(base, work, "with-val", [], args.timeout)
    print("running llmtrain sft with train.val_at_start=false ...", flush=True)
    results["without_val"] = run_job(base, work, "without-val", ["train.val_at_start=false"], args.timeout)
    if not args.skip_tiny:
        print("running train_throughput.py part (a) (tiny start-up) ...", flush=True)
        results["tiny"] = tiny_startup(args.timeout)
    results["load_average_end"] = _load()

    loads = {name: statistics.median(xs) for name, xs in results["loads_s"].items()}
    ref = loads["fp32"]
    print(f"\nload average {results['load_average_start']} at start, {results['load_average_end']} at end (2 cores shared)")
    print(
        f"model load, median of {len(results['loads_s']['fp32'])} interleaved: from_pretrained fp32 {ref:.2f} s "
        f"{results['loads_s']['fp32']}, dtype=auto {loads['auto']:.2f} s {results['loads_s']['auto']}"
    )
    ratio = loads["llmtrain"] / ref
    print(
        f"llmtrain build_model {loads['llmtrain']:.2f} s {results['loads_s']['llmtrain']} = {ratio:.2f}x "
        f"from_pretrained fp32, {verdict(ratio, TARGETS['load_ratio'])}"
    )
    for key, title, target in (
        ("with_val", "with the initial validation", TARGETS["with_val"]),
        ("without_val", "train.val_at_start=false", TARGETS["without_val"]),
    ):
        entry = results[key]
        print_job(title, entry, target)
        print(f"  driver {verdict(entry['startup_s']['driver'], TARGETS['driver'])}")
        model_ratio = entry["startup_s"]["model"] / ref  # built and loaded; LoRA is the next phase, "trainable"
        print(
            f"  model phase (build + load, 2 ranks at once) = {model_ratio:.2f}x from_pretrained, {verdict(model_ratio, TARGETS['load_ratio'])}"
        )
        print(f"  {entry['command']}")
    if "tiny" in results:
        tiny = results["tiny"]
        print_job("train_throughput.py part (a), tiny", tiny, TARGETS["tiny"])
    out = work / "results.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults: {out}")
    return 0


def tiny_startup(timeout: float) -> dict:
    """benchmarks/train_throughput.py part (a) (`llmtrain pretrain`, the tiny preset), its start-up."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_throughput as tt

    args = argparse.Namespace(
        work=tt.DEFAULT_WORK,
        zero_stage=2,
        warmup_steps=1,
        steps=1,
        global_batch=16,
        micro_batch=4,
        lr=3e-3,
        lr_warmup=20,
        workers=2,
        timeout=timeout,
    )
    prepared, _ = tt.prepare_data(tt.DEFAULT_WORK, tt.DEFAULT_CORPUS, 8000, 256)
    logs = tt.DEFAULT_WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    a = tt.run_llmtrain(args, prepared, logs)
    from llmtrain.metrics import read_metrics

    entry = next(e for e in read_metrics(a["run_dir"]) if "startup_s" in e)
    return {**entry, "command": " ".join(a["command"])}


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
