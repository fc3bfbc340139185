"""Preference tuning end to end (torchrun, no Ray): held-out reward accuracy rises from 0.5 to
>= 0.9 with LoRA (reference = adapters off) and full tuning (a frozen reference copy, ZeRO-3);
a stopped and resumed run equals an uninterrupted one bit for bit (ZeRO-2 and ZeRO-3, with and
without precomputed reference log-probabilities, whose cache is keyed and never reused for
another model); LoRA DPO of the released stories260K and of a Qwen2-shaped model, whose adapters
load in peft and whose merged export equals the adapter model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STORIES260K, need_shared
from fault_support import bitwise_equal, final_parameters
from runtime_support import BASE, REPO, benchmark, losses, subprocess_env, tiny_data, torchrun

from llmtrain.metrics import read_metrics

write_pairs = benchmark("preference_pairs").write_pairs

pytestmark = pytest.mark.slow

DPO = REPO / "configs" / "tiny-dpo.yaml"
STEPS = 32


def dpo(nproc: int, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun -m llmtrain.train --task dpo configs/tiny-dpo.yaml ...`; rank 0 prepares the data."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "llmtrain.train",
        "--task",
        "dpo",
        str(DPO),
        *BASE,
        f"cluster.num_workers={nproc}",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=REPO)
    assert proc.returncode == 0, f"dpo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


_JOBS = """
import json, sys
from llmtrain.config import load_config
from llmtrain.tasks import get_task
from llmtrain.train import run_torchrun
from llmtrain.worker import exit_process
for overrides in json.loads(sys.argv[1]):
    run_torchrun(load_config(sys.argv[2], overrides), get_task("dpo"))
