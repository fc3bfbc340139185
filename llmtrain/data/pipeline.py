"""The stages of `llmtrain prepare` as plain functions over Arrow tables, and the in-process
executor that runs them; llmtrain/prepare_ray.py runs the very same functions on Ray Data.

    units = plan_units(list_inputs(["corpus/"]))
    docs = LocalExecutor().documents(units, settings)       # read -> clean -> filter -> redact
    removed = find_duplicates(executor, docs, settings)     # exact (+ near) dedup, hash-partitioned
    for batch in executor.tokenized(docs, removed, tokenizer_dir, threads): ...   # in input order

Stage A, `process_unit`: one input file -> tables of its kept documents in input order, with
columns `order` (int64: unit index << 40 | document index in the file, so input order is
the order of the keys, whoever computes them), `text`, `key` (64-bit content hash: the exact
dedup key and the train/val split key), `val`, and with near-dedup on, `bands` (MinHash LSH
band keys). The unit's counters (cleaning, quality filters, PII kinds) travel in one extra
row per unit (`order` = -1 - unit index, `stats` = JSON), so aggregation reads only those rows.

Dedup is hash-partitioned: rows (key, order) go to partition key % P and each partition finds
its duplicates alone (exact: every order but the smallest per key; near: LSH edges per band
key, then connected components on the driver over the edges, which are few). The result is a
sorted array of removed orders that does not depend on P or on how rows reach partitions, so
the prepared bytes are the same for 1, 2 or N workers on any number of nodes.

Stage C, `tokenize_table`: kept documents minus the removed ones -> token ids per document
([BOS] tokens [EOS]) and the split; the driver packs them in order (llmtrain.data.shard_writer).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from llmtrain.data import minhash
from llmtrain.data.clean import CleanStats, clean_text, content_hash, is_val
from llmtrain.data.pii import PiiConfig, redact
from llmtrain.data.quality import FILTERS, QualityConfig, quality_reason
from llmtrain.data.readers import InputFile, iter_documents, splittable

UNIT_SHIFT = 40  # documents per input file < 2^40, input files < 2^23
TABLE_CHARS = 16 << 20  # characters of text per table out of stage A (bounds a worker's memory)
STAT_KEYS = (
    "documents_read",
    "dropped_empty",
    "dropped_short",
    "nfc_changed",
    "control_chars_removed",
    "invalid_utf8_documents",
    "invalid_utf8_replacements",
    "long_blocks_split",
)


@dataclass(frozen=True)
class StageSettings:
    """Everything stage A needs; its fields go into the manifest's build settings."""

    text_column: str = "text"
    min_chars: int = 16
    val_fraction: float = 0.01
    quality: QualityConfig = field(default_factory=QualityConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    minhash: minhash.MinHashConfig = field(default_factory=minhash.MinHashConfig)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=list))


CHUNK_BYTES = 16 << 20  # a JSON Lines file larger than this is read as ranges of this size


@dataclass(frozen=True)
class Unit:
    """One task of stage A: a file, or the lines beginning in a byte range of a JSON Lines file."""

    index: int
    file: InputFile
    byte_range: Optional[tuple[int, int]] = None

    @property
    def size(self) -> int:
        return self.file.size if self.byte_range is None else self.byte_range[1] - self.byte_range[0]


def plan_units(files: Sequence[InputFile], chunk_bytes: Optional[int] = None) -> list[Unit]:
    """Stage A's tasks in input order: so that a few large files still spread over every worker,
    a JSON Lines file is cut into ranges of `chunk_bytes` (a constant: the units, and so the
    order keys, never depend on the number of workers)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    units: list[Unit] = []
    for f in files:
        if splittable(f) and f.size > chunk_bytes:
            for start in range(0, f.size, chunk_bytes):
                units.append(Unit(len(units), f, (start, min(start + chunk_bytes, f.size))))
        else:
            units.append(Unit(len(units), f))
    return units


# ---------------------------------------------------------------------------------------------
# Stage A: read -> clean -> quality filters -> PII -> keys (and MinHash bands)


def _doc_schema(with_bands: bool):
    import pyarrow as pa

    fields = [
        pa.field("order", pa.int64()),
        pa.field("text", pa.large_string()),
        pa.field("key", pa.uint64()),
        pa.field("val", pa.bool_()),
        pa.field("stats", pa.string()),
    ]
    if with_bands:
        fields.append(pa.field("bands", pa.list_(pa.uint64())))
        fields.append(pa.field("sig", pa.list_(pa.uint32())))
    return pa.schema(fields)


def lists(matrix: np.ndarray, arrow_type):
    import pyarrow as pa

    n, width = matrix.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix).reshape(-1), arrow_type))


def matrix(column) -> np.ndarray:
    """A list column of equal-length lists as a 2-D numpy array."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    n = len(arr)
    values = arr.flatten().to_numpy()
    return values.reshape(n, -1) if n else values.reshape(0, 0)


