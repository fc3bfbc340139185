"""Arrow token shards and their manifest: the on-disk contract between `prepare` and the loader.

    data = open_prepared("data/tiny")          # manifest + cheap checks, shards memory-mapped
    train = data.split("train")
    tokens = train.shards[0].tokens            # np.ndarray [rows, seq_len], zero-copy view
    verify("data/tiny")                         # `llmtrain verify DIR`: every sha256

A prepared directory:
    manifest.json            schema version, tokenizer identity, seq_len, dtype, shards, stats
    tokenizer/               a copy of the tokenizer files (the directory is self-contained)
    train-00000.arrow ...    Arrow IPC files, one record batch each:
    val-00000.arrow ...

Row format (each shard, one record batch):
- `tokens`: fixed_size_list<uint16|uint32>[seq_len]. All rows of a shard are one contiguous,
  memory-mappable buffer [rows, seq_len]. A split is one continuous token stream cut into rows:
  every document is `[BOS] tokens [EOS]` (BOS only if the tokenizer has one) and continues into
  the next row (and the next shard). The last row of a split is padded with `pad_id` (EOS if
  the tokenizer has no pad); the manifest's per-shard `tokens` counts the real tokens, so the
  padding is exactly the tail of the final row.
- `doc_starts`: list<int32>, per row the in-row offsets where a document begins (its BOS, or
  its first token), plus where the padding begins. Positions restart at 0 there and at the row
  start; the model derives document ids from them and keeps attention inside documents.
- manifest `next_token` per shard: the first token of the following shard in the same split
  (null for the last), so the final position of a shard still has a next-token target.

The manifest describes and seals the directory: `manifest_sha256` is the sha256 of the canonical
JSON of every other field (an edited vocab size or fingerprint is caught), `tokenizer.files` the
sha256 of each file in `tokenizer/` (a swapped copy is caught), and each shard's `max_token_id`
(computed while writing) bounds its ids by the vocabulary without reading a token.

Cheap checks run on open (schema version, manifest hash, tokenizer copy hashes, each shard's
max token id < vocab size, file sizes, Arrow schema, row counts); `verify` additionally hashes
every shard byte, recomputes every shard's max token id and reloads the tokenizer copy (its
fingerprint and vocab size must be the manifest's). A mismatch is a `UserError` naming the
file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from llmtrain.errors import UserError

SCHEMA_VERSION = 2  # 2: manifest_sha256, tokenizer.files, per-shard max_token_id
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SPLITS = ("train", "val")
_REPREPARE = "re-run `llmtrain prepare ... --force` to rebuild it"


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def dtype_holds(dtype: str, vocab_size: int) -> bool:
    return vocab_size <= int(np.iinfo(DTYPES[dtype]).max) + 1


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.arrow"


def _arrow_schema(seq_len: int, dtype: str):
    import pyarrow as pa

    value_type = pa.uint16() if dtype == "uint16" else pa.uint32()
    return pa.schema(
        [
            pa.field("tokens", pa.list_(value_type, seq_len), nullable=False),
            pa.field("doc_starts", pa.list_(pa.int32()), nullable=False),
        ],
        metadata={b"llmtrain.schema_version": str(SCHEMA_VERSION).encode()},
    )


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_shard(path: Path, tokens: np.ndarray, starts_offsets: np.ndarray, starts_values: np.ndarray, dtype: str) -> dict:
    """Write one shard (rows = tokens.shape[0]); returns its manifest entry without `tokens`."""
    import pyarrow as pa

    def arrow(values: np.ndarray, arrow_type):  # zero-copy (and unlike pa.array, no pandas import)
        values = np.ascontiguousarray(values)
        return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])

    rows, seq_len = tokens.shape
    value_type = pa.uint16() if dtype == "uint16" else pa.uint32()
    token_arr = pa.FixedSizeListArray.from_arrays(
        arrow(tokens.reshape(-1).astype(DTYPES[dtype], copy=False), value_type), seq_len
    )
    starts_arr = pa.ListArray.from_arrays(
        arrow(starts_offsets.astype(np.int32), pa.int32()), arrow(starts_values.astype(np.int32), pa.int32())
    )
    schema = _arrow_schema(seq_len, dtype)
    batch = pa.RecordBatch.from_arrays([token_arr, starts_arr], schema=schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch)
    return {
        "file": path.name,
        "rows": int(rows),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "max_token_id": int(tokens.max()) if tokens.size else -1,
    }


# ---------------------------------------------------------------------------------------------
# The manifest's seals


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of every field but `manifest_sha256`."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """`manifest` with its `manifest_sha256` set (what `prepare` writes)."""
    return {**manifest, "manifest_sha256": manifest_digest(manifest)}


def tokenizer_hashes(directory: Path) -> dict[str, str]:
    """{file name: sha256} of the files of a tokenizer copy (hidden files aside)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {f.name: sha256_file(f) for f in sorted(directory.iterdir()) if f.is_file() and not f.name.startswith(".")}


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class Shard:
    file: str
    path: Path
    rows: int
    tokens: np.ndarray  # [rows, seq_len], read-only view of the memory map
    starts_offsets: np.ndarray  # int32 [rows + 1]
    starts_values: np.ndarray  # int32 [n]: in-row offsets
    real_tokens: int
    next_token: Optional[int]

    def mapped(self) -> Shard:
        """The shard with its arrays (itself; a shard_cache.CachedShard maps them on first use)."""
        return self


