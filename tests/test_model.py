"""The decoder on its own: presets and sizes, initialisation (also under ZeRO-3 construction),
packed-row document masking, the summed loss, the KV cache, activation checkpointing, tying."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmtrain.errors import UserError
from llmtrain.model.decoder import Decoder
from llmtrain.model.model_config import PRESETS, ModelConfig


def small(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=120,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return ModelConfig.from_preset("tiny", **{**base, **overrides})


def build(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(small(**overrides)).eval()


# ---------------------------------------------------------------------------------------------
# Presets, sizes, FLOPs


def test_presets_param_counts_match_the_built_model():
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        with torch.device("meta"):
            model = Decoder(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params(), name
    # The realistic presets have the published shapes: Llama-3.2-1B and Llama-3.1-8B.
    assert ModelConfig.from_preset("1b").num_params() == 1_235_814_400
    assert ModelConfig.from_preset("8b").num_params() == 8_030_261_248
    assert ModelConfig.from_preset("8b").rope_scaling["rope_type"] == "llama3"
    tiny = ModelConfig.from_preset("tiny")
    assert 2e6 < tiny.num_params() < 1e7 and tiny.max_position_embeddings == 1024


@pytest.mark.parametrize("tied", [True, False])
def test_num_params_and_flops_per_token(tied):
    cfg = small(tie_word_embeddings=tied, family="qwen2", attention_bias=True)
    model = Decoder(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert cfg.num_params() == total
    embed = cfg.vocab_size * cfg.hidden_size
    assert cfg.num_params(non_embedding=True) == total - embed * (1 if tied else 2)
    matmul_params = total - (0 if tied else embed)  # everything but the input lookup table
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 256
    assert cfg.flops_per_token(256) == 6 * matmul_params + attn


def test_config_errors_are_one_line_user_errors():
    with pytest.raises(UserError, match="unknown model preset 'huge'.*tiny, 125m, 1b, 8b"):
        ModelConfig.from_preset("huge")
    with pytest.raises(UserError, match="not a multiple of num_key_value_heads"):
        small(num_key_value_heads=3)
    with pytest.raises(UserError, match="unknown field"):
        ModelConfig.from_preset("tiny", hidden=3)
    with pytest.raises(UserError, match="only Qwen3 has q/k norm"):
        small(qk_norm=True)
    with pytest.raises(UserError, match="rope scaling type 'linear'"):
        small(rope_scaling={"rope_type": "linear", "factor": 2.0})
    cfg = small(eos_token_id=[5, 6])
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------
# Initialisation


def _check_init_stats(named: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    std = cfg.initializer_range
    out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
    expect = {
        "model.embed_tokens.weight": std,
        "model.layers.0.self_attn.q_proj.weight": std,
        "model.layers.1.self_attn.k_proj.weight": std,
        "model.layers.0.mlp.gate_proj.weight": std,
        "model.layers.0.self_attn.o_proj.weight": out_std,
        "model.layers.1.mlp.down_proj.weight": out_std,
    }
    for name, s in expect.items():
        t = named[name].float()
        assert abs(t.mean().item()) < 0.05 * s, name
        assert abs(t.std().item() - s) < 0.03 * s, (name, t.std().item(), s)
    assert torch.equal(named["model.layers.0.input_layernorm.weight"], torch.ones(cfg.hidden_size))
    assert torch.equal(named["model.norm.weight"], torch.ones(cfg.hidden_size))
    assert torch.equal(named["model.layers.0.self_attn.q_proj.bias"], torch.zeros(cfg.num_attention_heads * cfg.head_dim))


INIT_CONFIG = dict(
    family="qwen2",
    attention_bias=True,
    vocab_size=2000,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
)


def test_init_statistics():
    cfg = ModelConfig.from_preset("tiny", **INIT_CONFIG)
    torch.manual_seed(0)
    model = Decoder(cfg)
    _check_init_stats(dict(model.named_parameters()), cfg)


def _zero3_worker() -> None:
    """Run in a fresh 1-process gloo group: build under deepspeed.zero.Init, check init statistics
    and tying on the gathered parameters, then one SGD step through deepspeed.initialize equals
    the same step on a plain copy (tied head, packed documents, activation checkpointing)."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a ~60 s JIT build
    dist.init_process_group("gloo", rank=0, world_size=1)
    ds = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    cfg = ModelConfig.from_preset("tiny", **INIT_CONFIG, tie_word_embeddings=True)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = Decoder(cfg)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.numel() == 0 and tuple(q.ds_shape) == (384, 384)  # really partitioned at construction
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        _check_init_stats({n: p.detach().clone() for n, p in model.named_parameters()}, cfg)
        plain = Decoder(cfg)
        plain.load_state_dict({n: p.detach().clone() for n, p in model.state_dict().items()})

    model.gradient_checkpointing = True
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3), config=ds, dist_init_required=False
    )
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    loss = engine(ids, position_ids=pos, labels=ids)
    ref = plain(ids, position_ids=pos, labels=ids)
    assert torch.allclose(loss, ref, atol=1e-4, rtol=1e-6), (loss, ref)
    engine.backward(loss)
    engine.step()
    ref.backward()
    with torch.no_grad():
        for p in plain.parameters():
            p -= 1e-3 * p.grad
        after, expected = engine(ids, position_ids=pos, labels=ids), plain(ids, position_ids=pos, labels=ids)
    assert torch.allclose(after, expected, atol=1e-3, rtol=1e-6), (after, expected)
    assert abs((after - loss).item()) > 1e-2  # the step changed the tied weights as in plain PyTorch
    dist.destroy_process_group()
    print("ZERO3-OK")


