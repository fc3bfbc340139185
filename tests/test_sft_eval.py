"""`llmtrain eval`: label-word accuracy against an independent computation with transformers,
perplexity on prepared data, and records read from Parquet like JSONL."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES260K, need_shared

from llmtrain.config import DataSection


@pytest.fixture(scope="module")
def sentiment(shared_dir):
    return shared_dir / "data" / "eval" / "sentiment_test.jsonl"


def test_accuracy_scores_each_label_word_like_transformers(sentiment):
    """Our prediction for each record is the label whose answer (word + EOS) transformers'
    model finds most likely after the prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtrain.evaluate import load_model, task_accuracy

    words = {"positive": " happy", "negative": " sad"}
    data = DataSection(
        path=sentiment, format="labelled", template="Review: {text}\nSentiment:", label_words=words, chat_template="completion"
    )
    ours = task_accuracy(load_model(STORIES260K), STORIES260K, data, limit=24)
    assert ours["examples"] == 24 and ours["labels"] == ["positive", "negative"]

    hf, tok = AutoModelForCausalLM.from_pretrained(STORIES260K).eval(), AutoTokenizer.from_pretrained(STORIES260K)
    records = [json.loads(line) for line in sentiment.read_text().splitlines()[:24]]
    correct, pairs = 0, []
    for r in records:
        scores = {}
        for label, word in words.items():
            text = tok.bos_token + data.template.format(**r)
            prompt = tok(text, add_special_tokens=False)["input_ids"]
            full = tok(text + word + tok.eos_token, add_special_tokens=False)["input_ids"]
            assert full[: len(prompt)] == prompt
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([full])).logits[0, :-1].float(), -1)
            scores[label] = sum(logp[t - 1, full[t]].item() for t in range(len(prompt), len(full)))
        correct += max(scores, key=scores.get) == r["label"]
        pairs.append((r["label"], max(scores, key=scores.get)))
    assert ours["accuracy"] == pytest.approx(correct / len(records))
    f1 = []
    for label in words:
        tp = sum(g == p == label for g, p in pairs)
        gold, predicted = sum(g == label for g, _ in pairs), sum(p == label for _, p in pairs)
        f1.append(2 * tp / (gold + predicted) if gold + predicted else 0.0)
    assert ours["macro_f1"] == pytest.approx(sum(f1) / len(f1))


def test_perplexity_is_low_in_domain_and_high_out_of_domain(tmp_path, shared_dir):
    """stories260K was trained on TinyStories: low perplexity there, high on Jane Austen."""
    from llmtrain.data.prepare import prepare
    from llmtrain.evaluate import load_model, perplexity

    model = load_model(STORIES260K)
    result = {}
    for name in ("tinystories_val_subset", "austen_6novels"):
        lines = (shared_dir / "data" / "corpus" / f"{name}.txt").read_text()[:60_000].splitlines()
        (tmp_path / f"{name}.txt").write_text("\n\n".join(lines))  # a document per line
        prepared = prepare(
            [str(tmp_path / f"{name}.txt")],
            tokenizer=str(STORIES260K),
            seq_len=128,
            output=str(tmp_path / f"{name}-data"),
            val_fraction=0.2,
        )
        result[name] = perplexity(model, prepared, batches=2)
    stories, austen = result["tinystories_val_subset"], result["austen_6novels"]
    assert stories["perplexity"] == pytest.approx(torch.tensor(stories["val_loss"]).exp().item(), rel=1e-6)
    assert stories["val_loss"] < 2.0 < austen["val_loss"]


def test_parquet_records_equal_jsonl_records(tmp_path, sentiment):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmtrain.config import load_config
    from llmtrain.data.chat import resolve_template
    from llmtrain.data.sft import build_cache, read_meta
    from llmtrain.data.tokenizer import load_tokenizer

    records = [json.loads(line) for line in sentiment.read_text().splitlines()[:50]]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    tok = load_tokenizer(STORIES260K)
    caches = []
    for path in (jsonl, tmp_path / "r.parquet"):
        cfg = load_config(None, [f"data.path={path}", "data.chat_template=plain"])
        caches.append(build_cache(cfg.data, tok, resolve_template("plain", tok), 256, 0, tmp_path / path.suffix))
    for part in ("train_tokens", "train_mask", "val_tokens", "choices_tokens"):
        import numpy as np

        assert np.array_equal(np.load(caches[0] / f"{part}.npy"), np.load(caches[1] / f"{part}.npy")), part
    assert read_meta(caches[0])["format"] == read_meta(caches[1])["format"] == "labelled"


@pytest.fixture(autouse=True)
def _shared():
    need_shared()
