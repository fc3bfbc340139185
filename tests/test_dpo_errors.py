"""`llmtrain dpo` refuses bad input on the driver, before Ray or any worker starts: one line
naming the problem and the fix, exit 2, no traceback, and the run directory holds no resolved
config, checkpoint or data cache afterwards."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import STORIES260K, need_shared
from runtime_support import REPO, llmtrain, tiny_data

DPO = REPO / "configs" / "tiny-dpo.yaml"


def _pairs(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = [
    {"prompt": f"Question {i}?", "chosen": f"A good answer number {i}.", "rejected": f"number answer good A {i}."}
    for i in range(40)
]


def _other_shape(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((STORIES260K / "config.json").read_text())
    LlamaForCausalLM(LlamaConfig(**{**config, "num_hidden_layers": config["num_hidden_layers"] + 1})).save_pretrained(out)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(STORIES260K / f, out / f)
    return out


def _other_tokenizer(out: Path, tok: Path) -> Path:
    shutil.copytree(STORIES260K, out)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (out / f).unlink()
    for f in tok.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return out


CASES = {
    # name: (records or None for GOOD, extra overrides (callable of tmp paths), phrase of the one-line error)
    "all pairs identical": ([{"prompt": "q?", "chosen": "same", "rejected": "same"}] * 20, [], "no training pairs left"),
    "missing field": ([*GOOD[:5], {"prompt": "q?", "chosen": "only chosen"}, *GOOD[5:]], [], "record 6"),
    "beta not positive": (None, ["dpo.beta=0"], "dpo.beta"),
    "no starting model": (None, ["model.from=null", "data.tokenizer={tok}"], "dpo needs a starting model"),
    "ipo with label smoothing": (
        None,
        ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"],
        "label_smoothing is not defined for loss_type=ipo",
    ),
    "simpo with a precomputed reference": (
        None,
        ["dpo.loss_type=simpo", "dpo.precompute_reference=true"],
        "nothing to precompute",
    ),
    "reference of another shape": (None, ["dpo.reference={other_shape}"], "has another shape than the policy"),
    "reference with another tokenizer": (None, ["dpo.reference={other_tokenizer}"], "another tokenizer than the policy"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_workers_start(case, tmp_path, tmp_path_factory):
    need_shared()
    records, extra, phrase = CASES[case]
    data = _pairs(tmp_path / "pairs.jsonl", records or GOOD)
    tok = tiny_data(tmp_path_factory.getbasetemp()).parent / "tok"
    paths = {"tok": tok}
    if "{other_shape}" in " ".join(extra):
        paths["other_shape"] = _other_shape(tmp_path / "other-shape")
    if "{other_tokenizer}" in " ".join(extra):
        paths["other_tokenizer"] = _other_tokenizer(tmp_path / "other-tokenizer", tok)
    run = tmp_path / "run"
    started = time.monotonic()
    proc = llmtrain(
        "dpo",
        str(DPO),
        f"run.dir={run}",
        f"model.from={STORIES260K}",
        f"data.path={data}",
        "data.chat_template=plain",
        "data.seq_len=128",
        "lora.r=4",
        f"data.cache_dir={tmp_path / 'cache'}",
        *[e.format(**paths) for e in extra],
    )
    seconds = time.monotonic() - started
    lines = [line for line in proc.stderr.splitlines() if line.startswith("llmtrain: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and phrase in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert seconds < 60
    # nothing of a run: no resolved config (written once Ray is up), no checkpoint, no data cache
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
