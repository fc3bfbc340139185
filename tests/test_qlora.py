"""QLoRA (issue 12, section 3): `lora.quantize: nf4 | fp4` holds the frozen base in bitsandbytes
4-bit layers; adapters train in fp32 on CPU.

Measured properties:
- the 4-bit base's bytes per parameter (NF4 with double quantisation 0.516, without 0.5625:
  4 bits + an fp32 scale per 64 weights, or an 8-bit scale plus an fp32 one per 256 blocks),
  with the fp32 weights actually freed;
- a 4-bit layer computes exactly with `dequantized(weight)` (what a merged export writes);
- `llmtrain sft` with lora.quantize on 2 processes (torchrun) under ZeRO-2 and ZeRO-0 trains,
  and its losses track the same LoRA run on the full-precision base (NF4 within 4% per step,
  FP4 within 10%, at stories260K's width of 64);
- a run stopped and resumed equals the uninterrupted run bitwise (losses and adapters), while
  its checkpoints hold only the trainable tensors, not the base;
- the exported adapter (PEFT format) loads in `peft` on transformers' own 4-bit base and on the
  full-precision base, with our logits on each; `--merge` writes the dequantized base with
  the adapter merged, whose logits in transformers equal our QLoRA model's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from conftest import STORIES260K, need_shared
from runtime_support import REPO, subprocess_env

pytest.importorskip("bitsandbytes")

DATA = STORIES260K.parents[1] / "data" / "sft" / "chatterbot_english_pairs.json"
STEPS = 4


def _sft(run: Path, overrides: list[str]) -> Path:
    """`torchrun -m llmtrain.train --task sft configs/tiny-lora.yaml`, 2 processes, 4 steps of 64-token rows."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "llmtrain.train",
        "--task",
        "sft",
        str(REPO / "configs" / "tiny-lora.yaml"),
        f"run.dir={run}",
        f"model.from={STORIES260K}",
        f"data.path={DATA}",
        "cluster.num_workers=2",
        "cluster.use_gpu=false",
        "data.max_examples=128",
        "data.val_fraction=0",
        "data.seq_len=64",
        f"train.max_steps={STEPS}",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.val_every=0",
        "checkpoint.every=2",
        "finetune.eval_examples=4",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=REPO)
    assert proc.returncode == 0, f"sft failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    need_shared()
    root = tmp_path_factory.mktemp("qlora")
    resumed = _sft(root / "resumed", ["lora.quantize=nf4", "train.stop_at_step=2"])
    return {
        "qlora": _sft(root / "qlora", ["lora.quantize=nf4"]),
        "resumed": _sft(resumed, ["lora.quantize=nf4"]),
        "lora": _sft(root / "lora", []),
        "fp4-zero0": _sft(root / "fp4", ["lora.quantize=fp4", "lora.double_quant=false", "zero.stage=0"]),
    }


def _layer_model(hidden: int = 1024, intermediate: int = 2816):
    """One block at a real model's width (7.4M Linear weights): scale overheads as at full size."""
    from llmtrain.model.decoder import Decoder
    from llmtrain.model.model_config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=256)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden, intermediate, 1
    config.num_attention_heads = config.num_key_value_heads = 8
    return Decoder(config)


def _storage_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        storage = p.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@pytest.mark.parametrize("double_quant, low, high", [(True, 0.515, 0.518), (False, 0.562, 0.563)])
def test_a_4bit_base_holds_about_half_a_byte_per_parameter(double_quant, low, high):
    from llmtrain.model.quantize import quantize_base, quantized_bytes

    model = _layer_model()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    other = sum(p.numel() for n, p in model.named_parameters() if "proj" not in n) * 4
    assert quantize_base(model, "nf4", double_quant, torch.float32) == 7
    held, params = quantized_bytes(model)
    assert params == linear
    assert low < held / params < high, held / params
    # the fp32 weights are gone: what the model's storages hold is the 4-bit layers plus the rest
    assert _storage_bytes(model) <= other + params * 0.51


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_4bit_layer_computes_with_its_dequantized_weight(quant_type):
    from llmtrain.model.quantize import dequantized, quantize_base

    model = _layer_model(hidden=256, intermediate=512)
    weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    quantize_base(model, quant_type, True, torch.float32)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 256, requires_grad=True)
    y = layer(x)
    expected = x @ dequantized(weight, quant_type, True).T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # 4 bits keep the weight within its blocks' scale (NF4's largest step is ~0.3 of absmax)
    assert 0 < (dequantized(weight, quant_type, True) - weight).abs().max() < 0.25 * weight.abs().max()
    y.sum().backward()  # the input gradient flows through the frozen 4-bit weight
    torch.testing.assert_close(x.grad, dequantized(weight, quant_type, True).sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():  # eval mode takes the same path (no bf16 repacking on AVX512-BF16 CPUs)
        torch.testing.assert_close(layer(x.detach()), expected.detach(), rtol=1e-5, atol=1e-5)


def test_zero3_and_a_missing_bitsandbytes_are_one_line_errors(monkeypatch):
    from llmtrain.config import load_config
    from llmtrain.errors import UserError
    from llmtrain.model.quantize import import_bitsandbytes

    with pytest.raises(UserError, match=r"lora.quantize=nf4 .* ZeRO-3 cannot partition; use zero.stage=0, 1 or 2"):
        load_config(REPO / "configs" / "tiny-lora.yaml", ["lora.quantize=nf4", "zero.stage=3"])
    with pytest.raises(UserError, match=r"lora.quantize: Input should be 'nf4' or 'fp4'"):
        load_config(REPO / "configs" / "tiny-lora.yaml", ["lora.quantize=int4"])
    import importlib.util

    from llmtrain.model.quantize import check_bitsandbytes

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(
        UserError, match=r"needs bitsandbytes \(not installed\); install it with `pip install 'llmtrain\[qlora\]'`"
    ):
        check_bitsandbytes()  # the driver's check, before workers start
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match=r"needs bitsandbytes .* `pip install 'llmtrain\[qlora\]'`"):
        import_bitsandbytes()


