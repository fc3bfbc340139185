"""The fine-tuning half of `llmtrain quickstart`: after pretraining, a short full SFT and a short
LoRA run from the pretrained model, then the same chat prompts answered before and after.

    llmtrain quickstart                       # pretraining, then this
    llmtrain quickstart --sft-data pairs.jsonl --sft-steps 100

Without `--sft-data`, an instruction set is made from the corpus itself (nothing is downloaded):
"Continue: <6-10 words of a passage>" -> "<the next 4-8 words>". A pretrained model continues
text but has never seen a chat turn; after a few dozen steps of fine-tuning it answers in the
turn format and stops at the end-of-turn token. Both runs use the
embedded Ray runtime, the tokenized-data cache is shared, and each stage is reused on a rerun.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Optional

from llmtrain.config import load_config
from llmtrain.data.atomic import atomic_write_text
from llmtrain.data.clean import CleanStats
from llmtrain.data.readers import expand_inputs, iter_documents
from llmtrain.evaluate import generations, load_model
from llmtrain.export import export
from llmtrain.launch import launch
from llmtrain.tasks.sft import print_report

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def continue_dataset(inputs: list[str], output: Path, examples: int = 2000, seed: int = 0) -> tuple[Path, list[str]]:
    """JSONL prompt/response pairs "Continue: <6-10 words>" -> "<the next 4-8 words>" from the
    corpus; returns the file and two held-out prompts (passages not in the training set)."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    for path in expand_inputs(inputs):
        for doc in iter_documents(path, "text", CleanStats()):
            words = doc.split()
            for start in range(0, max(0, len(words) - 18), 41):
                cut = start + rng.randint(6, 10)
                pairs.append((" ".join(words[start:cut]), " ".join(words[cut : cut + rng.randint(4, 8)])))
            if len(pairs) > 20 * examples:
                break
    pairs = sorted(set(pairs))
    rng.shuffle(pairs)
    held_out, train = pairs[:2], pairs[2 : 2 + examples]
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, "".join(json.dumps({"prompt": f"Continue: {p}", "response": r}) + "\n" for p, r in train))
    return output, [f"Continue: {p}" for p, _ in held_out]


def finetune(
    out: Path,
    pretrain_run: Path,
    inputs: list[str],
    workers: int,
    steps: int,
    sft_data: Optional[str],
    stage: Callable[[str], None],
) -> dict:
    """Full SFT and LoRA from `pretrain_run`, their reports, and before/after chat generations."""
    if sft_data is None:
        data, prompts = continue_dataset(inputs, out / "sft-data" / "continue.jsonl")
        print(f"[quickstart] instruction data from the corpus: {data} ('Continue: <passage>' -> the next words)")
    else:
        data, prompts = Path(sft_data).resolve(), ["Hello! Who are you?", "What can you do?"]
    common = [
        f"model.from={pretrain_run}",
        f"data.path={data}",
        "data.format=auto",
        "data.chat_template=auto",
        f"data.cache_dir={out / 'sft-cache'}",
        "data.seq_len=128",
        f"train.max_steps={steps}",
        f"cluster.num_workers={workers}",
        "cluster.use_gpu=false",
        "checkpoint.every=0",
        "train.val_every=0",
        f"train.warmup_steps={max(1, steps // 10)}",
        "train.log_every=5",
    ]
    runs = {}
    for name, config, extra in (("sft", "tiny-sft.yaml", []), ("lora", "tiny-lora.yaml", ["lora.r=16", "lora.alpha=32"])):
        run = out / name
        cfg = load_config(REPO_CONFIGS / config, [f"run.dir={run}", *common, *extra])
        launch(cfg, "sft")
        print_report(run)
        runs[name] = run
        stage(name)

    sft_model = out / "sft-model"
    if not (sft_model / "config.json").is_file():
        export(runs["sft"], sft_model)
    print(f"[quickstart] fine-tuned model: {sft_model}; LoRA adapter: {runs['lora'] / 'adapter'}")
    models = {
        "pretrained": load_model(out / "model"),
        "full SFT": load_model(sft_model),
        "LoRA": load_model(runs["lora"] / "base", runs["lora"] / "adapter"),
    }
    answers = {name: generations(m, sft_model, prompts, chat=True, max_new_tokens=24) for name, m in models.items()}
    for i, prompt in enumerate(prompts):
        print(f"[quickstart] chat {prompt!r}")
        for name in models:
            print(f"[quickstart]   {name + ':':12s} {answers[name][i]!r}")
    stage("chat")
    return {"runs": {k: str(v) for k, v in runs.items()}, "answers": answers, "prompts": prompts}
