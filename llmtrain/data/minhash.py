"""Near-duplicate documents: MinHash signatures, LSH banding, candidate verification and
connected components, so each cluster of near-copies keeps exactly one document (the one with
the smallest `order`, i.e. the first in input order).

    cfg = MinHashConfig.from_dict({"enabled": True})          # 20 bands x 7 rows, J >= 0.8
    drop = near_duplicates(texts, np.arange(len(texts)), cfg)  # sorted orders to remove

The same steps, hash-partitioned (what llmtrain.data.pipeline runs on Ray Data):

    sigs = signatures(texts, cfg)                   # [n, num_perm] uint32, per document
    keys = band_keys(sigs, cfg)                     # [n, bands] uint64 (< 2**63), per document
    # rows (band_key, order) -> partition band_key % P; in each partition:
    edges = candidate_edges(part_keys, part_orders)  # [m, 2] int64 stars, a < b
    # on the driver: all partitions' edges, then the signatures of their endpoints only
    edges = verify_edges(np.concatenate(all_edges), endpoint_orders, endpoint_sigs, cfg)
    drop, root = clusters(edges)

`candidate_edges(part_keys, part_orders, part_sigs, cfg)` verifies inside the partition
instead, with the same result, if each band row carries its document's signature (bands times
the signature bytes through the shuffle, so the driver-side `verify_edges` is usually cheaper).
Nothing depends on the number of partitions or on how rows reach them: each band key's star
is a function of the set of its (band_key, order) rows, and the components of the union of
the stars do not depend on the order edges arrive in.

Shingles (as datatrove's MinhashDedupSignature, minus its language-specific word tokenizer):
the text is lowercased; a word is a maximal run of ASCII letters and digits or non-ASCII
bytes, except that UTF-8 punctuation U+00A0-U+00BF and U+2000-U+207F (no-break space, curly
quotes, dashes, ellipsis, ...) separates words like ASCII punctuation does; shingles are the
`ngram` consecutive words of a document (one shingle of all its words when it has fewer, one
of its whole lowercased text when it has none). Scripts written without spaces (Chinese,
Japanese, Thai) therefore get very few shingles and are matched almost only when equal.

Hashing, stable across processes, platforms and numpy versions (no `hash()`, no numpy RNG):
each word once by a polynomial hash over its UTF-8 bytes (prefix sums modulo 2**64) and the
murmur3 64-bit finalizer; a shingle is sum_j word[i+j] * M_j mod 2**64, finalized, top 32
bits; permutation p is x -> (a_p * x + b_p) mod 2**32 with a_p odd (a bijection), a_p and b_p
from BLAKE2b of (seed, p); the signature is the minimum per permutation, as a
[shingles x permutations] array operation in chunks that stay in cache.

Banding: band j of the signature (rows j*rows .. j*rows+rows-1) hashes to 56 bits, and
`band_key = j << 56 | hash`, so equal values in different bands never share a key, keys fit
in int64, and `band_key % P` spreads over partitions by the hash bits.

Defaults and their sources:
- ngram = 5 words: datatrove / FineWeb (`MinhashConfig.n_grams`).
- rows = 7, bands = 20 (num_perm 140): datatrove's 14 x 8 gives P(candidate | J=0.8) =
  1-(1-0.8**8)**14 = 0.924 only (FineWeb accepts the misses); NeMo Curator uses 20 bands
  (`num_buckets`) of 13, whose midpoint is J ~ 0.79 (P = 0.68 at 0.8). We keep NeMo's 20 bands
  and shorten the rows to 7 so that LSH alone misses under 1% of pairs at J = 0.8, and leave
  precision to the verification below. S-curve P(candidate) = 1-(1-J**7)**20:
      J       0.3    0.5    0.6    0.7    0.75   0.8    0.85   0.9
      cand.   0.004  0.145  0.433  0.821  0.943  0.991  0.999  1.000
      edge    0.000  0.000  0.000  0.168  0.652  0.966  0.999  1.000
  ("edge": candidate and verified, with verify on; from `s_curve`, which treats the two as
  independent; a shared band only raises the estimate, so the measured rate is a little higher).
- threshold = 0.8: the Jaccard similarity asked for; datatrove's and NeMo Curator's target.
- seed = 1: datatrove's.

Verification (`verify`, on by default; NeMo Curator's `false_positive_check` does the same
with exact Jaccard from the text): a candidate pair is an edge when the fraction of equal
signature positions is at least `verify_threshold` = threshold - 2 * sqrt(threshold *
(1 - threshold) / num_perm) (0.732 by default: 103 of 140 positions). The estimate of a pair at
exactly J = threshold falls below the threshold half of the time; two standard errors below
keeps 97.5% of them, so LSH x verification finds 0.966 of the pairs at J = 0.8 and more above,
while pairs at J <= 0.6 merge with P < 0.001. Without verification every candidate is an edge
(datatrove's behaviour: 14.5% of pairs at J = 0.5 would merge). Measured on
benchmarks/planted_corpus.py (12,000 documents, copies uniform in J 0.5-1.0), the fraction of
copies merged with their source per J: 0.60-0.65 0.005, 0.65-0.70 0.07, 0.70-0.75 0.44,
0.75-0.80 0.87, 0.80-0.85 0.99, above 1.00 (unverified: 0.20 already at 0.50-0.55).

Clusters are the connected components of the verified edges, so a chain of near-copies (A~B,
B~C) is one cluster even when A and C are further apart than the threshold: as in datatrove
and NeMo Curator. Each band key contributes a star (every member to the key's smallest
order): O(members), not all pairs; a member verified against no star centre in any band is
left out, which costs a fraction of a percent of recall when copies of one source fall in a
band whose smallest order is another copy, not the source.

`enabled` is read by the pipeline; the functions here always run.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from functools import cache, lru_cache
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from llmtrain.errors import UserError

MAX_PERM = 1024  # signature width a config may ask for (cost is linear in it)
MAX_BANDS = 127  # the band index takes bits 56..62 of a key, so keys stay below 2**63
VERIFY_Z = 2.0  # standard errors below the threshold that a verified estimate may fall
BATCH_BYTES = 1 << 20  # text per vectorised batch (a longer document is a batch of its own)
_CHUNK = 4096  # shingles per permutation block: [num_perm, _CHUNK] uint32 stays in L2
_BAND_BITS = 56
_U64 = np.uint64


@dataclass(frozen=True)
class MinHashConfig:
    enabled: bool = False  # run near-dedup in the pipeline (read by llmtrain.data.pipeline)
    ngram: int = 5  # words per shingle (datatrove / FineWeb: 5)
    bands: int = 20  # LSH bands (NeMo Curator: 20; datatrove: 14)
    rows: int = 7  # signature rows per band (datatrove: 8, NeMo Curator: 13); see the module doc
    threshold: float = 0.8  # Jaccard similarity of word n-gram sets that makes a near-duplicate
    verify: bool = True  # drop candidate pairs whose signature estimate is below verify_threshold
    seed: int = 1  # permutation parameters (datatrove: 1); all workers must use the same

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def verify_threshold(self) -> float:
        t = self.threshold
        return t - VERIFY_Z * math.sqrt(t * (1 - t) / self.num_perm)

    @property
    def min_matches(self) -> int:
        """Equal signature positions a verified pair needs: ceil(verify_threshold * num_perm)."""
        return max(1, math.ceil(self.verify_threshold * self.num_perm - 1e-9))

    def check(self) -> None:
        _require_bool("enabled", self.enabled)
        _require_bool("verify", self.verify)
        _require_int("ngram", self.ngram, 1, 32, 5)
        _require_int("bands", self.bands, 1, MAX_BANDS, 20)
        _require_int("rows", self.rows, 1, MAX_PERM, 7)
        _require_int("seed", self.seed, 0, 2**63 - 1, 1)
        if self.num_perm > MAX_PERM:
            raise UserError(
                f"minhash.bands x minhash.rows = {self.num_perm}: at most {MAX_PERM} permutations; lower bands or rows (default 20 x 7)"
            )
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise UserError(f"minhash.threshold = {t!r}: must be a Jaccard similarity in (0, 1]; e.g. minhash.threshold=0.8")

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> MinHashConfig:
        """The config from a mapping of some of its fields (None: the defaults), checked."""
        d = dict(d or {})
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise UserError(f"minhash.{key}: unknown key; use one of {', '.join(known)}")
        cfg = cls(**d)
        cfg.check()
        return cfg


def _require_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UserError(f"minhash.{key} = {value!r}: must be true or false")


def _require_int(key: str, value: Any, lo: int, hi: int, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise UserError(f"minhash.{key} = {value!r}: must be an integer in {lo}..{hi}; e.g. minhash.{key}={example}")


def s_curve(j: float, cfg: MinHashConfig) -> tuple[float, float]:
    """(P(candidate), P(edge)) for a pair at Jaccard `j`: 1-(1-j**rows)**bands, and that times
    P(Binomial(num_perm, j) >= min_matches) when `verify` (treated as independent)."""
    p_cand = 1.0 - (1.0 - j**cfg.rows) ** cfg.bands
    if not cfg.verify:
        return p_cand, p_cand
    k, m = cfg.num_perm, cfg.min_matches
    p_ver = sum(math.comb(k, i) * j**i * (1.0 - j) ** (k - i) for i in range(m, k + 1))
    return p_cand, p_cand * p_ver


# ---------------------------------------------------------------------------------------------
# Stable constants


def _blake_u64(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "little")


@cache
def _odd_constants(label: str, n: int) -> np.ndarray:
    return np.array([_blake_u64(f"llmtrain.minhash:{label}:{i}") | 1 for i in range(n)], dtype=_U64)


@lru_cache(maxsize=16)
def _permutations(seed: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """(a [num_perm, 1], b [num_perm, 1]) uint32, a odd: permutation p is (a_p * x + b_p) mod 2**32."""
    v = np.array([_blake_u64(f"llmtrain.minhash:perm:{seed}:{p}") for p in range(num_perm)], dtype=_U64)
    a = ((v & _U64(0xFFFFFFFF)) | _U64(1)).astype(np.uint32)
    b = (v >> _U64(32)).astype(np.uint32)
    return a[:, None].copy(), b[:, None].copy()


_BASE = 0x100000001B3  # FNV-1 64-bit prime: odd, so invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_pow = np.ones(1, dtype=_U64)
_inv = np.ones(1, dtype=_U64)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B**i, B**-i) mod 2**64 for i < n, cached and grown by doubling."""
    global _pow, _inv
    if len(_pow) < n:
        m = max(n, 2 * len(_pow))
        p = np.empty(m, dtype=_U64)
        q = np.empty(m, dtype=_U64)
        p[0] = q[0] = 1
        np.cumprod(np.full(m - 1, _BASE, dtype=_U64), out=p[1:])
        np.cumprod(np.full(m - 1, _BASE_INV, dtype=_U64), out=q[1:])
        _pow, _inv = p, q
    return _pow, _inv


