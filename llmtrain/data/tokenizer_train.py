"""Train our tokenizer: sentencepiece BPE with byte fallback, written with the Hugging Face files.

    llmtrain tokenizer --input ../shared/data/corpus --vocab-size 8000 --output tok/
    train_tokenizer(["corpus/"], 8000, "tok/")  # the same from Python

Training text: the inputs are read and cleaned as `prepare` does (llmtrain.data.readers/clean);
each non-empty line of a document is one sentencepiece sentence (lines longer than 4,000
characters are cut at spaces). At most `max_sentences` sentences are used, taken from the start
of every file in proportion to its size, so a huge corpus is sampled without reading all of it.

Model: BPE, `byte_fallback` (no unknown tokens), digits split, whitespace kept as is (no dummy
prefix, no collapsing of spaces, identity normalisation: cleaning already applied NFC), ids
`<unk>`=0 `<s>`=1 `</s>`=2 `<pad>`=3, then the chat/control tokens of `CHAT_TOKENS` as
user-defined pieces. All cores; progress bars for reading and for the merges.

The output directory is complete or absent: built in a temp dir (created before any input is
read, so an unwritable --output fails at once), checked (the transformers tokenizer must give
sentencepiece's ids on a sample of the training text) and renamed. A rerun with the same inputs
and settings is a no-op.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from llmtrain.data.atomic import atomic_dir, is_empty_dir
from llmtrain.data.clean import CleanStats, clean_text
from llmtrain.data.hf_tokenizer import write_hf_files
from llmtrain.data.readers import expand_inputs, iter_documents
from llmtrain.data.tokenizer import MARKER, load_tokenizer
from llmtrain.errors import UserError

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|reserved_0|>", "<|reserved_1|>")
MIN_VOCAB = 512  # 256 byte pieces + specials + chat tokens + the alphabet need room
_MAX_LINE_CHARS = 4000
_SEMANTIC_VERSION = 1  # bump when training settings change meaning


def input_signature(files: Sequence[Path]) -> list[dict]:
    out = []
    for f in files:
        st = f.stat()
        out.append({"path": str(f.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def train_tokenizer(
    inputs: Sequence[str],
    vocab_size: int,
    output: str | os.PathLike,
    max_sentences: int = 2_000_000,
    threads: Optional[int] = None,
    text_column: str = "text",
) -> Path:
    """Train our sentencepiece BPE tokenizer on `inputs` into `output` (reused when the inputs and
    settings are unchanged)."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 256 ids; use at least {MIN_VOCAB}")
    if max_sentences < 1:
        raise UserError(f"--max-sentences {max_sentences} must be at least 1")
    files = expand_inputs(inputs, exclude=[output])
    out = Path(output)
    record = {
        "version": _SEMANTIC_VERSION,
        "settings": {"vocab_size": vocab_size, "max_sentences": max_sentences, "text_column": text_column},
        "inputs": input_signature(files),
    }
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a directory; choose another --output")
    if out.exists() and not is_empty_dir(out):
        marker = out / MARKER
        if marker.is_file() and _same_record(marker, record):
            print(f"llmtrain: {out} is up to date (same inputs and settings); nothing to do", file=sys.stderr)
            return out
        raise UserError(f"{out} already exists; remove it or choose another --output")

    started = time.time()
    threads = max(1, threads or os.cpu_count() or 1)
    with atomic_dir(out) as tmp:
        sentences = collect_sentences(files, max_sentences, text_column)
        if not sentences:
            raise UserError("the inputs hold no text after cleaning; check --input (and --text-column for JSON/Parquet)")
        _train_sentencepiece(sentences, tmp / "tokenizer", vocab_size, threads)
        (tmp / "tokenizer.vocab").unlink(missing_ok=True)

        write_hf_files(tmp / "tokenizer.model", tmp)
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        _check_hf_ids(tmp, sentences)
    print(f"llmtrain: tokenizer with {vocab_size:,} tokens -> {out} ({time.time() - started:.1f}s)", file=sys.stderr)
    return out


def _same_record(marker: Path, record: dict) -> bool:
    try:
        return json.loads(marker.read_text()) == record
    except (OSError, json.JSONDecodeError):
        return False


