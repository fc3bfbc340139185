"""Hugging Face bridge: logits parity with transformers for every family through the real
conversion code (HF save_pretrained -> our loader; our save_hf_checkpoint -> AutoModelForCausalLM),
config round trips, sharded indexes, streaming, and clear errors for unsupported checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES260K, need_shared
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.utils import logging as hf_logging

from llmtrain.errors import UserError
from llmtrain.model.decoder import Decoder
from llmtrain.model.hf import (
    INDEX_FILE,
    check_model_files,
    iter_hf_tensors,
    iter_model_tensors,
    load_hf_config,
    load_hf_model,
    save_hf_checkpoint,
)
from llmtrain.model.model_config import ARCHITECTURES, ModelConfig

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

ATOL = 1e-5
SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)

CASES = {
    "llama-llama3rope-gqa-untied": (
        LlamaConfig,
        dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=LLAMA3),
    ),
    "llama-bias-tied": (LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, rope_theta=5e5)),
    "mistral-gqa-window": (MistralConfig, dict(num_key_value_heads=1, tie_word_embeddings=False, sliding_window=32)),
    "qwen2-qkvbias-tied": (Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3-qknorm-headdim": (Qwen3Config, dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
}


def _hf_model(cls, extra: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**SMALL, **extra), attn_implementation="eager").eval()
    with torch.no_grad():  # move biases off 0 and norms off 1 so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ids(seed: int = 1, batch: int = 2, length: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_parity_both_directions(case, tmp_path):
    cls, extra = CASES[case]
    hf = _hf_model(cls, extra)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded: exercises the index reader
    assert (tmp_path / "hf" / INDEX_FILE).is_file()

    ours = load_hf_model(tmp_path / "hf")
    assert ours.config.family == cls.model_type
    assert ours.config.tie_word_embeddings == extra["tie_word_embeddings"]
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    save_hf_checkpoint(ours.state_dict(), ours.config, tmp_path / "ours", max_shard_bytes=30_000)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [ARCHITECTURES[cls.model_type]] and written["model_type"] == cls.model_type
    assert len(json.loads((tmp_path / "ours" / INDEX_FILE).read_text())["weight_map"]) == len(ours.state_dict())
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back).__name__ == ARCHITECTURES[cls.model_type]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, got, atol=ATOL, rtol=0)
    reloaded = load_hf_model(tmp_path / "ours")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_llama3_rope_scaling_is_applied(tmp_path):
    """The llama3 case above would pass with plain RoPE only if scaling changed nothing: check it does."""
    cls, extra = CASES["llama-llama3rope-gqa-untied"]
    hf = _hf_model(cls, extra)
    hf.save_pretrained(tmp_path)
    scaled = load_hf_model(tmp_path)
    plain = load_hf_model(tmp_path)
    plain.config.rope_scaling = None
    with torch.no_grad():
        assert (scaled(_ids()) - plain(_ids())).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_config_round_trip_through_transformers(family, tmp_path):
    overrides = dict(
        family=family,
        vocab_size=128,
        num_key_value_heads=2,
        tie_word_embeddings=family != "mistral",
        bos_token_id=None,
        eos_token_id=[3, 4],
        rope_theta=123456.0,
    )
    overrides.update(
        {
            "llama": dict(rope_scaling=LLAMA3, attention_bias=True, attention_out_bias=True),
            "mistral": dict(sliding_window=512, head_dim=48),
            "qwen2": dict(attention_bias=True),
            "qwen3": dict(qk_norm=True, head_dim=40),
        }[family]
    )
    ours = ModelConfig.from_preset("tiny", **overrides)
    (tmp_path / "config.json").write_text(json.dumps(ours.to_hf_config(dtype="bfloat16")))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == family and hf.dtype == torch.bfloat16
    assert hf.rope_parameters["rope_theta"] == 123456.0 and hf.eos_token_id == [3, 4]
    if family != "qwen2":  # Qwen2Config derives head_dim from hidden_size / heads
        assert hf.head_dim == ours.head_dim
    assert ModelConfig.from_hf_config(hf.to_dict()) == ours
    assert load_hf_config(tmp_path) == ours


def test_reads_legacy_v4_config_spelling():
    hf = dict(
        model_type="llama",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        rope_theta=5e5,
        max_position_embeddings=256,
        rope_scaling=dict(type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0),
    )
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.rope_theta == 5e5 and cfg.num_key_value_heads == 4 and cfg.head_dim == 16
    assert cfg.rope_scaling == dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256
    )
    mistral = ModelConfig.from_hf_config(dict(hf, model_type="mistral", num_key_value_heads=2, rope_scaling=None))
    assert mistral.sliding_window == 4096  # MistralConfig's default when config.json omits it
    assert (
        ModelConfig.from_hf_config(
            dict(hf, model_type="mistral", num_key_value_heads=2, rope_scaling=None, sliding_window=None)
        ).sliding_window
        is None
    )


def test_released_configs():
    """config.json of Llama-3.1-8B and Qwen2.5-0.5B (as published, transformers v4 spelling)."""
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }
    assert ModelConfig.from_hf_config(llama) == ModelConfig.from_preset("8b", eos_token_id=[128001, 128008, 128009])
    qwen = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    cfg = ModelConfig.from_hf_config(qwen)
    assert cfg.attention_bias and not cfg.attention_out_bias and cfg.sliding_window is None and cfg.head_dim == 64
    assert cfg.num_params() == 494_032_768  # the published size of Qwen2.5-0.5B


@pytest.mark.parametrize("model_type,arch", [("gpt2", "GPT2LMHeadModel"), ("mixtral", "MixtralForCausalLM")])
def test_unsupported_architecture_is_one_clear_error(model_type, arch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch], "vocab_size": 10}))
    with pytest.raises(UserError) as err:
        load_hf_config(tmp_path)
    msg = str(err.value)
    assert (
        model_type in msg
        and arch in msg
        and "llama, mistral, qwen2, qwen3, gemma3_text, phi3 checkpoints" in msg
        and "\n" not in msg
    )


@pytest.mark.parametrize(
    "change,fragment",
    [
        (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "'yarn' is not supported"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(quantization_config={"quant_method": "awq"}), "quantized"),
        (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    ],
)
def test_unsupported_features_are_refused(change, fragment):
    hf = dict(
        model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    with pytest.raises(UserError, match=fragment):
        ModelConfig.from_hf_config({**hf, **change})


def micro_config(layers: int, **overrides) -> ModelConfig:
    """A tiny decoder for the weight-file tests (vocab 64, hidden 32, GQA 2:1)."""
    return ModelConfig.from_preset(
        "tiny",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        **overrides,
    )


def test_weight_file_errors(tmp_path):
    cfg = micro_config(1)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_hf_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="safetensors only"):
        load_hf_model(tmp_path)

    good = tmp_path / "good"
    save_hf_checkpoint(Decoder(cfg).state_dict(), cfg, good, max_shard_bytes=4000)
    index = json.loads((good / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (good / shard).unlink()
    with pytest.raises(UserError, match=f"shard {shard} .* missing"):
        load_hf_model(good)

    wrong = ModelConfig.from_dict({**cfg.to_dict(), "intermediate_size": 40})
    bad = tmp_path / "bad"
    save_hf_checkpoint(Decoder(cfg).state_dict(), cfg, bad)
    (bad / "config.json").write_text(json.dumps(wrong.to_hf_config()))
    with pytest.raises(UserError, match="has shape .* config.json implies"):
        load_hf_model(bad)


def test_check_model_files_reads_headers_only(tmp_path):
    """The driver's check: complete files, the config's names and shapes, from the headers alone."""
    cfg = micro_config(2)
    good = tmp_path / "good"
    save_hf_checkpoint(Decoder(cfg).state_dict(), cfg, good, max_shard_bytes=8000)
    check_model_files(good, cfg)
    shard = good / sorted(set(json.loads((good / INDEX_FILE).read_text())["weight_map"].values()))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])  # one byte short
    with pytest.raises(
        UserError,
        match=f"{shard.name}: not a complete safetensors file: {len(data) - 1:,} bytes where its header needs {len(data):,}",
    ):
        check_model_files(good, cfg)
    shard.write_bytes(data[:5])
    with pytest.raises(UserError, match="header unreadable"):
        check_model_files(good, cfg)
    shard.write_bytes(data[:8] + b"{" * (len(data) - 8))
    with pytest.raises(UserError, match="header is not valid JSON"):
        check_model_files(good, cfg)
    shard.write_bytes(data)
    smaller = ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": 32})
    with pytest.raises(UserError, match="config.json says vocab_size=32, the embedding has 64 rows"):
        check_model_files(good, smaller)
    deeper = ModelConfig.from_dict({**cfg.to_dict(), "num_hidden_layers": 3})
    with pytest.raises(UserError, match="checkpoint lacks model.layers.2"):
        check_model_files(good, deeper)


def test_save_is_atomic_and_validates_names(tmp_path):
    cfg = micro_config(1)
    state = Decoder(cfg).state_dict()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="missing tensor"):
        save_hf_checkpoint({k: v for k, v in state.items() if "mlp" not in k}, cfg, out)
    with pytest.raises(ValueError, match="unexpected tensor"):
        save_hf_checkpoint({**state, "model.extra.weight": torch.zeros(2)}, cfg, out)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp dir left
    save_hf_checkpoint(state, cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    with pytest.raises(UserError, match="already exists"):
        save_hf_checkpoint(state, cfg, out)
    save_hf_checkpoint(state, cfg, out, dtype=torch.bfloat16, overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for _, t in iter_hf_tensors(out))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_streams_one_shard_at_a_time(tmp_path):
    """Tensors handed over by an iterator are written (and can be released) shard by shard: at
    every point, the bytes taken but not yet on disk stay within one shard plus one tensor."""
    cfg = ModelConfig.from_preset(
        "tiny",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    names = [(n, p.shape) for n, p in Decoder(cfg).named_parameters()]
    shard_bytes = 40_000
    taken = peak = 0

    def on_disk() -> int:  # tensor bytes (+ small headers) already in shard files of the temp dir
        return sum(f.stat().st_size for f in tmp_path.glob(".out.tmp-*/*.safetensors"))

    def produce():
        nonlocal taken, peak
        for name, shape in names:
            peak = max(peak, taken - on_disk())
            tensor = torch.randn(shape)
            taken += tensor.numel() * 4
            yield name, tensor

    save_hf_checkpoint(produce(), cfg, tmp_path / "out", max_shard_bytes=shard_bytes)
    biggest = max(s.numel() for _, s in names) * 4
    assert taken > 4 * shard_bytes
    assert 0 < peak <= shard_bytes + biggest
    assert len(json.loads((tmp_path / "out" / INDEX_FILE).read_text())["weight_map"]) == len(names)


def test_iter_hf_tensors_subset(tmp_path):
    cfg = micro_config(2)
    state = Decoder(cfg).state_dict()
    save_hf_checkpoint(state, cfg, tmp_path / "c", max_shard_bytes=5000)
    want = ["model.norm.weight", "model.layers.1.mlp.up_proj.weight"]
    got = dict(iter_hf_tensors(tmp_path / "c", names=want))
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], state[n]) for n in want)
    assert [n for n, _ in iter_hf_tensors(tmp_path / "c")] == [n for n, _ in iter_hf_tensors(tmp_path / "c")]
    with pytest.raises(UserError, match="no tensor model.nope"):
        list(iter_hf_tensors(tmp_path / "c", names=["model.nope"]))


def test_iter_model_tensors_skips_what_the_model_recomputes(tmp_path):
    """Older exports of tied models carry lm_head.weight and rotary inv_freq buffers: skipped;
    anything else the model lacks is refused."""
    from safetensors.torch import save_file

    cfg = micro_config(1, tie_word_embeddings=True)
    state = Decoder(cfg).state_dict()
    extra = {
        "lm_head.weight": state["model.embed_tokens.weight"].clone(),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    save_file({**state, **extra}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert sorted(n for n, _ in iter_model_tensors(tmp_path, cfg)) == sorted(state)
    assert torch.equal(load_hf_model(tmp_path).lm_head.weight, state["model.embed_tokens.weight"])
    save_file({**state, "model.layers.0.mlp.gate_proj.bias": torch.zeros(48)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="unexpected tensor model.layers.0.mlp.gate_proj.bias"):
        list(iter_model_tensors(tmp_path, cfg))


def test_stories260k_logits_parity():
    need_shared()
    hf = AutoModelForCausalLM.from_pretrained(STORIES260K).eval()  # its default (SDPA) attention
    ours = load_hf_model(STORIES260K)
    assert ours.config.num_key_value_heads < ours.config.num_attention_heads and ours.config.tie_word_embeddings
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, ours.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)