@pytest.mark.slow
def test_qlora_trains_and_tracks_lora_on_the_full_precision_base(runs):
    lora, qlora, fp4 = _losses(runs["lora"]), _losses(runs["qlora"]), _losses(runs["fp4-zero0"])
    assert sorted(qlora) == sorted(lora) == sorted(fp4) == list(range(1, STEPS + 1))
    for losses in (qlora, fp4):
        assert losses[3] + losses[4] < losses[1] + losses[2]  # it learns (batches differ step to step)
    # stories260K is 64 wide, where 4 bits cost the most: measured gaps 0.5-3.0% (NF4) and
    # 0.1-7.9% (FP4 without double quantisation) per step; NF4 tracks closer, as in the QLoRA paper
    gap = {name: [abs(run[s] - lora[s]) / lora[s] for s in lora] for name, run in (("nf4", qlora), ("fp4", fp4))}
    assert max(gap["nf4"]) <= 0.04 and max(gap["fp4"]) <= 0.10, gap
    assert sum(gap["nf4"]) < sum(gap["fp4"]), gap
    assert min(gap["nf4"]) > 0  # the base really is another (quantized) one


@pytest.mark.slow
def test_a_resumed_qlora_run_equals_the_uninterrupted_one_and_its_checkpoints_hold_no_base(runs):
    from llmtrain.checkpoint import find_latest

    assert _losses(runs["resumed"]) == _losses(runs["qlora"])
    adapters = [json.loads((r / "adapter" / "adapter_config.json").read_text()) for r in (runs["qlora"], runs["resumed"])]
    assert adapters[0] == adapters[1]
    from safetensors.torch import load_file

    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (runs["qlora"], runs["resumed"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the full-precision LoRA checkpoint holds the base (fp32), the QLoRA one only the adapters
    sizes = {k: sum(f.stat().st_size for f in (find_latest(runs[k]) / "ds").iterdir()) for k in ("lora", "qlora")}
    base_bytes = (STORIES260K / "model.safetensors").stat().st_size
    assert sizes["lora"] > sizes["qlora"] + 0.8 * base_bytes, sizes


def _our_qlora_logits(adapter: Path, ids: torch.Tensor, quant_type: Optional[str] = "nf4") -> torch.Tensor:
    """Our decoder on stories260K in 4 bits (`quant_type`; None: full precision) with `adapter`."""
    from llmtrain.model.hf import load_hf_model
    from llmtrain.model.lora import load_adapter
    from llmtrain.model.quantize import quantize_base

    model = load_hf_model(STORIES260K)
    if quant_type is not None:
        quantize_base(model, quant_type, True, torch.float32)
    load_adapter(model, adapter)
    with torch.no_grad():
        return model(ids)


@pytest.mark.slow
def test_the_qlora_adapter_loads_in_peft_on_a_4bit_and_a_full_precision_base(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmtrain.export import export

    out = export(runs["qlora"], tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(STORIES260K)
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = _our_qlora_logits(out, ids)
    four_bit = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    base4 = AutoModelForCausalLM.from_pretrained(STORIES260K, quantization_config=four_bit, device_map="cpu", dtype=torch.float32)
    for module in base4.modules():  # bitsandbytes' bf16 repacking for CPU inference needs dims a 64-wide model lacks
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        theirs4 = PeftModel.from_pretrained(base4, out).eval()(ids).logits
    torch.testing.assert_close(theirs4, ours, rtol=1e-4, atol=1e-4)
    full = AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(full, out).eval()(ids).logits
    torch.testing.assert_close(theirs, _our_qlora_logits(out, ids, quant_type=None), rtol=1e-4, atol=1e-4)
    assert (theirs - ours).abs().max() > 1e-2  # on the full-precision base, the 4-bit rounding is gone


@pytest.mark.slow
def test_a_merged_qlora_export_is_the_dequantized_base_with_the_adapter_merged(runs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmtrain.export import export

    adapter = export(runs["qlora"], tmp_path / "adapter")
    merged = export(runs["qlora"], tmp_path / "merged", merge=True)
    written = load_file(merged / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.float32}  # stories260K is fp32
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = _our_qlora_logits(adapter, ids)
    hf = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_merging_a_qlora_run_whose_base_is_gone_says_so(runs, tmp_path):
    import shutil

    from llmtrain.errors import UserError
    from llmtrain.export import export

    run = tmp_path / "run"
    shutil.copytree(runs["fp4-zero0"], run)
    pointer = run / "sft-data.json"
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "base": str(tmp_path / "gone")}))
    with pytest.raises(
        UserError, match=r"--merge of a QLoRA run needs its base .* restore the base there, or export the adapter"
    ):
        export(run, tmp_path / "merged", merge=True, dtype="fp32")
    assert not (tmp_path / "merged").exists()
    assert (export(run, tmp_path / "adapter") / "adapter_model.safetensors").is_file()  # the adapter needs no base
