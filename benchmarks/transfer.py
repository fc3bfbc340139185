"""Transfer benchmark: does pretraining pay off in fine-tuning, and does LoRA keep the gain?

    .venv/bin/python benchmarks/transfer.py                    # tiny preset, 7M tokens (~28 min here), cached
    .venv/bin/python benchmarks/transfer.py --pretrain-steps 1000 --seeds 1 --out runs/transfer
    .venv/bin/python benchmarks/sentiment_probe.py MODEL_DIR   # what the pretrained features know (linear probe)

1. Pretrain `--preset` on ../shared/data/corpus (our tokenizer, prepared shards, `llmtrain
   pretrain` on the embedded Ray runtime with `--workers` CPU workers). Cached: tokenizer, data
   and the pretraining run are reused when they already exist with these settings.
2. Fine-tune for sentiment on `--examples` (2,000) records of sentiment_train.jsonl with the same
   budget (steps, batch, sequence length) three ways, each through `llmtrain sft`:
     (a) full fine-tuning from the pretrained model,
     (b) LoRA (r=--lora-r on every projection) from the pretrained model,
     (c) full fine-tuning of the same architecture from random initialisation.
   Prompt "Review: <text>\\nSentiment:", answers " positive"/" negative" + EOS (completion template).
3. Accuracy on sentiment_test.jsonl (1,000), scoring each label word's log-probability (the
   run's own report, before and after). LoRA's share = (LoRA - scratch) / (full - scratch).
With `--seeds N` every arm runs N times (run.seed 0..N-1: initialisation, data order, dropout);
accuracies are means, with the range over seeds beside them (one seed is not evidence here: the
scratch arm alone moves by several points between seeds).
Expectations: pretrained+FT >= scratch+FT + 10 points; LoRA share >= 90% with a small fraction
of the parameters trained. The table and a PASS/FAIL line per expectation are printed; the
numbers go to OUT/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
PROMPT = "Review: {text}\nSentiment:"


def pretrain(args, out: Path) -> tuple[Path, Path, float]:
    """(pretraining run, its tokenizer dir, seconds spent now): cached by settings."""
    from llmtrain.checkpoint import find_latest, read_meta
    from llmtrain.config import load_config
    from llmtrain.data.prepare import prepare
    from llmtrain.data.tokenizer_train import train_tokenizer
    from llmtrain.launch import launch

    t0 = time.perf_counter()
    corpus = [str(SHARED / "data" / "corpus")]
    tok = out / f"tokenizer-{args.vocab}"
    data = out / f"data-{args.vocab}-{args.seq_len}"
    run = out / f"pretrain-{args.preset}-v{args.vocab}-s{args.seq_len}-b{args.batch}-{args.pretrain_steps}"
    latest = find_latest(run)
    if latest is None or read_meta(latest)["step"] < args.pretrain_steps:
        if not (tok / "tokenizer.model").is_file():
            train_tokenizer(corpus, args.vocab, str(tok))
        # our own cache: rebuild it when the corpus files were touched since (prepare refuses otherwise)
        prepare(corpus, tokenizer=str(tok), seq_len=args.seq_len, output=str(data), val_fraction=0.01, force=True)
        cfg = load_config(
            REPO / "configs" / "tiny-pretrain.yaml",
            [
                f"run.dir={run}",
                f"data.path={data}",
                f"model.preset={args.preset}",
                f"train.max_steps={args.pretrain_steps}",
                f"train.global_batch_size={args.batch}",
                "train.micro_batch_size=4",
                f"train.lr={args.pretrain_lr}",
                f"train.warmup_steps={max(10, args.pretrain_steps // 50)}",
                f"train.val_every={max(50, args.pretrain_steps // 10)}",
                "train.log_every=10",
                f"checkpoint.every={max(100, args.pretrain_steps // 5)}",
                f"cluster.num_workers={args.workers}",
                "cluster.use_gpu=false",
            ],
        )
        launch(cfg, "pretrain")
    return run, run / "tokenizer", time.perf_counter() - t0  # the run keeps a copy of its tokenizer


def finetune(args, out: Path, name: str, extra: list[str]) -> dict:
    import hashlib

    from llmtrain.config import load_config
    from llmtrain.launch import launch

    common = {
        k: getattr(args, k)
        for k in (
            "preset",
            "vocab",
            "seq_len",
            "batch",
            "pretrain_steps",
            "pretrain_lr",
            "examples",
            "ft_steps",
            "template",
            "positive",
            "negative",
        )
    }
    key = hashlib.sha256(json.dumps([common, extra], sort_keys=True).encode()).hexdigest()[:8]
    run = out / f"ft-{name}-{key}"
    report_file = run / "finetune_report.json"
    t0 = time.perf_counter()
    if not report_file.is_file():
        cfg = load_config(
            REPO / "configs" / "tiny-sft.yaml",
            [
                f"run.dir={run}",
                f"data.path={SHARED / 'data' / 'eval' / 'sentiment_train.jsonl'}",
                f"data.val_path={SHARED / 'data' / 'eval' / 'sentiment_test.jsonl'}",
                "data.format=labelled",
                f"data.template={json.dumps(args.template)}",
                f"data.label_words={json.dumps({'positive': args.positive, 'negative': args.negative})}",
                "data.chat_template=completion",
                f"data.max_examples={args.examples}",
                "data.max_val_examples=1000",
                "finetune.eval_examples=1000",
                "data.seq_len=128",
                "data.truncation=drop",
                f"data.cache_dir={out / 'sft-cache'}",
                f"train.max_steps={args.ft_steps}",
                f"train.global_batch_size={args.batch}",
                "train.micro_batch_size=8",
                f"train.warmup_steps={max(1, args.ft_steps // 10)}",
                "train.val_every=0",
                "train.log_every=10",
                "checkpoint.every=0",
                f"cluster.num_workers={args.workers}",
                "cluster.use_gpu=false",
                *extra,
            ],
        )
        launch(cfg, "sft")
    report = json.loads(report_file.read_text())
    return {
        "name": name,
        "run": str(run),
        "seconds": time.perf_counter() - t0,
        "accuracy_before": report["before"]["accuracy"],
        "accuracy": report["after"]["accuracy"],
        "trainable": report["params"]["trainable"],
        "total": report["params"]["total"],
    }


def mean_over_seeds(runs: list[dict]) -> dict:
    """One arm: mean accuracy (before and after) over its seeds, their range and total time."""
    acc = [r["accuracy"] for r in runs]
    return {
        **runs[0],
        "accuracy": sum(acc) / len(acc),
        "min": min(acc),
        "max": max(acc),
        "accuracy_before": sum(r["accuracy_before"] for r in runs) / len(runs),
        "seconds": sum(r["seconds"] for r in runs),
        "runs": runs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/transfer", help="cache and runs (default: runs/transfer)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256, help="pretraining rows")
    p.add_argument("--batch", type=int, default=16, help="global batch (rows) for pretraining and fine-tuning")
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=1700,
        help="x batch x seq-len tokens; 1700 = 7M tokens (1.1 passes over the corpus), ~28 min on 2 cores",
    )
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--ft-steps", type=int, default=120, help="fine-tuning steps, the same for all three")
    p.add_argument("--ft-lr", type=float, default=5e-4, help="full fine-tuning of the pretrained model")
    p.add_argument("--scratch-lr", type=float, default=2e-3, help="training from random initialisation")
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--template", default=PROMPT, help="the prompt built from a review")
    p.add_argument("--positive", default=" positive", help="answer word of a positive review")
    p.add_argument("--negative", default=" negative", help="answer word of a negative review")
    p.add_argument("--arms", default="full,lora,scratch", help="which fine-tunings to run (all three for the table)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning runs per arm (run.seed 0..N-1); accuracies are their mean")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    run, tok, pretrain_s = pretrain(args, out)
    targets = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
    plans = {
        "full": ("full-pretrained", [f"model.from={run}", f"train.lr={args.ft_lr}"]),
        "lora": (
            "lora-pretrained",
            [
                f"model.from={run}",
                f"train.lr={args.lora_lr}",
                f"lora.r={args.lora_r}",
                f"lora.alpha={2 * args.lora_r}",
                f"lora.target_modules={targets}",
            ],
        ),
        "scratch": (
            "full-scratch",
            ["model.from=null", f"model.preset={args.preset}", f"data.tokenizer={tok}", f"train.lr={args.scratch_lr}"],
        ),
    }
    chosen = [a.strip() for a in args.arms.split(",")]
    # seed 0 is the configs' own run.seed: left out of the overrides so its runs keep their cache key
    arms = [
        mean_over_seeds([finetune(args, out, name, extra + ([f"run.seed={seed}"] if seed else [])) for seed in range(args.seeds)])
        for name, extra in (plans[a] for a in chosen)
    ]
    for arm in arms:
        for r in arm["runs"]:
            print(f"{arm['name']}: accuracy {r['accuracy_before']:.3f} -> {r['accuracy']:.3f} ({r['run']})")
    if chosen != ["full", "lora", "scratch"]:
        return 0
    full, lora, scratch = arms
    gain = full["accuracy"] - scratch["accuracy"]
    share = (lora["accuracy"] - scratch["accuracy"]) / gain if gain > 0 else float("nan")

    print(
        f"\ntransfer: {args.preset} preset, pretraining {args.pretrain_steps} steps x {args.batch} x {args.seq_len} tokens "
        f"({pretrain_s / 60:.1f} min now, cached in {run}); sentiment fine-tuning: {args.examples} examples, "
        f"{args.ft_steps} steps x {args.batch} rows of 128; mean over {args.seeds} seed(s)"
    )
    print(f"{'':20s}{'trainable params':>22s}{'acc. before':>13s}{'acc. after':>12s}{'range':>15s}{'minutes':>9s}")
    for arm in arms:
        frac = f"{arm['trainable']:,} ({arm['trainable'] / arm['total']:.1%})"
        spread = f"{arm['min']:.3f}-{arm['max']:.3f}"
        print(
            f"{arm['name']:20s}{frac:>22s}{arm['accuracy_before']:>13.3f}{arm['accuracy']:>12.3f}{spread:>15s}{arm['seconds'] / 60:>9.1f}"
        )
    print(f"pretrained+FT - scratch+FT: {100 * gain:+.1f} points   [{'PASS' if gain >= 0.10 else 'FAIL'}: expected >= +10]")
    print(
        f"LoRA's share of full FT's gain over scratch: {share:.0%}   "
        f"[{'PASS' if share >= 0.9 else 'FAIL'}: expected >= 90%, with {lora['trainable'] / lora['total']:.1%} of the parameters]"
    )
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min")
    (out / "transfer.json").write_text(
        json.dumps({"args": vars(args), "arms": arms, "gain": gain, "lora_share": share, "pretrain_run": str(run)}, indent=1)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
