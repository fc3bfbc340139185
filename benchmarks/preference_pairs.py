"""Preference pairs made from the data in ../shared (nothing is downloaded), for `llmtrain dpo`.

    python benchmarks/preference_pairs.py gsm8k --out runs/gsm8k-pairs.jsonl     # 7,473 pairs
    python benchmarks/preference_pairs.py chat --out runs/chat-pairs.jsonl       # 2,393 pairs
    python benchmarks/preference_pairs.py sentiment --out runs/sentiment-pairs.jsonl

Each kind is a preference a small model can learn and that generalises to held-out prompts:
- gsm8k: chosen = the reference solution; rejected = the same solution without its final answer
  line ("#### N"): complete answers are preferred (the greedy answers of a tuned model should end
  with "#### N" more often: `benchmarks/dpo_pipeline.py` counts it);
- chat: chosen = the response; rejected = the same words in reverse order (fluent text preferred);
- sentiment: prompt "Review: {text}\\nSentiment:", chosen = the correct label word, rejected = the
  other one.
Records are `{"prompt", "chosen", "rejected"}` JSON lines, in a seeded shuffled order.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Iterator, Optional

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def gsm8k(path: Path = SHARED / "sft" / "gsm8k_train.jsonl", max_chars: Optional[int] = None) -> Iterator[dict]:
    for line in path.read_text().splitlines():
        r = json.loads(line)
        answer = r["answer"].strip()
        body, sep, final = answer.rpartition("####")
        if not sep or not body.strip() or (max_chars and len(r["question"]) + 2 * len(answer) > max_chars):
            continue
        yield {"prompt": r["question"].strip(), "chosen": answer, "rejected": body.strip()}


def chat(path: Path = SHARED / "sft" / "chatterbot_english_pairs.json", max_chars: Optional[int] = None) -> Iterator[dict]:
    for r in json.loads(path.read_text()):
        words = r["response"].split()
        if len(words) < 3 or (max_chars and len(r["prompt"]) + 2 * len(r["response"]) > max_chars):
            continue
        reversed_words = " ".join(reversed(words))
        if reversed_words != r["response"]:
            yield {"prompt": r["prompt"].strip(), "chosen": r["response"].strip(), "rejected": reversed_words}


def sentiment(path: Path = SHARED / "eval" / "sentiment_train.jsonl", max_chars: Optional[int] = None) -> Iterator[dict]:
    other = {"positive": "negative", "negative": "positive"}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if max_chars and len(r["text"]) > max_chars:
            continue
        yield {"prompt": f"Review: {r['text']}\nSentiment:", "chosen": f" {r['label']}", "rejected": f" {other[r['label']]}"}


KINDS = {"gsm8k": gsm8k, "chat": chat, "sentiment": sentiment}


def write_pairs(kind: str, out: Path, limit: Optional[int] = None, seed: int = 0, max_chars: Optional[int] = None) -> Path:
    """Write up to `limit` pairs of `kind` to `out` (JSON lines) in a seeded order; returns `out`."""
    records = list(KINDS[kind](max_chars=max_chars))
    random.Random(seed).shuffle(records)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records[:limit]))
    tmp.replace(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-chars", type=int, default=None, help="skip records whose prompt + 2 answers are longer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = write_pairs(args.kind, args.out, args.limit, args.seed, args.max_chars)
    print(f"{sum(1 for _ in out.open())} pairs -> {out}")


if __name__ == "__main__":
    main()
