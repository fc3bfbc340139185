"""`llmtrain prepare`: raw text -> cleaned, filtered, deduplicated, tokenized, packed Arrow token shards.

    llmtrain prepare --input ../shared/data/corpus --tokenizer tok/ --seq-len 256 --output data/tiny
    prepare(["corpus/"], tokenizer="tok/", seq_len=256, output="data/tiny")   # the same from Python

The pipeline (llmtrain.data.pipeline holds the stages; an executor runs them: in this process,
or on Ray Data with llmtrain/prepare_ray.py, with the same bytes out):
1. read documents (llmtrain.data.readers: formats, compression, local paths or object storage),
2. clean them (llmtrain.data.clean: NFC, control characters, empty/short),
3. optional heuristic quality filters (llmtrain.data.quality) and PII redaction (llmtrain.data.pii),
4. exact dedup by content hash and optional near-dedup (MinHash LSH, llmtrain.data.minhash),
   both hash-partitioned over the whole corpus; the first document in input order is kept,
5. assign each document to train or val by a hash of its cleaned text (`val_fraction`),
6. tokenize (each document becomes [BOS] tokens [EOS]), and on the driver pack each split's
   stream into rows of exactly `seq_len` and write shards (llmtrain.data.shard_writer, format
   in llmtrain.data.shards) plus `manifest.json` and a copy of the tokenizer into a temp
   directory renamed to `output` when complete; for an object-store `output`
   (`s3://bucket/prefix`) the finished directory is uploaded with the manifest last, so a
   prefix without a manifest is never a dataset.
Counts of every stage (cleaning, each quality filter, each PII kind, exact and near duplicates)
go into the manifest and the report. The manifest holds nothing that depends on the executor,
the number of workers or the clock, so the output is byte-identical across them and reruns.
A rerun with the same inputs (paths, sizes, mtimes) and settings is a no-op unless `force`, once
the existing output passes `verify`; a damaged one is rebuilt. Checks before anything is
written: each argument's bounds, the output (not a file, writable; a bucket that exists and
takes our credentials), and after tokenizing a `seq_len` no longer than the train split's tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

import llmtrain
from llmtrain.data import objstore
from llmtrain.data.atomic import atomic_dir, is_empty_dir
from llmtrain.data.clean import CleanStats
from llmtrain.data.minhash import MinHashConfig
from llmtrain.data.pii import PiiConfig
from llmtrain.data.pipeline import (
    STAT_KEYS,
    Executor,
    LocalExecutor,
    StageSettings,
    find_duplicates,
    merge_stats,
    plan_units,
    split_tokens,
)
from llmtrain.data.quality import QualityConfig
from llmtrain.data.readers import list_inputs
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
from llmtrain.errors import UserError


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
    quality: QualityConfig | dict | None = None,
    pii: PiiConfig | dict | None = None,
    minhash: MinHashConfig | dict | None = None,
    executor: Optional[Executor] = None,
) -> Path | str:
    """Build the prepared directory (or object-store prefix) `output`; return it. See the module
    docstring. `executor` defaults to this process with `workers` tokenizer threads."""
    _check_args(seq_len, val_fraction, shard_tokens, workers, min_chars, dtype)
    settings = stage_settings(text_column, min_chars, val_fraction, quality, pii, minhash)
    out = str(output)
    remote = objstore.is_uri(out)
    if remote:
        objstore.check_access(out, write=True)
    files = list_inputs(inputs, exclude=[] if remote else [output])
    tok = load_tokenizer(tokenizer)
    if tok.max_length is not None and seq_len > tok.max_length:
        raise UserError(
            f"--seq-len {seq_len} is longer than the {tok.max_length} positions {tok.path} allows; use --seq-len <= {tok.max_length}"
        )
    if tok.eos_id is None:
        raise UserError(f"{tok.path}: the tokenizer has no EOS token to end documents with; use one that has")
    dtype = _resolve_dtype(dtype, tok)
    build = {
        "inputs": [f.signature() for f in files],
        "settings": {
            "schema_version": SCHEMA_VERSION,
            "tokenizer": tok.fingerprint,
            "seq_len": seq_len,
            "dtype": dtype,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
            "min_chars": min_chars,
            "text_column": text_column,
            "stages": {k: v for k, v in settings.to_dict().items() if k in ("quality", "pii", "minhash")},
        },
    }
    state = _existing_remote(out, build, force) if remote else _existing_output(Path(out), build, force)
    if state == "current":
        print(
            f"llmtrain: {out} is up to date (same inputs and settings, sha256 verified); nothing to do (--force rebuilds)",
            file=sys.stderr,
        )
        return out if remote else Path(out)

    started = time.time()
    executor = executor or LocalExecutor(max(1, workers or os.cpu_count() or 1))
    target = Path(tempfile.mkdtemp(prefix="llmtrain-prepare-")) / "out" if remote else Path(out)
    try:
        with atomic_dir(target, replace=state == "replace") as tmp:  # the temp dir exists before any input is read
            stats, splits = _run(files, tok, seq_len, dtype, shard_tokens, settings, executor, tmp)
            files_sha256 = _save_tokenizer(tok, tmp / TOKENIZER_DIR)
            manifest = _manifest(tok, files_sha256, seq_len, dtype, val_fraction, stats, splits, build)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            open_prepared(tmp)  # our own output must pass the checks every reader runs
        if remote:
            if state != "none":
                objstore.delete_prefix(out)  # a partial upload, or the dataset --force replaces
            objstore.upload_dir(target, out, last=MANIFEST)
    finally:
        if remote:
            shutil.rmtree(target.parent, ignore_errors=True)
    _report(out, manifest, stats, time.time() - started, executor)
    return out if remote else Path(out)


def stage_settings(text_column, min_chars, val_fraction, quality, pii, minhash) -> StageSettings:
    """The stage settings from configs or plain dicts (the YAML/CLI form), each checked."""
    quality = quality if isinstance(quality, QualityConfig) else QualityConfig.from_dict(quality or {})
    pii = pii if isinstance(pii, PiiConfig) else PiiConfig.from_dict(pii or {})
    near = minhash if isinstance(minhash, MinHashConfig) else MinHashConfig.from_dict(minhash or {})
    for cfg in (quality, pii, near):
        cfg.check()
    return StageSettings(text_column, min_chars, val_fraction, quality, pii, near)


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
    return _against_previous(str(out), manifest_path, manifest_path.read_bytes(), build, lambda: verify(out, quiet=True))


def _against_previous(out: str, where, manifest_text: bytes, build: dict, check) -> str:
    """ "current" or "replace" for an output whose manifest is `manifest_text`: refused when it
    was built from other inputs or settings; rebuilt when of another schema version or when
    `check()` (verify) finds it damaged."""
    try:
        previous = json.loads(manifest_text).get("build", {})
        inputs, settings = previous.get("inputs"), previous.get("settings", {})
        version = settings.get("schema_version")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"{where}: unreadable ({err}); pass --force to rebuild it or choose another --output") from None
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
        check()  # up to date only if it is also intact
    except UserError as err:
        print(f"llmtrain: {out} is damaged ({err}); rebuilding it", file=sys.stderr)
        return "replace"
    return "current"


def _existing_remote(out: str, build: dict, force: bool) -> str:
    """`_existing_output` for an object-store prefix: "partial" (objects but no manifest: an
    upload that died) is replaced like a damaged directory."""
    state = objstore.remote_state(out)
    if state == "none":
        return "none"
    if state == "other":  # objects we did not write: never deleted, even with --force
        raise UserError(f"{out} holds objects that are not an llmtrain dataset; choose another --output prefix")
    if state == "partial" or force:
        return "replace"
    where = f"{out.rstrip('/')}/{MANIFEST}"
    return _against_previous(out, where, objstore.read_bytes(where), build, lambda: objstore.verify_remote(out, quiet=True))


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


def _run(files, tok: Tokenizer, seq_len, dtype, shard_tokens, settings: StageSettings, executor: Executor, tmp: Path):
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    rows_per_shard = max(1, shard_tokens // seq_len)
    writers = {name: SplitWriter(tmp, name, seq_len, dtype, rows_per_shard, pad_id) for name in SPLITS}
    units = plan_units(files)
    total_bytes = sum(f.size for f in files)
    started = time.time()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr, mininterval=0.5) as bar:
        kept = [0]

        def progress(nbytes: int, records: list[dict]) -> None:
            kept[0] += sum(
                r["documents_read"] - r["dropped_empty"] - r["dropped_short"] - sum(r["quality"].values()) for r in records
            )
            bar.set_postfix_str(f"{kept[0]:,} docs kept", refresh=False)
            bar.update(nbytes)

        docs = executor.documents(units, settings, progress)
        totals = merge_stats(executor.stats(docs))
        phases = {"read+clean+filter": time.time() - started}
        bar.set_postfix_str("dedup", refresh=True)
        dedup = find_duplicates(executor, docs, settings)
        phases["dedup"] = time.time() - started - sum(phases.values())
        tokens = 0
        bar.reset(total=None)
        bar.unit, bar.unit_scale, bar.desc = "tok", True, "tokenize+pack"
        for batch in executor.tokenized(docs, dedup.removed, str(tok.path), max(1, executor.workers)):
            for is_val, ids, lengths in split_tokens(batch):
                writers["val" if is_val else "train"].add(ids, lengths)
                tokens += len(ids)
                bar.update(len(ids))
            rate = tokens / max(time.time() - started, 1e-9)
            bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)
        phases["tokenize+pack"] = time.time() - started - sum(phases.values())
    print("llmtrain: time: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()), file=sys.stderr)
    print(f"llmtrain: peak memory of a stage-A process: {totals.get('peak_rss_mb', 0):.0f} MB RSS", file=sys.stderr)
    stats = CleanStats(min_chars=settings.min_chars)
    for key in STAT_KEYS:
        setattr(stats, key, totals.get(key, 0))
    stats.dropped_duplicate = dedup.exact
    stats.documents_kept = writers["train"].documents + writers["val"].documents
    stages = {
        "bytes_read": totals.get("bytes", 0),
        "peak_rss_mb": totals.get("peak_rss_mb", 0.0),
        "quality": {"enabled": settings.quality.enabled, "dropped": totals.get("quality", {})},
        "pii": {"enabled": settings.pii.enabled, "redacted": totals.get("pii", {})},
        "dedup": {"exact_removed": dedup.exact, "near_enabled": settings.minhash.enabled, "near_removed": dedup.near},
    }
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
    return (stats, stages), splits


def _manifest(tok: Tokenizer, files: dict, seq_len, dtype, val_fraction, stats, splits: dict, build: dict) -> dict:
    stats, stages = stats
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
            },
            "seq_len": seq_len,
            "dtype": dtype,
            "splits": splits,
            "totals": totals,
            "cleaning": stats.to_dict(),
            "stages": {k: v for k, v in stages.items() if k != "peak_rss_mb"},
            "split": {
                "val_fraction": val_fraction,
                "unit": "document",
                "rule": "val iff blake2b-64(cleaned text) / 2^64 < val_fraction",
            },
            "build": {
                **build,
                "llmtrain_version": llmtrain.__version__,
            },
        }
    )


def _report(out: str, manifest: dict, stats, seconds: float, executor: Executor) -> None:
    say = lambda msg: print(f"llmtrain: {msg}", file=sys.stderr)  # noqa: E731
    stats, stages = stats
    say(
        f"cleaning: {stats.summary()}; {stats.control_chars_removed:,} control characters removed, {stats.nfc_changed:,} documents NFC-normalised"
    )
    if stages["quality"]["enabled"]:
        dropped = {k: v for k, v in stages["quality"]["dropped"].items() if v}
        say(f"quality filters dropped {sum(dropped.values()):,} documents" + (f" ({_counts(dropped)})" if dropped else ""))
    if stages["pii"]["enabled"]:
        found = {k: v for k, v in stages["pii"]["redacted"].items() if v}
        say(f"PII redacted: {_counts(found) if found else 'nothing found'}")
    if stages["dedup"]["near_enabled"]:
        say(f"near-duplicates (MinHash LSH) removed: {stages['dedup']['near_removed']:,} documents")
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
    mb = stages["bytes_read"] / 1e6
    say(
        f"wrote {out} ({manifest['dtype']}) in {seconds:.1f}s on {executor.name} with {executor.workers} worker(s) "
        f"on {executor.nodes} node{'s' if executor.nodes > 1 else ''}: "
        f"{mb / max(seconds, 1e-9):.1f} MB/s, {total / max(seconds, 1e-9) / 1e6:.2f}M tokens/s"
    )


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in d.items())
