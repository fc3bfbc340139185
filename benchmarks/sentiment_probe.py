"""How much sentiment does a model know before fine-tuning? A linear probe on frozen features.

    .venv/bin/python benchmarks/sentiment_probe.py MODEL_DIR [MODEL_DIR ...] [--examples 2000]

For each model (a Hugging Face directory: `llmtrain export RUN --output DIR`, or a released
checkpoint such as ../shared/checkpoints/stories260K) and for the same architecture at random
initialisation (the baseline, measured in the same run): mean-pool the hidden states of each
review (embeddings, middle block, final norm), fit an L2-regularised logistic regression on
`--examples` records of sentiment_train.jsonl and report accuracy on sentiment_test.jsonl (best
of three regularisation strengths). The probe's accuracy bounds what fine-tuning can carry over
from pretraining: when pretrained features beat random ones by only a few points, pretraining
cannot buy fine-tuning ten (benchmarks/transfer.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EVAL = REPO.parent / "shared" / "data" / "eval"


def read(path: Path, limit: int | None = None) -> tuple[list[str], torch.Tensor]:
    rows = [json.loads(line) for line in path.open()][:limit]
    return [r["text"] for r in rows], torch.tensor([r["label"] == "positive" for r in rows], dtype=torch.float32)


@torch.no_grad()
def features(model, tokenizer, texts: list[str], max_len: int = 128) -> torch.Tensor:
    """[len(texts), 3 * hidden]: mean over tokens of the embeddings, the middle block's output and
    the final norm's output."""
    taps = [model.model.embed_tokens, model.model.layers[len(model.model.layers) // 2 - 1], model.model.norm]
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[0].mean(dim=0))) for m in taps]
    rows = []
    try:
        for text in texts:
            seen.clear()
            ids = torch.tensor([tokenizer.encode(text)[:max_len]])
            model(ids)
            rows.append(torch.cat(seen))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(rows)


def probe_accuracy(x_train, y_train, x_test, y_test) -> float:
    """Logistic regression (L-BFGS) on standardised features; best test accuracy of three L2 strengths."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    best = 0.0
    for l2 in (1e-1, 1e-2, 1e-3):
        w = torch.zeros(x_train.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500)

        def loss():
            opt.zero_grad()
            value = torch.nn.functional.binary_cross_entropy_with_logits(x_train @ w + b, y_train) + l2 * (w * w).sum()
            value.backward()
            return value

        opt.step(loss)
        with torch.no_grad():
            best = max(best, float((((x_test @ w + b) > 0).float() == y_test).float().mean()))
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="Hugging Face model directories")
    p.add_argument("--examples", type=int, default=2000, help="training records for the probe (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random initialisation of the baseline")
    args = p.parse_args()
    torch.set_num_threads(1)
    from llmtrain.data.tokenizer import load_tokenizer
    from llmtrain.model.decoder import Decoder
    from llmtrain.model.hf import load_hf_model

    train_texts, y_train = read(EVAL / "sentiment_train.jsonl", args.examples)
    test_texts, y_test = read(EVAL / "sentiment_test.jsonl")
    print(f"linear probe: {len(train_texts)} training reviews, {len(test_texts)} test reviews")
    for model_dir in args.models:
        tokenizer = load_tokenizer(model_dir)
        pretrained = load_hf_model(model_dir).eval()
        torch.manual_seed(args.seed)
        scratch = Decoder(pretrained.config).eval()
        acc = {
            name: probe_accuracy(features(m, tokenizer, train_texts), y_train, features(m, tokenizer, test_texts), y_test)
            for name, m in (("pretrained", pretrained), ("random init", scratch))
        }
        print(
            f"{model_dir}: pretrained {acc['pretrained']:.3f}, random init {acc['random init']:.3f}, "
            f"difference {100 * (acc['pretrained'] - acc['random init']):+.1f} points"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
