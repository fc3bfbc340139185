"""`llmtrain prepare` on Ray Data: the stages of llmtrain.data.pipeline as a Ray Data job, on the
embedded local runtime (127.0.0.1 only) or an existing cluster (`--cluster ADDRESS`).

    llmtrain prepare --input s3://corpus/ --tokenizer tok/ --seq-len 2048 --output s3://data/x --executor ray
    prepare_job(["corpus/"], tokenizer="tok/", seq_len=256, output="data/x", executor="ray", workers=2)

How the job runs (the bytes do not depend on any of it, see llmtrain.data.pipeline):
- stage A: one Ray Data task per input file (read, clean, filter, redact, hash, MinHash); its
  tables are kept in Ray's object store (spilled to disk when memory is short), so a worker's
  memory is bounded by one file's tables, not by the corpus;
- dedup: a map/reduce of Ray tasks over stage A's blocks in the object store: each block splits
  its (key, order) rows by partition key % P, one reduce task per partition finds its
  duplicates; near-dedup the same with LSH band keys, then the signatures of the candidate
  edges' endpoints are fetched to verify them; only the removed orders (8 bytes each) and the
  edges come back to the driver;
- tokenize: an actor pool of `workers` actors (each loads the tokenizer once), in input order
  (`preserve_order`); the driver packs and writes the shards as they arrive.
Ray retries a task whose worker dies (`max_retries`), and the output is the same, since every
stage is a pure function of its input. Ray Data's own progress bars are off: the driver shows one.

`executor="auto"` runs in-process for inputs under AUTO_RAY_BYTES (Ray's start-up, ~5 s, is
more than the whole job there) and on Ray Data above it or whenever a cluster is named.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any, Optional, Sequence

import numpy as np

from llmtrain.data import pipeline
from llmtrain.data.pipeline import Executor, LocalExecutor, StageSettings, Unit
from llmtrain.errors import UserError
from llmtrain.ray_runtime import check_reachable, loopback_only, unused_port

AUTO_RAY_BYTES = 256 << 20
EXECUTORS = ("auto", "local", "ray")


def prepare_job(
    inputs: Sequence[str],
    executor: str = "auto",
    cluster: Optional[str] = None,
    workers: Optional[int] = None,
    **kwargs: Any,
):
    """`llmtrain.data.prepare.prepare` with the executor chosen here (see the module docstring)."""
    from llmtrain.data.prepare import prepare
    from llmtrain.data.readers import list_inputs

    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor}: choose one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers} must be at least 1 (or omit it to use all cores)")
    if executor == "local" and cluster is not None:
        raise UserError("--executor local runs in this process and cannot use --cluster; drop one of them")
    if executor == "auto":
        big = cluster is not None or sum(f.size for f in list_inputs(inputs)) >= AUTO_RAY_BYTES
        executor = "ray" if big else "local"
    if executor == "local":
        return prepare(inputs, workers=workers, **kwargs)
    ray_executor = RayExecutor(workers, cluster)
    try:
        return prepare(inputs, workers=workers, executor=ray_executor, **kwargs)
    finally:
        ray_executor.close()


def start_ray(cluster: Optional[str], workers: Optional[int]) -> int:
    """Start the embedded runtime with `workers` CPUs (default: all cores) or join `cluster`;
    returns the number of CPUs the job may use."""
    if cluster is None:
        loopback_only()
    import ray

    if not ray.is_initialized():
        if cluster is None:
            ray.init(
                address="local",
                num_cpus=workers or os.cpu_count() or 1,
                num_gpus=0,
                include_dashboard=False,
                dashboard_port=unused_port(),
                runtime_env={"worker_process_setup_hook": "llmtrain.reachable.use_own_cluster"},
                logging_level=logging.WARNING,
                logging_config=ray.LoggingConfig(log_level="ERROR"),
                log_to_driver=True,
            )
        else:
            check_reachable(cluster)
            try:
                ray.init(address=cluster, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, TimeoutError) as err:
                raise UserError(
                    f"--cluster {cluster}: could not connect ({err}); check the address and that the cluster is up"
                ) from None
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(workers, cpus) if workers else cpus)


class _Tokenize:
    """Ray Data actor: pipeline.tokenize_table with the tokenizer loaded once per actor."""

    def __init__(self, tokenizer_dir: str, removed: Any):
        import ray

        from llmtrain.data.tokenizer import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.removed = ray.get(removed) if isinstance(removed, ray.ObjectRef) else removed

    def __call__(self, table):
        return pipeline.tokenize_table(table, self.tok, self.removed, threads=1)


def _stage_a(batch, units: dict, settings: StageSettings):
    for index in batch.column("unit").to_pylist():
        _test_kill(index)
        yield from pipeline.process_unit(units[index], settings)


def _test_kill(index: int) -> None:
    """Test hook: LLMTRAIN_TEST_KILL_UNIT=INDEX:MARKER kills this worker process the first time
    it starts input file INDEX (MARKER records that it did), as a lost node would."""
    hook = os.environ.get("LLMTRAIN_TEST_KILL_UNIT")
    if hook:
        at, marker = hook.split(":", 1)
        if int(at) == index and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)


def _partition_block(table, partitions: int, kind: str) -> list:
    """One stage-A block's dedup rows split by partition: `partitions` (keys, orders) pairs."""
    rows = pipeline.key_rows(table, partitions) if kind == "exact" else pipeline.band_rows(table, partitions)
    keys = rows["key"] if kind == "exact" else rows["band_key"]
    by = np.argsort(rows["part"], kind="stable")
    cuts = np.searchsorted(rows["part"][by], np.arange(1, partitions))
    return [(k, o) for k, o in zip(np.split(keys[by], cuts), np.split(rows["order"][by], cuts))]


