"""Transfer benchmark: does pretraining pay off in fine-tuning, against a tuned scratch baseline?

    .venv/bin/python benchmarks/transfer.py                      # the default (~60-70 min on 2 cores), cached
    .venv/bin/python benchmarks/transfer.py --curve 100,300,1000,2000,8000
    .venv/bin/python benchmarks/transfer.py --released gemma3-270m=PATH/TO/HF_DIR   # another released base

1. Bases. (a) scratch: the tiny preset at random initialisation; (b) general: `llmtrain pretrain`
   of the tiny preset on ../shared/data/corpus (novels, scripture, speeches, Python docs; our
   tokenizer); (c) domain: (b) continued on unlabeled movie reviews,
   ../shared/data/domain/movie_reviews_unlabeled.txt, with `llmtrain pretrain model.from=(b)`
   (domain-adaptive pretraining, Gururangan et al. 2020: same tokenizer, fresh schedule, the
   loader on the new data); (d) released checkpoints (`--released`, default stories260K from
   ../shared/checkpoints), each with its own tokenizer. Pretraining runs are cached by settings.
2. Fine-tuning: `--examples` (2,000) labelled sentences of eval/sentiment_train.jsonl (a fixed
   random draw), prompt "Review: <text>\\nSentiment:", answer " positive"/" negative" + EOS,
   the same budget for every arm (`--ft-steps` steps x `--batch` packed rows of 128). Arms: full
   fine-tuning of every base, and LoRA of the domain model and of each released one.
3. Fair tuning: every arm's learning rate is chosen from its own grid (3-4 values) on a validation
   split carved from the 2,000 (1,600 train / 400 validation, seed 0), never on the test file;
   then every arm runs `--seeds` seeds (initialisation and data order) at its chosen LR on all
   2,000 and is scored on eval/sentiment_test.jsonl (1,000): accuracy and macro-F1 from each
   label word's log-probability (the run's own report). Per arm: mean, range over seeds; per
   pretrained arm: the difference to scratch with a 95% interval (Welch's t over seeds).
4. Label efficiency (`--curve`): accuracy against the number of labelled examples (nested draws)
   for scratch, general, domain and the first released base, each at its chosen LR and the same
   steps: the table and OUT/transfer.png.
Every fine-tuning is `python -m llmtrain.train --task sft` (the one training loop, one process,
one thread, `--jobs` at a time: at this size two independent runs use the two cores better than
one run on two Ray workers, and Ray's start-up would be a third of each run). Every run's
numbers go to OUT/transfer.json; PASS/FAIL lines state the targets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
EVAL = SHARED / "data" / "eval"
DOMAIN = SHARED / "data" / "domain" / "movie_reviews_unlabeled.txt"
PROMPT = "Review: {text}\nSentiment:"
TARGETS = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
# two-sided 95% quantiles of Student's t, df 1..30 (beyond: 1.96)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Pretraining (cached)


def pretrain(args, out: Path) -> tuple[Path, Path]:
    """(general pretraining run, the tokenizer dir its data was prepared with)."""
    from llmtrain.data.prepare import prepare
    from llmtrain.data.tokenizer_train import train_tokenizer

    corpus = [str(SHARED / "data" / "corpus")]
    tok = out / f"tokenizer-{args.vocab}"
    data = out / f"data-{args.vocab}-{args.seq_len}"
    run = out / f"pretrain-{args.preset}-v{args.vocab}-s{args.seq_len}-b{args.batch}-{args.pretrain_steps}"
    if not _done(run, args.pretrain_steps):
        if not (tok / "tokenizer.model").is_file():
            train_tokenizer(corpus, args.vocab, str(tok))
        # our own cache: rebuild it when the corpus files were touched since (prepare refuses otherwise)
        prepare(corpus, tokenizer=str(tok), seq_len=args.seq_len, output=str(data), val_fraction=0.01, force=True)
        _pretrain_run(args, run, data, args.pretrain_steps, args.pretrain_lr, [f"model.preset={args.preset}"])
    return run, tok


def domain_pretrain(args, out: Path, general: Path, tok: Path) -> Path:
    """The general run continued on the unlabeled movie reviews (same tokenizer, fresh schedule)."""
    from llmtrain.data.prepare import prepare

    data = out / f"domain-data-{args.vocab}-{args.seq_len}"
    run = out / f"domain-{general.name}-{args.domain_steps}-lr{args.domain_lr:g}"
    if not _done(run, args.domain_steps):
        prepare([str(DOMAIN)], tokenizer=str(tok), seq_len=args.seq_len, output=str(data), val_fraction=0.02, force=True)
        _pretrain_run(args, run, data, args.domain_steps, args.domain_lr, [f"model.from={general}"])
    return run


def _done(run: Path, steps: int) -> bool:
    from llmtrain.checkpoint import find_latest, read_meta

    latest = find_latest(run)
    return latest is not None and read_meta(latest)["step"] >= steps


def _pretrain_run(args, run: Path, data: Path, steps: int, lr: float, model: list[str]) -> None:
    from llmtrain.config import load_config
    from llmtrain.launch import launch

    cfg = load_config(
        REPO / "configs" / "tiny-pretrain.yaml",
        [
            f"run.dir={run}",
            f"data.path={data}",
            *model,
            f"train.max_steps={steps}",
            f"train.global_batch_size={args.batch}",
            "train.micro_batch_size=4",
            f"train.lr={lr}",
            f"train.warmup_steps={max(10, steps // 50)}",
            f"train.val_every={max(50, steps // 10)}",
            "train.log_every=10",
            f"checkpoint.every={max(100, steps // 5)}",
            f"cluster.num_workers={args.workers}",
            "cluster.use_gpu=false",
        ],
    )
    launch(cfg, "pretrain")


# ---------------------------------------------------------------------------------------------
# Labelled data and fine-tuning runs


def splits(args, out: Path) -> dict[str, Path]:
    """The labelled files every arm uses: a fixed random order of sentiment_train.jsonl; its first
    n records are the n-example set (nested: 100 within 300 within 2,000), and the 2,000 split
    1,600 / 400 for choosing learning rates."""
    d = out / "splits"
    d.mkdir(parents=True, exist_ok=True)
    lines = (EVAL / "sentiment_train.jsonl").read_text().splitlines()
    random.Random(0).shuffle(lines)
    files: dict[str, Path] = {}

    def write(name: str, rows: list[str]) -> None:
        path = files[name] = d / f"{name}.jsonl"
        text = "\n".join(rows) + "\n"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)

    n = args.examples
    write("sweep-train", lines[: n * 4 // 5])
    write("sweep-val", lines[n * 4 // 5 : n])
    for size in sorted({n, *args.curve}):
        if size > len(lines):
            raise SystemExit(f"--curve {size}: sentiment_train.jsonl has only {len(lines)} records")
        write(f"train-{size}", lines[:size])
    return files


def finetune(
    args, out: Path, name: str, base: list[str], train: Path, val: Path, lr: float, seed: int, before: bool, steps: int = 0
) -> dict:
    """One `llmtrain sft` run (cached by its settings), `steps` (default --ft-steps); its report's numbers."""
    steps = steps or args.ft_steps
    overrides = [
        f"data.path={train}",
        f"data.val_path={val}",
        "data.format=labelled",
        f"data.template={json.dumps(args.template)}",
        f"data.label_words={json.dumps({'positive': args.positive, 'negative': args.negative})}",
        "data.chat_template=completion",
        "data.max_val_examples=1000",
        "finetune.eval_examples=1000",
        "data.seq_len=128",
        "data.truncation=drop",
        f"train.max_steps={steps}",
        f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        f"train.warmup_steps={max(1, steps // 10)}",
        f"train.lr={lr}",
        f"train.val_at_start={str(before).lower()}",
        "train.val_every=0",
        "train.log_every=10",
        "checkpoint.every=0",
        "cluster.num_workers=1",
        "cluster.use_gpu=false",
        "zero.stage=0",  # one process: nothing to partition
        f"run.seed={seed}",
        *base,
    ]
    key = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    run = out / "ft" / f"{name}-{train.stem}-lr{lr:g}-s{seed}-{key}"
    report_file = run / "finetune_report.json"
    t0 = time.perf_counter()
    if not report_file.is_file():
        overrides += [f"run.dir={run}", f"data.cache_dir={out / 'sft-cache'}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "llmtrain.train", "--task", "sft", str(REPO / "configs" / "tiny-sft.yaml"), *overrides]
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(run.parent / f"{run.name}.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"fine-tuning {run.name} failed (exit {proc.returncode}); see {run.parent / (run.name + '.log')}")
    report = json.loads(report_file.read_text())
    return {
        "arm": name,
        "run": str(run),
        "train": train.stem,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "accuracy_before": report["before"].get("accuracy"),
        "accuracy": report["after"]["accuracy"],
        "macro_f1": report["after"].get("macro_f1"),
        "trainable": report["params"]["trainable"],
        "total": report["params"]["total"],
    }


# ---------------------------------------------------------------------------------------------
# Statistics and the picture


def summary(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "min": min(values), "max": max(values), "sd": sd, "n": n}


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): the 95% interval of the difference of means, Welch's t
    (df rounded down; a NaN interval with fewer than 2 values per side)."""
    sa, sb = summary(a), summary(b)
    diff = sa["mean"] - sb["mean"]
    if sa["n"] < 2 or sb["n"] < 2:
        return diff, float("nan"), float("nan")
    va, vb = sa["sd"] ** 2 / sa["n"], sb["sd"] ** 2 / sb["n"]
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (sa["n"] - 1) + vb**2 / (sb["n"] - 1))
    t = T975[min(int(df), 30) - 1] if df >= 1 else T975[0]
    t = t if df < 31 else 1.96
    return diff, diff - t * se, diff + t * se


def plot(curve: dict[str, dict[int, dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for arm, points in curve.items():
        sizes = sorted(points)
        mean = [points[n]["mean"] for n in sizes]
        ax.plot(sizes, mean, marker="o", label=arm)
        ax.fill_between(sizes, [points[n]["min"] for n in sizes], [points[n]["max"] for n in sizes], alpha=0.15)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ticks = sorted({n for points in curve.values() for n in points})
    ax.set_xticks(ticks, [f"{n:,}" for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labelled examples")
    ax.set_ylabel("test accuracy (1,000 sentences)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------


def grid(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/transfer", help="cache and runs (default: runs/transfer)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256, help="pretraining rows")
    p.add_argument("--batch", type=int, default=16, help="global batch (rows) for pretraining and fine-tuning")
    p.add_argument("--pretrain-steps", type=int, default=1700, help="general pretraining: 1700 x 16 x 256 = 7M tokens (~28 min)")
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--domain-steps", type=int, default=500, help="continued pretraining on the reviews: ~1 pass (~8 min)")
    p.add_argument("--domain-lr", type=float, default=1e-3)
    p.add_argument("--examples", type=int, default=2000, help="labelled examples of the main comparison")
    p.add_argument("--ft-steps", type=int, default=120, help="fine-tuning steps, the same for every arm")
    p.add_argument("--full-lrs", default="2.5e-4,5e-4,1e-3,2e-3", help="LR grid of full fine-tuning of a pretrained base")
    p.add_argument("--scratch-lrs", default="5e-4,1e-3,2e-3,4e-3", help="LR grid of training from random initialisation")
    p.add_argument("--lora-lrs", default="1e-3,3e-3,1e-2", help="LR grid of LoRA")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-long", type=int, default=4, help="also LoRA of the domain model at this many times the steps (0: not)")
    p.add_argument("--lora", default="", help="extra LoRA overrides, comma-separated (e.g. lora.rslora=true)")
    p.add_argument("--released", default="stories260K", help="released bases: NAME or NAME=HF_DIR, comma-separated ('' for none)")
    p.add_argument("--curve", default="100,300,2000", help="labelled-example counts of the label-efficiency curve ('' for none)")
    p.add_argument("--seeds", type=int, default=3, help="runs per arm (run.seed 0..N-1)")
    p.add_argument("--jobs", type=int, default=2, help="fine-tuning runs at once (one thread each)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers of the pretraining runs")
    p.add_argument("--template", default=PROMPT, help="the prompt built from a review")
    p.add_argument("--positive", default=" positive", help="answer word of a positive review")
    p.add_argument("--negative", default=" negative", help="answer word of a negative review")
    args = p.parse_args()
    args.curve = [int(v) for v in args.curve.split(",") if v.strip()]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    general, tok = pretrain(args, out)
    domain = domain_pretrain(args, out, general, tok)
    pretrain_min = (time.perf_counter() - t0) / 60
    files = splits(args, out)
    lora = [f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}", f"lora.target_modules={TARGETS}"]
    lora += [o.strip() for o in args.lora.split(",") if o.strip()]
    full_lrs, scratch_lrs, lora_lrs = grid(args.full_lrs), grid(args.scratch_lrs), grid(args.lora_lrs)
    # arm -> (overrides naming its base and method, LR grid)
    arms: dict[str, tuple[list[str], list[float]]] = {
        "scratch": (["model.from=null", f"model.preset={args.preset}", f"data.tokenizer={general / 'tokenizer'}"], scratch_lrs),
        "general": ([f"model.from={general}"], full_lrs),
        "domain": ([f"model.from={domain}"], full_lrs),
        "domain-lora": ([f"model.from={domain}", *lora], lora_lrs),
    }
    released = []
    for spec in filter(None, (s.strip() for s in args.released.split(","))):
        name, _, path = spec.partition("=")
        path = Path(path) if path else SHARED / "checkpoints" / name
        if not (path / "config.json").is_file():
            raise SystemExit(f"--released {spec}: {path} is not a Hugging Face model directory (no config.json)")
        released.append(name)
        arms[name] = ([f"model.from={path}"], full_lrs)
        arms[f"{name}-lora"] = ([f"model.from={path}", *lora], lora_lrs)

    pool = ThreadPoolExecutor(args.jobs)

    def submit(name, train, val, lr, seed, before, steps=0):
        return pool.submit(finetune, args, out, name, arms[name][0], train, val, lr, seed, before, steps)

    # 1. learning rates, on the validation split of the 2,000
    sweep = {
        name: [submit(name, files["sweep-train"], files["sweep-val"], lr, 0, False) for lr in lrs]
        for name, (_, lrs) in arms.items()
    }
    chosen, sweep_runs = {}, {}
    for name, futures in sweep.items():
        runs = sweep_runs[name] = [f.result() for f in futures]
        best = max(runs, key=lambda r: (round(r["accuracy"], 6), round(r["macro_f1"] or 0, 6), -r["lr"]))
        chosen[name] = best["lr"]
        print(
            f"{name}: validation accuracy "
            + ", ".join(f"lr {r['lr']:g} {r['accuracy']:.3f}" for r in runs)
            + f" -> lr {best['lr']:g}"
        )

    # 2. every arm at its LR, --seeds seeds, on the test file; 3. the curve
    test = EVAL / "sentiment_test.jsonl"
    curve_arms = ["scratch", "general", "domain", *released[:1]]
    main_futures = {
        name: [submit(name, files[f"train-{args.examples}"], test, chosen[name], s, s == 0) for s in range(args.seeds)]
        for name in arms
    }
    long_name = f"domain-lora-{args.lora_long}x"
    if args.lora_long > 1:  # what budget LoRA needs: the same LR and data, more steps
        arms[long_name] = arms["domain-lora"]
        chosen[long_name] = chosen["domain-lora"]
        main_futures[long_name] = [
            submit(long_name, files[f"train-{args.examples}"], test, chosen[long_name], s, False, args.ft_steps * args.lora_long)
            for s in range(args.seeds)
        ]
    curve_futures = {
        (name, n): [submit(name, files[f"train-{n}"], test, chosen[name], s, False) for s in range(args.seeds)]
        for name in curve_arms
        for n in args.curve
        if n != args.examples
    }
    results = {name: [f.result() for f in fs] for name, fs in main_futures.items()}
    curve_runs = {key: [f.result() for f in fs] for key, fs in curve_futures.items()}
    for name in curve_arms:
        if args.examples in args.curve:
            curve_runs[(name, args.examples)] = results[name]
    pool.shutdown()

    # report
    table = {
        name: {**summary([r["accuracy"] for r in runs]), "macro_f1": summary([r["macro_f1"] for r in runs])}
        for name, runs in results.items()
    }
    scratch = [r["accuracy"] for r in results["scratch"]]
    print(
        f"\ntransfer: {args.preset} preset; general pretraining {args.pretrain_steps} x {args.batch} x {args.seq_len} tokens, "
        f"domain {args.domain_steps} steps on the reviews ({pretrain_min:.1f} min now, cached); fine-tuning {args.examples} "
        f"examples, {args.ft_steps} steps x {args.batch} rows of 128, LR chosen on 400 held-out of the {args.examples}; "
        f"{args.seeds} seeds; test: 1,000 sentences"
    )
    head = f"{'arm':18s}{'trainable':>20s}{'lr':>9s}{'acc. before':>12s}{'accuracy':>10s}{'range':>14s}{'macro-F1':>10s}{'vs scratch [95% CI]':>28s}"
    print(head)
    diffs = {}
    for name, runs in results.items():
        s, f1 = table[name], table[name]["macro_f1"]
        frac = f"{runs[0]['trainable']:,} ({runs[0]['trainable'] / runs[0]['total']:.1%})"
        before = runs[0]["accuracy_before"]
        vs = ""
        if name != "scratch":
            d, lo, hi = diffs[name] = welch_interval([r["accuracy"] for r in runs], scratch)
            vs = f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        spread = f"{s['min']:.3f}-{s['max']:.3f}"
        before_text = "-" if before is None else f"{before:.3f}"
        print(
            f"{name:18s}{frac:>20s}{chosen[name]:>9g}{before_text:>12s}{s['mean']:>10.3f}{spread:>14s}{f1['mean']:>10.3f}{vs:>28s}"
        )

    def gain(name: str) -> float:
        return table[name]["mean"] - table["scratch"]["mean"]

    verdicts = []
    d, lo, _ = diffs["domain"]
    verdicts.append(
        (
            f"domain-pretrained + FT - tuned scratch: {100 * d:+.1f} points (95% CI low {100 * lo:+.1f})",
            d >= 0.10 and lo > 0,
            "expected >= +10, interval above 0",
        )
    )
    share = (table["domain-lora"]["mean"] - table["scratch"]["mean"]) / gain("domain") if gain("domain") > 0 else float("nan")
    verdicts.append(
        (f"LoRA's share of full FT's gain (domain base): {share:.0%}", share >= 0.9, "expected >= 90% at the same steps")
    )
    for name in released:
        if name.startswith("gemma"):
            verdicts.append(
                (f"{name} + FT - tuned scratch: {100 * gain(name):+.1f} points", gain(name) >= 0.25, "expected >= +25")
            )
        s = (table[f"{name}-lora"]["mean"] - table["scratch"]["mean"]) / gain(name) if gain(name) > 0 else float("nan")
        verdicts.append((f"{name}: LoRA's share of full FT's gain: {s:.0%}", s >= 0.9, "expected >= 90%"))
    for text, ok, expected in verdicts:
        print(f"{text}   [{'PASS' if ok else 'FAIL'}: {expected}]")
    if long_name in table and gain("domain") > 0:
        long_share = (table[long_name]["mean"] - table["scratch"]["mean"]) / gain("domain")
        print(
            f"LoRA at {args.lora_long}x the steps ({args.lora_long * args.ft_steps}): {long_share:.0%} of full FT's gain at {args.ft_steps}"
        )

    curve = {}
    if args.curve:
        print(f"\nlabel efficiency: test accuracy, mean (min-max) over {args.seeds} seeds")
        print(f"{'examples':>10s}" + "".join(f"{a:>22s}" for a in curve_arms))
        curve = {a: {n: summary([r["accuracy"] for r in curve_runs[(a, n)]]) for n in args.curve} for a in curve_arms}
        for n in args.curve:
            print(
                f"{n:>10d}"
                + "".join(
                    f"{curve[a][n]['mean']:.3f} ({curve[a][n]['min']:.3f}-{curve[a][n]['max']:.3f})".rjust(22) for a in curve_arms
                )
            )
        plot(
            curve,
            out / "transfer.png",
            f"sentiment, {args.ft_steps} fine-tuning steps, tiny preset ({args.seeds} seeds, band: range)",
        )
        print(f"plot: {out / 'transfer.png'}")
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min")
    record = {
        "args": vars(args),
        "bases": {"general": str(general), "domain": str(domain)},
        "chosen_lr": chosen,
        "sweep": sweep_runs,
        "arms": {name: {"summary": table[name], "runs": runs} for name, runs in results.items()},
        "vs_scratch": {name: dict(zip(("diff", "low", "high"), v)) for name, v in diffs.items()},
        "curve": {a: {str(n): {**curve[a][n], "runs": curve_runs[(a, n)]} for n in args.curve} for a in curve},
        "verdicts": [{"claim": t, "pass": ok, "expected": e} for t, ok, e in verdicts],
    }
    tmp = out / "transfer.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out / "transfer.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
