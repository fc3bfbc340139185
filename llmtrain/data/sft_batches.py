"""Packing of SFT examples into rows, and the batches the training loop takes from them.

    order, rows = pack_rows(lengths, seq_len=512, packing=True)   # best-fit decreasing
    batches = SFTBatches(SFTSplit.open(cache, "train"), seq_len=512, pad_id=0, micro_batch_size=2,
                         grad_accum=4, rank=0, world_size=2, seed=0)
    for mb in batches.next_step(): ...      # input_ids / labels / position_ids, as TokenLoader's

Packing puts several examples in one row of `seq_len` tokens (best-fit decreasing: each example,
longest first, goes into the fullest row it still fits in); `packing=False` gives one example
per row. In a batch, position ids restart at 0 at every example start (and at the padding), so
attention stays inside each example exactly as for pretraining's packed documents, and
`labels[t]` is token t+1 when that token is an assistant token of the same example, else -100.

Sample order is the pretraining loader's: the global sample g is row perm(seed, epoch)(g mod
rows) with the seeded permutation of `llmtrain.data.sample_order`, a step takes one global batch of
consecutive samples and rank r its contiguous share, so the state is (seed, g) and resume is O(1).
`wrap=False` (validation) serves each row once and pads the last step with empty rows (no
supervised tokens), so every rank runs the same number of forward passes (ZeRO-3 needs that).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from llmtrain.data.sample_order import Permutation, derive_key
from llmtrain.errors import UserError

IGNORE = -100


def pack_rows(lengths: np.ndarray, seq_len: int, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """(example order, row offsets into that order): row r holds order[rows[r]:rows[r+1]]."""
    n = len(lengths)
    if not packing or n == 0:
        return np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64)
    if int(lengths.max()) > seq_len:
        raise ValueError(f"an example of {int(lengths.max())} tokens does not fit seq_len {seq_len}")
    free_rows: list[list[int]] = [[] for _ in range(seq_len + 1)]  # rows by remaining capacity
    has_free = np.zeros(seq_len + 1, dtype=bool)
    members: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        size = int(lengths[i])
        k = int(np.argmax(has_free[size:]))
        if has_free[size + k]:
            room = size + k
            row = free_rows[room].pop()
            has_free[room] = bool(free_rows[room])
        else:
            room, row = seq_len, len(members)
            members.append([])
        members[row].append(int(i))
        left = room - size
        if left > 0:
            free_rows[left].append(row)
            has_free[left] = True
    order = np.fromiter((i for row in members for i in row), dtype=np.int64, count=n)
    rows = np.zeros(len(members) + 1, dtype=np.int64)
    np.cumsum([len(m) for m in members], out=rows[1:])
    return order, rows


def row_arrays(tokens: np.ndarray, mask: np.ndarray, starts: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """One packed row -> (input_ids, labels, position_ids), int64 [seq_len] each. `starts`:
    offsets of the examples in the row (the first is 0)."""
    n = len(tokens)
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    input_ids[:n] = tokens
    if n > 1:
        labels[: n - 1] = np.where(mask[1:] != 0, tokens[1:], IGNORE)
    ends = np.append(np.asarray(starts[1:], dtype=np.int64), n) - 1
    labels[ends[ends >= 0]] = IGNORE  # the last token of an example predicts nothing
    segment = np.zeros(seq_len, dtype=bool)
    segment[np.asarray(starts, dtype=np.int64)] = True
    if n < seq_len:
        segment[n] = True  # padding is a segment of its own
    seg_starts = np.flatnonzero(segment)
    position_ids = np.arange(seq_len, dtype=np.int64) - np.repeat(seg_starts, np.diff(np.append(seg_starts, seq_len)))
    return input_ids, labels, position_ids


class SFTBatches:
    """Deterministic, rank-sharded, resumable batches of packed SFT rows (module docstring)."""

    def __init__(
        self,
        split,
        seq_len: int,
        pad_id: int,
        micro_batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        wrap: bool = True,
    ):
        self.split, self.seq_len, self.pad_id = split, seq_len, pad_id
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.wrap = int(seed), shuffle, wrap
        self.num_rows = split.num_rows
        self._sample = 0
        self._perm: Optional[tuple[int, Permutation]] = None

    def state_dict(self) -> dict:
        return {"kind": "sft", "seed": self.seed, "sample": self._sample, "rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "sft" or state.get("rows") != self.num_rows:
            raise UserError(
                f"the checkpoint's data position ({state}) is not from this SFT data ({self.num_rows} rows); "
                "resume with the same data and data settings, or use a new run.dir"
            )
        self.seed, self._sample = int(state["seed"]), int(state["sample"])

    def _row_index(self, g: int) -> Optional[int]:
        epoch, i = divmod(g, self.num_rows)
        if not self.wrap and epoch > 0:
            return None
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, Permutation(self.num_rows, derive_key(self.seed, "sft-rows", epoch)))
        return int(self._perm[1](np.asarray([i]))[0])

    def next_step(self) -> list[dict]:
        """This rank's `grad_accum` micro-batches of the next global batch."""
        import torch

        per_rank = self.micro_batch_size * self.grad_accum
        first = self._sample + self.rank * per_rank
        self._sample += per_rank * self.world_size
        arrays = [self._arrays(self._row_index(first + j)) for j in range(per_rank)]
        out = []
        for m in range(self.grad_accum):
            chunk = arrays[m * self.micro_batch_size : (m + 1) * self.micro_batch_size]
            ids, labels, pos = (torch.from_numpy(np.stack([c[k] for c in chunk])) for k in range(3))
            out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
        return out

    def _arrays(self, row: Optional[int]) -> tuple[np.ndarray, ...]:
        if row is None:
            empty = np.zeros(0, dtype=np.int64)
            return row_arrays(empty, empty, np.zeros(1, dtype=np.int64), self.seq_len, self.pad_id)
        return row_arrays(*self.split.row(row), self.seq_len, self.pad_id)
