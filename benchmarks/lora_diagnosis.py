"""Why does LoRA keep (or not keep) full fine-tuning's gain? Measurements on finished sentiment runs.

    .venv/bin/python benchmarks/lora_diagnosis.py RUN_DIR [RUN_DIR ...] [--examples 400]

For each fine-tuning run of benchmarks/transfer.py (LoRA or full; the run's RUN_DIR/base/ and,
for LoRA, RUN_DIR/adapter/ are read with transformers + peft, nothing of ours in the forward):
  - the loss on the label decision token (the first token of " positive" / " negative"), the
    accuracy and the share of "positive" answers over `--examples` test sentences: a share near
    0 or 1 is a collapse to one answer, which scores ~50% whatever the model knows;
  - LoRA: the effective scale alpha/r (alpha/sqrt(r) with rsLoRA), the size of each adapted
    module's update ||scale * B A|| against ||W||, and the gradient norms of A and B on one batch
    of training sentences, at the trained adapter and at peft's initialisation (B = 0, so A's
    gradient is exactly 0 at step 0: only B moves first; measured with the trained A).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EVAL = REPO.parent / "shared" / "data" / "eval"


def load(run: Path, adapter: bool, scratch: Path):
    """LoRA: the base + the run's adapter (peft); full: the run's last checkpoint, exported."""
    from transformers import AutoModelForCausalLM

    if adapter:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
        return PeftModel.from_pretrained(model, run / "adapter", is_trainable=True)
    from llmtrain.checkpoint import find_latest
    from llmtrain.export import export

    target = scratch / run.name
    export(find_latest(run), target, dtype="fp32")
    return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)


def encode(tok, template: str, words: dict, rows: list[dict]):
    """[(prompt ids, {label: answer ids})]: BOS + prompt, answer = word + EOS (the run's template)."""
    out = []
    for r in rows:
        prompt = [tok.bos_id] + tok.encode(template.format(text=r["text"]))
        out.append((prompt, {lab: tok.encode(w) + [tok.eos_id] for lab, w in words.items()}, r["label"]))
    return out


def decision(model, examples) -> dict:
    """Label-token loss, accuracy and the share of 'positive' answers (whole-answer log-prob)."""
    losses, correct, positive = [], 0, 0
    with torch.no_grad():
        for prompt, answers, gold in examples:
            scores = {}
            for lab, ans in answers.items():
                logp = torch.log_softmax(model(torch.tensor([prompt + ans])).logits[0, :-1].float(), -1)
                tokens = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ans)]
                scores[lab] = sum(tokens)
                if lab == gold:
                    losses.append(-tokens[0])
            pred = max(scores, key=scores.get)
            correct += pred == gold
            positive += pred == "positive"
    n = len(examples)
    return {"label_token_loss": sum(losses) / n, "accuracy": correct / n, "positive_share": positive / n}


def lora_norms(model) -> dict:
    """Per adapted module: ||scale B A||_F / ||W||_F, and the LoRA gradient norms."""
    rel, grads_a, grads_b = [], [], []
    for module in model.modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        scale = module.scaling["default"]
        rel.append(float((scale * b @ a).norm() / module.base_layer.weight.norm()))
        if a.grad is not None:
            grads_a.append(float(a.grad.norm()) ** 2)
            grads_b.append(float(b.grad.norm()) ** 2)
    return {
        "modules": len(rel),
        "update_over_weight_mean": sum(rel) / len(rel),
        "update_over_weight_max": max(rel),
        "grad_norm_A": math.sqrt(sum(grads_a)),
        "grad_norm_B": math.sqrt(sum(grads_b)),
    }


def gradients(model, examples) -> None:
    """Backward of the summed answer loss of `examples` (gold answers) into the LoRA weights."""
    model.zero_grad()
    for prompt, answers, gold in examples:
        ans = answers[gold]
        ids = torch.tensor([prompt + ans])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        (-sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(ans)) / len(examples)).backward()


def main() -> int:
    from llmtrain.checkpoint import find_latest, read_meta
    from llmtrain.data.tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--examples", type=int, default=400, help="test sentences scored (default 400)")
    p.add_argument("--batch", type=int, default=32, help="training sentences of the gradient measurement")
    args = p.parse_args()
    test = [json.loads(line) for line in (EVAL / "sentiment_test.jsonl").open()][: args.examples]
    train = [json.loads(line) for line in (EVAL / "sentiment_train.jsonl").open()][: args.batch]
    results = {}
    scratch = tempfile.mkdtemp(prefix="lora-diagnosis-")
    for run in args.runs:
        cfg = read_meta(find_latest(run))["config"]
        data = cfg.get("data", {})
        template = data.get("template") or "Review: {text}\nSentiment:"
        words = data.get("label_words") or {"positive": " positive", "negative": " negative"}
        tok = load_tokenizer(run / "tokenizer")
        is_lora = (run / "adapter").is_dir()
        model = load(run, is_lora, Path(scratch)).eval()
        row = {"lora": is_lora, **decision(model, encode(tok, template, words, test))}
        if is_lora:
            lc = cfg.get("lora", {})
            row["scale"] = lc.get("alpha", 16) / (math.sqrt(lc.get("r", 8)) if lc.get("rslora") else lc.get("r", 8))
            batch = encode(tok, template, words, train)
            gradients(model, batch)
            row["trained"] = lora_norms(model)
            for module in model.modules():  # peft's initialisation: B = 0
                if hasattr(module, "lora_B") and "default" in module.lora_B:
                    torch.nn.init.zeros_(module.lora_B["default"].weight)
            gradients(model, batch)
            at_init = lora_norms(model)
            row["at_init"] = {k: at_init[k] for k in ("grad_norm_A", "grad_norm_B")}
        results[str(run)] = row
        print(json.dumps({str(run): row}), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
