"""Preference tuning, measured: pretrain -> SFT -> DPO on GSM8K pairs, LoRA and full, ZeRO-2 and ZeRO-3.

    .venv/bin/python benchmarks/dpo_pipeline.py                 # ~20 min here (pretraining cached after the first run)
    .venv/bin/python benchmarks/dpo_pipeline.py --dpo-steps 30 --out runs/dpo-bench

1. Pretrain the tiny preset on ../shared/data/corpus (benchmarks/transfer.py's cached run), then
   full SFT on GSM8K (question -> reference solution) through `llmtrain sft`.
2. Pairs (benchmarks/preference_pairs.py gsm8k): chosen = the reference solution, rejected = the
   same solution without its final answer line "#### N"; held-out pairs from the same split.
3. `llmtrain dpo` from the SFT run, 2 Ray workers, the same steps and batch each:
     lora-z2: LoRA r=16, ZeRO-2 (reference: adapters off)
     full-z3: full, ZeRO-3 (reference: a frozen copy, partitioned too)
     full-z2-copy: full, ZeRO-2, frozen reference copy     } memory with and without
     full-z2-pre:  full, ZeRO-2, precomputed reference     } a reference model
4. For each: held-out reward accuracy before/after (the run's report); the greedy answers of the
   SFT model and of the tuned one on held-out GSM8K test questions, counted for the chosen style
   (an answer that ends with "#### N"); KL(policy || reference) estimated on the held-out
   prompts by sampling from the policy (temperature 1): mean over samples of
   log pi(y|x) - log ref(y|x), in nats per answer; tokens/s of DPO vs the SFT run (same sequence
   length and rows per step; DPO rows hold pairs); peak RSS per rank with and without a reference copy.
Targets (issue 11): held-out reward accuracy from ~0.5 to >= 0.9. Writes OUT/dpo.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"


def run_job(task: str, config: Path, overrides: list[str], run: Path) -> Path:
    from llmtrain.config import load_config
    from llmtrain.launch import launch

    if not (run / "finetune_report.json").is_file():
        launch(load_config(config, [*overrides, f"run.dir={run}"]), task)
    return run


def steady(run: Path, key: str) -> float:
    from llmtrain.metrics import read_metrics

    values = [e[key] for e in read_metrics(run) if key in e and "loss" in e]
    half = values[len(values) // 2 :] or values
    return sum(half) / len(half) if key == "tokens_per_s" else max(values)


def logprob(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    import torch

    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).float()[0, :-1], dim=-1)
    picked = logp[torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1), ids[0, len(prompt_ids) :]]
    return float(picked.sum())


def style_and_kl(policy_dir: Path, reference_dir: Path, questions: list[str], new_tokens: int, seed: int) -> dict:
    """Greedy answers ending with "#### N" (share), and the sampled KL estimate."""
    import re

    from llmtrain.evaluate import generations, load_model
    from llmtrain.generate import eos_ids, generate, load_tokenizer

    policy, reference = load_model(policy_dir), load_model(reference_dir)
    greedy = generations(policy, policy_dir, questions, chat=True, max_new_tokens=new_tokens)
    final = sum(bool(re.search(r"####\s*-?[\d,.]+\s*$", g.strip())) for g in greedy) / len(greedy)
    tok = load_tokenizer(policy_dir)
    eos = eos_ids(policy_dir, policy.config.eos_token_id, tok.eos_token_id)
    kls = []
    for i, q in enumerate(questions):
        prompt = list(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        sample = generate(policy, prompt, new_tokens, temperature=1.0, eos_id=eos, seed=seed + i)[len(prompt) :]
        if sample:
            kls.append(logprob(policy, prompt, sample) - logprob(reference, prompt, sample))
    return {"final_answer_share": final, "kl": sum(kls) / max(len(kls), 1), "examples": [greedy[0][-160:]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "dpo-bench")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--dpo-steps", type=int, default=40)
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--questions", type=int, default=24, help="held-out GSM8K test questions for style and KL")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--runs", default="lora-z2,full-z3,full-z2-copy,full-z2-pre")
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import transfer
    from preference_pairs import write_pairs

    from llmtrain.export import export

    t0 = time.perf_counter()
    pre = SimpleNamespace(
        preset="tiny", vocab=8000, seq_len=256, batch=16, pretrain_steps=args.pretrain_steps, pretrain_lr=3e-3, workers=2
    )
    base, _, _ = transfer.pretrain(pre, out)
    common = [
        "cluster.num_workers=2",
        "cluster.use_gpu=false",
        "data.seq_len=512",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.log_every=5",
        "checkpoint.every=0",
        "train.val_batches=8",
    ]
    sft = run_job(
        "sft",
        REPO / "configs" / "tiny-sft.yaml",
        [
            *common,
            f"model.from={base}",
            f"data.path={SHARED / 'data' / 'sft' / 'gsm8k_train.jsonl'}",
            "data.format=pairs",
            "data.prompt_field=question",
            "data.response_field=answer",
            "data.max_examples=4000",
            "data.max_val_examples=64",
            f"train.max_steps={args.sft_steps}",
            "train.lr=1e-3",
            "train.warmup_steps=10",
            "train.val_every=0",
        ],
        out / "sft",
    )
    sft_model = out / "sft-model"
    if not (sft_model / "config.json").is_file():
        export(sft, sft_model)
    pairs = write_pairs("gsm8k", out / "gsm8k-pairs.jsonl", limit=args.pairs + 128, max_chars=700)
    dpo_common = [
        *common,
        f"model.from={sft}",
        f"data.path={pairs}",
        "data.max_val_examples=128",
        f"train.max_steps={args.dpo_steps}",
        "train.val_every=0",
        f"data.cache_dir={out / 'dpo-cache'}",
    ]
    settings = {
        "lora-z2": ["zero.stage=2", "train.lr=2e-3"],
        "full-z3": ["lora=null", "zero.stage=3", "train.lr=3e-4"],
        "full-z2-copy": ["lora=null", "zero.stage=2", "train.lr=3e-4"],
        "full-z2-pre": ["lora=null", "zero.stage=2", "train.lr=3e-4", "dpo.precompute_reference=true"],
    }
    questions = [json.loads(line)["question"] for line in (SHARED / "data" / "sft" / "gsm8k_test.jsonl").open()][: args.questions]
    results = {
        "sft": {
            "tokens_per_s": steady(sft, "tokens_per_s"),
            "memory_gb": steady(sft, "memory_gb"),
            **style_and_kl(sft_model, sft_model, questions, args.new_tokens, 0),
        }
    }
    for name in args.runs.split(","):
        run = run_job("dpo", REPO / "configs" / "tiny-dpo.yaml", [*dpo_common, *settings[name]], out / name)
        model = out / f"{name}-model"
        if not (model / "config.json").is_file():
            export(run, model, merge=name.startswith("lora"))
        report = json.loads((run / "finetune_report.json").read_text())
        results[name] = {
            "reward_accuracy_before": report["before"]["reward_accuracy"],
            "reward_accuracy_after": report["after"]["reward_accuracy"],
            "reward_margin_after": report["after"]["reward_margin"],
            "tokens_per_s": steady(run, "tokens_per_s"),
            "memory_gb": steady(run, "memory_gb"),
            **style_and_kl(model, run / "base", questions, args.new_tokens, 0),
        }
    results["seconds"] = time.perf_counter() - t0
    (out / "dpo.json").write_text(json.dumps(results, indent=1) + "\n")
    s = results["sft"]
    print(f"\n{'run':14s}{'reward acc':>16s}{'final ####':>12s}{'KL nats':>9s}{'tokens/s':>10s}{'vs SFT':>8s}{'peak GB':>9s}")
    print(
        f"{'sft':14s}{'-':>16s}{s['final_answer_share']:>12.2f}{'-':>9s}{s['tokens_per_s']:>10.0f}{'1.00':>8s}{s['memory_gb']:>9.2f}"
    )
    for name in args.runs.split(","):
        r = results[name]
        acc = f"{r['reward_accuracy_before']:.2f} -> {r['reward_accuracy_after']:.2f}"
        print(
            f"{name:14s}{acc:>16s}{r['final_answer_share']:>12.2f}{r['kl']:>9.2f}{r['tokens_per_s']:>10.0f}"
            f"{r['tokens_per_s'] / s['tokens_per_s']:>8.2f}{r['memory_gb']:>9.2f}"
        )
    ok = all(results[n]["reward_accuracy_after"] >= 0.9 for n in args.runs.split(","))
    print(f"held-out reward accuracy >= 0.9 in every run: {'PASS' if ok else 'FAIL'}; {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
