"""Start-up of a base model: `build_model` gives the base's weights bit for bit without running
any random init (ZeRO-2 on the meta device, ZeRO-3 each rank filling only its partition), and
the initial validation is bounded by `train.val_batches`, counted in the start-up record and
skipped with `train.val_at_start=false`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from llmtrain.config import load_config
from llmtrain.engine import build_model
from llmtrain.metrics import MetricsWriter
from llmtrain.model.decoder import Decoder, no_init
from llmtrain.model.hf import iter_model_tensors, load_hf_config, save_hf_checkpoint
from llmtrain.model.model_config import ModelConfig
from llmtrain.tasks.base import Task
from llmtrain.train import initial_validation
from llmtrain.worker import WorkerContext

REPO = Path(__file__).resolve().parents[1]
INIT_FUNCTIONS = ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_")


def odd_config() -> ModelConfig:
    """Tied embeddings, q/k/v/o biases, and odd sizes (hidden 33, vocab 65): several parameters
    have an odd number of elements, so 2 ZeRO-3 partitions include padding."""
    return ModelConfig.from_preset(
        "tiny",
        vocab_size=65,
        hidden_size=33,
        intermediate_size=47,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        attention_bias=True,
        attention_out_bias=True,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A bf16 Hugging Face directory with random weights (biases and norms off 0 and 1)."""
    config = odd_config()
    torch.manual_seed(0)
    model = Decoder(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path_factory.mktemp("base") / "hf"
    return save_hf_checkpoint(model.state_dict(), config, out, dtype=torch.bfloat16)


def counting_init():
    """Patch torch.nn.init's filling functions and our Linear.reset_parameters with counters."""
    calls: dict[str, int] = {}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    patches = [mock.patch.object(torch.nn.init, n, counted(n, getattr(torch.nn.init, n))) for n in INIT_FUNCTIONS]
    return calls, patches


def test_a_base_is_built_bit_identical_without_any_random_init(base):
    config = load_hf_config(base)
    cfg = load_config(REPO / "configs" / "tiny-pretrain.yaml", ["zero.stage=2"])
    calls, patches = counting_init()
    for p in patches:
        p.start()
    try:
        model = build_model(config, cfg, {}, lambda: iter_model_tensors(base, config))
    finally:
        for p in patches:
            p.stop()
    assert calls == {}, f"random init ran while building a base: {calls}"
    stored = load_file(base / "model.safetensors")
    params = dict(model.named_parameters())
    assert set(params) == set(stored)  # the tied head is the embedding, stored once
    for name, tensor in stored.items():
        assert params[name].dtype == torch.float32 and not params[name].is_meta
        assert torch.equal(params[name], tensor.float()), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.requires_grad for p in model.parameters())


def test_random_init_still_runs_for_a_preset_and_not_under_no_init():
    config = odd_config()
    calls, patches = counting_init()
    for p in patches:
        p.start()
    try:
        Decoder(config)
        initialised = dict(calls)
        calls.clear()
        with no_init():
            Decoder(config)
        with torch.device("meta"):
            Decoder(config)
    finally:
        for p in patches:
            p.stop()
    assert initialised.get("normal_", 0) > 0 and initialised.get("ones_", 0) > 0
    assert calls == {}, f"init ran under no_init() or on the meta device: {calls}"


