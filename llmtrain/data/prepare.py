"""`llmtrain prepare`: raw text -> cleaned, deduplicated, tokenized, packed Arrow token shards.

    llmtrain prepare --input ../shared/data/corpus --tokenizer tok/ --seq-len 256 --output data/tiny
    prepare(["corpus/"], tokenizer="tok/", seq_len=256, output="data/tiny")   # the same from Python

The pipeline, in input order (so the output does not depend on the number of workers):
1. read documents (llmtrain.data.readers: how each format is split into documents),
2. clean them (llmtrain.data.clean: NFC, control characters, empty/short, exact duplicates),
3. assign each document to train or val by a hash of its cleaned text (`val_fraction`),
4. tokenize batches of documents on all cores: sentencepiece's C++ thread pool (or the Rust
   `tokenizers` pool for a Hugging Face tokenizer), in a background thread so reading and
   cleaning the next batch overlaps with it; each document becomes [BOS] tokens [EOS],
5. pack each split's stream into rows of exactly `seq_len` and write shards
   (llmtrain.data.shard_writer, format in llmtrain.data.shards) plus `manifest.json` and a copy of
   the tokenizer into a temp directory that is renamed to `output` when complete.
Invalid UTF-8 in text files is replaced with U+FFFD and counted (reported, and in the manifest).
A rerun with the same inputs (paths, sizes, mtimes) and settings is a no-op unless `force`, once
the existing output passes `verify` (every shard's sha256, at about 1.7 GB/s); a damaged one is
rebuilt. Checks before anything is written: each argument's bounds, the output (not a file,
writable), and after tokenizing a `seq_len` no longer than the train split's tokens.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

from tqdm import tqdm

import llmtrain
from llmtrain.data.atomic import atomic_dir, is_empty_dir
from llmtrain.data.clean import CleanStats, clean_text, content_hash, is_val
from llmtrain.data.readers import expand_inputs, iter_documents
from llmtrain.data.shard_writer import SplitWriter
from llmtrain.data.shards import (
    MANIFEST,
    SCHEMA_VERSION,
    SPLITS,
    TOKENIZER_DIR,
    dtype_for_vocab,
    dtype_holds,
    open_prepared,
    seal_manifest,
    tokenizer_hashes,
    verify,
)
from llmtrain.data.tokenizer import Tokenizer, load_tokenizer
from llmtrain.data.tokenizer_train import input_signature
from llmtrain.errors import UserError

BATCH_CHARS = 4 << 20  # characters per tokenization batch
_IN_FLIGHT = 2  # batches tokenizing while the next one is read


def prepare(
    inputs: Sequence[str],
    tokenizer: str | os.PathLike,
    seq_len: int,
    output: str | os.PathLike,
    val_fraction: float = 0.01,
    shard_tokens: int = 50_000_000,
    workers: Optional[int] = None,
    min_chars: int = 16,
    text_column: str = "text",
    force: bool = False,
    dtype: str = "auto",
) -> Path:
    """Build the prepared directory `output`; return its path. See the module docstring."""
    _check_args(seq_len, val_fraction, shard_tokens, workers, min_chars, dtype)
    files = expand_inputs(inputs, exclude=[output])
    tok = load_tokenizer(tokenizer)
    if tok.max_length is not None and seq_len > tok.max_length:
        raise UserError(
            f"--seq-len {seq_len} is longer than the {tok.max_length} positions {tok.path} allows; use --seq-len <= {tok.max_length}"
        )
    if tok.eos_id is None:
        raise UserError(f"{tok.path}: the tokenizer has no EOS token to end documents with; use one that has")
    dtype = _resolve_dtype(dtype, tok)
    out = Path(output)
    build = {
        "inputs": input_signature(files),
        "settings": {
            "schema_version": SCHEMA_VERSION,
            "tokenizer": tok.fingerprint,
            "seq_len": seq_len,
            "dtype": dtype,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
            "min_chars": min_chars,
            "text_column": text_column,
        },
    }
    state = _existing_output(out, build, force)
    if state == "current":
        print(
            f"llmtrain: {out} is up to date (same inputs and settings, sha256 verified); nothing to do (--force rebuilds)",
            file=sys.stderr,
        )
        return out

    started = time.time()
    threads = max(1, workers or os.cpu_count() or 1)
    with atomic_dir(out, replace=state == "replace") as tmp:  # the temp dir exists before any input is read
        stats, splits = _run(files, tok, seq_len, dtype, val_fraction, shard_tokens, threads, min_chars, text_column, tmp)
        files_sha256 = _save_tokenizer(tok, tmp / TOKENIZER_DIR)
        manifest = _manifest(tok, files_sha256, seq_len, dtype, val_fraction, stats, splits, build, time.time() - started)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        open_prepared(tmp)  # our own output must pass the checks every reader runs
    _report(out, manifest, stats, time.time() - started)
    return out


def _check_args(seq_len: int, val_fraction: float, shard_tokens: int, workers: Optional[int], min_chars: int, dtype: str) -> None:
    """Each argument's own bounds (`seq_len` against the corpus is checked after tokenizing)."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len} is too small: a row needs at least 2 tokens (an input and its next-token target)")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1), e.g. 0.01")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens {shard_tokens} must be at least 1 (a shard holds at least one row), e.g. 50000000")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers} must be at least 1 (or omit it to use all cores)")
    if min_chars < 0:
        raise UserError(f"--min-chars {min_chars} must be >= 0")
    if dtype not in ("auto", "uint16", "uint32"):
        raise UserError(f"--dtype {dtype}: choose auto, uint16 or uint32")


