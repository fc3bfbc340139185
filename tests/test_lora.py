"""LoRA end to end through the Ray launcher on 2 CPU workers, fine-tuning the released
stories260K checkpoint: ZeRO-2 and ZeRO-3, PEFT-format adapters that `peft` loads with our
logits, a merged export equal to the adapter model, every saved tensor's shape under ZeRO-3,
and a stopped-and-resumed LoRA run that follows an uninterrupted one (all with rsLoRA scaling
and LoRA+'s faster B).

Three jobs in one Ray session keep this affordable: ZeRO-3 straight through, and ZeRO-2 stopped
at step 3 then resumed (ZeRO-2 and ZeRO-3 agree to ~1e-7 here, so the resumed run must track the
straight one to 1e-5; a resume that restarted the data, the adapters or the optimizer would not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED, STORIES260K, need_shared
from runtime_support import REPO, llmtrain, losses, ray_jobs
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

LORA = REPO / "configs" / "tiny-lora.yaml"
STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One Ray session: LoRA under ZeRO-3, and under ZeRO-2 stopped at step 3 then resumed."""
    need_shared()
    root = tmp_path_factory.mktemp("lora")
    common = [
        f"data.path={SHARED / 'data' / 'sft' / 'chatterbot_english_pairs.json'}",
        "data.max_examples=400",
        "data.max_val_examples=16",
        "data.seq_len=128",
        f"data.cache_dir={root / 'cache'}",
        f"train.max_steps={STEPS}",
        "train.val_batches=1",
        "lora.rslora=true",  # alpha/sqrt(r): peft must read the same scale from adapter_config.json, the merge use it
        "lora.loraplus_lr_ratio=4",
    ]
    out = {name: root / name for name in ("zero2", "zero3")}
    ray_jobs(
        [
            [*common, "zero.stage=3", f"run.dir={out['zero3']}"],
            [*common, "zero.stage=2", f"run.dir={out['zero2']}", "train.stop_at_step=3"],
            [*common, "zero.stage=2", f"run.dir={out['zero2']}", "train.resume=auto"],
        ],
        task="sft",
        config=LORA,
    )
    return out


def _ours_with_checkpoint(run: Path):
    """Our decoder with LoRA injected and every tensor of the run's newest checkpoint loaded
    (consolidated from the ZeRO shards): the model as it was trained."""
    from peft import inject_adapter_in_model

    from llmtrain.checkpoint import find_latest, read_meta
    from llmtrain.config import LoraSection
    from llmtrain.export import consolidated_tensors
    from llmtrain.model.decoder import Decoder
    from llmtrain.model.lora import lora_config, resolve_targets
    from llmtrain.model.model_config import ModelConfig

    ckpt = find_latest(run)
    meta = read_meta(ckpt)
    model = Decoder(ModelConfig.from_dict(meta["model_config"]))
    section = LoraSection.model_validate(meta["config"]["lora"])
    inject_adapter_in_model(lora_config(section, resolve_targets(model, section, True)), model)
    tensors = dict(consolidated_tensors(ckpt, meta["zero_stage"]))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and missing in ([], ["lm_head.weight"])
    return model.eval(), tensors


IDS = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def _export(run: Path, out: Path, merge: bool = False) -> Path:
    from llmtrain.export import export

    return export(run, out, merge=merge)


@pytest.mark.parametrize("stage", [2, 3])
def test_adapter_loads_in_peft_with_our_logits_and_merge_equals_it(runs, tmp_path, stage):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs[f"zero{stage}"]
    ours, tensors = _ours_with_checkpoint(run)
    adapter = _export(run, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(STORIES260K), adapter).eval()
    with torch.no_grad():
        ours_logits, peft_logits = ours(IDS), peft_model(IDS).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(IDS).logits
    torch.testing.assert_close(peft_logits, ours_logits, rtol=1e-5, atol=1e-5)
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter was trained, not left at zero
    # the adapter written at the end of the run (gathered from the live model) is the exported one
    at_end, exported = load_file(run / "adapter" / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    assert at_end.keys() == exported.keys() and all(torch.equal(at_end[k], exported[k]) for k in at_end)
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(STORIES260K) and written["use_rslora"] is True
    # --merge: a plain transformers model equal to base + adapter
    if stage == 3:  # through the command line once
        proc = llmtrain("export", str(run), "--output", str(tmp_path / "merged"), "--merge")
        assert proc.returncode == 0 and f"exported {tmp_path / 'merged'}" in proc.stdout, proc.stderr
    else:
        _export(run, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, peft_logits, rtol=1e-4, atol=1e-4)
    # only the adapters trained: the base tensors in the checkpoint are the released ones, bit for bit
    released = load_file(STORIES260K / "model.safetensors")
    for name, tensor in released.items():
        trained = (
            tensors[name.replace(".weight", ".base_layer.weight")]
            if name.replace(".weight", ".base_layer.weight") in tensors
            else tensors[name]
        )
        assert torch.equal(trained, tensor.float()), name


def test_every_saved_tensor_has_its_full_shape_under_zero3(runs, tmp_path):
    """ZeRO-3 partitions every parameter; written without gathering, tensors come out (0,)."""
    from transformers import AutoModelForCausalLM

    hf = dict(AutoModelForCausalLM.from_pretrained(STORIES260K).named_modules())
    r = 8
    exported = _export(runs["zero3"], tmp_path / "adapter")
    for directory in (runs["zero3"] / "adapter", exported):
        tensors = load_file(directory / "adapter_model.safetensors")
        assert len(tensors) == 2 * 7 * 5  # A and B for 7 projections in 5 blocks
        for key, tensor in tensors.items():
            module = hf[key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]]
            want = (r, module.in_features) if ".lora_A." in key else (module.out_features, r)
            assert tuple(tensor.shape) == want, key
    report = json.loads((runs["zero3"] / "finetune_report.json").read_text())
    assert report["lora"] and report["params"] == {"trainable": 46240, "total": 260032 + 46240}
    assert report["after"]["val_loss"] < report["before"]["val_loss"]


def test_stopped_and_resumed_lora_run_follows_an_uninterrupted_one(runs):
    straight, resumed = runs["zero3"], runs["zero2"]
    assert sorted(losses(straight)) == sorted(losses(resumed)) == list(range(1, STEPS + 1))
    for step, loss in losses(straight).items():
        assert losses(resumed)[step] == pytest.approx(loss, rel=1e-5), step
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)  # Adam magnifies ~1e-7 stage differences
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000003", f"step_{STEPS:08d}"]
    # the first segment (stopped at step 3) wrote no report or adapter of its own; the resumed one did
    report = json.loads((resumed / "finetune_report.json").read_text())
    assert report["steps"] == STEPS and report["before"]["val_loss"] is not None