ZERO3_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, deepspeed
    from safetensors.torch import load_file
    from llmtrain.config import load_config
    from llmtrain.engine import build_model, deepspeed_config, batch_layout, prepare_deepspeed_runtime
    from llmtrain.model.hf import iter_model_tensors, load_hf_config
    from llmtrain.worker import WorkerContext

    base, repo = sys.argv[1], sys.argv[2]
    ctx = WorkerContext.start(False)
    prepare_deepspeed_runtime(False)
    cfg = load_config(repo + "/configs/tiny-pretrain.yaml", ["zero.stage=3", "train.global_batch_size=2", "train.micro_batch_size=1"])
    config = load_hf_config(base)
    ds = deepspeed_config(cfg, batch_layout(cfg, 2), "fp32", False, config.hidden_size)
    calls = []
    real = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda *a, **k: calls.append(1) or real(*a, **k)
    model = build_model(config, cfg, ds, lambda: iter_model_tensors(base, config))
    torch.nn.init.normal_ = real
    stored = load_file(base + "/model.safetensors")
    local = {n: p.ds_tensor.numel() for n, p in model.named_parameters()}
    full = {n: p.ds_numel for n, p in model.named_parameters()}
    same = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            same[name] = bool(torch.equal(p.data, stored[name].float()))
    result = {"rank": ctx.rank, "calls": len(calls), "local": local, "full": full, "same": same}
    with open(f"{sys.argv[3]}/rank{ctx.rank}.json", "w") as f:  # one file a rank: printed lines would interleave
        json.dump(result, f)
    ctx.barrier()
    from llmtrain.worker import exit_process
    exit_process(0)  # past torch's teardown abort (llmtrain/worker.py)
    """
)


def test_zero3_ranks_fill_only_their_partitions_bit_identical(base, tmp_path):
    script = tmp_path / "zero3_build.py"
    script.write_text(ZERO3_SCRIPT)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen(
        [*cmd, str(script), str(base), str(REPO), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a hung rank: end the whole group, not only torchrun
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    stored = load_file(base / "model.safetensors")
    for r in results:
        assert r["calls"] == 0, "random init ran under zero.Init for a base"
        assert set(r["same"]) == set(stored) and all(r["same"].values()), [n for n, ok in r["same"].items() if not ok]
        for name, numel in r["full"].items():
            assert r["local"][name] == (numel + 1) // 2, name  # half (rounded up): never the whole parameter
    assert any(n % 2 for n in results[0]["full"].values())  # padding was exercised


class FakeBatches:
    def __init__(self, micro_batches: list[dict]):
        self.micro_batches = micro_batches

    def next_step(self) -> list[dict]:
        return self.micro_batches


class CountingTask(Task):
    """A task whose validation is `n` micro-batches of a tiny LM; counts its `start` calls."""

    name = "counting"

    def __init__(self, n: int):
        self.n, self.started = n, 0

    def prepare(self, cfg, layout):
        raise NotImplementedError

    def build(self, cfg, layout, ctx):
        raise NotImplementedError

    def validation(self):
        ids = torch.randint(0, 64, (2, 8))
        return FakeBatches([{"input_ids": ids, "position_ids": torch.arange(8).expand(2, 8), "labels": ids}] * self.n)

    def start(self, engine, ctx, run_dir):
        self.started += 1


@pytest.mark.parametrize("enabled", [True, False])
def test_initial_validation_counts_its_micro_batches_and_can_be_skipped(tmp_path, enabled):
    torch.manual_seed(0)
    model = Decoder(ModelConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1))
    task = CountingTask(n=3)
    writer = MetricsWriter(tmp_path, enabled=True)
    n = initial_validation(model, task, WorkerContext.single_process(), writer, tmp_path, enabled)
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] if enabled else []
    assert n == (3 if enabled else 0)
    assert task.started == (1 if enabled else 0)
    assert [e["step"] for e in lines if "val_loss" in e] == ([0] if enabled else [])


def test_val_at_start_is_a_train_setting_defaulting_on():
    assert load_config(REPO / "configs" / "tiny-pretrain.yaml", []).train.val_at_start is True
    cfg = load_config(REPO / "configs" / "tiny-pretrain.yaml", ["train.val_at_start=false"])
    assert cfg.train.val_at_start is False


def test_the_ray_trainer_starts_no_ray_data_actor_without_datasets(tmp_path):
    """No DatasetManager actor (one more process importing ray.data) for a run without Ray
    Datasets; Ray Train's other callbacks (backend set-up, ...) stay."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from llmtrain.launch import _trainer
    from llmtrain.metrics import StartupClock

    cfg = load_config(REPO / "configs" / "tiny-pretrain.yaml", [f"run.dir={tmp_path / 'run'}"])
    trainer = _trainer(cfg, "pretrain", False, StartupClock())
    callbacks = trainer._create_default_callbacks()
    assert not any(isinstance(c, DatasetsCallback) for c in callbacks)
    assert "BackendSetupCallback" in {type(c).__name__ for c in callbacks}