def _split_task(table, partitions: int, kind: str):
    pieces = _partition_block(table, partitions, kind)
    return pieces[0] if partitions == 1 else tuple(pieces)


def _reduce_partition(kind: str, *pieces) -> np.ndarray:
    keys = np.concatenate([k for k, _ in pieces]) if pieces else np.zeros(0, np.uint64)
    orders = np.concatenate([o for _, o in pieces]) if pieces else np.zeros(0, np.int64)
    if kind == "exact":
        return pipeline.exact_partition(keys, orders)
    return pipeline.near_partition(keys, orders).reshape(-1, 2)


def _endpoint_sigs(table, endpoints: Any):
    import pyarrow as pa
    import ray

    found = pipeline.endpoint_sigs(table, ray.get(endpoints) if isinstance(endpoints, ray.ObjectRef) else endpoints)
    return pa.table({"order": found["order"], "sig": pipeline.lists(found["sig"], pa.uint32())})


class RayExecutor(Executor):
    name = "Ray Data"

    def __init__(self, workers: Optional[int] = None, cluster: Optional[str] = None, partitions: Optional[int] = None):
        self.cluster = cluster
        self.workers = start_ray(cluster, workers)
        import ray

        self.nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
        self.partitions = partitions or max(8, 2 * self.workers)
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # blocks come out in input order
        ctx.enable_progress_bars = False  # the driver shows one bar
        ctx.print_on_execution_start = False
        self._started_here = True

    def documents(self, units: Sequence[Unit], s: StageSettings, progress):
        import ray
        import ray.data

        by_index = {u.index: u for u in units}
        ds = ray.data.from_items([{"unit": u.index} for u in units], override_num_blocks=max(1, len(units)))
        ds = ds.map_batches(
            partial(_stage_a, units=by_index, settings=s),
            batch_size=1,
            batch_format="pyarrow",
            zero_copy_batch=True,
            max_retries=3,
        )
        stats_task = ray.remote(num_cpus=0)(pipeline.stats_of)
        refs, stats = [], []
        for bundle in ds.iter_internal_ref_bundles():
            for entry, piece in zip(bundle.blocks, bundle.slices):
                if piece is not None and (piece.start_offset != 0 or piece.end_offset != entry.metadata.num_rows):
                    raise RuntimeError("Ray Data returned a sliced block from a map stage; this pipeline expects whole blocks")
                refs.append(entry.ref)
                records = ray.get(stats_task.remote(entry.ref))
                stats += records
                progress(sum(r["bytes"] for r in records), records)
        self._stats, self._refs = stats, refs
        return ray.data.from_arrow_refs(refs) if refs else None

    def stats(self, docs):
        return self._stats

    def exact_duplicates(self, docs):
        return np.sort(self._shuffle("exact")).astype(np.int64)

    def near_edges(self, docs):
        return self._shuffle("near").reshape(-1, 2).astype(np.int64)

    def _shuffle(self, kind: str) -> np.ndarray:
        """Hash-partitioned dedup as a map/reduce of Ray tasks over the stage-A blocks: each block
        splits its rows by partition (one object per partition), one task per partition reduces.
        (Ray Data's groupby did the same in ~17 s on a 21 MB corpus for tens of ms of numpy.)"""
        import ray

        P = self.partitions
        if not self._refs:
            return np.zeros(0, dtype=np.int64)
        split = ray.remote(_split_task).options(num_returns=P, max_retries=3)
        parts = [split.remote(ref, P, kind) for ref in self._refs]
        parts = [p if isinstance(p, list) else [p] for p in parts]
        reduce = ray.remote(_reduce_partition).options(max_retries=3)
        results = ray.get([reduce.remote(kind, *[blocks[i] for blocks in parts]) for i in range(P)])
        return np.concatenate(results) if results else np.zeros(0, dtype=np.int64)

    def signatures_of(self, docs, endpoints):
        import ray

        ref = ray.put(np.asarray(endpoints, dtype=np.int64))
        found = docs.map_batches(partial(_endpoint_sigs, endpoints=ref), batch_format="pyarrow", batch_size=None)
        tables = [t for t in found.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
        orders = np.concatenate([t.column("order").to_numpy() for t in tables])
        sigs = np.concatenate([pipeline.matrix(t.column("sig")) for t in tables])
        return orders, sigs

    def tokenized(self, docs, removed, tokenizer_dir, threads):
        import ray

        if docs is None:
            return
        out = docs.map_batches(
            _Tokenize,
            fn_constructor_args=(tokenizer_dir, ray.put(np.asarray(removed, dtype=np.int64))),
            batch_size=None,
            batch_format="pyarrow",
            concurrency=self.workers,
            max_task_retries=3,
        )
        yield from out.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)

    def close(self) -> None:
        import ray

        if self.cluster is None and ray.is_initialized():
            ray.shutdown()


def _gather(ds, column: str) -> np.ndarray:
    parts = [b[column] for b in ds.iter_batches(batch_format="numpy", batch_size=None) if len(b[column])]
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


__all__ = ["AUTO_RAY_BYTES", "EXECUTORS", "LocalExecutor", "RayExecutor", "prepare_job", "start_ray"]
