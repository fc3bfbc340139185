"""The token loader: deterministic, rank-sharded, resumable batches from prepared directories.

    loader = TokenLoader("data/tiny", split="train", micro_batch_size=2, grad_accum=2,
                         rank=0, world_size=2, seed=0, shuffle=True)
    for step in range(100):
        for mb in loader.next_step():           # grad_accum micro-batches for this rank
            loss = model(mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"])
    state = loader.state_dict()                  # {"seed", "epoch", "cursor", ...}: JSON, tiny
    loader.load_state_dict(state)                # O(1): the next batch is the one that followed

Order. All rows of the split form the epoch; sample g of the stream (g = epoch * rows + cursor)
is row perm(seed, epoch)(cursor) - a seeded permutation, `llmtrain.data.sample_order` - or row g
mod rows with `shuffle=False`. A step consumes one global batch of micro_batch_size x
grad_accum x world_size consecutive samples; rank r takes its contiguous share of it, split into
grad_accum micro-batches. Everything is a pure function of (seed, g), so resuming after k steps
gives exactly the batches of an uninterrupted run, a new world size with the same global batch
continues the same sample sequence, and a batch may straddle an epoch boundary.

Mixtures: `sources=[(dir, weight), ...]` (same tokenizer fingerprint and seq_len required).
Samples are dealt to sources by `MixtureSchedule`; each source runs through its own
permutations and epochs. The state is the same (seed, g); `realized_shares()` reports each
source's share of the samples (= tokens: every row is seq_len) served so far.

Batches (torch int64 [micro_batch_size, seq_len]; zero-copy from numpy):
- `input_ids`: the row;
- `labels`: next-token targets, labels[j] = row[j+1], and for the last position the first token
  of the following row of the same stream (the next shard's first token at a shard end): no
  prediction is lost; -100 where the target is padding or past the end of the split;
- `position_ids`: restart at 0 at every document start and at the row start. The model derives
  document ids as cumsum(position_ids == 0) and keeps attention inside documents.

Object storage: a source may be a URI (s3://bucket/prefix) of a prepared dataset, read through
the node's shard cache (llmtrain/data/shard_cache.py; `cache_dir`, `cache_bytes`). Each step the
loader tells the cache which shards its rank's next `prefetch_steps` steps read (a pure function
of (seed, g), like the batches), so the cache fetches them before they are needed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from llmtrain.data.objstore import is_uri
from llmtrain.data.sample_order import MixtureSchedule, Permutation, derive_key
from llmtrain.data.shards import Prepared, Split, open_prepared
from llmtrain.errors import UserError

IGNORE = -100
STATE_VERSION = 1
PREFETCH_STEPS = 8  # steps of samples ahead whose shards a remote source fetches
Source = Union[str, os.PathLike]
Sources = Union[Source, Sequence[tuple[Source, float]]]


def _location(path: Source) -> Union[Path, str]:
    return path if is_uri(path) else Path(path)  # a URI stays a string (a Path folds its //)


def parse_sources(sources: Sources) -> list[tuple[Union[Path, str], float]]:
    """A prepared dir or URI, or [(dir, weight), ...] (also dicts with path/weight) -> [(location, weight)]."""
    if isinstance(sources, (str, os.PathLike)):
        return [(_location(sources), 1.0)]
    parsed = []
    for item in sources:
        if isinstance(item, dict):
            path, weight = item.get("path"), item.get("weight")
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            path, weight = item
        else:
            raise UserError(f"mixture entry {item!r}: expected (path, weight); give every source a path and a weight")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise UserError(f"mixture weight for {path} is {weight!r}; give a number > 0") from None
        if not weight > 0 or not np.isfinite(weight):
            raise UserError(f"mixture weight for {path} is {weight}; weights must be > 0 (remove the source instead)")
        parsed.append((_location(path), weight))
    if not parsed:
        raise UserError("empty data mixture; list at least one prepared directory with a weight")
    return parsed


class TokenLoader:
    """Batches of one split of one prepared directory or a weighted mixture (module docstring)."""

    def __init__(
        self,
        sources: Sources,
        split: str = "train",
        micro_batch_size: int = 1,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        cache_dir: Optional[Path] = None,
        cache_bytes: Optional[int] = None,
        prefetch_steps: int = PREFETCH_STEPS,
    ):
        if micro_batch_size < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(
                f"invalid batch layout (micro_batch_size={micro_batch_size}, grad_accum={grad_accum}, "
                f"rank={rank}, world_size={world_size}); all must be >= 1 and 0 <= rank < world_size"
            )
        self.sources = parse_sources(sources)
        self.data: list[Prepared] = [open_prepared(p, cache_dir, cache_bytes) for p, _ in self.sources]
        first = self.data[0]
        for d in self.data[1:]:
            if d.fingerprint != first.fingerprint:
                raise UserError(
                    f"{d.where} was tokenized with a different tokenizer than {first.where}; prepare every mixture source with the same tokenizer"
                )
            if d.seq_len != first.seq_len:
                raise UserError(
                    f"{d.where} has seq_len {d.seq_len} but {first.where} has {first.seq_len}; prepare every mixture source with the same --seq-len"
                )
        self.split_name = split
        self.splits: list[Split] = [d.split(split) for d in self.data]
        self.seq_len = first.seq_len
        self.vocab_size = first.vocab_size
        self.manifest = first.manifest
        self.tokenizer_dir = first.tokenizer_dir
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rows = [s.rows for s in self.splits]
        self.num_rows = int(sum(self.rows))
        self.mixture = MixtureSchedule([w for _, w in self.sources], self.seed) if len(self.sources) > 1 else None
        self._sample = 0  # g: global index of the next sample
        self._perms: OrderedDict[tuple[int, int], Permutation] = OrderedDict()
        # sources in object storage: the cache holds a shuffled split whole, a sequential one in windows
        self.prefetch_steps = max(1, prefetch_steps)
        self._remote = [s for s, split in enumerate(self.splits) if split.cache is not None]
        for s in self._remote:
            self.splits[s].cache.require(shuffle, self.prefetch_steps * self.global_batch)

    # -- the public API ------------------------------------------------------------------------

    def has_split(self, name: str) -> bool:
        return all(d.has_split(name) for d in self.data)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_rows // self.global_batch)

    @property
    def samples_seen(self) -> int:
        return self._sample

    def next_step(self) -> list[dict]:
        """This rank's grad_accum micro-batches of the next global batch."""
        per_rank = self.micro_batch_size * self.grad_accum
        start = self._sample + self.rank * per_rank
        g = np.arange(start, start + per_rank, dtype=np.int64)
        # remote sources not all here yet: this rank's samples of the next prefetch_steps steps, this step's first
        ahead = self._remote and not all(self.splits[s].cache.settled for s in self._remote)
        if ahead:
            g = (g[None, :] + self.global_batch * np.arange(self.prefetch_steps)[:, None]).reshape(-1)
        source, rows = self.rows_for(g)
        if ahead:
            self._prefetch(source, rows, per_rank)
            source, rows = source[:per_rank], rows[:per_rank]
        self._sample += self.global_batch
        arrays = self._arrays(source, rows)  # one vectorised pass, then contiguous row slices
        return [self._tensors(arrays, i, i + self.micro_batch_size) for i in range(0, per_rank, self.micro_batch_size)]

    def _prefetch(self, source: np.ndarray, rows: np.ndarray, current: int) -> None:
        """Tell each remote source's cache the rows of the next steps (`current` of them this step's)."""
        for s in self._remote:
            mine = source == s if self.mixture is not None else slice(None)
            now = int(np.count_nonzero(source[:current] == s)) if self.mixture is not None else current
            self.splits[s].cache.want(rows[mine], now)

    def state_dict(self) -> dict:
        """{seed, epoch, cursor, ...}: the next sample is g = epoch * num_rows + cursor (num_rows
        summed over the sources of a mixture); the rest identifies the data it belongs to."""
        epoch, cursor = divmod(self._sample, self.num_rows)
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": int(epoch),
            "cursor": int(cursor),
            "split": self.split_name,
            "shuffle": self.shuffle,
            "global_batch": self.global_batch,
            "sources": [
                {"path": str(p), "weight": w, "fingerprint": d.fingerprint, "rows": n}
                for (p, w), d, n in zip(self.sources, self.data, self.rows)
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (any world size / micro-batch layout)."""
        try:
            version, seed, epoch, cursor = state["version"], int(state["seed"]), int(state["epoch"]), int(state["cursor"])
            saved = [(s["fingerprint"], int(s["rows"]), float(s["weight"])) for s in state["sources"]]
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"loader state is malformed ({err!r}); resume from a checkpoint written by llmtrain") from None
        if version != STATE_VERSION:
            raise UserError(
                f"loader state version {version} is not supported (expected {STATE_VERSION}); resume with the llmtrain that wrote it"
            )
        current = [(d.fingerprint, n, w) for d, n, (_, w) in zip(self.data, self.rows, self.sources)]
        if saved != current:
            raise UserError(
                "the checkpoint's loader state belongs to other data (different sources, weights, tokenizer or row counts); "
                "resume with the same data.path / data.mixture, or start a new run"
            )
        self.seed = seed
        if self.mixture is not None:
            self.mixture = MixtureSchedule([w for _, w in self.sources], seed)
        self._perms.clear()
        self._sample = epoch * self.num_rows + cursor

    def realized_shares(self) -> dict[str, float]:
        """Each source's share of the samples (and tokens) served so far."""
        names = [str(p) for p, _ in self.sources]
        if self.mixture is None:
            return {names[0]: 1.0}
        counts = self.mixture.samples_before(self._sample)
        total = max(int(counts.sum()), 1)
        return {name: int(c) / total for name, c in zip(names, counts)}

    # -- order ---------------------------------------------------------------------------------

    def rows_for(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source index, row within that source's split)."""
        if self.mixture is None:
            source, local = np.zeros_like(g), g
        else:
            source, local = self.mixture.assign(g)
        rows = np.empty_like(g)
        for s in range(len(self.rows)) if self.mixture is not None else (0,):
            sel = source == s if self.mixture is not None else slice(None)
            epoch, index = np.divmod(local[sel], self.rows[s])
            if not self.shuffle or len(index) == 0:
                rows[sel] = index
                continue
            first, last = int(epoch.min()), int(epoch.max())
            if first == last:
                rows[sel] = self._permutation(s, first)(index)
                continue
            out = np.empty_like(index)
            for e in range(first, last + 1):
                at = epoch == e
                out[at] = self._permutation(s, e)(index[at])
            rows[sel] = out
        return source, rows

    def _permutation(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            perm = Permutation(self.rows[source], derive_key(self.seed, "rows", source, epoch))
            self._perms[key] = perm
            if len(self._perms) > 4:  # tables are up to 16 MB; a step touches at most two epochs
                self._perms.popitem(last=False)
        return perm

    # -- batches -------------------------------------------------------------------------------

    def _arrays(self, source: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, labels, position_ids), int64 [len(rows), seq_len] each."""
        n, L = len(rows), self.seq_len
        input_ids = np.empty((n, L), dtype=np.int64)
        labels = np.empty((n, L), dtype=np.int64)
        # flat positions where a segment (row, document, padding) starts
        resets = np.zeros(n * L, dtype=bool)
        resets[::L] = True
        for s in range(len(self.splits)) if self.mixture is not None else (0,):
            in_source = np.flatnonzero(source == s) if self.mixture is not None else np.arange(n)
            if len(in_source) == 0:
                continue
            split = self.splits[s]
            shard_of, local = split.locate(rows[in_source])
            if len(split.shards) == 1:
                self._fill(split.shards[0], in_source, local, input_ids, labels, resets)
                continue
            for k in np.unique(shard_of):
                at = shard_of == k
                self._fill(split.shards[int(k)], in_source[at], local[at], input_ids, labels, resets)
        starts = np.flatnonzero(resets)
        lengths = np.diff(starts, append=n * L)
        position_ids = (self._flat_arange(n * L) - np.repeat(starts, lengths)).reshape(n, L)
        return input_ids, labels, position_ids

    def _flat_arange(self, size: int) -> np.ndarray:
        cached = self.__dict__.get("_arange")
        if cached is None or len(cached) != size:
            cached = self.__dict__["_arange"] = np.arange(size, dtype=np.int64)
        return cached

    @staticmethod
    def _tensors(arrays: tuple[np.ndarray, ...], start: int, stop: int) -> dict:
        import torch

        input_ids, labels, position_ids = (torch.from_numpy(a[start:stop]) for a in arrays)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    @staticmethod
    def _fill(shard, out: np.ndarray, r: np.ndarray, input_ids, labels, resets: np.ndarray) -> None:
        """Rows `r` of one shard -> batch rows `out` (vectorised over the rows)."""
        shard = shard.mapped()  # a shard in object storage: its memory map in the node's cache
        L = input_ids.shape[1]
        block = shard.tokens[r]  # [k, L] gather
        input_ids[out] = block
        labels[out, :-1] = block[:, 1:]
        labels[out, -1] = shard.tokens[np.minimum(r + 1, shard.rows - 1), 0]
        last = r + 1 == shard.rows
        if last.any():
            final = out[last][0]
            labels[final, -1] = IGNORE if shard.next_token is None else shard.next_token
            if shard.next_token is None:  # the split's final row: padding (if any) carries no loss
                labels[final, shard.real_tokens - (shard.rows - 1) * L - 1 :] = IGNORE
        first, stop = shard.starts_offsets[r].astype(np.int64), shard.starts_offsets[r + 1].astype(np.int64)
        counts = stop - first
        total = int(counts.sum())
        if total:
            # concatenate the ranges values[first[i]:stop[i]] without a Python loop
            begin = np.cumsum(counts) - counts
            where = np.repeat(first - begin, counts) + np.arange(total)
            resets[np.repeat(out * L, counts) + shard.starts_values[where]] = True
