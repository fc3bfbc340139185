"""prepare: cleaning, dedup, split, tokenization and packing into Arrow shards, on real text."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, STORIES260K

from llmtrain.cli import main
from llmtrain.data.prepare import prepare
from llmtrain.data.shards import manifest_digest, open_prepared, sha256_file, verify
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.errors import UserError


def blocks(text: str) -> list[str]:
    """Documents of a text file (runs of non-blank lines), derived independently of our reader."""
    out, current = [], []
    for line in text.split("\n"):
        if line.strip(" \t\r\f\v"):
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    return out + ["\n".join(current)] if current else out


def stream(data, split: str) -> np.ndarray:
    """A split's real tokens, in order, from its shards."""
    parts = [s.tokens.reshape(-1)[: s.real_tokens] for s in data.splits[split].shards]
    return np.concatenate(parts).astype(np.int64)


def documents(data, split: str, tok) -> list[str]:
    """Decode a split back into documents, cutting the stream at BOS...EOS."""
    ids = stream(data, split)
    bos = np.flatnonzero(ids == tok.bos_id)
    eos = np.flatnonzero(ids == tok.eos_id)
    assert len(bos) == len(eos) and np.all(bos < eos) and np.all(eos[:-1] < bos[1:]) and eos[-1] == len(ids) - 1
    return [tok.decode(ids[b + 1 : e].tolist()) for b, e in zip(bos, eos)]


def test_manifest(small_prepared, small_tokenizer):
    m = json.loads((small_prepared / "manifest.json").read_text())
    tok = load_tokenizer(small_tokenizer)
    assert m["schema_version"] == 2 and m["seq_len"] == 64 and m["dtype"] == "uint16"
    assert m["manifest_sha256"] == manifest_digest(m)
    copy = small_prepared / "tokenizer"
    assert (
        m["tokenizer"]["files"] == {f.name: sha256_file(f) for f in copy.iterdir()}
        and "tokenizer.model" in m["tokenizer"]["files"]
    )
    t = m["tokenizer"]
    assert (t["fingerprint"], t["vocab_size"], t["bos_id"], t["eos_id"], t["pad_id"]) == (tok.fingerprint, 2000, 1, 2, 3)
    assert len(m["splits"]["train"]["shards"]) > 3  # shard_tokens=20k
    data = open_prepared(small_prepared)
    largest = {sh.file: int(sh.tokens.max()) for split in data.splits.values() for sh in split.shards}
    assert data.max_token_id == max(largest.values())
    for split in m["splits"].values():
        for s in split["shards"]:
            path = small_prepared / s["file"]
            assert s["sha256"] == sha256_file(path) and s["bytes"] == path.stat().st_size
            assert (s["rows"] - 1) * 64 < s["tokens"] <= s["rows"] * 64
            assert s["max_token_id"] == largest[s["file"]] < 2000
        assert split["rows"] == sum(s["rows"] for s in split["shards"])
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        assert split["padding"] == split["rows"] * 64 - split["tokens"]
    for key in ("rows", "tokens", "documents", "padding"):
        assert m["totals"][key] == sum(s[key] for s in m["splits"].values())
    c = m["cleaning"]
    assert c["documents_read"] == c["documents_kept"] + c["dropped_empty"] + c["dropped_short"] + c["dropped_duplicate"]
    assert c["documents_kept"] == m["totals"]["documents"]
    assert m["split"]["val_fraction"] == 0.05
    # the tokenizer travels with the data
    assert load_tokenizer(small_prepared / "tokenizer").fingerprint == tok.fingerprint
    assert load_tokenizer(small_prepared).fingerprint == tok.fingerprint


def test_shards_hold_exactly_the_cleaned_unique_documents(small_prepared, small_tokenizer, corpus_slice):
    tok = load_tokenizer(small_tokenizer)
    data = open_prepared(small_prepared)
    train, val = documents(data, "train", tok), documents(data, "val", tok)
    expected = []
    for path in sorted(corpus_slice.glob("*.txt")):
        for b in blocks(path.read_text(encoding="utf-8")):
            b = unicodedata.normalize("NFC", b)
            b = re.sub("[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", b).rstrip()
            if len(b) >= 16 and b not in expected:
                expected.append(b)
    assert sorted(train + val) == sorted(expected)
    assert len(set(train) & set(val)) == 0
    assert [d for d in expected if d in set(train)] == train  # input order is kept
    assert 0.02 < len(val) / len(expected) < 0.10