def _resolve_dtype(dtype: str, tok: Tokenizer) -> str:
    if dtype == "auto":
        return dtype_for_vocab(tok.vocab_size)
    if not dtype_holds(dtype, tok.vocab_size):
        raise UserError(
            f"the tokenizer has {tok.vocab_size:,} token ids, more than {dtype} shards can hold; use --dtype uint32 (or auto)"
        )
    return dtype


def _existing_output(out: Path, build: dict, force: bool) -> str:
    """What `--output` holds: "none" (absent or empty), "current" (these inputs and settings, and
    it passes `verify`), or "replace" (`force`, or these inputs and settings but damaged or of
    another schema version: it is rebuilt). Anything else is refused before any input is read."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a directory; choose another --output")
    if not out.exists() or is_empty_dir(out):
        return "none"
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{out} exists and is not a prepared directory; choose another --output")
    if force:
        return "replace"
    try:
        previous = json.loads(manifest_path.read_text()).get("build", {})
        inputs, settings = previous.get("inputs"), previous.get("settings", {})
        version = settings.get("schema_version")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"{manifest_path}: unreadable ({err}); pass --force to rebuild it or choose another --output") from None
    unversioned = lambda d: {k: v for k, v in d.items() if k != "schema_version"}  # noqa: E731
    if inputs != build["inputs"] or unversioned(settings) != unversioned(build["settings"]):
        raise UserError(
            f"{out} holds data prepared from other inputs or settings; pass --force to replace it or choose another --output"
        )
    if version != SCHEMA_VERSION:
        print(
            f"llmtrain: {out} was written by another llmtrain (manifest schema version {version}); rebuilding it", file=sys.stderr
        )
        return "replace"
    try:
        verify(out, quiet=True)  # up to date only if it is also intact
    except UserError as err:
        print(f"llmtrain: {out} is damaged ({err}); rebuilding it", file=sys.stderr)
        return "replace"
    return "current"


def _save_tokenizer(tok: Tokenizer, directory: Path) -> dict[str, str]:
    """Copy the tokenizer's files into `directory`; {file: sha256} for the manifest. The copy must
    be the same tokenizer (readers trust it)."""
    tok.save(directory)
    copy = load_tokenizer(directory)
    if copy.fingerprint != tok.fingerprint:
        raise UserError(
            f"{tok.path}: a copy of its tokenizer files is not the same tokenizer (its special ids come from a file "
            "outside them, e.g. config.json); set bos_token/eos_token in its tokenizer_config.json"
        )
    return tokenizer_hashes(directory)


def _batches(
    files: list[Path], stats: CleanStats, text_column: str, val_fraction: float, bar: tqdm
) -> Iterator[tuple[list[str], list[str]]]:
    """(train documents, val documents) in input order, about BATCH_CHARS characters per batch."""
    train: list[str] = []
    val: list[str] = []
    chars = 0
    for path in files:
        for raw in iter_documents(path, text_column, stats, on_bytes=bar.update):
            text = clean_text(raw, stats)
            if text is None:
                continue
            key = content_hash(text)
            if stats.is_duplicate(key):
                continue
            stats.documents_kept += 1
            stats.chars_kept += len(text)
            (val if is_val(key, val_fraction) else train).append(text)
            chars += len(text)
            if chars >= BATCH_CHARS:
                yield train, val
                train, val, chars = [], [], 0
    if train or val:
        yield train, val


def _run(files, tok: Tokenizer, seq_len, dtype, val_fraction, shard_tokens, threads, min_chars, text_column, tmp: Path):
    stats = CleanStats(min_chars=min_chars)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    rows_per_shard = max(1, shard_tokens // seq_len)
    writers = {name: SplitWriter(tmp, name, seq_len, dtype, rows_per_shard, pad_id) for name in SPLITS}
    total_bytes = sum(f.stat().st_size for f in files)

    def encode(train: list[str], val: list[str]):
        return tok.encode_documents(train, threads), tok.encode_documents(val, threads)

    started = time.time()
    tokens = 0
    with (
        tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr, mininterval=0.5) as bar,
        ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool,
    ):
        pending: deque = deque()

        def consume() -> None:
            nonlocal tokens
            for name, (ids, lengths) in zip(SPLITS, pending.popleft().result()):
                writers[name].add(ids, lengths)
                tokens += len(ids)
            rate = tokens / max(time.time() - started, 1e-9)
            bar.set_postfix_str(f"{tokens / 1e6:.1f}M tok, {rate / 1e6:.2f}M tok/s", refresh=False)

        for train, val in _batches(files, stats, text_column, val_fraction, bar):
            pending.append(pool.submit(encode, train, val))
            while len(pending) > _IN_FLIGHT:
                consume()
        while pending:
            consume()
    if stats.documents_kept == 0:
        raise UserError(f"no documents left after cleaning ({stats.summary()}); check --input, or lower --min-chars")
    if writers["train"].documents == 0:
        raise UserError(
            f"all {stats.documents_kept} documents went to the validation split; lower --val-fraction or add more documents"
        )
    train_tokens = writers["train"].tokens
    if seq_len > train_tokens:  # nothing is written yet: no row is complete
        padding = math.floor(10_000 * (seq_len - train_tokens) / seq_len) / 100  # never rounded up to 100%
        raise UserError(
            f"--seq-len {seq_len:,} is longer than the corpus: the train split has {train_tokens:,} tokens, so its one row "
            f"would be {padding:.2f}% padding ({seq_len - train_tokens:,} of {seq_len:,}); use --seq-len <= {train_tokens:,} "
            "or more text"
        )
    splits = {}
    for name, writer in writers.items():
        entries = writer.finish()
        rows = sum(e["rows"] for e in entries)
        splits[name] = {
            "shards": entries,
            "rows": rows,
            "tokens": writer.tokens,
            "documents": writer.documents,
            "padding": rows * seq_len - writer.tokens,
        }
    return stats, splits


def _manifest(
    tok: Tokenizer, files: dict, seq_len, dtype, val_fraction, stats: CleanStats, splits: dict, build: dict, seconds: float
) -> dict:
    totals = {k: sum(s[k] for s in splits.values()) for k in ("rows", "tokens", "documents", "padding")}
    return seal_manifest(
        {
            "schema_version": SCHEMA_VERSION,
            "format": "llmtrain token shards (Arrow IPC); see llmtrain/data/shards.py",
            "tokenizer": {
                "fingerprint": tok.fingerprint,
                "backend": tok.backend,
                "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
                "pad_id": tok.pad_id,
                "dir": TOKENIZER_DIR,
                "files": files,
                "source": str(tok.path.resolve()),
            },
            "seq_len": seq_len,
            "dtype": dtype,
            "splits": splits,
            "totals": totals,
            "cleaning": stats.to_dict(),
            "split": {
                "val_fraction": val_fraction,
                "unit": "document",
                "rule": "val iff blake2b-64(cleaned text) / 2^64 < val_fraction",
            },
            "build": {
                **build,
                "llmtrain_version": llmtrain.__version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(seconds, 3),
            },
        }
    )


def _report(out: Path, manifest: dict, stats: CleanStats, seconds: float) -> None:
    say = lambda msg: print(f"llmtrain: {msg}", file=sys.stderr)  # noqa: E731
    say(
        f"cleaning: {stats.summary()}; {stats.control_chars_removed:,} control characters removed, {stats.nfc_changed:,} documents NFC-normalised"
    )
    if stats.invalid_utf8_documents:
        say(
            f"warning: invalid UTF-8 in {stats.invalid_utf8_documents:,} documents: "
            f"{stats.invalid_utf8_replacements:,} byte sequences replaced with U+FFFD"
        )
    for name, s in manifest["splits"].items():
        say(
            f"{name}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['rows']:,} rows x {manifest['seq_len']} in {len(s['shards'])} shards"
        )
    val_fraction = manifest["split"]["val_fraction"]
    if manifest["splits"]["val"]["rows"] == 0:
        why = (
            "--val-fraction 0"
            if val_fraction == 0
            else f"--val-fraction {val_fraction} selected none of the {stats.documents_kept:,} documents"
        )
        say(
            f"note: the val split is empty ({why}): training runs without validation and `llmtrain eval --data` has nothing to measure"
        )
    total = manifest["totals"]["tokens"]
    say(f"wrote {out} ({manifest['dtype']}) in {seconds:.1f}s ({total / max(seconds, 1e-9) / 1e6:.2f}M tokens/s)")