@dataclass
class Split:
    name: str
    shards: list[Shard]
    seq_len: int
    rows: int = 0
    tokens: int = 0
    first_row: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    cache: Optional[object] = None  # a split in object storage: its shard_cache.SplitCache

    def __post_init__(self) -> None:
        counts = np.array([s.rows for s in self.shards], dtype=np.int64)
        self.first_row = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.rows = int(self.first_row[-1])
        self.tokens = int(sum(s.real_tokens for s in self.shards))

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row indices -> (shard index, row within shard)."""
        shard = np.searchsorted(self.first_row, rows, side="right") - 1
        return shard, rows - self.first_row[shard]


@dataclass
class Prepared:
    dir: Path  # the directory with manifest.json and tokenizer/ (for a URI: its local cache)
    manifest: dict
    splits: dict[str, Split]
    uri: Optional[str] = None  # read from object storage (llmtrain/data/shard_cache.py)

    @property
    def where(self) -> str:
        """What messages call the data: the path or URI the user gave."""
        return self.uri or str(self.dir)

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def max_token_id(self) -> int:
        """The largest token id in any shard (from the manifest; `verify` recomputes it)."""
        ids = [int(s["max_token_id"]) for split in self.manifest["splits"].values() for s in split["shards"]]
        return max(ids, default=-1)

    @property
    def pad_id(self) -> int:
        tok = self.manifest["tokenizer"]
        return tok["pad_id"] if tok["pad_id"] is not None else tok["eos_id"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / TOKENIZER_DIR

    def has_split(self, name: str) -> bool:
        return name in self.splits and self.splits[name].rows > 0

    def split(self, name: str) -> Split:
        if not self.has_split(name):
            raise UserError(f"{self.where}: no '{name}' rows (prepare with a larger --val-fraction for val, or more text)")
        return self.splits[name]


def split_rows(path: str | os.PathLike, split: str) -> int:
    """Rows of one split from the manifest alone (no shard is opened)."""
    manifest = read_manifest(Path(path))
    return int(manifest["splits"].get(split, {}).get("rows", 0))


def read_manifest(directory: Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise UserError(f"{directory}: prepared data directory not found; run `llmtrain prepare` first or fix the path")
    if not path.is_file():
        raise UserError(f"{directory}: not a prepared directory (no {MANIFEST}); create it with `llmtrain prepare`")
    return parse_manifest(path.read_bytes(), path)


def parse_manifest(text: bytes | str, path: object) -> dict:
    """The checked manifest from its JSON (`path` names it in errors: a file or a URI)."""
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable manifest ({err}); {_REPREPARE}") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION:
        raise UserError(
            f"{path}: written by an older llmtrain (manifest schema version {version}; this llmtrain reads version "
            f"{SCHEMA_VERSION}, which also records hashes of the manifest and tokenizer copy); {_REPREPARE}"
        )
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{path}: manifest schema version {version!r} is not supported (this llmtrain reads version {SCHEMA_VERSION}); "
            f"use the llmtrain that wrote it, or {_REPREPARE}"
        )
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise UserError(
            f"{path}: the manifest does not match its own manifest_sha256 (it was edited or is corrupt: "
            f"vocab size, tokenizer fingerprint, shard list...); restore it or {_REPREPARE}"
        )
    try:
        _check_manifest(manifest)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: malformed manifest ({err!r}); {_REPREPARE}") from None
    return manifest


def _check_manifest(m: dict) -> None:
    seq_len, dtype, vocab = int(m["seq_len"]), m["dtype"], int(m["tokenizer"]["vocab_size"])
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype}")
    if not dtype_holds(dtype, vocab):
        raise ValueError(f"vocab_size {vocab} does not fit dtype {dtype}")
    m["tokenizer"]["fingerprint"], m["tokenizer"]["eos_id"]  # noqa: B018 (presence)
    if not isinstance(m["tokenizer"]["files"], dict) or not m["tokenizer"]["files"]:
        raise ValueError("tokenizer.files")
    for split in m["splits"].values():
        for s in split["shards"]:
            s["file"], int(s["rows"]), int(s["bytes"]), s["sha256"], int(s["tokens"]), int(s["max_token_id"])  # noqa: B018


def open_prepared(path: str | os.PathLike, cache_dir: Optional[Path] = None, cache_bytes: Optional[int] = None) -> Prepared:
    """Read and check the manifest and memory-map every shard (no token is read). An object-store
    URI (s3://...) is read through this node's shard cache instead (`cache_dir`, `cache_bytes`:
    llmtrain/data/shard_cache.py), which maps each shard when a batch first needs it."""
    from llmtrain.data.objstore import is_uri  # here: objstore imports this module

    if is_uri(path):
        from llmtrain.data.shard_cache import open_remote  # on use: local data never loads pyarrow.fs

        return open_remote(path, cache_dir, cache_bytes)
    directory = Path(path)
    manifest = read_manifest(directory)
    check_contents(directory, manifest)
    splits = {}
    for name, info in manifest["splits"].items():
        shards = [_open_shard(directory, entry, manifest) for entry in info["shards"]]
        splits[name] = Split(name, shards, int(manifest["seq_len"]))
        if splits[name].rows != int(info["rows"]):
            raise UserError(
                f"{directory / MANIFEST}: split {name} says {info['rows']} rows but its shards hold {splits[name].rows}; {_REPREPARE}"
            )
    return Prepared(directory, manifest, splits)


def check_contents(directory: Path, manifest: dict, where: Optional[str] = None) -> None:
    """What open checks before any shard: vocabulary vs dtype, the tokenizer copy in `directory`,
    every shard's max token id (`where`, default `directory`, names the shards in errors)."""
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if not dtype_holds(manifest["dtype"], vocab):
        raise UserError(f"{directory / MANIFEST}: vocab size {vocab} does not fit {manifest['dtype']} tokens; {_REPREPARE}")
    _check_tokenizer_copy(directory, manifest)
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            if int(entry["max_token_id"]) >= vocab:
                raise UserError(
                    f"{where or directory}/{entry['file']}: holds token ids up to {int(entry['max_token_id'])} but the "
                    f"manifest's tokenizer has {vocab} ids (0..{vocab - 1}); {_REPREPARE}"
                )