def process_unit(unit: Unit, s: StageSettings) -> Iterator[Any]:
    """Tables (pyarrow) of one input file's kept documents, then its stats row."""
    import pyarrow as pa

    stats = CleanStats(min_chars=s.min_chars)
    dropped = {name: 0 for name in FILTERS} if s.quality.enabled else {}
    redacted = {kind: 0 for kind in s.pii.kinds} if s.pii.enabled else {}
    schema = _doc_schema(s.minhash.enabled)
    base = unit.index << UNIT_SHIFT
    texts: list[str] = []
    orders: list[int] = []
    chars = 0

    def table():
        keys = np.fromiter((content_hash(t) for t in texts), dtype=np.uint64, count=len(texts))
        cols = {
            "order": pa.array(orders, pa.int64()),
            "text": pa.array(texts, pa.large_string()),
            "key": pa.array(keys, pa.uint64()),
            "val": pa.array([is_val(int(k), s.val_fraction) for k in keys], pa.bool_()),
            "stats": pa.nulls(len(texts), pa.string()),
        }
        if s.minhash.enabled:
            sigs = minhash.signatures(texts, s.minhash)
            cols["bands"] = lists(minhash.band_keys(sigs, s.minhash).astype(np.uint64), pa.uint64())
            cols["sig"] = lists(sigs.astype(np.uint32), pa.uint32())
        return pa.table(cols, schema=schema)

    for i, raw in enumerate(iter_documents(unit.file, s.text_column, stats, byte_range=unit.byte_range)):
        text = clean_text(raw, stats)
        if text is None:
            continue
        if s.quality.enabled:
            reason = quality_reason(text, s.quality)
            if reason is not None:
                dropped[reason] += 1
                continue
        if s.pii.enabled:
            text, found = redact(text, s.pii)
            for kind, n in found.items():
                redacted[kind] += n
        texts.append(text)
        orders.append(base + i)
        chars += len(text)
        if chars >= TABLE_CHARS:
            yield table()
            texts, orders, chars = [], [], 0
    if texts:
        yield table()
    record = {k: getattr(stats, k) for k in STAT_KEYS}
    record.update(bytes=unit.size, quality=dropped, pii=redacted, peak_rss_mb=_peak_rss_mb())
    row = {"order": [-1 - unit.index], "text": [None], "key": [0], "val": [False], "stats": [json.dumps(record)]}
    if s.minhash.enabled:
        row["bands"] = row["sig"] = [None]
    yield pa.table(row, schema=schema)


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB): the report shows the largest over the
    processes that ran stage A; it never enters the manifest (it depends on the machine)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def merge_stats(records: Sequence[dict]) -> dict:
    """Sum the per-unit stats records (nested dicts of counts; `peak_*` values: the largest)."""
    total: dict = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("peak_"):
                total[k] = max(total.get(k, 0), v)
            elif isinstance(v, dict):
                sub = total.setdefault(k, {})
                for kk, vv in v.items():
                    sub[kk] = sub.get(kk, 0) + vv
            else:
                total[k] = total.get(k, 0) + v
    return total


def stats_of(table) -> list[dict]:
    """The stats records in a stage-A table (its rows with `order` < 0)."""
    col = table.column("stats")
    return [json.loads(v) for v in col.drop_null().to_pylist()]


# ---------------------------------------------------------------------------------------------
# Stage B: dedup, one hash partition at a time


def key_rows(table, partitions: int) -> dict[str, np.ndarray]:
    """(part, key, order) of each document of a stage-A table, part = key % partitions."""
    docs = _docs(table)
    keys = docs.column("key").to_numpy()
    return {"part": (keys % np.uint64(partitions)).astype(np.int64), "key": keys, "order": docs.column("order").to_numpy()}


