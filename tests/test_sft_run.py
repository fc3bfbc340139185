"""Full fine-tuning from one of our pretraining runs (torchrun, no Ray): the base exported once,
frozen blocks untouched, layer-wise LR decay, the forgetting report; and a chat-tuned model
whose generations stop at the end-of-turn token."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import need_shared
from runtime_support import BASE, REPO, subprocess_env, tiny_data, torchrun
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SFT = REPO / "configs" / "tiny-sft.yaml"


def sft(nproc: int, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun -m llmtrain.train --task sft configs/tiny-sft.yaml ...`; rank 0 prepares the data."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "llmtrain.train",
        "--task",
        "sft",
        str(SFT),
        *BASE,
        f"cluster.num_workers={nproc}",
        *overrides,
    ]
    env = subprocess_env(OMP_NUM_THREADS="1")  # as torchrun sets for several processes; tiny models gain nothing from more
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, f"sft failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, prepared data): 8 pretraining steps of the tiny preset at vocab 512."""
    need_shared()
    data = tiny_data(tmp_path_factory.getbasetemp())
    run = tmp_path_factory.mktemp("pre") / "run"
    torchrun(1, [f"data.path={data}", f"run.dir={run}", "train.max_steps=8", "zero.stage=2"])
    return run, data


def test_full_sft_from_our_run_freezing_and_forgetting_report(pretrained, tmp_path, shared_dir, capsys):
    run, prepared = pretrained
    out = tmp_path / "sft"
    sft(
        2,
        [
            f"run.dir={out}",
            f"model.from={run}",
            f"data.path={shared_dir / 'data' / 'eval' / 'sentiment_train.jsonl'}",
            "data.format=labelled",
            'data.template="Review: {text}\\nSentiment:"',
            "data.chat_template=completion",
            'data.label_words={positive: " positive", negative: " negative"}',
            "data.max_examples=160",
            "data.max_val_examples=32",
            "data.seq_len=128",
            "train.max_steps=5",
            "train.lr=1e-3",
            "zero.stage=2",
            "finetune.freeze_layers=0",
            "finetune.layer_lr_decay=0.5",
            "finetune.eval_examples=32",
        ],
    )
    # the base: our run's newest checkpoint, exported once before training
    marker = json.loads((out / "base" / "llmtrain_base.json").read_text())
    assert marker == {"source": str(run / "checkpoints" / "step_00000008"), "step": 8}
    base = load_file(out / "base" / "model.safetensors")
    from llmtrain.export import export

    tuned = load_file(export(out, tmp_path / "export") / "model.safetensors")
    for name in base:
        same = torch.equal(base[name], tuned[name])
        assert same == name.startswith("model.layers.0."), name  # block 0 frozen, everything else trained
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["format"] == "labelled" and not report["lora"]
    for when in ("before", "after"):
        assert 0 <= report[when]["accuracy"] <= 1 and report[when]["base_val_loss"] > 0
    assert report["after"]["val_loss"] < report["before"]["val_loss"]
    assert report["forgetting"] == pytest.approx(report["after"]["base_val_loss"] - report["before"]["base_val_loss"])
    block = sum(t.numel() for n, t in base.items() if n.startswith("model.layers.0."))
    assert report["params"]["trainable"] == report["params"]["total"] - block
    from llmtrain.tasks.sft import print_report

    print_report(out)
    table = capsys.readouterr().out
    assert "base validation loss (forgetting)" in table and "task accuracy (label log-prob)" in table
    assert f"{report['params']['trainable']:,} of {report['params']['total']:,}" in table


def test_layer_wise_lr_decay_and_freezing_select_parameters():
    from llmtrain.config import load_config
    from llmtrain.engine import param_groups
    from llmtrain.model.decoder import Decoder
    from llmtrain.model.model_config import ModelConfig
    from llmtrain.tasks.sft import select_trainable

    mc = ModelConfig.from_preset(
        "tiny",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Decoder(mc)
    select_trainable(model, load_config(None, ["finetune.layer_lr_decay=0.5"]), mc)
    lr_of = {id(p): g.get("lr", 1.0) for g in param_groups(model, 0.1, lr=1.0) for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["model.norm.weight"])] == 1.0
    for i in range(3):
        assert lr_of[id(named[f"model.layers.{i}.mlp.up_proj.weight"])] == 0.5 ** (3 - i)
    assert lr_of[id(named["model.embed_tokens.weight"])] == 0.5**4
    assert param_groups(model, 0.1, lr=1.0)[0].get("lr", 1.0) == 1.0  # the first group reports the peak LR
    # freezing by name pattern and block range
    model = Decoder(mc)
    select_trainable(
        model, load_config(None, ["finetune.freeze=[model.embed_tokens.*, '*.mlp.*']", "finetune.freeze_layers=0-1"]), mc
    )
    for name, p in model.named_parameters():
        frozen = name.startswith(("model.embed_tokens.", "model.layers.0.", "model.layers.1.")) or ".mlp." in name
        assert p.requires_grad == (not frozen), name


QA = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (7, 2)]]


def test_chat_tuned_model_stops_at_the_end_of_turn(pretrained, tmp_path):
    """Our tokenizer's template ends answers with <|end|>: trained on it (it is in the loss), the
    model ends its answers with it, and the export lists it among the stop tokens."""
    from transformers import AutoTokenizer

    from llmtrain.export import export
    from llmtrain.generate import eos_ids, generate
    from llmtrain.model.hf import load_hf_model

    run, _ = pretrained
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n" for q, a in QA
        )
    )
    out = tmp_path / "chat"
    sft(
        1,
        [
            f"run.dir={out}",
            f"model.from={run}",
            f"data.path={data}",
            "data.format=chat",
            "data.val_fraction=0",
            "data.seq_len=64",
            "data.packing=false",
            "train.max_steps=40",
            "train.lr=2e-3",
            "train.global_batch_size=6",
            "train.micro_batch_size=6",
            "zero.stage=0",
        ],
    )
    model_dir = export(out, tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    eos = eos_ids(model_dir, None, None)
    assert end in eos and tokenizer.eos_token_id in eos
    tuned, base = load_hf_model(model_dir), load_hf_model(out / "base")
    for question, _ in QA[:3]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        tokens = generate(tuned, list(prompt), 40, eos_id=eos)[len(prompt) :]
        assert tokens[-1] == end and 1 < len(tokens) < 40, tokenizer.decode(tokens)  # an answer, then the end of turn
        assert re.match(r"\d", tokenizer.decode(tokens[:-1])), tokenizer.decode(tokens)  # answers start with a number
        before = generate(base, list(prompt), 40, eos_id=eos)[len(prompt) :]
        assert len(before) == 40 and end not in before  # the base never learned to stop