def _check_tokenizer_copy(directory: Path, manifest: dict) -> None:
    """The files in `tokenizer/` are the ones the data was tokenized with (sha256 per file)."""
    copy = directory / TOKENIZER_DIR
    want, have = manifest["tokenizer"]["files"], tokenizer_hashes(copy)
    for name in sorted(set(want) | set(have)):
        if name not in have:
            problem = "is missing"
        elif name not in want:
            problem = "was not part of the tokenizer the data was prepared with"
        elif have[name] != want[name]:
            problem = "differs from the file the data was prepared with (sha256 mismatch)"
        else:
            continue
        raise UserError(f"{copy / name}: {problem}: the tokenizer copy was replaced or edited; restore it or {_REPREPARE}")


def _view(array, dtype) -> np.ndarray:
    """Zero-copy numpy view of a primitive Arrow array (read-only when memory-mapped)."""
    dtype = np.dtype(dtype)
    if array.null_count:
        raise ValueError("unexpected nulls")
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _open_shard(directory: Path, entry: dict, manifest: dict) -> Shard:
    import pyarrow as pa

    path = directory / entry["file"]
    seq_len, dtype = int(manifest["seq_len"]), manifest["dtype"]
    if not path.is_file():
        raise UserError(f"{path}: shard listed in the manifest is missing; {_REPREPARE}")
    size = path.stat().st_size
    if size != int(entry["bytes"]):
        raise UserError(
            f"{path}: {size:,} bytes but the manifest says {int(entry['bytes']):,} (truncated or replaced); {_REPREPARE}"
        )
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        if reader.num_record_batches != 1 or not reader.schema.equals(_arrow_schema(seq_len, dtype), check_metadata=False):
            raise ValueError("unexpected layout")
        batch = reader.get_batch(0)
        tokens_col, starts_col = batch.column(0), batch.column(1)
        rows = len(tokens_col)
        flat = _view(tokens_col.values, DTYPES[dtype])
        tokens = flat[tokens_col.offset * seq_len : (tokens_col.offset + rows) * seq_len].reshape(rows, seq_len)
        offsets = _view(starts_col.offsets, np.int32)
        values = _view(starts_col.values, np.int32)
    except (pa.ArrowException, ValueError, OSError) as err:
        raise UserError(f"{path}: not a valid token shard ({str(err).splitlines()[0]}); {_REPREPARE}") from None
    if rows != int(entry["rows"]) or len(offsets) != rows + 1 or int(offsets[-1]) > len(values):
        raise UserError(f"{path}: {rows} rows but the manifest says {entry['rows']}; {_REPREPARE}")
    return Shard(entry["file"], path, rows, tokens, offsets, values, int(entry["tokens"]), entry.get("next_token"))