def collect_sentences(files: Sequence[Path], max_sentences: int, text_column: str) -> list[str]:
    """Cleaned lines, at most `max_sentences`, each file contributing in proportion to its size."""
    sizes = [max(f.stat().st_size, 1) for f in files]
    total = sum(sizes)
    sentences: list[str] = []
    stats = CleanStats(min_chars=1)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", file=sys.stderr, mininterval=0.5) as bar:
        for f, size in zip(files, sizes):
            budget = max(1, round(max_sentences * size / total))
            taken = 0
            for raw in iter_documents(f, text_column, stats, on_bytes=bar.update):
                text = clean_text(raw, stats)
                if text is None:
                    continue
                for line in text.split("\n"):
                    if line.strip():
                        for piece in _cut_line(line):
                            sentences.append(piece)
                            taken += 1
                if taken >= budget:
                    break
    return sentences[: max(max_sentences, 0)]


def _cut_line(line: str) -> list[str]:
    if len(line) <= _MAX_LINE_CHARS:
        return [line]
    out, start = [], 0
    while len(line) - start > _MAX_LINE_CHARS:
        cut = line.rfind(" ", start + 1, start + _MAX_LINE_CHARS)
        cut = cut if cut > start else start + _MAX_LINE_CHARS
        out.append(line[start:cut])
        start = cut
    out.append(line[start:])
    return out


def _train_sentencepiece(sentences: list[str], prefix: Path, vocab_size: int, threads: int) -> None:
    import sentencepiece as spm

    kwargs = dict(
        sentence_iterator=iter(sentences),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        max_sentence_length=4 * _MAX_LINE_CHARS + 16,
        input_sentence_size=0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=SPECIAL_TOKENS["unk"],
        bos_piece=SPECIAL_TOKENS["bos"],
        eos_piece=SPECIAL_TOKENS["eos"],
        pad_piece=SPECIAL_TOKENS["pad"],
        user_defined_symbols=list(CHAT_TOKENS),
        num_threads=threads,
        minloglevel=0,
    )
    error: list[BaseException] = []

    def run() -> None:
        try:
            spm.SentencePieceTrainer.Train(**kwargs)
        except BaseException as err:  # re-raised in the calling thread
            error.append(err)

    _with_merge_progress(run, vocab_size)
    if error:
        err = error[0]
        if isinstance(err, RuntimeError):
            reason = str(err).strip().splitlines()[-1]
            raise UserError(
                f"sentencepiece could not train a {vocab_size:,}-token vocabulary ({reason}); use a smaller --vocab-size or more text"
            ) from None
        raise err


_MERGES = re.compile(r"merges=(\d+)")
_ALPHABET = re.compile(r"Alphabet size=(\d+)")


def _with_merge_progress(run, vocab_size: int) -> None:
    """Run sentencepiece's trainer in a thread, turning its log (stderr) into a progress bar of
    BPE merges; warnings and errors from its log are passed through."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    console = os.fdopen(os.dup(saved), "w", buffering=1)

    def target() -> None:
        try:
            run()
        finally:
            os.dup2(saved, 2)  # closes the pipe's last writer: the reader below sees EOF

    bar = tqdm(total=None, unit=" merges", desc="training BPE", file=console, mininterval=0.5)
    worker = threading.Thread(target=target, name="sentencepiece-train")
    try:
        worker.start()
        with os.fdopen(read_fd, "r", errors="replace") as log:
            for line in log:
                if m := _ALPHABET.search(line):
                    bar.total = max(vocab_size - 4 - len(CHAT_TOKENS) - 256 - int(m.group(1)), 1)
                    bar.refresh()
                elif m := _MERGES.search(line):
                    bar.update(int(m.group(1)) - bar.n)
                elif line[:1] in ("W", "E", "F") and "absl::InitializeLog" not in line:
                    bar.write(line.rstrip(), file=console)
        worker.join()
    finally:
        if not worker.is_alive() and bar.total:
            bar.update(bar.total - bar.n)
        bar.close()
        console.close()
        os.dup2(saved, 2)  # in case the reader stopped early (e.g. Ctrl-C)
        os.close(saved)


def _check_hf_ids(directory: Path, sentences: list[str], samples: int = 2000) -> None:
    """The transformers tokenizer written beside the model must give sentencepiece's ids."""
    tok = load_tokenizer(directory)
    step = max(1, len(sentences) // samples)
    sample = sentences[::step][:samples]
    hf = tok.hf()
    expected = tok.encode_batch(sample)
    got = hf(sample, add_special_tokens=False)["input_ids"]
    for text, a, b in zip(sample, expected, got):
        if a != b:
            raise RuntimeError(f"transformers tokenizer disagrees with sentencepiece on {text[:80]!r}: {b[:20]} vs {a[:20]}")
