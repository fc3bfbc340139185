"""Bad fine-tuning input: one clear line each, exit status 2, found on the driver before Ray
starts, and nothing half-written (no checkpoint, no partial cache entry)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import STORIES260K, need_shared
from runtime_support import REPO, llmtrain

LORA = REPO / "configs" / "tiny-lora.yaml"
COMMON = ["train.max_steps=2", "cluster.num_workers=1", "cluster.use_gpu=false", "data.val_fraction=0"]


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    """Every case must fail before Ray starts: starting it would be a test failure."""
    need_shared()
    import llmtrain.launch

    def refuse(cfg):
        raise AssertionError("reached start_ray: the mistake was not caught on the driver")

    monkeypatch.setattr(llmtrain.launch, "start_ray", refuse)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PAIRS = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(6)]


def sft_error(capsys, run: Path, *overrides: str, config: Path = LORA) -> str:
    """`llmtrain sft` in this process, expecting a user error; returns its single line."""
    from llmtrain import cli

    code = cli.main(["sft", str(config), *COMMON, f"run.dir={run}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("llmtrain: error: ") and "Traceback" not in err
    assert not (run / "checkpoints").exists()
    cache = run / "sft-cache"
    assert not cache.exists() or all((entry / "meta.json").is_file() for entry in cache.iterdir())  # complete or absent
    return lines[-1]


def test_record_missing_the_configured_field(tmp_path, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS[:2] + [{"prompt": "Where is it?", "answer": "Here."}] + PAIRS[2:])
    line = sft_error(capsys, tmp_path / "r", f"data.path={data}")
    assert f"{data}: record 3 has no field 'response' (fields: answer, prompt); set data.response_field or fix the record" in line


def test_messages_with_an_unknown_role(tmp_path, capsys):
    data = _jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hey"}]},
        ],
    )
    line = sft_error(capsys, tmp_path / "r", f"data.path={data}", "data.format=chat")
    assert "record 2: message 2 has unknown role 'bot'; roles must be one of system, user, assistant" in line


def test_examples_longer_than_seq_len(tmp_path, capsys):
    long = [{"prompt": "Tell me a story. " * 20, "response": "Once upon a time."}]
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS + long * 2)
    line = sft_error(capsys, tmp_path / "r", f"data.path={data}", "data.seq_len=64", "data.truncation=error")
    assert "2 of 8 train examples are longer than seq_len 64 (longest" in line
    assert "set data.truncation=drop or truncate, or raise data.seq_len" in line
    # every example too long for the row, and dropped by policy: nothing left to train on
    line = sft_error(capsys, tmp_path / "r2", f"data.path={data}", "data.seq_len=8", "data.truncation=drop")
    assert "no training examples left (8 read, 8 longer than seq_len (dropped))" in line


def test_lora_target_pattern_matching_nothing(tmp_path, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    line = sft_error(capsys, tmp_path / "r", f"data.path={data}", "lora.target_modules=[q_proj, qkv_proj]")
    assert "lora.target_modules: 'qkv_proj' selects nothing to adapt (it matches no module)" in line
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in line
    line = sft_error(capsys, tmp_path / "r", f"data.path={data}", "lora.target_modules=[self_attn]")
    assert "'self_attn' selects nothing to adapt (it matches model.layers.0.self_attn (Attention), not a Linear layer)" in line
    line = sft_error(capsys, tmp_path / "r", f"data.path={data}", "lora.target_modules=[embed_tokens]")
    assert "embed_tokens is tied to lm_head in this model" in line


def test_freezing_mistakes(tmp_path, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    full = ["lora=null", f"data.path={data}"]
    line = sft_error(capsys, tmp_path / "r", *full, "finetune.freeze=[embeddings.*]")
    assert "finetune.freeze: 'embeddings.*' matches no parameter" in line
    line = sft_error(capsys, tmp_path / "r", *full, "finetune.freeze_layers=3-7")
    assert "finetune.freeze_layers=3-7: the model has 5 blocks (0-4)" in line
    line = sft_error(capsys, tmp_path / "r", *full, "finetune.freeze=['*']")
    assert "every parameter is frozen" in line


def test_base_of_an_unsupported_architecture(tmp_path, capsys):
    base = tmp_path / "gpt2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    line = sft_error(capsys, tmp_path / "r", f"data.path={data}", f"model.from={base}")
    assert (
        "model_type 'gpt2' (GPT2LMHeadModel) is not supported; llmtrain loads llama, mistral, qwen2, qwen3, gemma3_text, phi3 checkpoints"
        in line
    )


def test_data_that_is_not_records(tmp_path, capsys, shared_dir):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text("{}")
    line = sft_error(capsys, tmp_path / "r", f"data.path={prepared}")
    assert "is a prepared pretraining directory; SFT reads JSONL/JSON/Parquet records" in line
    line = sft_error(capsys, tmp_path / "r", f"data.path={tmp_path / 'missing.jsonl'}")
    assert "missing.jsonl: no such file or directory" in line
    odd = _jsonl(tmp_path / "odd.jsonl", [{"q": "a", "a": "b"}])
    line = sft_error(capsys, tmp_path / "r", f"data.path={odd}", "data.format=auto")
    assert "the first record has fields a, q" in line and "set data.format and the field names" in line


def test_adapter_saved_for_another_base_model(tmp_path):
    """`llmtrain eval BASE --adapter A` (through the real CLI process): an adapter trained on
    stories260K refuses a base of another shape, and loads on its own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmtrain.model.decoder import Decoder
    from llmtrain.model.hf import save_hf_checkpoint
    from llmtrain.model.model_config import ModelConfig

    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(STORIES260K),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    peft_model.save_pretrained(adapter)
    other = ModelConfig.from_preset(
        "tiny",
        vocab_size=512,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    save_hf_checkpoint(Decoder(other).state_dict(), other, tmp_path / "other")
    t0 = time.perf_counter()
    proc = llmtrain("eval", str(tmp_path / "other"), "--adapter", str(adapter), "--prompt", "Once", timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.strip()][-1]
    assert line.startswith(
        f"llmtrain: error: {adapter} was trained for another base model: model.layers.0.self_attn.q_proj "
        "has 96 inputs here, the adapter expects 64"
    )
    assert "Traceback" not in proc.stderr and time.perf_counter() - t0 < 60
    ok = llmtrain(
        "eval", str(STORIES260K), "--adapter", str(adapter), "--prompt", "Once upon a time", "--max-new-tokens", "8", timeout=120
    )
    assert ok.returncode == 0 and "'Once upon a time' -> " in ok.stdout, ok.stderr