exit_process(0)
"""


def dpo_jobs(jobs: list[list[str]], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Several DPO jobs one after another in one torchrun of 2 processes (the process group is
    reused, each job builds its own engine): start-up paid once."""
    (tmp / "jobs.py").write_text(_JOBS)
    payload = json.dumps([[*BASE, "cluster.num_workers=2", *job] for job in jobs])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(tmp / "jobs.py"),
        payload,
        str(DPO),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=REPO)
    assert proc.returncode == 0, f"dpo jobs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny pretrained run (vocab 512, 30 steps) exported once, and chat pairs (chosen: the response; rejected:
    its words reversed)."""
    need_shared()
    root = tmp_path_factory.mktemp("dpo")
    data = tiny_data(tmp_path_factory.getbasetemp())
    run = root / "pre"
    torchrun(1, [f"data.path={data}", f"run.dir={run}", "train.max_steps=30", "zero.stage=2"])
    pairs = write_pairs("chat", root / "pairs.jsonl", limit=600, max_chars=300)
    from llmtrain.export import export

    base = export(run, root / "pre-hf")  # one Hugging Face base for every job (no per-run export)
    return {"root": root, "base": base, "pairs": pairs, "prepared": data}


def common(setup, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"model.from={setup['base']}",
        f"data.path={setup['pairs']}",
        "data.seq_len=128",
        "data.max_val_examples=64",
        f"train.max_steps={STEPS}",
        "train.val_every=0",
        "train.lr=3e-3",
        f"data.cache_dir={setup['root'] / 'cache'}",
        f"finetune.base_val_path={setup['prepared']}",
        *extra,
    ]


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "finetune_report.json").read_text())


def test_lora_dpo_learns_the_preference(setup):
    out = setup["root"] / "lora"
    dpo(2, common(setup, out, "zero.stage=2"))
    r = report(out)
    assert r["task"] == "dpo" and r["lora"] and r["format"] == "preference"
    assert r["before"]["reward_accuracy"] == 0.5 and r["before"]["reward_margin"] == 0.0  # policy == reference
    assert r["after"]["reward_accuracy"] >= 0.9 and r["after"]["reward_margin"] > 0
    assert r["after"]["val_loss"] < r["before"]["val_loss"] == pytest.approx(np.log(2))
    assert r["before"]["base_val_loss"] > 0 and "forgetting" in r  # the base's pretraining data, before and after
    logged = [e for e in read_metrics(out) if "loss" in e]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(key in e for e in logged), key
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_full_dpo_with_a_frozen_reference_copy_under_zero3_learns_the_preference(setup):
    out = setup["root"] / "full3"
    dpo(2, common(setup, out, "lora=null", "zero.stage=3", "train.lr=3e-4"))
    r = report(out)
    assert not r["lora"] and r["params"]["trainable"] == r["params"]["total"]
    assert r["before"]["reward_accuracy"] == 0.5 and r["after"]["reward_accuracy"] >= 0.9


RESUME_STEPS = 8
REFERENCES = {  # reference -> settings; each ZeRO stage with each kind of reference
    "precomputed": ["dpo.precompute_reference=true"],
    "adapters off": [],
    "frozen copy": ["lora=null", "train.lr=3e-4"],
}
COMBOS = [(2, "precomputed"), (3, "precomputed"), (2, "adapters off"), (3, "frozen copy")]


def test_stopped_and_resumed_runs_equal_uninterrupted_ones(setup, tmp_path):
    """ZeRO-2 and ZeRO-3, with and without precomputed reference log-probabilities: stopped at
    half and resumed, each equals its uninterrupted run bit for bit (loss line and parameters)."""
    root = setup["root"] / "resume"

    def settings(stage: int, reference: str) -> list[str]:
        return [
            f"zero.stage={stage}",
            f"train.max_steps={RESUME_STEPS}",
            *REFERENCES[reference],
            f"data.cache_dir={root / f'cache-{stage}-{reference}'}",
        ]  # each its own precomputed table

    def name(stage: int, reference: str) -> str:
        return f"{stage}-{reference.replace(' ', '-')}"

    first = dpo_jobs([common(setup, root / name(*c), *settings(*c)) for c in COMBOS], tmp_path)
    assert "reference log-probabilities of" in first.stdout + first.stderr
    # a table made for another model or data is detected by its key and recomputed, never used
    tables = {}
    for stage, reference in COMBOS[:2]:
        [table] = (root / f"cache-{stage}-{reference}").glob("*/reference_logps.npz")
        with np.load(table) as f:
            tables[table] = {k: f[k] for k in f.files}
        np.savez(table, **{**tables[table], "key": np.asarray("another-model"), "train": tables[table]["train"] + 1.0})
    second = dpo_jobs(
        [common(setup, root / f"{name(*c)}-split", *settings(*c), f"train.stop_at_step={RESUME_STEPS // 2}") for c in COMBOS],
        tmp_path,
    )
    assert (second.stdout + second.stderr).count("holds reference log-probabilities of another model or data; recomputing") == 2
    assert not any((root / f"{name(*c)}-split" / "finetune_report.json").exists() for c in COMBOS)  # stopped early
    for table, saved in tables.items():
        with np.load(table) as f:
            assert str(f["key"]) == str(saved["key"]) and np.array_equal(f["train"], saved["train"])
    dpo_jobs([common(setup, root / f"{name(*c)}-split", *settings(*c)) for c in COMBOS], tmp_path)
    for combo in COMBOS:
        straight, split = root / name(*combo), root / f"{name(*combo)}-split"
        assert losses(split) == losses(straight), combo
        assert bitwise_equal(final_parameters(split), final_parameters(straight)), combo


def _qwen2_shaped(out: Path) -> Path:
    """A released-architecture directory: Qwen2 layout (qkv bias, GQA, tied embeddings) at a small
    width, random weights, with stories260K's tokenizer files."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(STORIES260K / f, out / f)
    return out


@pytest.mark.parametrize("base", ["stories260K", "qwen2"])
def test_lora_dpo_of_a_released_architecture_exports_a_peft_adapter(setup, tmp_path, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmtrain.export import export

    source = STORIES260K if base == "stories260K" else _qwen2_shaped(tmp_path / "qwen2")
    out = tmp_path / "run"
    dpo(
        1,
        [
            f"run.dir={out}",
            f"model.from={source}",
            f"data.path={setup['pairs']}",
            "data.chat_template=plain",
            "data.seq_len=128",
            "data.max_examples=128",
            "data.max_val_examples=16",
            "train.max_steps=4",
            "train.val_every=0",
            "train.global_batch_size=4",
            "cluster.num_workers=1",
            "zero.stage=2",
        ],
    )
    adapter = export(out, tmp_path / "adapter")
    merged = export(out, tmp_path / "merged", merge=True)
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), adapter).eval()
    with torch.no_grad():
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert (adapted - plain).abs().max() > 1e-4  # the adapter moved