def test_zero3_construction_init_and_tied_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu"
    )
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_model; test_model._zero3_worker()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ZERO3-OK" in run.stdout, run.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Forward contract


def test_packed_row_equals_documents_run_alone():
    model = build(seed=1)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 4]
    docs = [torch.randint(0, 120, (1, n), generator=g) for n in lengths]
    row = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    single = torch.randint(0, 120, (1, sum(lengths)), generator=g)  # a second row with one document
    with torch.no_grad():
        packed = model(torch.cat([row, single]), position_ids=torch.cat([pos, torch.arange(sum(lengths))[None]]))
        alone = torch.cat([model(d) for d in docs], dim=1)
        torch.testing.assert_close(packed[0], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[1], model(single)[0], atol=1e-5, rtol=0)
        # Without the restarts the later documents see the earlier ones: the mask matters.
        assert (model(row)[0, 5:] - alone[0, 5:]).abs().max() > 1e-3


def test_loss_is_fp32_sum_over_supervised_tokens():
    model = build(seed=2, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 120, (3, 16), generator=g)
    labels = torch.randint(0, 120, (3, 16), generator=g)
    labels[0, :7] = -100
    labels[2, 10:] = -100
    pos = torch.cat([torch.arange(6), torch.arange(10)]).expand(3, 16)
    model.train()
    loss = model(ids, position_ids=pos, labels=labels)
    logits = model(ids, position_ids=pos)
    manual = F.cross_entropy(logits.reshape(-1, 120).double(), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.allclose(loss.double(), manual, rtol=1e-5)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_kv_cache_decoding_matches_full_forward():
    for overrides in (dict(), dict(family="qwen3", qk_norm=True, head_dim=24, tie_word_embeddings=False)):
        model = build(seed=4, **overrides)
        ids = torch.randint(0, 120, (2, 20), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            full = model(ids)
            cache = model.new_kv_cache(2, 20)
            steps = [model(ids[:, :12], kv_cache=cache)]
            for t in range(12, 20):
                steps.append(model(ids[:, t : t + 1], kv_cache=cache))
        assert cache.length == 20
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    cache = model.new_kv_cache(2, 30)
    model(ids[:, :4], kv_cache=cache)
    with pytest.raises(ValueError, match="exactly one new token"):
        model(ids[:, 4:6], kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 10 positions, this call needs 20"):
        model(ids, kv_cache=model.new_kv_cache(2, 10))


def test_activation_checkpointing_gives_same_loss_and_grads():
    model = build(seed=6).train()
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(7))
    pos = torch.cat([torch.arange(7), torch.arange(9)]).expand(2, 16)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        loss = model(ids, position_ids=pos, labels=ids)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_tied_embeddings_are_one_parameter_and_absent_from_state_dict():
    model = build(seed=8, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = model.state_dict()
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    assert "lm_head.weight" not in dict(model.named_parameters())
    other = build(seed=9, tie_word_embeddings=True)
    other.load_state_dict(state)  # strict, without lm_head.weight
    assert torch.equal(other.lm_head.weight, model.model.embed_tokens.weight)
    untied = build(seed=8, tie_word_embeddings=False).state_dict()
    assert "lm_head.weight" in untied
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        build(tie_word_embeddings=False).load_state_dict(state)


def test_sliding_window_longer_spans_are_refused():
    model = build(family="mistral", sliding_window=16)
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long))
        with pytest.raises(UserError, match="sliding window 16"):
            model(torch.zeros(1, 17, dtype=torch.long))