def test_row_format(small_prepared, small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    data = open_prepared(small_prepared)
    for split in data.splits.values():
        shards = split.shards
        for a, b in zip(shards, shards[1:]):
            assert a.next_token == int(b.tokens[0, 0])  # the stream continues across shards
        assert shards[-1].next_token is None
        for shard in shards:
            assert shard.tokens.shape == (shard.rows, 64) and shard.tokens.dtype == np.uint16
            assert not shard.tokens.flags.writeable and not shard.tokens.flags.owndata  # memory-mapped view
            flat = shard.tokens.reshape(-1)
            for r in range(shard.rows):
                starts = shard.starts_values[shard.starts_offsets[r] : shard.starts_offsets[r + 1]].tolist()
                row = shard.tokens[r]
                bos_at = np.flatnonzero(row == tok.bos_id).tolist()
                end = shard.real_tokens - r * 64
                pad_start = [end] if 0 < end < 64 else []
                assert starts == bos_at + pad_start
            assert np.all(flat[shard.real_tokens :] == tok.pad_id)
        last = shards[-1]
        assert last.real_tokens > (last.rows - 1) * 64  # padding only inside the final row


def test_output_independent_of_workers_and_batching(small_prepared, small_tokenizer, corpus_slice, tmp_path, monkeypatch):
    import llmtrain.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "TABLE_CHARS", 10_000)  # many small tables out of stage A
    other = prepare([str(corpus_slice)], small_tokenizer, 64, tmp_path / "w1", val_fraction=0.05, shard_tokens=20_000, workers=1)
    a = json.loads((small_prepared / "manifest.json").read_text())["splits"]
    b = json.loads((other / "manifest.json").read_text())["splits"]
    assert a == b  # same files, rows, tokens and sha256


def test_split_is_per_document(small_prepared, small_tokenizer, corpus_slice, tmp_path):
    """A document's split depends only on its text, not on the other documents."""
    tok = load_tokenizer(small_tokenizer)
    full_val = set(documents(open_prepared(small_prepared), "val", tok))
    subset = sorted(corpus_slice.glob("*.txt"))[::2]
    part = prepare([str(p) for p in subset], small_tokenizer, 64, tmp_path / "part", val_fraction=0.05)
    data = open_prepared(part)
    assert set(documents(data, "val", tok)) <= full_val
    assert not set(documents(data, "train", tok)) & full_val


