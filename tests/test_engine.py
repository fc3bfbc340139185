"""The engine and one training step, in this process (world size 1, gloo, DeepSpeed on CPU):
token-weighted loss across micro-batches, LR schedule, weight-decay groups, NaN skipping."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from llmtrain.config import load_config
from llmtrain.engine import batch_layout, deepspeed_config, initialize, param_groups, prepare_deepspeed_runtime
from llmtrain.errors import UserError
from llmtrain.model.decoder import Decoder
from llmtrain.model.model_config import ModelConfig
from llmtrain.schedule import lr_multiplier
from llmtrain.train import train_step
from llmtrain.worker import WorkerContext

VOCAB, SEQ = 97, 16


@pytest.fixture(scope="module")
def ctx():
    before = dict(os.environ)
    ctx = WorkerContext.start(use_gpu=False)
    prepare_deepspeed_runtime(on_gpu=False)
    yield ctx
    torch.distributed.destroy_process_group()
    os.environ.clear()  # the process group's MASTER_PORT etc. must not leak into later tests' subprocesses
    os.environ.update(before)


def small_model(seed=0) -> Decoder:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Decoder(cfg)
    with torch.no_grad():  # sharp logits: per-token losses differ widely, as in a trained model
        model.model.embed_tokens.weight.mul_(40)
    return model


def batch(rows: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Rows with very uneven numbers of supervised tokens and a packed document boundary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    masked = [0, 2, 14, 15]  # supervised tokens per row: 16, 14, 2, 1
    for r in range(rows):
        labels[r, : masked[r % 4]] = -100
    pos = torch.arange(SEQ).repeat(rows, 1)
    pos[:, 9:] -= 9  # a second document starts at position 9
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def split(b: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = b["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in b.items()} for i in range(0, n, size)]


def engine_for(stage: int, micro: int, accum: int, model: Decoder, extra=()):
    cfg = load_config(
        None,
        [
            f"zero.stage={stage}",
            f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro * accum}",
            "train.grad_clip=0",
            "train.warmup_steps=0",
            "train.schedule=constant",
            "train.lr=0.01",
            *extra,
        ],
    )
    layout = batch_layout(cfg, 1)
    assert layout.grad_accum == accum
    ds = deepspeed_config(cfg, layout, "fp32", on_gpu=False)
    engine, guard, grad_norm = initialize(model, cfg, ds)
    return engine, guard, grad_norm


def reference_step(model: Decoder, b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Plain PyTorch: sum of token losses over the whole batch / number of supervised tokens."""
    loss_sum = model(b["input_ids"], position_ids=b["position_ids"], labels=b["labels"])
    n = int((b["labels"] != -100).sum())
    (loss_sum / n).backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    return float(loss_sum.detach()) / n, float(norm)


def capture_grads(engine) -> list[torch.Tensor]:
    """Gradients as the optimizer sees them at each step call (after reduction, before update)."""
    seen: list[torch.Tensor] = []

    def hook(opt, args, kwargs):
        seen.append(torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None]))

    base_optimizer(engine).register_step_pre_hook(hook)
    return seen


