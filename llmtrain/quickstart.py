"""`llmtrain quickstart`: the whole product in one command on a laptop.

    llmtrain quickstart                      # corpus: text that ships with Python itself
    llmtrain quickstart --corpus my_texts/   # any text/JSONL/Parquet files or directories

tokenizer -> prepare -> pretrain (embedded local Ray, 2 CPU workers, ZeRO-2) -> export to the
Hugging Face format -> generate, printing where everything is and the validation loss before
and after pretraining; then a short full SFT and a short LoRA run from the pretrained model and
the same chat prompts answered before and after (llmtrain/quickstart_sft.py). Each stage
reuses its output when it is already complete, so a second run goes straight to training (which
resumes or finishes at once).
"""

from __future__ import annotations

import glob
import time
from pathlib import Path
from typing import Optional

from llmtrain.config import load_config
from llmtrain.data.prepare import prepare
from llmtrain.data.sample_corpus import write_sample_corpus
from llmtrain.data.tokenizer_train import MIN_VOCAB, train_tokenizer
from llmtrain.errors import UserError
from llmtrain.export import export
from llmtrain.generate import complete
from llmtrain.launch import launch
from llmtrain.quickstart_sft import finetune
from llmtrain.run_summary import print_run_summary

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = ["The meaning of", "def main(", "In the beginning"]


def quickstart(
    output: str | Path = "runs/quickstart",
    corpus: Optional[list[str]] = None,
    steps: int = 200,
    vocab_size: int = 4096,
    seq_len: int = 256,
    workers: int = 2,
    overrides: list[str] = (),
    sft_steps: int = 60,
    sft_data: Optional[str] = None,
) -> dict:
    out = Path(output).resolve()
    run_dir, data_dir = out / "pretrain", out / "data"
    pretrain_overrides = [
        f"run.dir={run_dir}",
        f"data.path={data_dir}",
        f"train.max_steps={steps}",
        f"cluster.num_workers={workers}",
        "cluster.use_gpu=false",
        *overrides,
    ]
    _check_flags(corpus, steps, vocab_size, seq_len, workers, sft_steps, sft_data)
    load_config(REPO_CONFIGS / "tiny-pretrain.yaml", pretrain_overrides)  # a mistaken override costs nothing
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = now - t
        t = now

    if corpus:
        inputs = list(corpus)
    else:
        inputs = [str(p) for p in write_sample_corpus(out / "corpus")]
        print(f"[quickstart] corpus: text shipped with Python ({len(inputs)} files) in {out / 'corpus'}")
    stage("corpus")

    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.model").is_file():
        train_tokenizer(inputs, vocab_size, str(tok_dir))
    print(f"[quickstart] tokenizer: {tok_dir}")
    stage("tokenizer")

    prepare(inputs, tokenizer=str(tok_dir), seq_len=seq_len, output=str(data_dir), val_fraction=0.02)
    print(f"[quickstart] token shards: {data_dir}")
    stage("prepare")

    launch(load_config(REPO_CONFIGS / "tiny-pretrain.yaml", pretrain_overrides), "pretrain")
    summary = print_run_summary(run_dir)
    stage("pretrain")

    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        export(run_dir, model_dir)
    print(f"[quickstart] Hugging Face model: {model_dir}")
    stage("export")

    samples = sample(model_dir, PROMPTS)
    for prompt, text in samples.items():
        print(f"[quickstart] generate {prompt!r} -> {text!r}")
    stage("generate")

    tuned = finetune(out, run_dir, inputs, workers, sft_steps, sft_data, stage) if sft_steps > 0 else None
    print("[quickstart] seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return {"summary": summary, "samples": samples, "timings": timings, "model_dir": str(model_dir), "finetune": tuned}


def _check_flags(corpus, steps: int, vocab_size: int, seq_len: int, workers: int, sft_steps: int, sft_data) -> None:
    """Every flag's bounds, before the first file is written."""
    for item in corpus or ():
        if not Path(item).exists() and not glob.glob(str(item)):
            raise UserError(f"--corpus {item}: no such file or directory; pass text/JSONL/Parquet files, directories or globs")
    if sft_data is not None and not Path(sft_data).is_file():
        raise UserError(f"--sft-data {sft_data}: no such file; pass chat or prompt/response records (JSONL/JSON/Parquet)")
    bounds = [("--steps", steps, 1), ("--workers", workers, 1), ("--sft-steps", sft_steps, 0), ("--seq-len", seq_len, 8)]
    bounds.append(("--vocab-size", vocab_size, MIN_VOCAB))
    for flag, value, least in bounds:
        if value < least:
            raise UserError(f"{flag} {value}: must be at least {least}")


def sample(model_dir: Path, prompts: list[str], max_new_tokens: int = 24) -> dict[str, str]:
    """Greedy continuations of `prompts` from a Hugging Face-format model directory."""
    return dict(zip(prompts, complete(model_dir, prompts, max_new_tokens=max_new_tokens)))
