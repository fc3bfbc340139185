"""Evaluation: perplexity on prepared data, accuracy on a labelled task, sampled generations.

    llmtrain eval MODEL_DIR --data PREPARED_DIR                     # perplexity (val split)
    llmtrain eval MODEL_DIR --task sentiment_test.jsonl --template "Review: {text}\\nSentiment:" \\
        --label-word positive=" positive" --label-word negative=" negative" --chat-template completion
    llmtrain eval MODEL_DIR --adapter runs/lora/adapter --prompt "Hello" --chat --temperature 0.7 --seed 0

Accuracy scores every label word: the summed log-probability of the answer tokens (the label
word and the end-of-turn token after it, as the template renders them) given the prompt; the
highest-scoring label is the prediction. No free-form output is parsed.

The same functions run inside training workers (validation, the fine-tuning report)
on the DeepSpeed engine, any ZeRO stage: examples are split over ranks, and every rank makes
the same number of forward passes (ZeRO-3 gathers parameters collectively in each).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from llmtrain.data.chat import resolve_template
from llmtrain.data.loader import TokenLoader
from llmtrain.data.sft import data_files, label_set, make_choices, read_records
from llmtrain.data.shards import check_fits_model, open_prepared
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.errors import UserError
from llmtrain.generate import eos_ids, generate
from llmtrain.generate import load_tokenizer as load_hf_tokenizer
from llmtrain.model.hf import load_hf_model
from llmtrain.model.lora import load_adapter
from llmtrain.worker import WorkerContext

Forward = Callable[[torch.Tensor], torch.Tensor]  # input_ids [B, L] -> logits [B, L, V]


@torch.no_grad()
def answer_logprobs(forward: Forward, rows: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, device) -> torch.Tensor:
    """Sum of log p(token) over the masked (answer) tokens of each row; rows padded on the right."""
    width = max(1, max((len(ids) for ids, _ in rows), default=1))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (t, m) in enumerate(rows):
        ids[i, : len(t)] = torch.as_tensor(np.asarray(t, dtype=np.int64))
        mask[i, : len(m)] = torch.as_tensor(np.asarray(m) != 0)
    logits = forward(ids.to(device)).float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
    return (logp * mask[:, 1:].to(device)).sum(dim=1).cpu()


def choice_scores(
    forward: Forward,
    choices,
    limit: int,
    rank: int,
    world_size: int,
    batch_examples: int,
    pad_id: int,
    device,
    all_reduce: Callable[[list[float]], list[float]],
) -> Optional[dict[str, float]]:
    """{"accuracy", "macro_f1"} over the first `limit` examples of `choices`
    (llmtrain.data.sft.Choices), split over ranks; every rank runs the same number of forward
    passes. Macro-F1 is the mean over the labels of each label's F1 (a label never gold nor
    predicted counts 0), so a model that answers one label everywhere scores about 1/k of it."""
    if choices is None:
        return None
    n = min(limit, len(choices.gold))
    k = len(choices.labels)
    mine = list(range(rank, n, world_size))
    passes = math.ceil(math.ceil(n / world_size) / batch_examples)
    confusion = np.zeros((k, k), dtype=np.float64)  # [gold, predicted]
    for p in range(passes):
        batch = mine[p * batch_examples : (p + 1) * batch_examples]
        rows = [choices.candidate(e * k + j) for e in batch for j in range(k)]
        if not rows:  # keep step with the other ranks
            answer_logprobs(forward, [(np.asarray([pad_id]), np.asarray([0]))], pad_id, device)
            continue
        scores = answer_logprobs(forward, rows, pad_id, device).view(len(batch), k)
        np.add.at(confusion, (np.asarray(choices.gold)[batch], scores.argmax(dim=1).numpy()), 1)
    confusion = np.asarray(all_reduce(confusion.ravel().tolist()), dtype=np.float64).reshape(k, k)
    total = confusion.sum()
    if not total:
        return None
    hits = np.diag(confusion)
    gold_plus_predicted = confusion.sum(0) + confusion.sum(1)
    f1 = np.divide(2 * hits, gold_plus_predicted, out=np.zeros(k), where=gold_plus_predicted > 0)
    return {"accuracy": float(hits.sum() / total), "macro_f1": float(f1.mean())}


def count_labels(micro_batch: dict[str, torch.Tensor]) -> int:
    """Supervised tokens of a micro-batch: what language-model losses are normalised by."""
    return int((micro_batch["labels"] != -100).sum())


def lm_loss(model, micro_batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token cross-entropy over the supervised tokens (no extra statistics)."""
    mb = micro_batch
    return model(mb["input_ids"].to(device), position_ids=mb["position_ids"].to(device), labels=mb["labels"].to(device)), {}


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module, batches, ctx: WorkerContext, loss=lm_loss, count=count_labels
) -> Optional[dict[str, float]]:
    """{"loss": ..., **stats}: sums over `batches.next_step()` (one call) and all ranks, divided
    by the global count (tokens for language modelling, pairs for preference losses); None when
    the batches hold nothing. `model` (a module or the DeepSpeed engine) is in eval mode meanwhile."""
    was_training = model.training
    model.train(False)
    sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), dtype=torch.float64, device=ctx.device)}
    n = 0
    for mb in batches.next_step():
        loss_sum, stats = loss(model, mb, ctx.device)
        for key, value in {"loss": loss_sum, **stats}.items():
            sums[key] = sums.get(key, 0) + value.detach().double()
        n += count(mb)
    model.train(was_training)
    keys = list(sums)
    totals = ctx.all_reduce_sum([float(sums[k]) for k in keys] + [n])
    count_all = totals.pop()
    return {k: v / count_all for k, v in zip(keys, totals)} if count_all else None


