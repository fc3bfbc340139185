"""LoRA DPO at a released model's real shape, end to end: the published Qwen2.5-0.5B architecture
(hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4,864, vocabulary 151,936, tied
embeddings, qkv bias) at random init, saved as a Hugging Face directory with stories260K's
tokenizer; a few `llmtrain dpo` steps with LoRA r=16 on every projection; the PEFT adapter loaded
by `peft` on the same directory and the merged export compared with it.

    .venv/bin/python benchmarks/dpo_released_shape.py --out runs/dpo-qwen2-shape     # ~5 min on 2 cores

Then full DPO of the same model for a few steps twice, with a frozen reference copy and with
precomputed reference log-probabilities: peak resident memory of the worker (metrics.jsonl
memory_gb), i.e. what the reference copy costs. Speed and the learning signal do not matter here
(random weights): it shows the path works at 0.5B parameters and a 152k vocabulary (per-token
log-probabilities from the chunked LM head, never [tokens x vocab] logits).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STORIES = REPO.parent / "shared" / "checkpoints" / "stories260K"


def qwen25_shape(out: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1e6,
        bos_token_id=1,
        eos_token_id=2,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(STORIES / f, out / f)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "dpo-qwen2-shape")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch
    from peft import PeftModel
    from preference_pairs import write_pairs
    from transformers import AutoModelForCausalLM

    from llmtrain.config import load_config
    from llmtrain.export import export
    from llmtrain.launch import launch
    from llmtrain.metrics import read_metrics

    t = {}
    t0 = time.perf_counter()
    base = qwen25_shape(out / "base")
    t["base_s"] = time.perf_counter() - t0
    pairs = write_pairs("chat", out / "pairs.jsonl", limit=200, max_chars=300)
    run = out / "run"
    common = [
        f"model.from={base}",
        f"data.path={pairs}",
        "data.chat_template=plain",
        "data.seq_len=128",
        "data.max_val_examples=8",
        f"train.max_steps={args.steps}",
        "train.global_batch_size=2",
        "train.micro_batch_size=1",
        "train.val_every=0",
        "train.val_batches=1",
        "train.log_every=1",
        "checkpoint.every=0",
        "cluster.num_workers=1",
        "cluster.use_gpu=false",
        f"data.cache_dir={out / 'cache'}",
    ]
    t0 = time.perf_counter()
    if not (run / "finetune_report.json").is_file():
        launch(load_config(REPO / "configs" / "tiny-dpo.yaml", [*common, f"run.dir={run}", "lora.r=16", "lora.alpha=32"]), "dpo")
    t["dpo_s"] = time.perf_counter() - t0
    memory = {}
    for name, extra in (("frozen copy", []), ("precomputed", ["dpo.precompute_reference=true"])):
        full = out / f"full-{name.replace(' ', '-')}"
        if not (full / "finetune_report.json").is_file():
            launch(
                load_config(
                    REPO / "configs" / "tiny-dpo.yaml", [*common, f"run.dir={full}", "lora=null", "train.lr=1e-5", *extra]
                ),
                "dpo",
            )
        memory[name] = max(e["memory_gb"] for e in read_metrics(full) if "memory_gb" in e)
    for name in ("adapter", "merged"):
        shutil.rmtree(out / name, ignore_errors=True)
    adapter = export(run, out / "adapter")
    merged = export(run, out / "merged", merge=True)
    ids = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
        del peft_model
        merged_logits = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    diff = float((merged_logits - adapted).abs().max())
    moved = float((adapted - plain).abs().max())
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    print(
        f"Qwen2.5-0.5B shape: {params / 1e6:.0f}M parameters; LoRA DPO {args.steps} steps in {t['dpo_s']:.0f} s "
        f"(command to end, 1 worker); peft adapter vs merged export: max |logit diff| {diff:.2e}; adapter moved logits by {moved:.2e}"
    )
    print(
        f"full DPO, peak RSS of the worker: frozen reference copy {memory['frozen copy']:.2f} GB, precomputed reference "
        f"{memory['precomputed']:.2f} GB ({memory['frozen copy'] - memory['precomputed']:+.2f} GB for the copy; the fp32 "
        f"weights are {params * 4 / 2**30:.2f} GB)"
    )
    print("PASS" if diff < 1e-3 and moved > 0 else "FAIL")


if __name__ == "__main__":
    main()