def check_tokenizer(data: Prepared) -> None:
    """The tokenizer copy, loaded, is the manifest's: same fingerprint and vocab size (`verify`
    and every driver run this once; the per-file hashes of `open_prepared` are the cheap check)."""
    from llmtrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(data.tokenizer_dir)
    if tok.fingerprint != data.fingerprint or tok.vocab_size != data.vocab_size:
        raise UserError(
            f"{data.tokenizer_dir}: this tokenizer (vocab {tok.vocab_size}) is not the one the manifest records "
            f"(vocab {data.vocab_size}{', another fingerprint' if tok.fingerprint != data.fingerprint else ''}); {_REPREPARE}"
        )


def check_fits_model(data: Prepared, vocab_size: int, model: str, model_dir: Optional[Path], fix: str) -> None:
    """Refuse `data` for a model (`model` names it in the message) of `vocab_size` ids, or whose
    directory holds another tokenizer than the one the data was prepared with; `fix` ends the line.
    The data's own tokenizer copy is checked first (`check_tokenizer`)."""
    check_tokenizer(data)
    if model_dir is not None:
        from llmtrain.data.tokenizer import load_tokenizer, resolve_tokenizer_dir

        tok_dir = resolve_tokenizer_dir(model_dir)
        if any((tok_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
            tok = load_tokenizer(tok_dir)
            if tok.fingerprint != data.fingerprint:
                raise UserError(
                    f"{data.where} was prepared with another tokenizer (vocab {data.vocab_size}) than {model}'s "
                    f"(vocab {tok.vocab_size}, another fingerprint); {fix}"
                )
    if data.max_token_id >= vocab_size:
        raise UserError(
            f"{data.where} holds token ids up to {data.max_token_id} but {model} has {vocab_size} token ids "
            f"(0..{vocab_size - 1}); {fix}"
        )


def verify(path: str | os.PathLike, quiet: bool = False) -> Prepared | dict:
    """`open_prepared` plus the sha256 and the largest token id of every shard, and the
    tokenizer copy reloaded (its fingerprint and vocab size must be the manifest's). A URI
    (s3://bucket/prefix) is verified in place by `objstore.verify_remote`, which returns the manifest."""
    from llmtrain.data import objstore

    if objstore.is_uri(path):
        return objstore.verify_remote(str(path), quiet=quiet)
    data = open_prepared(path)
    vocab = data.vocab_size
    check_tokenizer(data)
    n_shards = n_tokens = 0
    for split in data.splits.values():
        entries = {e["file"]: e for e in data.manifest["splits"][split.name]["shards"]}
        for shard in split.shards:
            digest = sha256_file(shard.path)
            if digest != entries[shard.file]["sha256"]:
                raise UserError(
                    f"{shard.path}: sha256 does not match the manifest (the file changed or is corrupt); {_REPREPARE}"
                )
            largest = int(shard.tokens.max()) if shard.rows else -1
            if largest != int(entries[shard.file]["max_token_id"]) or largest >= vocab:
                raise UserError(
                    f"{shard.path}: largest token id {largest}, but the manifest says "
                    f"{entries[shard.file]['max_token_id']} (vocab size {vocab}); {_REPREPARE}"
                )
            n_shards += 1
            n_tokens += shard.real_tokens
    if not quiet:
        print(f"llmtrain: {data.dir}: ok ({n_shards} shards, {n_tokens:,} tokens, sha256 verified)")
    return data