def prepared_val_loss(
    model,
    path: Path,
    micro_batch_size: int,
    grad_accum: int,
    ctx: WorkerContext,
    seed: int = 0,
    model_dir: Optional[Path] = None,
) -> Optional[float]:
    """Token-weighted loss on the validation split of a prepared directory (None if it has none).
    Data made with another tokenizer than `model_dir`'s, or holding ids beyond the model's
    vocabulary, is refused before any forward pass."""
    _check_data_for_model(model, path, model_dir)
    loader = TokenLoader(
        str(path),
        split="val",
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=seed,
        shuffle=False,
    )
    if not loader.has_split("val"):
        return None
    result = mean_loss(model, loader, ctx)
    return None if result is None else result["loss"]


def _check_data_for_model(model, path: Path, model_dir: Optional[Path]) -> None:
    config = getattr(getattr(model, "module", model), "config", None)  # a module or the DeepSpeed engine
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        return
    name = str(model_dir) if model_dir is not None else "the model"
    fix = (
        f"prepare it with `llmtrain prepare --tokenizer {model_dir}`"
        if model_dir is not None
        else "prepare it with the model's tokenizer"
    )
    check_fits_model(open_prepared(path), int(vocab), name, model_dir, fix)


# ---------------------------------------------------------------------------------------------
# `llmtrain eval`


def load_model(model_dir: str | Path, adapter: Optional[str | Path] = None):
    """Our decoder from a Hugging Face directory, with a PEFT adapter loaded when given."""
    model = load_hf_model(model_dir)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval()


def perplexity(
    model, data_dir: str | Path, batches: int = 16, micro_batch_size: int = 8, model_dir: Optional[str | Path] = None
) -> dict:
    ctx = WorkerContext.single_process()
    loss = prepared_val_loss(model, Path(data_dir), micro_batch_size, batches, ctx, model_dir=model_dir)
    if loss is None:
        raise UserError(f"{data_dir}: no validation split; prepare it with --val-fraction > 0")
    return {"val_loss": loss, "perplexity": math.exp(loss)}


def task_accuracy(model, model_dir: str | Path, data, limit: int = 1000, seq_len: Optional[int] = None) -> dict:
    """Accuracy on labelled records (`data`: a DataSection with path, template, label words, ...)."""
    tokenizer = load_tokenizer(model_dir)
    template = resolve_template(data.chat_template, tokenizer)
    files = data_files(data.path, "--task")
    records = read_records(files, "--task")
    order = np.arange(min(limit, len(records)))
    label_words = data.label_words or {w: w for w in label_set(records, data.label_field, order)}
    where = lambda i: f"{files[0]}: record {i + 1}"  # noqa: E731
    choices = make_choices(
        records, order, order, data, tokenizer, template, seq_len or model.config.max_position_embeddings, label_words, where
    )
    positions = seq_len or model.config.max_position_embeddings
    if choices is None:
        raise UserError(
            f"--task {data.path}: none of its {len(order)} records fits the model's {positions} positions with every label word; "
            "shorten the records or the template"
        )
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    scores = choice_scores(lambda ids: model(ids), choices, limit, 0, 1, 16, pad, torch.device("cpu"), lambda v: list(v))
    examples = len(choices.gold)
    return {**scores, "examples": examples, "skipped_too_long": len(order) - examples, "labels": list(label_words)}


