"""Export in the base's dtype (issue 12, section 5): a bf16 released-style base (a tiny random
Qwen2 saved by transformers, its config.json in the released v4 spelling) fine-tuned by
`llmtrain sft` (full and LoRA, torchrun, 1 process, a few steps) exports bf16 by default and
fp32 with --dtype fp32; transformers loads both and gives our model's logits (bf16 within bf16
rounding); config.json keeps the base's fields, generation_config.json its sampling defaults,
the tokenizer its chat template."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STORIES260K, need_shared
from runtime_support import BASE, REPO, llmtrain, subprocess_env
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}User: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
# A released Qwen2.5 config.json, shrunk: the v4 spelling (torch_dtype, rope_theta, rope_scaling),
# an unused sliding window with its layer count, a field llmtrain does not model (use_mrope).
BASE_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "max_window_layers": 1,
    "model_type": "qwen2",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "sliding_window": 128,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 512,
}
GENERATION = {"bos_token_id": 1, "eos_token_id": [2], "do_sample": True, "temperature": 0.7, "top_p": 0.8}
KEPT = ("max_window_layers", "sliding_window", "use_sliding_window", "use_mrope", "rope_theta", "transformers_version")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A bf16 Hugging Face directory: random Qwen2 weights, stories260K's tokenizer with a chat template."""
    need_shared()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("bf16-base") / "qwen2-bf16"
    torch.manual_seed(0)
    hf_config = Qwen2Config(**json.loads(json.dumps(BASE_CONFIG)))  # a copy: transformers edits rope_scaling in place
    Qwen2ForCausalLM(hf_config).to(torch.bfloat16).save_pretrained(out)
    (out / "config.json").write_text(json.dumps(BASE_CONFIG, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    for name in ("tokenizer.json", "tokenizer.model"):
        shutil.copy(STORIES260K / name, out / name)
    tok_config = json.loads((STORIES260K / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": TEMPLATE}, indent=2))
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    return out


def sft(run: Path, base: Path, config: str, overrides: list[str]) -> Path:
    """`torchrun -m llmtrain.train --task sft configs/CONFIG ...`, 1 process, 3 steps of 64-token rows."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=1",
        "-m",
        "llmtrain.train",
        "--task",
        "sft",
        str(REPO / "configs" / config),
        *BASE,
        "cluster.num_workers=1",
        f"run.dir={run}",
        f"model.from={base}",
        f"data.path={STORIES260K.parents[1] / 'data' / 'sft' / 'chatterbot_english_pairs.json'}",
        "data.chat_template=auto",  # the base's own template
        "data.max_examples=96",
        "data.val_fraction=0",
        "data.seq_len=64",
        "train.max_steps=3",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.lr=1e-2",  # large enough that every bf16 weight moves
        "zero.stage=0",
        "finetune.eval_examples=4",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=REPO)
    assert proc.returncode == 0, f"sft failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16-runs")
    return {
        "full": sft(root / "full", base, "tiny-sft.yaml", []),
        "lora": sft(root / "lora", base, "tiny-lora.yaml", ["lora.r=4"]),
    }


def _ours_logits(ckpt_tensors: dict[str, torch.Tensor], model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from llmtrain.model.decoder import Decoder
    from llmtrain.model.hf import load_hf_config

    ours = Decoder(load_hf_config(model_dir))
    missing, unexpected = ours.load_state_dict(ckpt_tensors, strict=False)
    assert not unexpected and missing in ([], ["lm_head.weight"])
    with torch.no_grad():
        return ours.eval()(ids)


def _hf_logits(model_dir: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # the dtype config.json names
    assert next(hf.parameters()).dtype == dtype
    with torch.no_grad():
        return hf.float()(ids).logits


def _check_export(out: Path, base: Path, dtype: torch.dtype, trained: dict[str, torch.Tensor], ids: torch.Tensor) -> None:
    """Weights in `dtype` equal to the trained fp32 ones rounded once; config, generation
    settings and chat template from the base; transformers' logits equal ours."""
    name = str(dtype).removeprefix("torch.")
    written = load_file(out / "model.safetensors")
    assert {t.dtype for t in written.values()} == {dtype}
    for key, tensor in written.items():
        assert torch.equal(tensor, trained[key].to(dtype)), key
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == name
    for key in KEPT:
        assert config[key] == BASE_CONFIG[key], key
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 4.0
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("do_sample", "temperature", "top_p")} == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
    }
    assert 2 in ([generation["eos_token_id"]] if isinstance(generation["eos_token_id"], int) else generation["eos_token_id"])
    from transformers import AutoConfig, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(out)
    assert hf_config.max_window_layers == 1 and not hf_config.use_sliding_window
    assert hf_config.rope_parameters["rope_type"] == "llama3"
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE
    # logits: transformers on the written weights vs our decoder on the checkpoint's fp32 weights
    ours = _ours_logits(trained, base, ids)
    theirs = _hf_logits(out, ids, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.0, atol=0.05 * ours.abs().max().item())
    torch.testing.assert_close(theirs, ours, **tol)
    if dtype != torch.float32:  # rounding the weights shows, and stays small
        assert 0 < (theirs - ours).abs().max() < 0.05 * ours.abs().max()


def _trained(run: Path) -> dict[str, torch.Tensor]:
    from llmtrain.checkpoint import find_latest, read_meta
    from llmtrain.export import consolidated_tensors

    ckpt = find_latest(run)
    return dict(consolidated_tensors(ckpt, read_meta(ckpt)["zero_stage"]))


def test_full_sft_of_a_bf16_base_exports_bf16_by_default_and_fp32_on_request(base, runs, tmp_path):
    from llmtrain.export import export, export_dtype

    run = runs["full"]
    assert export_dtype(str(base)) == torch.bfloat16
    trained = _trained(run)
    base_weights = load_file(base / "model.safetensors")
    moved = [k for k in base_weights if not torch.equal(trained[k].to(torch.bfloat16), base_weights[k])]
    assert len(moved) == len(base_weights)  # the export is the fine-tuned model, not the base
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    _check_export(export(run, tmp_path / "bf16"), base, torch.bfloat16, trained, ids)
    proc = llmtrain("export", str(run), "--output", str(tmp_path / "fp32"), "--dtype", "fp32")
    assert proc.returncode == 0 and f"exported {tmp_path / 'fp32'}" in proc.stdout, proc.stderr
    _check_export(tmp_path / "fp32", base, torch.float32, trained, ids)
    export(run, tmp_path / "fp16", dtype="fp16")
    assert {t.dtype for t in load_file(tmp_path / "fp16" / "model.safetensors").values()} == {torch.float16}
    proc = llmtrain("export", str(run), "--output", str(tmp_path / "bad"), "--dtype", "int8")
    assert proc.returncode == 2 and "--dtype" in proc.stderr and not (tmp_path / "bad").exists()


def test_merged_lora_of_a_bf16_base_merges_in_fp32_then_casts(base, runs, tmp_path):
    from llmtrain.export import export
    from llmtrain.model.hf import iter_hf_tensors

    run = runs["lora"]
    fp32 = export(run, tmp_path / "merged-fp32", merge=True, dtype="fp32")
    merged = dict(iter_hf_tensors(fp32))
    assert {t.dtype for t in merged.values()} == {torch.float32}
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    _check_export(export(run, tmp_path / "merged", merge=True), base, torch.bfloat16, merged, ids)
    _check_export(fp32, base, torch.float32, merged, ids)
    # the adapter keeps PEFT's fp32 unless asked
    adapter = load_file(export(run, tmp_path / "adapter") / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    adapter = load_file(export(run, tmp_path / "adapter-bf16", dtype="bf16") / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}


def test_runs_without_a_base_export_fp32(tmp_path):
    """A run from scratch (no model.from) writes the fp32 it holds; a gone base falls back to fp32, said."""
    from llmtrain.export import base_dir, export_dtype

    meta = {"config": {"model": {"from": None}}}
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert base_dir(ckpt, meta) is None and export_dtype(None) == torch.float32
    assert export_dtype(str(tmp_path / "gone")) == torch.float32
