"""Packing: one split's continuous token stream -> fixed-length rows -> shards on disk.

    writer = SplitWriter(tmp_dir, "train", seq_len=256, dtype="uint16", rows_per_shard=1000, pad_id=3)
    writer.add(ids, lengths)        # documents already wrapped as [BOS] ... [EOS]
    entries = writer.finish()       # manifest entries, one per shard

Documents are appended to the stream in order and cut into rows of exactly `seq_len`; a shard
is written once `rows_per_shard` rows *and one more token* are available, so its `next_token`
(the first token of the following shard) is known. At the end the remainder becomes the last
shard, whose final row is padded with `pad_id`. See `llmtrain.data.shards` for the row format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from llmtrain.data.shards import DTYPES, shard_name, write_shard


class SplitWriter:
    def __init__(self, out_dir: Path, split: str, seq_len: int, dtype: str, rows_per_shard: int, pad_id: int):
        self.out_dir, self.split, self.seq_len, self.dtype = Path(out_dir), split, seq_len, dtype
        self.np_dtype = DTYPES[dtype]
        self.max_id = int(np.iinfo(self.np_dtype).max)
        self.shard_len = rows_per_shard * seq_len
        self.pad_id = pad_id
        self.buf = np.empty(0, dtype=self.np_dtype)  # pending stream tokens
        self.fill = 0
        self.starts: list[np.ndarray] = []  # stream positions (relative to buf) of document starts
        self.entries: list[dict] = []
        self.documents = 0
        self.tokens = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if int(ids.max()) > self.max_id or int(ids.min()) < 0:
            raise ValueError(f"token id {int(ids.max())} does not fit {self.dtype}")
        need = self.fill + len(ids)
        if need > len(self.buf):
            grown = np.empty(max(need, 2 * len(self.buf), self.shard_len + 1), dtype=self.np_dtype)
            grown[: self.fill] = self.buf[: self.fill]
            self.buf = grown
        self.buf[self.fill : need] = ids
        self.starts.append(self.fill + np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64))
        self.fill = need
        self.documents += len(lengths)
        self.tokens += len(ids)
        while self.fill > self.shard_len:
            self._cut(self.shard_len, next_token=int(self.buf[self.shard_len]))

    def finish(self) -> list[dict]:
        if self.fill:
            self._cut(self.fill, next_token=None)
        return self.entries

    def _cut(self, n: int, next_token: Optional[int]) -> None:
        L = self.seq_len
        rows = -(-n // L)
        tokens = np.full(rows * L, self.pad_id, dtype=self.np_dtype)
        tokens[:n] = self.buf[:n]
        starts = np.concatenate(self.starts) if self.starts else np.zeros(0, dtype=np.int64)
        here, rest = starts[starts < n], starts[starts >= n]
        if n < rows * L:
            here = np.append(here, n)  # the padding starts a segment of its own
        row_of = here // L
        offsets = np.searchsorted(row_of, np.arange(rows + 1), side="left").astype(np.int32)
        path = self.out_dir / shard_name(self.split, len(self.entries))
        entry = write_shard(path, tokens.reshape(rows, L), offsets, (here % L).astype(np.int32), self.dtype)
        entry["tokens"] = int(n)
        entry["next_token"] = next_token
        self.entries.append(entry)
        # keep the remainder
        remaining = self.fill - n
        self.buf[:remaining] = self.buf[n : self.fill]
        self.fill = remaining
        self.starts = [rest - n] if len(rest) else []
