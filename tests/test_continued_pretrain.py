"""Continued (domain-adaptive) pretraining: `llmtrain pretrain model.from=RUN` on new data starts
from the run's weights (exported once to RUN_DIR/base/) and the new data's first rows, with a
fresh or a continued LR schedule; data tokenized with another tokenizer is refused up front."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CORPUS, need_shared
from runtime_support import BASE, CONFIG, losses, tiny_data, torchrun

from llmtrain.config import load_config
from llmtrain.data.loader import TokenLoader
from llmtrain.engine import batch_layout
from llmtrain.errors import UserError
from llmtrain.metrics import read_metrics
from llmtrain.schedule import lr_multiplier
from llmtrain.tasks.pretrain import PretrainTask

pytestmark = pytest.mark.slow
DOMAIN = CORPUS.parent / "domain" / "movie_reviews_unlabeled.txt"


def _lrs(run) -> dict[int, float]:
    return {e["step"]: e["lr"] for e in read_metrics(run) if "lr" in e}


def test_continued_pretraining_from_a_run(tmp_path_factory, tmp_path):
    need_shared()
    data = tiny_data(tmp_path_factory.getbasetemp())
    tok = data.parent / "tok"
    from llmtrain.data.prepare import prepare

    text = tmp_path / "reviews.txt"
    text.write_text(DOMAIN.read_text()[:150_000])
    domain = tmp_path / "domain"
    prepare([str(text)], tokenizer=str(tok), seq_len=64, output=str(domain), val_fraction=0.05)

    base = tmp_path / "base"
    torchrun(1, [f"data.path={data}", f"run.dir={base}", "train.max_steps=4", "zero.stage=0"])
    cont = tmp_path / "cont"
    overrides = [f"data.path={domain}", f"model.from={base}", f"run.dir={cont}", "train.max_steps=2", "zero.stage=0"]
    torchrun(1, [*overrides, "train.schedule_offset=4"])

    # 1. the base's trained weights, exported once, on the new data's first global batch
    marker = json.loads((cont / "base" / "llmtrain_base.json").read_text())
    assert marker["step"] == 4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cont / "base", dtype=torch.float32).eval()
    cfg = load_config(CONFIG, [*BASE, *overrides, "cluster.num_workers=1"])
    layout = batch_layout(cfg, 1)
    loader = TokenLoader(str(domain), micro_batch_size=layout.micro_batch_size, grad_accum=layout.grad_accum, seed=cfg.run.seed)
    total = count = 0.0
    with torch.no_grad():
        for mb in loader.next_step():
            logits = model(mb["input_ids"], position_ids=mb["position_ids"]).logits
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="sum"))
            count += int((mb["labels"] != -100).sum())
    assert losses(cont)[1] == pytest.approx(total / count, rel=1e-4)

    # 2. the schedule: continued = the last 2 steps of a 6-step one (no second warmup), as the
    # base's own first steps were of its fresh 4-step one
    lr, t = cfg.train.lr, cfg.train
    shift = next(
        k
        for k in (0, -1)
        if all(
            v == pytest.approx(lr * lr_multiplier(s + k, t.model_copy(update={"max_steps": 4}))) for s, v in _lrs(base).items()
        )
    )
    full = t.model_copy(update={"max_steps": 6})
    assert {s: pytest.approx(lr * lr_multiplier(4 + s + shift, full)) for s in (1, 2)} == _lrs(cont)
    fresh = t.model_copy(update={"max_steps": 2})
    assert _lrs(cont)[1] != pytest.approx(lr * lr_multiplier(1 + shift, fresh))  # what a fresh schedule would give

    # 3. data tokenized with another tokenizer than the base's: one line on the driver, before any worker
    other = tmp_path / "other"
    from llmtrain.data.tokenizer_train import train_tokenizer

    train_tokenizer([str(text)], 512, str(tmp_path / "tok-reviews"))
    prepare([str(text)], tokenizer=str(tmp_path / "tok-reviews"), seq_len=64, output=str(other), val_fraction=0.05)
    bad = load_config(CONFIG, [*BASE, f"data.path={other}", f"model.from={base}", f"run.dir={tmp_path / 'bad'}"])
    with pytest.raises(UserError, match="another tokenizer"):
        PretrainTask().prepare(bad, batch_layout(bad, 1))
