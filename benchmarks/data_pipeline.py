"""Data pipeline benchmark: `llmtrain prepare` vs the Hugging Face recipe, and loader read speed
vs a plain numpy memmap copy, measured side by side in one run.

    .venv/bin/python benchmarks/data_pipeline.py                      # ../shared/data/corpus
    .venv/bin/python benchmarks/data_pipeline.py --corpus DIR --seq-len 1024 --tokenizer tok/

(a) ours: `llmtrain.data.prepare.prepare` (clean, dedup, split, tokenize on all cores, pack,
    write Arrow shards + manifest).
(b) the recipe users would otherwise run (transformers' run_clm.py): `datasets.load_dataset
    ("text")`, batched `map` tokenization with `num_proc` = cores using the transformers
    tokenizer of the same tokenizer directory, then `group_texts` into blocks of seq_len.
Both start from the same files (page cache warmed first) with the same tokenizer and seq_len;
module imports are not timed; the recipe's cache directory is fresh, so nothing is reused.
Loader: tokens/s of `TokenLoader.next_step()` over shuffled batches (input ids, labels and
position ids as int64 tensors) vs gathering the same number of random rows from a numpy
memmap of the same token bytes (with the int64 cast). Targets: prepare >= 3x the recipe,
loader >= 50M tokens/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "corpus"


def warm(files: list[Path]) -> int:
    return sum(len(f.read_bytes()) for f in files)


def run_ours(files: list[Path], tokenizer: Path, seq_len: int, out: Path) -> tuple[float, int]:
    from llmtrain.data.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    prepare([str(f) for f in files], tokenizer, seq_len, out, force=True)
    seconds = time.perf_counter() - start
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    return seconds, int(manifest["totals"]["tokens"])


def run_recipe(files: list[Path], tokenizer: Path, seq_len: int, cache: Path, num_proc: int) -> tuple[float, int]:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    raw = datasets.load_dataset("text", data_files={"train": [str(f) for f in files]}, cache_dir=str(cache))["train"]

    def tokenize(batch):
        return tok(batch["text"])

    tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(concatenated["input_ids"]) // seq_len) * seq_len
        result = {k: [t[i : i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    seconds = time.perf_counter() - start
    return seconds, len(grouped) * seq_len


def loader_speed(prepared: Path, micro_batch: int, grad_accum: int, seconds: float) -> tuple[float, float]:
    import numpy as np

    from llmtrain.data.loader import TokenLoader
    from llmtrain.data.shards import open_prepared

    loader = TokenLoader(prepared, split="train", micro_batch_size=micro_batch, grad_accum=grad_accum, seed=0, shuffle=True)
    L = loader.seq_len
    for _ in range(5):
        loader.next_step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for mb in loader.next_step():
            assert mb["input_ids"].shape == (micro_batch, L)
        steps += 1
    ours = steps * micro_batch * grad_accum * L / (time.perf_counter() - start)

    # baseline: the same token bytes as one raw file, memory-mapped with numpy
    split = open_prepared(prepared).split("train")
    raw = prepared.parent / (prepared.name + ".tokens.bin")
    with open(raw, "wb") as f:
        for shard in split.shards:
            shard.tokens.tofile(f)
    mm = np.memmap(raw, dtype=split.shards[0].tokens.dtype, mode="r", shape=(split.rows, L))
    rng = np.random.default_rng(0)
    per_step = micro_batch * grad_accum
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows = rng.integers(0, split.rows, per_step)
        batch = mm[rows].astype(np.int64)
        assert batch.shape == (per_step, L)
        steps += 1
    baseline = steps * per_step * L / (time.perf_counter() - start)
    raw.unlink()
    return ours, baseline


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--tokenizer", type=Path, default=None, help="default: train one (--vocab-size) first, untimed")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--loader-seconds", type=float, default=3.0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed at the end")
    args = p.parse_args()

    from llmtrain.data.readers import expand_inputs
    from llmtrain.data.tokenizer_train import train_tokenizer

    cores = os.cpu_count() or 1
    files = expand_inputs([str(args.corpus)])
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmtrain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = args.tokenizer or train_tokenizer([str(args.corpus)], args.vocab_size, work / "tokenizer")
        nbytes = warm(files)
        print(
            f"corpus: {len(files)} files, {nbytes / 1e6:.1f} MB; tokenizer {tokenizer}; seq_len {args.seq_len}; {cores} cores",
            flush=True,
        )

        ours_s, ours_tokens = run_ours(files, tokenizer, args.seq_len, work / "prepared")
        recipe_s, recipe_tokens = run_recipe(files, tokenizer, args.seq_len, work / "hf_cache", num_proc=cores)
        loader_tps, memmap_tps = loader_speed(work / "prepared", args.micro_batch, args.grad_accum, args.loader_seconds)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        f"{'(a) llmtrain prepare':<34}{ours_s:8.2f} s  {ours_tokens / 1e6:6.2f}M tokens  {ours_tokens / ours_s / 1e6:6.2f}M tok/s"
    )
    print(
        f"{'(b) HF datasets map + group_texts':<34}{recipe_s:8.2f} s  {recipe_tokens / 1e6:6.2f}M tokens  {recipe_tokens / recipe_s / 1e6:6.2f}M tok/s"
    )
    print(f"{'prepare speedup (b / a)':<34}{recipe_s / ours_s:8.2f} x   (target >= 3x)")
    print(
        f"{'loader next_step':<34}{loader_tps / 1e6:8.1f} M tok/s (micro-batch {args.micro_batch} x accum {args.grad_accum}; target >= 50M)"
    )
    print(f"{'numpy memmap gather + int64':<34}{memmap_tps / 1e6:8.1f} M tok/s")
    print(f"{'loader / memmap':<34}{loader_tps / memmap_tps:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