def generations(
    model,
    model_dir: str | Path,
    prompts: Sequence[str],
    chat: bool,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
) -> list[str]:
    """Continuations of `prompts` (wrapped in the model's chat template with `chat`)."""
    tokenizer = load_hf_tokenizer(model_dir)
    eos = eos_ids(model_dir, model.config.eos_token_id, tokenizer.eos_token_id)
    out = []
    for i, prompt in enumerate(prompts):
        if chat:
            if not tokenizer.chat_template:
                raise UserError(f"{model_dir}: no chat template to wrap prompts in; drop --chat or use a fine-tuned export")
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = tokenizer(prompt)["input_ids"]
        tokens = generate(
            model,
            list(ids),
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_id=eos,
            seed=None if seed is None else seed + i,
        )
        out.append(tokenizer.decode(tokens[len(ids) :], skip_special_tokens=True))
    return out


def eval_command(
    model_dir: str,
    adapter: Optional[str],
    data: Optional[str],
    batches: int,
    task_cfg,
    limit: int,
    prompts: Sequence[str],
    chat: bool,
    max_new_tokens: int,
    temperature: float,
    seed: Optional[int],
    as_json: bool,
) -> dict:
    if data is None and task_cfg is None and not prompts:
        raise UserError("nothing to evaluate: give --data PREPARED_DIR (perplexity), --task FILE (accuracy) and/or --prompt TEXT")
    model = load_model(model_dir, adapter)
    result: dict = {"model": str(model_dir), "adapter": adapter}
    if data is not None:
        result["perplexity"] = perplexity(model, data, batches, model_dir=Path(model_dir))
        if not as_json:
            print(
                f"perplexity on {data} (val): {result['perplexity']['perplexity']:.3f} (loss {result['perplexity']['val_loss']:.4f})"
            )
    if task_cfg is not None:
        result["task"] = task_accuracy(model, model_dir, task_cfg, limit)
        if not as_json:
            t = result["task"]
            skipped = f"; {t['skipped_too_long']} longer than the model's positions skipped" if t["skipped_too_long"] else ""
            print(
                f"accuracy on {task_cfg.path}: {t['accuracy']:.4f} over {t['examples']} examples "
                f"(labels {', '.join(t['labels'])}{skipped})"
            )
    if prompts:
        texts = generations(model, model_dir, prompts, chat, max_new_tokens, temperature, seed=seed)
        result["generations"] = [{"prompt": p, "output": t} for p, t in zip(prompts, texts)]
        if not as_json:
            for p, t in zip(prompts, texts):
                print(f"{p!r} -> {t!r}")
    if as_json:
        print(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------
# The fine-tuning report


def format_report(report: dict) -> str:
    """The end-of-run table (before / after, forgetting, trainable parameters)."""

    def cell(x, digits=4):
        return "-" if x is None else f"{x:.{digits}f}"

    b, a = report.get("before", {}), report.get("after", {})
    lines = [f"fine-tuning report ({report['report']})", f"  {'':34s}{'before':>10s}{'after':>10s}"]
    rows = [
        ("task accuracy (label log-prob)", "accuracy"),
        ("task macro-F1", "macro_f1"),
        ("held-out reward accuracy", "reward_accuracy"),
        ("held-out reward margin", "reward_margin"),
        ("task validation loss", "val_loss"),
        ("base validation loss (forgetting)", "base_val_loss"),
    ]
    for title, key in rows:
        if b.get(key) is not None or a.get(key) is not None:
            lines.append(f"  {title:34s}{cell(b.get(key)):>10s}{cell(a.get(key)):>10s}")
    if "base_val_note" in report:
        lines.append(f"  base validation loss: {report['base_val_note']}")
    p = report["params"]
    lines.append(
        f"  trainable parameters: {p['trainable']:,} of {p['total']:,} ({p['trainable'] / p['total']:.2%})"
        + (" - LoRA" if report.get("lora") else "")
    )
    return "\n".join(lines)
