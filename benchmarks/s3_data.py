"""Training data in object storage against the same data on local disk, side by side in one run:
the loader with a warm shard cache, and a short training run (issue 9's targets).

    .venv/bin/python benchmarks/s3_data.py                        # about 3-5 minutes on 2 cores
    .venv/bin/python benchmarks/s3_data.py --json /tmp/s3.json    # also the numbers as JSON
    .venv/bin/python benchmarks/s3_data.py --parts loader         # only the loader (or: train)

Server: SeaweedFS `weed mini` on 127.0.0.1 (tests/s3_support.py, loaded by file path), a fresh
bucket, credentials only in this process's AWS_* environment (the server's `env()`; never
printed). Data: a tokenizer (vocab --vocab-size) and prepared shards at seq_len 256 and 2048 from
TinyStories + tinyshakespeare of ../shared/data/corpus, built once under --work and reused;
small shards (--shard-tokens) so a split has many objects. Each is uploaded with
`objstore.upload_dir` (manifest last).

(1) Loader. `TokenLoader(local dir)` (memory-mapped shards) against `TokenLoader(s3://...)`
    with the same layout and seed. The S3 loader's cache is warmed first: one step, then
    `wait_idle()` (the shuffled split is fetched whole), then one untimed pass of --loader-steps
    on both. Then --rounds rounds, each timing --loader-steps `next_step()` calls on local, then
    on S3; rows/s and tokens/s are the median over rounds, the ratio the median of the per-round
    ratios (S3 / local). Target: >= 0.9.
(2) Training. `python -m llmtrain.train configs/tiny-pretrain.yaml` under torchrun, 2 ranks on
    gloo, no Ray (tests/runtime_support.py's `torchrun`, as tests/test_s3_loader.py runs it),
    the tiny preset on the seq-256 data, --train-steps steps, train.log_every=1. tokens/s of a
    run = tokens of the steps after the first --skip-steps / their summed wall time, from
    RUN_DIR/metrics.jsonl (each entry's window is one step). --train-pairs pairs, each a local
    run then an S3 run: the first S3 run on a fresh cache directory (cold: the manifest, the
    tokenizer and the shards are fetched by the run itself, the shards while the first steps
    run, which are mostly the skipped ones, so its steady-state number holds little of the
    fetch; command -> first step, which holds the manifest and tokenizer fetch and the first
    shards, is printed beside it), the later ones on the cache it left (warm). The ratio is
    S3 / local per pair; the target (>= 0.95) is judged on the median over the pairs.

The CPU is shared on development machines: compare ratios from one run, and look at the load
average printed at the start and the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TESTS = REPO / "tests"
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "corpus"
DEFAULT_WORK = REPO / "benchmarks" / ".cache" / "s3_data"
CORPUS_FILES = ("tinystories_val_subset.txt", "tinyshakespeare.txt")
SEQ_LENS = (256, 2048)
TRAIN_SEQ_LEN = 256
LOADER_TARGET, TRAIN_TARGET = 0.9, 0.95


def load_test_module(name: str):
    """tests/NAME.py by file path: tests/ never goes on sys.path."""
    spec = importlib.util.spec_from_file_location(f"tests_{name}", TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Data: tokenizer + prepared shards, built once under --work


def prepare_data(work: Path, corpus: Path, vocab_size: int, shard_tokens: int) -> dict[int, Path]:
    """{seq_len: prepared dir}, built once under `work` and reused."""
    from llmtrain.data.prepare import prepare
    from llmtrain.data.tokenizer_train import train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    ignore = work.parent / ".gitignore"
    if work.parent.name == ".cache" and not ignore.exists():
        ignore.write_text("*\n")
    inputs = [str(corpus / name) for name in CORPUS_FILES]
    tokenizer = work / f"tokenizer-v{vocab_size}"
    if not (tokenizer / "tokenizer.model").is_file():
        print(f"training a {vocab_size}-token tokenizer on {', '.join(CORPUS_FILES)} (once) ...", flush=True)
        train_tokenizer(inputs, vocab_size, str(tokenizer))
    out = {}
    for seq_len in SEQ_LENS:
        data = work / f"prepared-v{vocab_size}-s{seq_len}-t{shard_tokens}"
        if not (data / "manifest.json").is_file():
            print(f"preparing seq_len {seq_len} shards (once) ...", flush=True)
            prepare(
                inputs, tokenizer=str(tokenizer), seq_len=seq_len, output=str(data), val_fraction=0.02, shard_tokens=shard_tokens
            )
        out[seq_len] = data
    return out


def shard_count(prepared: Path) -> int:
    manifest = json.loads((prepared / "manifest.json").read_text())
    return len(manifest["splits"]["train"]["shards"])


# ---------------------------------------------------------------------------------------------
# (1) Loader: local memory maps vs the warm S3 cache


def bench_loader(local_dir: Path, uri: str, cache_dir: Path, args) -> dict:
    from llmtrain.data.loader import TokenLoader

    kw = dict(micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum, seed=3)
    local = TokenLoader(local_dir, **kw)
    remote = TokenLoader(uri, cache_dir=cache_dir, **kw)
    seq_len = local.data[0].seq_len
    t = time.perf_counter()
    remote.next_step()
    remote.splits[0].cache.cache.wait_idle()  # the shuffled train split is now cached whole
    warm_s = time.perf_counter() - t
    for loader in (local, remote):  # one untimed pass each: page cache and code paths warm
        for _ in range(args.loader_steps):
            loader.next_step()
    rows = args.loader_steps * args.micro_batch_size * args.grad_accum
    times: dict[str, list[float]] = {"local": [], "s3": []}
    for _ in range(args.rounds):
        for name, loader in (("local", local), ("s3", remote)):
            t = time.perf_counter()
            for _ in range(args.loader_steps):
                loader.next_step()
            times[name].append(time.perf_counter() - t)
    ratios = [lt / st for lt, st in zip(times["local"], times["s3"])]
    rows_s = {name: rows / statistics.median(ts) for name, ts in times.items()}
    return {
        "seq_len": seq_len,
        "shards": len(remote.splits[0].shards),
        "warm_up_fetch_s": warm_s,
        "rows_per_s": rows_s,
        "tokens_per_s": {name: r * seq_len for name, r in rows_s.items()},
        "round_ratios": ratios,
        "ratio": statistics.median(ratios),
    }


# ---------------------------------------------------------------------------------------------
# (2) Training: torchrun, 2 ranks, tiny preset; tokens/s from metrics.jsonl


def train_run(rt, data: str, run_dir: Path, cache_dir: Path, args) -> dict:
    from llmtrain.metrics import read_metrics

    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"train.max_steps={args.train_steps}",
        "zero.stage=1",
        "train.val_batches=1",
        f"data.path={data}",
        f"data.cache_dir={cache_dir}",
        f"run.dir={run_dir}",
    ]
    t = time.perf_counter()
    rt.torchrun(2, overrides, timeout=600)
    wall = time.perf_counter() - t
    entries = read_metrics(run_dir)
    steps = [e for e in entries if "tokens_per_s" in e and e["step"] > args.skip_steps]
    tokens_per_step = args.global_batch_size * TRAIN_SEQ_LEN
    seconds = sum(tokens_per_step / e["tokens_per_s"] for e in steps)  # each window is one step
    first = next((e["command_to_first_step_s"] for e in entries if "command_to_first_step_s" in e), None)
    return {
        "tokens_per_s": tokens_per_step * len(steps) / seconds,
        "steps_timed": len(steps),
        "command_to_first_step_s": first,
        "wall_s": wall,
    }


def bench_train(rt, local_dir: Path, uri: str, root: Path, args) -> dict:
    """--train-pairs pairs (local, S3), run in that order; the first S3 run on a fresh cache
    directory (cold), the later ones on the cache it left (warm)."""
    cache = root / "train-cache"
    shutil.rmtree(cache, ignore_errors=True)
    pairs = []
    for i in range(args.train_pairs):
        pair = {"cache": "cold" if i == 0 else "warm"}
        for name, data in (("local", str(local_dir)), ("s3", uri)):
            print(
                f"  training run {i + 1}/{args.train_pairs} {name}{' (' + pair['cache'] + ' cache)' if name == 's3' else ''} ...",
                flush=True,
            )
            pair[name] = train_run(rt, data, root / "runs" / f"{i}-{name}", cache, args)
        pair["ratio"] = pair["s3"]["tokens_per_s"] / pair["local"]["tokens_per_s"]
        pairs.append(pair)
    return {"pairs": pairs, "ratio": statistics.median([p["ratio"] for p in pairs])}


# ---------------------------------------------------------------------------------------------


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio >= target else "NOT met"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="tokenizer and prepared shards (kept)")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--shard-tokens", type=int, default=32768, help="tokens per shard: many small objects")
    p.add_argument("--parts", default="loader,train", help="comma-separated: loader, train")
    p.add_argument("--micro-batch-size", type=int, default=16, help="loader part")
    p.add_argument("--grad-accum", type=int, default=2, help="loader part")
    p.add_argument("--loader-steps", type=int, default=100, help="next_step() calls per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--skip-steps", type=int, default=5, help="first optimizer steps left out of tokens/s")
    p.add_argument("--train-pairs", type=int, default=3, help="(local, S3) pairs: the first S3 run cold, the rest warm")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    parts = set(args.parts.split(","))
    s3 = load_test_module("s3_support")
    rt = load_test_module("runtime_support")
    args.global_batch_size = next(int(o.split("=")[1]) for o in rt.BASE if o.startswith("train.global_batch_size="))

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    datasets = prepare_data(args.work, args.corpus, args.vocab_size, args.shard_tokens)
    from llmtrain.data import objstore

    results: dict = {"loader": {}, "train": None}
    with tempfile.TemporaryDirectory(prefix="s3_data-") as tmp, s3.seaweedfs(Path(tmp) / "weed") as server:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[key]
        os.environ.update(server.env())  # the torchrun children inherit it (credentials never printed)
        bucket = server.make_bucket("s3-data-bench")
        print(f"SeaweedFS up in {server.started_s:.1f} s at {server.endpoint}, bucket {bucket}", flush=True)
        uris = {}
        for seq_len, local_dir in datasets.items():
            uris[seq_len] = f"s3://{bucket}/s{seq_len}"
            t = time.perf_counter()
            objstore.upload_dir(local_dir, uris[seq_len])
            print(
                f"uploaded seq_len {seq_len} ({shard_count(local_dir)} train shards) in {time.perf_counter() - t:.1f} s",
                flush=True,
            )
        if "loader" in parts:
            for seq_len in SEQ_LENS:
                print(f"loader, seq_len {seq_len} ...", flush=True)
                results["loader"][seq_len] = bench_loader(
                    datasets[seq_len], uris[seq_len], Path(tmp) / f"loader-cache-{seq_len}", args
                )
        if "train" in parts:
            print("training (torchrun, 2 ranks, tiny preset, seq_len 256) ...", flush=True)
            results["train"] = bench_train(rt, datasets[TRAIN_SEQ_LEN], uris[TRAIN_SEQ_LEN], Path(tmp), args)
    load_end = os.getloadavg()

    print()
    print(f"{'measurement':<44} {'local':>12} {'s3':>12} {'ratio':>7} {'target':>7}  verdict")
    for seq_len, r in results["loader"].items():
        label = f"loader rows/s, seq {seq_len}, warm cache"
        print(
            f"{label:<44} {r['rows_per_s']['local']:>12,.0f} {r['rows_per_s']['s3']:>12,.0f} {r['ratio']:>7.2f} {LOADER_TARGET:>7.2f}  {verdict(r['ratio'], LOADER_TARGET)}"
        )
        label = f"loader tokens/s, seq {seq_len}"
        print(f"{label:<44} {r['tokens_per_s']['local']:>12,.0f} {r['tokens_per_s']['s3']:>12,.0f}")
    if results["train"]:
        t = results["train"]
        for i, pair in enumerate(t["pairs"]):
            label = f"train tokens/s, pair {i + 1}, {pair['cache']} cache"
            print(
                f"{label:<44} {pair['local']['tokens_per_s']:>12,.0f} {pair['s3']['tokens_per_s']:>12,.0f} {pair['ratio']:>7.2f}"
            )
        label = "train tokens/s ratio, median of the pairs"
        print(f"{label:<44} {'':>12} {'':>12} {t['ratio']:>7.2f} {TRAIN_TARGET:>7.2f}  {verdict(t['ratio'], TRAIN_TARGET)}")
        for i, pair in enumerate(t["pairs"]):
            label = f"command -> first step s, pair {i + 1}"
            print(f"{label:<44} {pair['local']['command_to_first_step_s']:>12.1f} {pair['s3']['command_to_first_step_s']:>12.1f}")
        print(f"train: tokens/s over steps {args.skip_steps + 1}-{args.train_steps} of each run (metrics.jsonl)")
    for seq_len, r in results["loader"].items():
        rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
        print(
            f"loader seq {seq_len}: {r['shards']} shards, cache warmed in {r['warm_up_fetch_s']:.2f} s (untimed); round ratios {rounds}"
        )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load_end)}")
    if args.json:
        results["targets"] = {"loader": LOADER_TARGET, "train": TRAIN_TARGET}
        results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        results["load_average_end"] = load_end
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
