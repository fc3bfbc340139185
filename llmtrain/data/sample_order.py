"""Sample order as pure functions of (seed, position): seeded permutations that are never
materialised, and the block schedule that interleaves the sources of a weighted mixture.

    perm = Permutation(n=1_000_000, key=derive_key(seed, "rows", epoch))
    rows = perm(np.arange(start, start + 64))          # O(batch) work for any position

    mix = MixtureSchedule([0.7, 0.3], seed=0)
    source, index = mix.assign(np.arange(g, g + 64))    # which source, and its own sample index

`Permutation` is a keyed Feistel-style network on the next power of two >= n, restricted to
[0, n) by cycle walking: a bijection, so an epoch visits every row exactly once, computed per index, so
resuming at any position costs nothing and memory does not grow with the dataset.

`MixtureSchedule`: the stream is cut into blocks of `block` slots; each source gets a fixed
number of slots per block (largest-remainder rounding of its weight, at least one), and the
order of the slots inside block b is a seeded permutation of block b. Sample g therefore maps
to (source, that source's k-th sample) in O(1), every source keeps its own epochs, and the
realised shares equal the slot shares exactly at every block boundary.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def derive_key(*parts: object) -> int:
    """A 64-bit key from any printable parts (stable across runs, platforms and versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixing 64-bit hash (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A keyed pseudo-random bijection of [0, n), evaluated per index.

    x in [0, 2^bits) (2^bits < 2n) is split into a high and a low part; each round XORs a keyed
    hash of one part into the other (each round is invertible, so the whole is a bijection);
    values that land outside [0, n) are encrypted again until they land inside (cycle
    walking keeps it a bijection of [0, n)). Small domains are tabulated once: same values.
    """

    TABLE_MAX = 1 << 22  # tabulate up to 4M entries (16 MB); beyond that evaluate per call

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.low_bits = np.uint64(bits // 2)
        self.low_mask = np.uint64((1 << (bits // 2)) - 1)
        self.high_mask = np.uint64((1 << (bits - bits // 2)) - 1)
        self.keys = [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]
        self.table = (
            self._evaluate(np.arange(n, dtype=np.int64)).astype(np.int32 if n < 2**31 else np.int64)
            if n <= self.TABLE_MAX
            else None
        )

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        high, low = x >> self.low_bits, x & self.low_mask
        for i, k in enumerate(self.keys):
            if i % 2 == 0:
                high = high ^ (_mix(low ^ k) & self.high_mask)
            else:
                low = low ^ (_mix(high ^ k) & self.low_mask)
        return (high << self.low_bits) | low

    def _evaluate(self, index: np.ndarray) -> np.ndarray:
        out = self._encrypt(index.astype(np.uint64))
        outside = np.flatnonzero(out >= np.uint64(self.n))
        while len(outside):  # cycle walking; the domain is < 2n, so few rounds
            out[outside] = self._encrypt(out[outside])
            outside = outside[out[outside] >= np.uint64(self.n)]
        return out.astype(np.int64)

    def __call__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"permutation index out of range [0, {self.n})")
        if self.table is not None:
            return self.table[index].astype(np.int64)
        return self._evaluate(index)


class MixtureSchedule:
    """Interleave sources by weight; see the module docstring."""

    def __init__(self, weights: list[float], seed: int, block: int = 1000):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or not np.all(w > 0):
            raise ValueError("mixture weights must be > 0")
        block = max(block, int(np.ceil(w.sum() / w.min())))  # every source gets a slot
        raw = w / w.sum() * block
        counts = np.floor(raw).astype(np.int64)
        extra = block - int(counts.sum())
        counts[np.argsort(-(raw - counts), kind="stable")[:extra]] += 1
        zero = counts == 0
        if zero.any():  # only possible through rounding; take the slot from the largest source
            for i in np.flatnonzero(zero):
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
        self.block = block
        self.counts = counts
        self.seed = seed
        self._base = np.repeat(np.arange(len(w)), counts)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def shares(self) -> np.ndarray:
        return self.counts / self.block

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, rank of the slot among its source's slots) for block b."""
        hit = self._cache.get(b)
        if hit is not None:
            self._cache.move_to_end(b)
            return hit
        order = self._base[Permutation(self.block, derive_key(self.seed, "mixture", b))(np.arange(self.block))]
        rank = np.empty(self.block, dtype=np.int64)
        for s in range(len(self.counts)):
            where = np.flatnonzero(order == s)
            rank[where] = np.arange(len(where))
        self._cache[b] = (order, rank)
        if len(self._cache) > 8:
            self._cache.popitem(last=False)
        return order, rank

    def assign(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source, index within that source's own stream)."""
        g = np.asarray(g, dtype=np.int64)
        blocks, slots = g // self.block, g % self.block
        source = np.empty_like(g)
        local = np.empty_like(g)
        for b in np.unique(blocks):
            sel = blocks == b
            order, rank = self._block(int(b))
            s = order[slots[sel]]
            source[sel] = s
            local[sel] = int(b) * self.counts[s] + rank[slots[sel]]
        return source, local

    def samples_before(self, g: int) -> np.ndarray:
        """How many of the first g samples each source supplied."""
        full, part = divmod(int(g), self.block)
        counts = full * self.counts
        if part:
            order, _ = self._block(full)
            counts = counts + np.bincount(order[:part], minlength=len(self.counts))
        return counts
