"""Tokenizer: our sentencepiece BPE (+ its transformers files) and released checkpoints' tokenizers."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import CORPUS, STORIES260K, need_shared

from llmtrain.data.tokenizer import MARKER, load_tokenizer
from llmtrain.data.tokenizer_train import CHAT_TOKENS
from llmtrain.errors import UserError

EDGE_CASES = [
    "Hello world",
    " leading space",
    "   three leading spaces and trailing   ",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttab\tseparated\tvalues",
    "naïve café – “quotes” — 日本語 😀 ∑ ﬁ",
    "<|user|>What is 2+2?<|end|><|assistant|>4<|end|>",
    "a <|system|> b",
    "def f(x):\n    return x ** 2  # comment\n",
    "1234567890 3.14159 1e-9",
    "x" * 300,
]


def corpus_blocks(limit_chars: int = 400_000) -> list[str]:
    """Blank-line-separated blocks from every corpus file (an independent split, not our reader)."""
    out = []
    for path in sorted(CORPUS.glob("*.txt")):
        text = path.read_text(encoding="utf-8")[:limit_chars]
        out += [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    return out


def test_trained_tokenizer_layout(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    names = {p.name for p in small_tokenizer.iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", MARKER} <= names
    assert not any(n.startswith(".") for n in names)
    assert tok.backend == "sentencepiece" and tok.vocab_size == 2000
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.token_to_id(t) for t in CHAT_TOKENS] == list(range(4, 4 + len(CHAT_TOKENS)))
    # byte fallback: a character never seen in training still round-trips, without <unk>
    ids = tok.encode("ꙮ")
    assert tok.unk_id not in ids and tok.decode(ids) == "ꙮ"


def test_transformers_gives_sentencepiece_ids_on_corpus(small_tokenizer):
    need_shared()
    tok = load_tokenizer(small_tokenizer)
    hf = tok.hf()
    texts = corpus_blocks() + EDGE_CASES
    expected = tok.encode_batch(texts)
    assert hf(texts, add_special_tokens=False)["input_ids"] == expected
    with_bos = hf(texts[:50])["input_ids"]
    assert with_bos == [[tok.bos_id] + ids for ids in expected[:50]]
    for text, ids in zip(EDGE_CASES, expected[-len(EDGE_CASES) :]):
        assert tok.decode(ids) == text
        assert hf.decode(ids) == text
    # the chat tokens are single ids in both, and special to transformers
    assert tok.encode("<|user|>")[0] == tok.token_to_id("<|user|>") == hf.convert_tokens_to_ids("<|user|>")
    chat = tok.encode("<|user|>Hi there<|end|>")
    assert hf.decode(chat, skip_special_tokens=True) == "Hi there" and tok.decode(chat) == "<|user|>Hi there<|end|>"


def test_autotokenizer_loads_from_the_directory(small_tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(small_tokenizer))
    tok = load_tokenizer(small_tokenizer)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
    assert len(hf) == tok.vocab_size
    assert hf("Once upon a time", add_special_tokens=False)["input_ids"] == tok.encode("Once upon a time")


def test_control_strings_in_text_are_not_control_ids(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    ids = tok.encode("</s> <s> <pad> <unk>")
    assert not {tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id} & set(ids)


def test_encode_documents_wraps_and_splits_long_texts_exactly(small_tokenizer):
    need_shared()
    tok = load_tokenizer(small_tokenizer)
    bible = (CORPUS / "bible_web.txt").read_text(encoding="utf-8")[:400_000]  # one line, no blank lines
    docs = ["First document.", bible, "Third one, short."]
    pieces, owners = tok._pieces(docs)
    assert len(pieces) > 5 and owners is not None  # the long text really is cut
    ids, lengths = tok.encode_documents(docs, num_threads=2)
    assert lengths.tolist() == [len(tok.encode(d)) + 2 for d in docs]
    at = 0
    for doc, n in zip(docs, lengths):
        assert ids[at] == tok.bos_id and ids[at + n - 1] == tok.eos_id
        assert ids[at + 1 : at + n - 1].tolist() == tok.encode(doc)  # same as encoding it whole
        at += n
    assert ids.dtype == np.int32


def test_rerun_is_noop_and_other_output_refused(small_tokenizer, corpus_slice, tmp_path, capfd):
    from llmtrain.data.tokenizer_train import train_tokenizer

    before = (small_tokenizer / "tokenizer.model").stat().st_mtime_ns
    assert train_tokenizer([str(corpus_slice)], 2000, small_tokenizer) == small_tokenizer
    assert "up to date" in capfd.readouterr().err
    assert (small_tokenizer / "tokenizer.model").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="already exists"):
        train_tokenizer([str(corpus_slice)], 2500, small_tokenizer)


@pytest.mark.parametrize("output", ["plain/tok", "plain"])
def test_unwritable_output_is_found_before_any_input_is_read(corpus_slice, tmp_path, monkeypatch, output):
    import llmtrain.data.tokenizer_train as tt

    (tmp_path / "plain").write_text("a file, not a directory\n")
    monkeypatch.setattr(tt, "iter_documents", lambda *a, **k: pytest.fail("input read before the output was checked"))
    with pytest.raises(UserError, match="cannot create|is a file, not a directory"):
        tt.train_tokenizer([str(corpus_slice)], 512, tmp_path / output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_fingerprint_and_save(small_tokenizer, tmp_path):
    tok = load_tokenizer(small_tokenizer)
    assert tok.fingerprint == load_tokenizer(small_tokenizer).fingerprint
    copy = tok.save(tmp_path / "copy")
    again = load_tokenizer(copy)
    assert again.fingerprint == tok.fingerprint and again.backend == "sentencepiece"
    assert again.encode_batch(EDGE_CASES) == tok.encode_batch(EDGE_CASES)
    assert load_tokenizer(STORIES260K).fingerprint != tok.fingerprint


def test_released_checkpoint_tokenizer_matches_transformers(shared_dir):
    from transformers import AutoTokenizer

    tok = load_tokenizer(STORIES260K)
    hf = AutoTokenizer.from_pretrained(str(STORIES260K))
    assert tok.backend == "tokenizers" and tok.vocab_size == 512 == len(hf)
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert tok.pad_id is None and tok.max_length == 512
    stories = [b for b in re.split(r"\n\s*\n", (CORPUS / "tinystories_val_subset.txt").read_text()) if b.strip()][:500]
    assert tok.encode_batch(stories) == hf(stories, add_special_tokens=False)["input_ids"]
    ids, lengths = tok.encode_documents(stories[:3])
    assert ids[0] == 1 and ids[lengths[0] - 1] == 2 and lengths[0] == len(tok.encode(stories[0])) + 2
    assert tok.decode(tok.encode(stories[0])) == hf.decode(hf(stories[0], add_special_tokens=False)["input_ids"])
    # control strings in data stay text (transformers itself would turn "</s>" into id 2)
    assert 2 not in tok.encode("The end.</s>")


def test_tokenizer_json_only_directory(shared_dir, tmp_path):
    """Qwen-style release: tokenizer.json + tokenizer_config.json, no tokenizer.model."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES260K / name, tmp_path / name)
    tok, full = load_tokenizer(tmp_path), load_tokenizer(STORIES260K)
    assert tok.backend == "tokenizers" and tok.fingerprint == full.fingerprint
    assert tok.encode_batch(EDGE_CASES) == full.encode_batch(EDGE_CASES)
    assert {p.name for p in tok.files()} == {"tokenizer.json", "tokenizer_config.json"}


def test_byte_level_bpe_without_bos(corpus_slice, tmp_path):
    """A GPT-2-style byte-level BPE (no BOS, EOS only), trained with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    rust.train([str(p) for p in sorted(corpus_slice.glob("*.txt"))], trainer)
    rust.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None and tok.eos_id == 0
    ids, lengths = tok.encode_documents(["Hello there.", "General Kenobi!"])
    assert lengths.tolist() == [len(tok.encode("Hello there.")) + 1, len(tok.encode("General Kenobi!")) + 1]
    assert ids[lengths[0] - 1] == 0 and ids[-1] == 0 and 0 not in ids[: lengths[0] - 1]
    assert tok.decode(tok.encode(" spaced  text\n")) == " spaced  text\n"
    assert 0 not in tok.encode("text <|endoftext|> more")


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path)