def test_rerun_noop_force_and_changed_settings(small_tokenizer, corpus_slice, tmp_path, capfd):
    out = tmp_path / "d"
    args = [
        "prepare",
        "--input",
        str(corpus_slice / "inaugural.txt"),
        "--tokenizer",
        str(small_tokenizer),
        "--seq-len",
        "32",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    first = (out / "manifest.json").read_text()
    capfd.readouterr()
    assert main(args) == 0
    assert "up to date" in capfd.readouterr().err
    assert (out / "manifest.json").read_text() == first
    assert main(args[:-2] + ["--output", str(out), "--seq-len", "48"]) == 2
    assert "other inputs or settings" in capfd.readouterr().err
    assert main(args + ["--seq-len", "48", "--force"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["seq_len"] == 48 and verify(out)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp dirs left behind


def test_rerun_over_damaged_output_rebuilds_it(small_tokenizer, corpus_slice, tmp_path, capfd):
    """Up to date means intact too: a flipped byte (same size) is found by sha256 and rebuilt."""
    inputs = [str(corpus_slice / "inaugural.txt")]
    out = prepare(inputs, small_tokenizer, 32, tmp_path / "d", shard_tokens=5_000)
    shard = out / "train-00001.arrow"
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    shard.write_bytes(bytes(bad))
    capfd.readouterr()
    prepare(inputs, small_tokenizer, 32, out, shard_tokens=5_000)
    err = capfd.readouterr().err
    assert "is damaged" in err and "sha256 does not match" in err and "rebuilding it" in err and "up to date" not in err
    assert shard.read_bytes() == good and verify(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_seq_len_longer_than_the_corpus_is_refused_with_the_numbers(small_tokenizer, tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("A few short paragraphs of text.\n\nNot nearly enough for a long row.\n")
    with pytest.raises(
        UserError, match=r"--seq-len 1,000,000,000 is longer than the corpus: the train split has \d+ tokens.*99\.\d+% padding"
    ):
        prepare([str(text)], small_tokenizer, 10**9, tmp_path / "o", shard_tokens=10**9, val_fraction=0)
    assert not (tmp_path / "o").exists() and [p.name for p in tmp_path.iterdir()] == ["small.txt"]
    # --shard-tokens has its own bound and no longer limits --seq-len: a shard holds at least one row
    with pytest.raises(UserError, match="--shard-tokens 0 must be at least 1"):
        prepare([str(text)], small_tokenizer, 8, tmp_path / "o", shard_tokens=0)
    data = open_prepared(prepare([str(text)], small_tokenizer, 8, tmp_path / "o", shard_tokens=4, val_fraction=0))
    assert all(s.rows == 1 for s in data.splits["train"].shards)


def test_jsonl_parquet_text_globs_and_dirs_agree(small_tokenizer, corpus_slice, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = blocks((corpus_slice / "tinystories_val_subset.txt").read_text())
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "jl").mkdir()
    (tmp_path / "jl" / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "arr.json").write_text(json.dumps([{"text": d} for d in docs]))
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet", row_group_size=100)
    runs = {
        "text-dir": ([str(tmp_path / "txt")], "text"),
        "jsonl-glob": ([str(tmp_path / "jl" / "*.jsonl")], "text"),
        "json-array": ([str(tmp_path / "arr.json")], "text"),
        "parquet": ([str(tmp_path / "a.parquet")], "body"),
    }
    results = {}
    for name, (inputs, column) in runs.items():
        out = prepare(inputs, small_tokenizer, 64, tmp_path / f"out-{name}", text_column=column)
        results[name] = json.loads((out / "manifest.json").read_text())
    shards = {name: m["splits"] for name, m in results.items()}
    assert all(s == shards["text-dir"] for s in shards.values())
    assert results["parquet"]["cleaning"]["documents_read"] == len(docs)


def test_cleaning_rules_and_counts(small_tokenizer, tmp_path):
    story = "Once upon a time there was a small robot who liked to read."
    text = "\n\n".join(
        [
            "Cafe\u0301 au lait is a drink made with coffee.",  # decomposed é -> NFC
            "Bell\x07 and\r\nCRLF line endings here.",  # control characters removed
            story,
            "tiny",  # shorter than min_chars
            "   \t ",  # whitespace-only blocks are separators, not documents
            story,  # exact duplicate
            "Another story about a cat that sat on a mat all day.",
        ]
    )
    (tmp_path / "in.txt").write_bytes(text.encode())
    out = prepare([str(tmp_path / "in.txt")], small_tokenizer, 16, tmp_path / "out", val_fraction=0.0)
    m = json.loads((out / "manifest.json").read_text())
    c = m["cleaning"]
    assert (c["documents_read"], c["documents_kept"], c["dropped_short"], c["dropped_duplicate"]) == (6, 4, 1, 1)
    assert c["nfc_changed"] == 1 and c["control_chars_removed"] == 2
    docs = documents(open_prepared(out), "train", load_tokenizer(small_tokenizer))
    assert docs[0] == "Café au lait is a drink made with coffee." and "\u0301" not in docs[0]
    assert docs[1] == "Bell and\nCRLF line endings here."
    assert docs[2:] == [story, "Another story about a cat that sat on a mat all day."]


def test_invalid_utf8_is_replaced_and_counted(small_tokenizer, corpus_slice, tmp_path, capfd):
    good = (corpus_slice / "austen_6novels.txt").read_bytes()
    bad = good[:5000] + b"\xff\xfe broken \xc3 bytes" + good[5000:]
    (tmp_path / "in.txt").write_bytes(bad)
    out = prepare([str(tmp_path / "in.txt")], small_tokenizer, 64, tmp_path / "out")
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["invalid_utf8_documents"], c["invalid_utf8_replacements"]) == (1, 3)
    assert c["invalid_utf8_policy"].startswith("replace")
    assert "3 byte sequences replaced with U+FFFD" in capfd.readouterr().err
    tok = load_tokenizer(small_tokenizer)
    data = open_prepared(out)
    assert any("\ufffd broken \ufffd bytes" in d for s in ("train", "val") if data.has_split(s) for d in documents(data, s, tok))


def test_released_checkpoint_tokenizer(corpus_slice, tmp_path):
    out = prepare([str(corpus_slice / "tinystories_val_subset.txt")], STORIES260K, 128, tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    tok = load_tokenizer(STORIES260K)
    assert m["tokenizer"]["backend"] == "tokenizers" and m["tokenizer"]["fingerprint"] == tok.fingerprint
    assert m["tokenizer"]["vocab_size"] == 512 and m["tokenizer"]["pad_id"] is None
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "tokenizer" / "tokenizer.model").is_file()
    data = open_prepared(out)
    last = data.splits["train"].shards[-1]
    assert np.all(last.tokens.reshape(-1)[last.real_tokens :] == tok.eos_id)  # no pad token: EOS pads
    decoded = documents(data, "train", tok) + (documents(data, "val", tok) if data.has_split("val") else [])
    expected = {b.rstrip() for b in blocks((corpus_slice / "tinystories_val_subset.txt").read_text()) if len(b.rstrip()) >= 16}
    assert sorted(decoded) == sorted(expected)


def test_large_vocab_uses_uint32(corpus_slice, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(re.findall(r"\w+|[^\w\s]", (corpus_slice / "austen_6novels.txt").read_text())))
    vocab = {"[UNK]": 0, "</s>": 1} | {f"<extra_{i}>": i + 2 for i in range(70_000 - len(words) - 2)}
    vocab |= {w: len(vocab) + i for i, w in enumerate(words)}  # real words get the ids above 65535
    rust = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    (tmp_path / "tok").mkdir()
    rust.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "[UNK]"}))
    out = prepare([str(corpus_slice / "austen_6novels.txt")], tmp_path / "tok", 32, tmp_path / "out")
    data = open_prepared(out)
    assert data.dtype == "uint32" and data.vocab_size == 70_000
    shard = data.splits["train"].shards[0]
    assert shard.tokens.dtype == np.uint32 and int(shard.tokens.max()) >= 65_536


def test_full_corpus(small_tokenizer, shared_dir, tmp_path):
    out = prepare([str(CORPUS)], small_tokenizer, 256, tmp_path / "full")
    m = verify(out).manifest
    expected_blocks = sum(len(blocks(p.read_text(encoding="utf-8"))) for p in CORPUS.glob("*.txt"))
    assert m["cleaning"]["documents_read"] == expected_blocks
    assert m["totals"]["tokens"] > 5_000_000 and m["splits"]["val"]["documents"] > 0
    assert m["cleaning"]["dropped_duplicate"] > 0  # the corpus repeats some paragraphs


def test_sample_corpus_is_deterministic_and_prepares(small_tokenizer, tmp_path):
    from llmtrain.data.sample_corpus import write_sample_corpus

    files = write_sample_corpus(tmp_path / "a")
    mtimes = [f.stat().st_mtime_ns for f in files]
    # a second run produces the same bytes, so it leaves the files (and their mtimes) alone
    assert write_sample_corpus(tmp_path / "a") == files and [f.stat().st_mtime_ns for f in files] == mtimes
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert sum(f.stat().st_size for f in files) > 1_500_000
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert any(r["source"] == "pydoc_data.topics:if" and "if_stmt" in r["text"] for r in records)
    out = prepare([str(tmp_path / "a")], small_tokenizer, 64, tmp_path / "prepared")
    assert open_prepared(out).splits["train"].tokens > 300_000


def test_verify_cli(small_prepared, capfd):
    assert main(["verify", str(small_prepared)]) == 0
    assert "sha256 verified" in capfd.readouterr().out


def test_loader_rejects_empty_split(small_tokenizer, corpus_slice, tmp_path, capfd):
    out = prepare([str(corpus_slice / "inaugural.txt")], small_tokenizer, 64, tmp_path / "o", val_fraction=0.0)
    assert "note: the val split is empty (--val-fraction 0)" in capfd.readouterr().err
    prepare([str(corpus_slice / "inaugural.txt")], small_tokenizer, 64, tmp_path / "p", val_fraction=1e-12)
    assert "note: the val split is empty (--val-fraction 1e-12 selected none of the" in capfd.readouterr().err
    data = open_prepared(out)
    assert not data.has_split("val")
    with pytest.raises(UserError, match="no 'val' rows"):
        data.split("val")
    assert Path(out, "manifest.json").is_file()


def test_output_inside_an_input_directory(small_tokenizer, corpus_slice, tmp_path, capfd):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes((corpus_slice / "inaugural.txt").read_bytes())
    out = prepare([str(corpus)], small_tokenizer, 64, corpus / "prepared")
    capfd.readouterr()
    prepare([str(corpus)], small_tokenizer, 64, corpus / "prepared")  # its own manifest is no input
    assert "up to date" in capfd.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["cleaning"]["documents_read"] == len(
        blocks((corpus / "a.txt").read_text())
    )