def base_optimizer(engine) -> torch.optim.Optimizer:
    """Our AdamW: the engine's optimizer at stage 0, wrapped by DeepSpeed's ZeRO optimizer above."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


@pytest.mark.parametrize("stage", [0, 2])
def test_loss_and_gradient_are_token_weighted_across_micro_batches(ctx, stage):
    b = batch(4)
    ref_loss, ref_norm = reference_step(small_model(), b)
    results = []
    for micro, accum in [(2, 2), (4, 1), (1, 4)]:
        engine, guard, grad_norm = engine_for(stage, micro, accum, small_model())
        grads = capture_grads(engine)
        loss, n_tokens, finite, _ = train_step(engine, guard, split(b, micro), ctx)
        assert finite and n_tokens == int((b["labels"] != -100).sum())
        results.append((loss, grad_norm(), torch.cat(grads)))
    for loss, norm, grads in results:
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        assert float(grads.norm()) == pytest.approx(ref_norm, rel=1e-5)
    for _, _, grads in results[1:]:
        torch.testing.assert_close(grads, results[0][2], rtol=1e-5, atol=1e-7)
    # A mean of per-micro-batch means would differ from the reference on this data:
    means = [
        float(small_model().requires_grad_(False)(m["input_ids"], position_ids=m["position_ids"], labels=m["labels"]))
        / int((m["labels"] != -100).sum())
        for m in split(b, 2)
    ]
    assert abs(sum(means) / 2 - ref_loss) > 0.01 * ref_loss


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_loss_skips_the_update_and_keeps_optimizer_state(ctx, stage):
    model = small_model()
    engine, guard, _ = engine_for(stage, 2, 2, model)
    train_step(engine, guard, split(batch(4), 2), ctx)  # one real step: Adam moments exist
    before = [p.detach().clone() for p in engine.module.parameters()]
    state_before = copy.deepcopy(base_optimizer(engine).state_dict()["state"])

    bad = split(batch(4, seed=2), 2)
    embed = engine.module.model.embed_tokens.weight
    saved = embed.detach().clone()
    with torch.no_grad():
        embed[bad[1]["input_ids"][0, 0]] = float("nan")  # poisons the second micro-batch only
    loss, _, finite, _ = train_step(engine, guard, bad, ctx)
    with torch.no_grad():
        embed.copy_(saved)
    assert not finite and math.isnan(loss)
    for a, p in zip(before, engine.module.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=0, equal_nan=True)
    state_after = base_optimizer(engine).state_dict()["state"]
    assert state_before, "the first step created Adam moments"
    for k, v in state_before.items():
        for name, t in v.items():
            assert torch.equal(t, state_after[k][name]), f"optimizer state {k}.{name} changed on a skipped step"
    loss, _, finite, _ = train_step(engine, guard, split(batch(4, seed=3), 2), ctx)
    assert finite and all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_weight_decay_groups_exclude_norms_biases_embeddings():
    cfg = ModelConfig.from_preset(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        family="qwen2",
        attention_bias=True,
        tie_word_embeddings=False,
    )
    model = Decoder(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "lm_head.weight" in decayed
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    assert "model.layers.0.self_attn.q_proj.bias" in kept and "model.layers.0.input_layernorm.weight" in kept
    assert decayed | kept == set(names.values()) and not decayed & kept
    model.model.embed_tokens.weight.requires_grad_(False)
    assert "model.embed_tokens.weight" not in {names[id(p)] for g in param_groups(model, 0.1) for p in g["params"]}


def test_lr_schedules():
    t = load_config(None, ["train.max_steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"]).train
    assert lr_multiplier(0, t) == pytest.approx(0.1) and lr_multiplier(9, t) == pytest.approx(1.0)
    assert lr_multiplier(10, t) == pytest.approx(1.0)
    assert lr_multiplier(55, t) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_multiplier(100, t) == pytest.approx(0.1)
    w = t.model_copy(update={"schedule": "wsd", "decay_fraction": 0.2})
    assert lr_multiplier(50, w) == 1.0 and lr_multiplier(79, w) == 1.0
    assert lr_multiplier(89, w) == pytest.approx(1 - 0.9 * 10 / 20)
    assert lr_multiplier(99, w) == pytest.approx(0.1)
    c = t.model_copy(update={"schedule": "constant"})
    assert lr_multiplier(99, c) == 1.0
    # a continued schedule: 40 steps after 60 are the last 40 of the 100-step one, no warmup
    for kind in (t, w):
        cont = kind.model_copy(update={"max_steps": 40, "schedule_offset": 60})
        assert [lr_multiplier(s, cont) for s in range(40)] == [lr_multiplier(60 + s, kind) for s in range(40)]


def test_global_batch_must_divide():
    cfg = load_config(None, ["train.global_batch_size=10", "train.micro_batch_size=2"])
    assert batch_layout(cfg, 1).grad_accum == 5
    with pytest.raises(UserError, match="not divisible by train.micro_batch_size x workers = 2 x 2"):
        batch_layout(cfg, 2)


def test_loraplus_trains_b_at_ratio_times_the_lr():
    from llmtrain.tasks.sft import select_trainable

    cfg = load_config(None, ["lora.r=4", "lora.loraplus_lr_ratio=16", "lora.target_modules=[q_proj, down_proj]"])
    model_config = ModelConfig.from_preset("tiny", vocab_size=512, num_hidden_layers=2)
    model = Decoder(model_config)
    select_trainable(model, cfg, model_config)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.0, lr=1e-3)
    by_lr = {g.get("lr", 1e-3): {names[id(p)] for p in g["params"]} for g in groups}
    assert set(by_lr) == {1e-3, 16e-3}
    assert by_lr[16e-3] and all(".lora_B." in n for n in by_lr[16e-3])
    assert by_lr[1e-3] and all(".lora_A." in n for n in by_lr[1e-3])
    assert len(by_lr[16e-3]) == len(by_lr[1e-3]) == 4  # q_proj and down_proj of 2 blocks
