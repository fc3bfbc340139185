"""The whole pipeline on 2 Ray workers, as `llmtrain pretrain`, `sft` and `dpo` launch it: a tiny
pretrained run -> full SFT (sentiment labels) -> DPO on chat pairs from the SFT run, LoRA under ZeRO-2 and full
tuning under ZeRO-3 (frozen reference copy): held-out reward accuracy from 0.5 to >= 0.9 (full)
and >= 0.85 (LoRA, see below)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SHARED, need_shared
from runtime_support import BASE, REPO, benchmark, subprocess_env, tiny_data, torchrun

write_pairs = benchmark("preference_pairs").write_pairs

pytestmark = pytest.mark.slow

_DRIVER = """
import json, sys
from llmtrain.config import load_config
from llmtrain.launch import launch
for task, config, overrides in json.loads(sys.argv[1]):
    launch(load_config(config, overrides), task)
"""


def test_pretrain_sft_dpo_on_ray(tmp_path_factory):
    need_shared()
    root = tmp_path_factory.mktemp("pipeline")
    data = tiny_data(tmp_path_factory.getbasetemp())
    pre, sft, lora, full = root / "pre", root / "sft", root / "dpo-lora-z2", root / "dpo-full-z3"
    torchrun(1, [f"data.path={data}", f"run.dir={pre}", "train.max_steps=30", "zero.stage=2"])
    pairs = write_pairs("chat", root / "pairs.jsonl", limit=600, max_chars=300)
    sft_job = [  # SFT on other data than the preference pairs (sentiment labels), as a user's SFT base would be
        "sft",
        str(REPO / "configs" / "tiny-sft.yaml"),
        [
            *BASE,
            f"run.dir={sft}",
            f"model.from={pre}",
            f"data.path={SHARED / 'data' / 'eval' / 'sentiment_train.jsonl'}",
            "data.format=labelled",
            'data.template="Review: {text}\\nSentiment:"',
            'data.label_words={positive: " positive", negative: " negative"}',
            "data.seq_len=128",
            "data.max_examples=400",
            "data.max_val_examples=16",
            "train.max_steps=10",
            "train.lr=1e-3",
            "finetune.eval_examples=16",
        ],
    ]
    dpo_common = [
        *BASE,
        f"model.from={sft}",
        f"data.path={pairs}",
        "data.seq_len=128",
        "data.max_val_examples=64",
        "train.max_steps=32",
        f"data.cache_dir={root / 'cache'}",
    ]
    jobs = [
        sft_job,
        ["dpo", str(REPO / "configs" / "tiny-dpo.yaml"), [*dpo_common, f"run.dir={lora}", "zero.stage=2", "train.lr=3e-3"]],
        [
            "dpo",
            str(REPO / "configs" / "tiny-dpo.yaml"),
            [*dpo_common, f"run.dir={full}", "lora=null", "zero.stage=3", "train.lr=3e-4"],
        ],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=900,
        env=subprocess_env(),
        cwd=REPO,
    )
    assert proc.returncode == 0, f"pipeline failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    placement = json.loads((lora / "placement.json").read_text())
    assert len(placement) == 2 and len({p["pid"] for p in placement}) == 2  # two Ray Train workers
    # LoRA after this SFT plateaus at 56 of the 64 held-out pairs within 32 steps (0.875; r=32 or a
    # lower LR did no better); from the pretrained run it reaches >= 0.9 (tests/test_dpo_run.py), and
    # benchmarks/dpo_pipeline.py's LoRA arm 1.00 on GSM8K pairs.
    for run, lora_run, target in ((lora, True, 0.85), (full, False, 0.9)):
        report = json.loads((run / "finetune_report.json").read_text())
        assert report["lora"] == lora_run
        assert report["base"] == str(run / "base")  # the SFT run, exported once on the driver
        assert report["before"]["reward_accuracy"] == 0.5 and report["after"]["reward_accuracy"] >= target, report
    assert json.loads((sft / "finetune_report.json").read_text())["after"]["val_loss"] is not None