def _fmix64(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finalizer, in place."""
    x ^= x >> _U64(33)
    x *= _U64(0xFF51AFD7ED558CCD)
    x ^= x >> _U64(33)
    x *= _U64(0xC4CEB9FE1A85EC53)
    x ^= x >> _U64(33)
    return x


# Word bytes: ASCII letters and digits (the text is lowercased first) and every non-ASCII byte.
_WORD = np.zeros(256, dtype=bool)
_WORD[ord("0") : ord("9") + 1] = True
_WORD[ord("a") : ord("z") + 1] = True
_WORD[ord("A") : ord("Z") + 1] = True  # uppercase that str.lower() leaves (none in practice)
_WORD[0x80:] = True


# ---------------------------------------------------------------------------------------------
# Signatures


def _word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """(hash of every word of every text [W] uint64, words per text [n], the lowercased UTF-8)."""
    enc = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
    lens = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
    data = np.frombuffer(b"\n".join(enc), dtype=np.uint8)  # "\n" is never a word byte
    word = _WORD[data]
    # UTF-8 punctuation separates words: U+2000-U+207F (E2 80 xx, E2 81 xx), U+00A0-U+00BF (C2 A0-BF)
    at = np.flatnonzero(data[:-2] == 0xE2)
    at = at[(data[at + 1] == 0x80) | (data[at + 1] == 0x81)]
    word[at] = word[at + 1] = word[at + 2] = False
    at = np.flatnonzero(data[:-1] == 0xC2)
    at = at[data[at + 1] >= 0xA0]
    word[at] = word[at + 1] = False
    step = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(step == 1)
    ends = np.flatnonzero(step == -1)
    # polynomial hash of bytes [s, e): (P[e] - P[s]) * B**-s, with P the prefix sums of (byte+1) * B**i
    pw, inv = _powers(len(data) + 1)
    prefix = np.empty(len(data) + 1, dtype=_U64)
    prefix[0] = 0
    terms = data.astype(_U64)
    terms += _U64(1)
    terms *= pw[: len(data)]
    np.cumsum(terms, out=prefix[1:])
    h = prefix[ends] - prefix[starts]
    h *= inv[starts]
    _fmix64(h)
    doc_start = np.concatenate([[0], np.cumsum(lens + 1)[:-1]]) if len(enc) else np.zeros(0, np.int64)
    counts = np.diff(np.searchsorted(starts, np.append(doc_start, len(data) + 1)))
    return h, counts, enc


def _shingle_hashes(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every shingle [S] uint64 grouped by text, first shingle of each text [n]).
    Every text has at least one shingle."""
    h, counts, enc = _word_hashes(texts)
    n = len(texts)
    mult = _odd_constants("shingle", ngram)
    first_word = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    doc = np.repeat(np.arange(n), counts)
    parts_s, parts_d = [], []
    span = len(h) - ngram + 1
    if span > 0:
        s = h[:span] * mult[0]
        for j in range(1, ngram):
            s += h[j : j + span] * mult[j]
        inside = doc[:span] == doc[ngram - 1 :]
        parts_s.append(s[inside])
        parts_d.append(doc[:span][inside])
    short = np.flatnonzero((counts > 0) & (counts < ngram))
    if len(short):  # fewer words than ngram: one shingle of all of them
        s = np.zeros(len(short), dtype=_U64)
        for j in range(ngram - 1):
            m = counts[short] > j
            s[m] += h[first_word[short[m]] + j] * mult[j]
        parts_s.append(s)
        parts_d.append(short)
    empty = np.flatnonzero(counts == 0)
    if len(empty):  # no words at all: one shingle of the whole lowercased text
        parts_s.append(np.array([_blake_u64_bytes(enc[i]) for i in empty], dtype=_U64))
        parts_d.append(empty)
    s = np.concatenate(parts_s) if parts_s else np.zeros(0, _U64)
    d = np.concatenate(parts_d) if parts_d else np.zeros(0, np.int64)
    if len(parts_s) > 1:
        by_doc = np.argsort(d, kind="stable")
        s, d = s[by_doc], d[by_doc]
    _fmix64(s)
    return s, np.searchsorted(d, np.arange(n))


def shingle_sets(texts: Sequence[str], ngram: int = 5) -> list[np.ndarray]:
    """The set of 64-bit shingle hashes of each text (sorted, unique uint64): what the
    signatures estimate the Jaccard similarity of."""
    out: list[np.ndarray] = []
    for lo, hi in _batches(texts):
        s, first = _shingle_hashes(texts[lo:hi], ngram)
        out += [np.unique(part) for part in np.split(s, first[1:])]
    return out


def _batches(texts: Sequence[str]) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of `texts` of about BATCH_BYTES characters (at least one text each)."""
    lo = 0
    while lo < len(texts):
        hi, size = lo, 0
        while hi < len(texts) and (hi == lo or size + len(texts[hi]) <= BATCH_BYTES):
            size += len(texts[hi])
            hi += 1
        yield lo, hi
        lo = hi


def _blake_u64_bytes(b: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")


def _min_hash(x: np.ndarray, first: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signatures [n, num_perm]: per text (shingles x[first[i]:first[i+1]]) the minimum of
    (a * x + b) mod 2**32 per permutation, computed on [num_perm, _CHUNK] blocks."""
    k, n, total = len(a), len(first), len(x)
    out = np.full((k, n), 0xFFFFFFFF, dtype=np.uint32)
    buf = np.empty((k, _CHUNK), dtype=np.uint32)
    for lo in range(0, total, _CHUNK):
        hi = min(lo + _CHUNK, total)
        v = buf[:, : hi - lo]
        np.multiply(a, x[None, lo:hi], out=v)
        v += b
        d0 = int(np.searchsorted(first, lo, "right")) - 1
        d1 = int(np.searchsorted(first, hi, "left"))
        seg = np.maximum(first[d0:d1], lo) - lo
        block = out[:, d0:d1]
        np.minimum(block, np.minimum.reduceat(v, seg, axis=1), out=block)
    return np.ascontiguousarray(out.T)


def signatures(texts: Sequence[str], cfg: MinHashConfig) -> np.ndarray:
    """MinHash signatures [len(texts), num_perm] uint32 of word `ngram` shingles."""
    cfg.check()
    a, b = _permutations(int(cfg.seed), cfg.num_perm)
    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    for lo, hi in _batches(texts):
        s, first = _shingle_hashes(texts[lo:hi], cfg.ngram)
        out[lo:hi] = _min_hash((s >> _U64(32)).astype(np.uint32), first, a, b)
    return out


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal positions: the MinHash estimate of the Jaccard similarity (per row)."""
    return (np.asarray(sig_a) == np.asarray(sig_b)).mean(axis=-1)


# ---------------------------------------------------------------------------------------------
# LSH


def band_keys(sigs: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """Band keys [n, bands] uint64 (< 2**63): band j's rows hashed to 56 bits, j in bits 56..62."""
    sigs = np.asarray(sigs)
    if sigs.ndim != 2 or sigs.shape[1] != cfg.num_perm:
        raise ValueError(f"band_keys: signatures of shape {sigs.shape}, expected [n, {cfg.num_perm}]")
    n = len(sigs)
    v = sigs.reshape(n, cfg.bands, cfg.rows).astype(_U64)
    v *= _odd_constants("row", cfg.rows)
    h = v.sum(axis=2, dtype=_U64)
    h += _odd_constants("band", cfg.bands)
    _fmix64(h)
    h >>= _U64(64 - _BAND_BITS)
    h |= np.arange(cfg.bands, dtype=_U64) << _U64(_BAND_BITS)
    return h


def _unique_edges(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    idx = np.lexsort((b, a))
    a, b = a[idx], b[idx]
    keep = np.concatenate([[True], (a[1:] != a[:-1]) | (b[1:] != b[:-1])])
    return np.stack([a[keep], b[keep]], axis=1).astype(np.int64)


def _equal_positions(sa: np.ndarray, sb: np.ndarray, block: int = 1 << 14) -> np.ndarray:
    out = np.empty(len(sa), dtype=np.int64)
    for lo in range(0, len(sa), block):
        out[lo : lo + block] = (sa[lo : lo + block] == sb[lo : lo + block]).sum(axis=1)
    return out


def candidate_edges(
    keys: np.ndarray, orders: np.ndarray, sigs: Optional[np.ndarray] = None, cfg: Optional[MinHashConfig] = None
) -> np.ndarray:
    """One partition's edges [m, 2] int64, (a, b) with a < b, each pair once: for every band key
    shared by >= 2 orders, each member joined to the key's smallest order (a star).

    Rows are (keys[i], orders[i]) (1-D, one row per document and band), or keys [n, bands] with
    orders [n]. With `sigs` (the signature of each row's document, [rows, num_perm] or [n,
    num_perm] beside 2-D keys) and `cfg`, only edges that pass `cfg`'s verification are kept,
    the same edges `verify_edges` keeps afterwards."""
    keys = np.asarray(keys)
    orders = np.asarray(orders, dtype=np.int64)
    rows = None
    if keys.ndim == 2:
        if orders.shape != (len(keys),):
            raise ValueError(f"candidate_edges: keys {keys.shape} need orders of shape ({len(keys)},), got {orders.shape}")
        rows = np.repeat(np.arange(len(keys)), keys.shape[1])
        orders = orders[rows]
        keys = keys.reshape(-1)
    if keys.shape != orders.shape:
        raise ValueError(f"candidate_edges: keys {keys.shape} and orders {orders.shape} differ")
    keys = keys.astype(_U64, copy=False)
    idx = np.lexsort((orders, keys))
    k, o = keys[idx], orders[idx]
    head = np.concatenate([[True], k[1:] != k[:-1]])
    centre = np.maximum.accumulate(np.where(head, np.arange(len(k)), 0))
    member = ~head & (o != o[centre])
    a, b = o[centre[member]], o[member]
    if sigs is not None:
        if cfg is None:
            raise ValueError("candidate_edges: verifying with sigs needs cfg")
        if cfg.verify:
            ra, rb = idx[centre[member]], idx[member]
            if rows is not None:
                ra, rb = rows[ra], rows[rb]
            sigs = np.asarray(sigs)
            ok = _equal_positions(sigs[ra], sigs[rb]) >= cfg.min_matches
            a, b = a[ok], b[ok]
    return _unique_edges(a, b)


def verify_edges(edges: np.ndarray, orders: np.ndarray, sigs: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """The unique edges whose endpoints' signatures agree in >= `cfg.min_matches` positions
    (all of them, deduplicated, when `cfg.verify` is off). `orders` [u] and `sigs` [u, num_perm]
    hold the signature of (at least) every order in `edges`, in any order."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    edges = _unique_edges(edges[:, 0], edges[:, 1])
    if not cfg.verify or len(edges) == 0:
        return edges
    orders = np.asarray(orders, dtype=np.int64)
    if len(orders) == 0:
        raise ValueError(f"verify_edges: no signature for order {int(edges[0, 0])}")
    sorter = np.argsort(orders, kind="stable")
    at = sorter[np.searchsorted(orders, edges, sorter=sorter).clip(max=len(orders) - 1)]
    missing = orders[at] != edges
    if missing.any():
        raise ValueError(f"verify_edges: no signature for order {int(edges[missing][0])}")
    sigs = np.asarray(sigs)
    ok = _equal_positions(sigs[at[:, 0]], sigs[at[:, 1]]) >= cfg.min_matches
    return edges[ok]


def clusters(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of `edges` [m, 2]: (orders to drop, their component's root), both
    int64 and sorted by the dropped order; the root is the smallest order of the component and
    is not dropped. Hook each edge's larger root under its smaller one, compress, repeat."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    nodes, inv = np.unique(edges, return_inverse=True)
    inv = inv.reshape(-1, 2)
    a, b = inv[:, 0], inv[:, 1]
    parent = np.arange(len(nodes))
    while len(a):
        pa, pb = parent[a], parent[b]
        apart = pa != pb
        a, b, pa, pb = a[apart], b[apart], pa[apart], pb[apart]
        if len(a) == 0:
            break
        np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))
        while True:  # pointer jumping until every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    moved = np.flatnonzero(parent != np.arange(len(nodes)))
    return nodes[moved], nodes[parent[moved]]


def near_duplicates(texts: Sequence[str], orders: Optional[np.ndarray] = None, cfg: Optional[MinHashConfig] = None) -> np.ndarray:
    """Single-process reference: the sorted orders (default 0..n-1) of every document that a
    near-duplicate with a smaller order replaces (`cfg` default: MinHashConfig())."""
    cfg = cfg or MinHashConfig()
    orders = np.arange(len(texts), dtype=np.int64) if orders is None else np.asarray(orders, dtype=np.int64)
    if orders.shape != (len(texts),):
        raise ValueError(f"near_duplicates: {len(texts)} texts but orders of shape {orders.shape}")
    sigs = signatures(texts, cfg)
    edges = candidate_edges(band_keys(sigs, cfg), orders, sigs, cfg)
    return clusters(edges)[0]
