"""The distributed runtime end to end on CPU: ZeRO stages against a single process, bitwise
resume through Ray Train, export to transformers, and the artifacts a run leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import need_shared
from runtime_support import llmtrain, losses, ray_jobs, tiny_data, torchrun
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    need_shared()
    return tiny_data(tmp_path_factory.getbasetemp())


def test_zero_stages_track_a_single_process(data, tmp_path):
    """Same global batch: ZeRO 0/1/2/3 on 2 workers (and ZeRO-3 with parameter and optimizer
    CPU offload and activation checkpointing) follow one process's losses step by step."""
    steps = ["train.max_steps=4", f"data.path={data}"]
    torchrun(1, [*steps, f"run.dir={tmp_path / 'single'}", "zero.stage=0"])
    reference = losses(tmp_path / "single")
    assert sorted(reference) == [1, 2, 3, 4]
    variants = {f"zero{stage}": [f"zero.stage={stage}"] for stage in (0, 1, 2, 3)}
    variants["zero3-offload-checkpointing"] = [
        "zero.stage=3",
        "zero.offload_params=true",
        "zero.offload_optimizer=true",
        "model.activation_checkpointing=true",
    ]
    for name, settings in variants.items():
        torchrun(2, [*steps, f"run.dir={tmp_path / name}", *settings])
        got = losses(tmp_path / name)
        for step, loss in reference.items():
            assert got[step] == pytest.approx(loss, rel=2e-5), f"{name} step {step}"


def _final_tensors(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    proc = llmtrain("export", str(run_dir), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_is_bitwise_identical_through_ray(data, tmp_path, stage):
    """2 Ray workers, fp32: 10 steps straight == 5 steps, stop, resume 5 more: same parameters
    to the bit and the same loss line."""
    common = [f"data.path={data}", "train.max_steps=10", f"zero.stage={stage}"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    ray_jobs(
        [
            [*common, f"run.dir={straight}"],
            [*common, f"run.dir={interrupted}", "train.stop_at_step=5"],
            [*common, f"run.dir={interrupted}", "train.resume=auto"],
        ]
    )
    assert sorted(losses(straight)) == list(range(1, 11))
    assert losses(interrupted) == losses(straight)
    ckpts = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert ckpts == ["step_00000005", "step_00000010"]
    a = _final_tensors(straight, tmp_path / "export-straight")
    b = _final_tensors(interrupted, tmp_path / "export-interrupted")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if stage == 3:
        _check_transformers_parity(tmp_path / "export-straight", straight)


def _check_transformers_parity(model_dir: Path, run_dir: Path) -> None:
    """The export loads in transformers and gives the logits of our model with the checkpoint's
    own (consolidated ZeRO-3) parameters."""
    from transformers import AutoModelForCausalLM

    from llmtrain.checkpoint import find_latest, read_meta
    from llmtrain.export import consolidated_tensors
    from llmtrain.model.decoder import Decoder
    from llmtrain.model.model_config import ModelConfig

    ckpt = find_latest(run_dir)
    meta = read_meta(ckpt)
    ours = Decoder(ModelConfig.from_dict(meta["model_config"]))
    missing, unexpected = ours.load_state_dict(dict(consolidated_tensors(ckpt, meta["zero_stage"])), strict=False)
    assert not unexpected and missing in ([], ["lm_head.weight"])
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids), rtol=1e-5, atol=1e-5)


def test_run_artifacts_and_contract(data, tmp_path):
    """One Ray run with validation and periodic checkpoints: the files scripts rely on."""
    run = tmp_path / "run"
    ray_jobs(
        [
            [
                f"data.path={data}",
                f"run.dir={run}",
                "train.max_steps=6",
                "train.val_every=3",
                "checkpoint.every=2",
                "checkpoint.keep=2",
                "zero.stage=2",
            ]
        ]
    )
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in entries if "loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    for e in train:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "mfu", "memory_gb"} <= e.keys()
        assert e["tokens_per_s"] > 0 and 0 < e["mfu"] < 1
    val = [e for e in entries if "val_loss" in e]
    assert [e["step"] for e in val] == [0, 3, 6]
    assert val[-1]["val_loss"] < val[0]["val_loss"]  # it learns
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert (run / "loss.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.model").is_file()
    placement = json.loads((run / "placement.json").read_text())
    assert [p["rank"] for p in placement] == [0, 1]
    assert {p["node_ip"] for p in placement} == {"127.0.0.1"} and len({p["pid"] for p in placement}) == 2