def exact_partition(keys: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """One partition's exact duplicates: every order but the smallest of each key."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.lexsort((orders, keys))
    k = keys[idx]
    repeat = np.concatenate([[False], k[1:] == k[:-1]])
    return np.sort(orders[idx][repeat]).astype(np.int64)


def band_rows(table, partitions: int) -> dict[str, np.ndarray]:
    """(part, band_key, order) for every LSH band of each document, part = band_key % partitions."""
    docs = _docs(table)
    bands = matrix(docs.column("bands")).astype(np.uint64)
    keys = bands.reshape(-1)
    orders = np.repeat(docs.column("order").to_numpy(), bands.shape[1] if bands.ndim == 2 else 0)
    return {"part": (keys % np.uint64(partitions)).astype(np.int64), "band_key": keys, "order": orders}


def endpoint_sigs(table, endpoints: np.ndarray) -> dict[str, np.ndarray]:
    """(order, sig) of the documents of a stage-A table whose order is in sorted `endpoints`."""
    docs = _docs(table)
    orders = docs.column("order").to_numpy()
    if len(endpoints) == 0 or len(orders) == 0:
        return {"order": orders[:0], "sig": np.zeros((0, 0), dtype=np.uint32)}
    at = np.searchsorted(endpoints, orders).clip(max=len(endpoints) - 1)
    hit = endpoints[at] == orders
    sigs = matrix(docs.column("sig"))
    return {"order": orders[hit], "sig": sigs[hit].astype(np.uint32)}


def near_partition(band_keys: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """One partition's LSH candidate edges [m, 2] (int64)."""
    return minhash.candidate_edges(band_keys, orders)


def _docs(table):
    import pyarrow.compute as pc

    return table.filter(pc.greater_equal(table.column("order"), 0))


@dataclass
class DedupResult:
    removed: np.ndarray  # sorted int64 orders removed by either dedup
    exact: int
    near: int


def find_duplicates(executor: Executor, docs: Any, s: StageSettings) -> DedupResult:
    exact = executor.exact_duplicates(docs)
    near = np.zeros(0, dtype=np.int64)
    if s.minhash.enabled:
        edges = executor.near_edges(docs)
        if s.minhash.verify and len(edges):
            orders, sigs = executor.signatures_of(docs, np.unique(edges))
            edges = minhash.verify_edges(edges, orders, sigs, s.minhash)
        near, _ = minhash.clusters(edges)
        near = np.setdiff1d(np.asarray(near, dtype=np.int64), exact)
    removed = np.union1d(exact, near).astype(np.int64)
    return DedupResult(removed, len(exact), len(near))


# ---------------------------------------------------------------------------------------------
# Stage C: tokenize what is kept


def tokenize_table(table, tok, removed: np.ndarray, threads: Optional[int] = 1):
    """Token ids ([BOS] ... [EOS]) of each kept, not removed document of a stage-A table, in
    order: a table with `ids` (list<int32>) and `val`."""
    import pyarrow as pa

    docs = _docs(table)
    orders = docs.column("order").to_numpy()
    if len(removed):
        at = np.searchsorted(removed, orders).clip(max=len(removed) - 1)
        docs = docs.filter(pa.array(removed[at] != orders))
    texts = docs.column("text").to_pylist()
    ids, lengths = tok.encode_documents(texts, threads) if texts else (np.zeros(0, np.int32), np.zeros(0, np.int64))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return pa.table(
        {
            "ids": pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(ids, pa.int32())),
            "val": docs.column("val"),
        }
    )


def split_tokens(batch) -> Iterator[tuple[bool, np.ndarray, np.ndarray]]:
    """(is_val, ids, lengths) per split of a `tokenize_table` result, train first."""
    import pyarrow.compute as pc

    for val in (False, True):
        part = batch.filter(pc.equal(batch.column("val"), val))
        if part.num_rows == 0:
            continue
        ids = part.column("ids").combine_chunks()
        offsets = ids.offsets.to_numpy()
        yield val, ids.flatten().to_numpy(), np.diff(offsets - offsets[0]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Executors


class Executor:
    """Where the stages run. `documents` returns a handle the later stages take."""

    name = "local"
    workers = 1
    nodes = 1

    def documents(self, units: Sequence[Unit], s: StageSettings, progress: Callable[[int, list[dict]], None]) -> Any:
        raise NotImplementedError

    def stats(self, docs: Any) -> list[dict]:
        raise NotImplementedError

    def exact_duplicates(self, docs: Any) -> np.ndarray:
        raise NotImplementedError

    def near_edges(self, docs: Any) -> np.ndarray:
        raise NotImplementedError

    def signatures_of(self, docs: Any, endpoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def tokenized(self, docs: Any, removed: np.ndarray, tokenizer_dir: str, threads: int) -> Iterator[Any]:
        raise NotImplementedError

    def close(self) -> None:
        return None


class LocalExecutor(Executor):
    """This process: stage A file by file, dedup as one partition, tokenizing on `threads`
    threads of the tokenizer's own pool. Holds the kept text in memory: for inputs up to a few
    hundred MB (`prepare` picks Ray Data above that)."""

    name = "local"

    def __init__(self, threads: int = 1):
        self.workers = threads

    def documents(self, units, s, progress):
        tables, self._stats = [], []
        for unit in units:
            out = list(process_unit(unit, s))
            records = [r for t in out for r in stats_of(t)]
            tables += out
            self._stats += records
            progress(unit.size, records)
        return tables

    def stats(self, docs):
        return self._stats

    def exact_duplicates(self, docs):
        rows = [key_rows(t, 1) for t in docs]
        return exact_partition(np.concatenate([r["key"] for r in rows]), np.concatenate([r["order"] for r in rows]))

    def near_edges(self, docs):
        rows = [band_rows(t, 1) for t in docs]
        return near_partition(np.concatenate([r["band_key"] for r in rows]), np.concatenate([r["order"] for r in rows]))

    def signatures_of(self, docs, endpoints):
        found = [endpoint_sigs(t, endpoints) for t in docs]
        found = [f for f in found if len(f["order"])]
        return np.concatenate([f["order"] for f in found]), np.concatenate([f["sig"] for f in found])

    def tokenized(self, docs, removed, tokenizer_dir, threads):
        from llmtrain.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        for t in docs:
            yield tokenize_table(t, tok, removed, threads)
