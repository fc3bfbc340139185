"""A corpus with planted near-duplicates at known Jaccard similarities, and the score of a
near-dedup result against it (recall, distinct documents removed, precision).

    .venv/bin/python benchmarks/planted_corpus.py --out /tmp/planted --mb 2000 --workers 8   # JSONL + truth.json

    paragraphs = load_paragraphs()                                  # ../shared/data/corpus
    docs, truth = generate(paragraphs, n_distinct=2000, n_dups=500, seed=0)
    print(score(near_duplicates(docs, None, cfg), truth))

Distinct documents are runs of consecutive paragraphs of the real corpus (paragraphs over 150
words cut at sentence ends), 100-600 words each, taken from a seeded partition of the
paragraph list, so no two share a paragraph; past the partition's documents (about 9,400 from
../shared) they are random mixtures of 3-8 paragraphs (two mixtures rarely share two
paragraphs, so they are not near-duplicates; pairs the corpus itself makes similar are in
`truth`). A planted copy starts from a distinct document (or, one time in
five, from an earlier copy: chains) and changes it by one of
- words: substitutions, insertions and deletions at random places,
- paragraphs: the paragraphs reordered, then word edits,
- boilerplate: header and footer lines from a stock of site chrome, then word edits,
- mixed: all three,
with the number of word edits searched so that the copy's true Jaccard similarity to its parent
lands near a target drawn from `levels` (by default 80% uniform in [0.8, 1.0] and 20% in
[0.3, 0.6], related but distinct). Similarity is measured on the shingles MinHash uses
(llmtrain.data.minhash.shingle_sets, word 5-grams). Everything is shuffled with the seed, so a
copy is anywhere relative to its source. `truth` records, for every pair of documents of one
planted family, the true Jaccard similarity, and every pair of distinct documents that the
corpus itself makes similar (J >= 0.2: the World English Bible holds two texts of Daniel).

`score`: a duplicate pair has true J >= threshold; a distinct document has no such partner.
- recall: duplicate pairs merged (one cluster, when `roots` is given; else at least one of the
  two removed),
- distinct_removed_fraction: distinct documents removed / distinct documents,
- precision: removed documents that have a duplicate partner / removed documents,
- by_j: per 0.05 bin of true J, the fraction of planted copies merged with their parent (the
  measured S-curve; a family's other pairs also merge through their relatives).

The CLI writes `--mb` MB of JSONL (`{"text": ...}` per line: documents contain blank lines) in
files of about 64 MB, each file one `generate` call (its copies are within the same file, on
average a third of it away from their sources), and `truth.json` with global orders (line
number across the files in name order).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmtrain.data.minhash import shingle_sets  # noqa: E402

DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "corpus"
NGRAM = 5
MAX_PARAGRAPH_WORDS = 150
DOC_WORDS = (100, 600)
LEVELS = ((0.8, 1.0, 0.8), (0.3, 0.6, 0.2))  # (lo, hi, weight): target Jaccard of a copy to its parent
CHAIN = 0.2  # probability that a copy's parent is an earlier copy
KINDS = ("words", "paragraphs", "boilerplate", "mixed")

HEADERS = [
    "Home | News | Sport | Business | Culture | Contact us",
    "Skip to main content. Sign in or create an account to save articles for later.",
    "You are here: Home > Archive > Articles > Reading room",
    "Menu Search Subscribe Newsletter Podcasts Events Shop",
    "This page was last updated on a Tuesday. Estimated reading time: six minutes.",
    "Advertisement. Continue reading below the advertisement.",
]
FOOTERS = [
    "Copyright The Example Publishing Company. All rights reserved. No part of this page may be reproduced without permission.",
    "We use cookies to improve your experience on our site. By continuing to browse you agree to our use of cookies. Read our privacy policy.",
    "Share this article: Facebook Twitter Email Print. Related articles you may also like are listed below.",
    "Terms of use | Privacy policy | Accessibility | Sitemap | Careers | Advertise with us",
    "Sign up for our weekly newsletter and get the best stories delivered straight to your inbox every Friday morning.",
    "Comments are closed for this article. Please read our community guidelines before posting on other pages.",
    "Found a mistake? Let us know and we will correct it as soon as we can. Thank you for reading.",
]


def load_paragraphs(corpus: Path = DEFAULT_CORPUS) -> list[str]:
    """The paragraphs of every *.txt under `corpus` (sorted by name), blank-line separated,
    whitespace collapsed, over-long ones cut at sentence ends, exact repeats dropped."""
    out: list[str] = []
    seen: set[str] = set()
    for path in sorted(Path(corpus).glob("*.txt")):
        for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            for piece in _pieces(" ".join(para.split())):
                if piece and piece not in seen:
                    seen.add(piece)
                    out.append(piece)
    return out


def _pieces(para: str) -> list[str]:
    words = para.split(" ")
    if len(words) <= MAX_PARAGRAPH_WORDS:
        return [para]
    pieces, cur = [], []
    for w in words:
        cur.append(w)
        if (len(cur) >= MAX_PARAGRAPH_WORDS // 2 and w[-1:] in ".!?") or len(cur) >= MAX_PARAGRAPH_WORDS:
            pieces.append(" ".join(cur))
            cur = []
    if cur:
        pieces.append(" ".join(cur))
    return pieces


def _spans(paragraphs: Sequence[str], seed: int) -> list[list[int]]:
    """A partition of the paragraph indices into runs of 100-600 words, in a seeded order."""
    rng = np.random.default_rng([seed, 1])
    counts = [len(p.split()) for p in paragraphs]
    spans, cur, words, target = [], [], 0, int(rng.integers(*DOC_WORDS))
    for i, c in enumerate(counts):
        cur.append(i)
        words += c
        if words >= target:
            spans.append(cur)
            cur, words, target = [], 0, int(rng.integers(*DOC_WORDS))
    return [spans[i] for i in rng.permutation(len(spans))]


def _distinct(paragraphs: Sequence[str], spans: list[list[int]], index: int, seed: int) -> list[str]:
    if index < len(spans):
        return [paragraphs[i] for i in spans[index]]
    rng = np.random.default_rng([seed, 2, index])
    target, out, words = int(rng.integers(*DOC_WORDS)), [], 0
    while len(out) < 3 or (words < target and len(out) < 8):
        p = paragraphs[int(rng.integers(len(paragraphs)))]
        out.append(p)
        words += len(p.split(" "))
    return out


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _natural_pairs(sets: Sequence[np.ndarray], min_j: float = 0.2) -> list[tuple[int, int, float]]:
    """Pairs of documents that already overlap (the corpus repeats itself: e.g. the two texts of
    Daniel in the World English Bible), with their Jaccard similarity if >= min_j."""
    if not sets:
        return []
    values = np.concatenate(sets)
    owner = np.repeat(np.arange(len(sets)), [len(x) for x in sets])
    by = np.argsort(values, kind="stable")
    v, w = values[by], owner[by]
    start = np.flatnonzero(np.concatenate([[True], v[1:] != v[:-1]]))
    length = np.diff(np.append(start, len(v)))
    two = start[length == 2]
    a, b = [w[two]], [w[two + 1]]
    for n in np.unique(length[(length > 2) & (length <= 64)]):  # shingles in n documents: all pairs
        x, y = np.triu_indices(int(n), 1)
        at = start[length == n][:, None]
        a.append(w[at + x].reshape(-1))
        b.append(w[at + y].reshape(-1))
    pa, pb = np.concatenate(a), np.concatenate(b)
    key, count = np.unique(np.minimum(pa, pb) * len(sets) + np.maximum(pa, pb), return_counts=True)
    out = []
    for k, c in zip(key.tolist(), count.tolist()):
        i, j = divmod(k, len(sets))
        jac = c / (len(sets[i]) + len(sets[j]) - c)
        if jac >= min_j:
            out.append((i, j, jac))
    return out


def _words(lines: Sequence[str]) -> int:
    return sum(len(x.split(" ")) for x in lines)


def _edit(
    paras: list[str],
    kind: str,
    target: float,
    bounds: tuple[float, float],
    vocab: Sequence[str],
    rng: np.random.Generator,
    parent_set: np.ndarray,
) -> tuple[list[str], float, str]:
    """A near-copy of `paras`: the structural change of `kind` (paragraphs reordered,
    boilerplate added), toned down while it alone takes the similarity below `target` (short
    paragraphs make every moved boundary count), then the number of word edits searched so
    that the Jaccard similarity to `parent_set` comes close to `target`, inside `bounds` where
    it can (a short document moves in large steps). (paragraphs, true Jaccard, what was done)."""
    reorders: list[list[int]] = [list(range(len(paras)))]
    if kind in ("paragraphs", "mixed") and len(paras) > 1:
        swap = list(range(len(paras)))
        i, j = rng.choice(len(paras), size=2, replace=False)
        swap[i], swap[j] = swap[j], swap[i]
        reorders = [[int(i) for i in rng.permutation(len(paras))], swap, reorders[0]]
    chrome: list[tuple[list[str], list[str]]] = [([], [])]
    if kind in ("boilerplate", "mixed"):
        # boilerplate for about half the loss the target allows (J ~ W / (W + B)), at most W / 2
        budget = max(8, int(_words(paras) * (1 / max(target, 0.5) - 1) * 0.5))
        header: list[str] = []
        footer: list[str] = []
        while _words(header + footer) < budget:
            if rng.random() < 0.4:
                header.append(HEADERS[int(rng.integers(len(HEADERS)))])
            else:
                footer.append(FOOTERS[int(rng.integers(len(FOOTERS)))])
        chrome = [(header, footer), (header[:1], footer[-1:]), ([], [])]
    # one random edit per word position, applied to the first m positions of a random order
    n = _words(paras)
    where = rng.permutation(n)
    ops = rng.choice(3, size=n, p=[0.6, 0.2, 0.2])  # substitute, insert, delete
    fresh = rng.integers(len(vocab), size=n)

    def build(order: list[int], head: list[str], foot: list[str], m: int) -> list[str]:
        edit = {int(where[i]): i for i in range(m)}
        out: list[list[str]] = [[] for _ in paras]
        pos = 0
        for k, p in enumerate(paras):
            for w in p.split(" "):
                i = edit.get(pos)
                pos += 1
                if i is None:
                    out[k].append(w)
                elif ops[i] == 0:
                    out[k].append(vocab[fresh[i]])
                elif ops[i] == 1:
                    out[k] += [w, vocab[fresh[i]]]
                # ops[i] == 2: deleted
        return head + [" ".join(out[k]) for k in order if out[k]] + foot

    def sim(base: tuple[list[int], list[str], list[str]], m: int) -> tuple[list[str], float]:
        copy = build(*base, m)
        return copy, _jaccard(parent_set, shingle_sets(["\n\n".join(copy)], NGRAM)[0])

    def better(c: tuple[list[str], float], b: tuple[list[str], float]) -> bool:
        # inside bounds beats outside; then closer to the target
        return (bounds[0] <= c[1] <= bounds[1], -abs(c[1] - target)) > (bounds[0] <= b[1] <= bounds[1], -abs(b[1] - target))

    for base in ((o, h, f) for o in reorders for h, f in chrome):
        best = sim(base, 0)
        if best[1] >= target:
            break
    done = "+".join(
        name
        for name, on in (("reorder", base[0] != reorders[-1]), ("boilerplate", bool(base[1] or base[2])), ("words", True))
        if on
    )
    if best[1] <= target or n < 2:
        return best[0], best[1], done
    # J(m) falls about like J(0) (W - 5m) / (W + 5m): start there, then bisect
    r = target / best[1]
    m = int(np.clip(n * (1 - r) / (NGRAM * (1 + r)), 1, n - 1))
    lo, hi = 0, n  # J(lo) > target >= J(hi)
    for _ in range(10):
        copy = sim(base, m)
        if better(copy, best):
            best = copy
        if abs(copy[1] - target) < 0.005:
            break
        if copy[1] > target:
            lo = m
        else:
            hi = m
        if hi - lo <= 1:
            break
        m = (lo + hi) // 2
    return best[0], best[1], done


def generate(
    base_docs: Sequence[str],
    n_distinct: int,
    n_dups: int,
    seed: int,
    first: int = 0,
    levels: Sequence[tuple[float, float, float]] = LEVELS,
) -> tuple[list[str], dict]:
    """`n_distinct` distinct documents made of the paragraphs `base_docs` plus `n_dups` planted
    near-copies, shuffled; (docs, truth). `first`: the index of the first distinct document,
    so that calls for successive files of one corpus never repeat a document. truth:
    {"n_docs", "copies": orders of the planted copies, "planted": [[copy, parent, jaccard,
    kind]], "pairs": [[a, b, jaccard]] for every pair of one family and every natural pair of
    distinct documents at J >= 0.2, a < b}."""
    spans = _spans(base_docs, seed)
    rng = np.random.default_rng([seed, 3, first])
    vocab = sorted({w for p in base_docs[:2000] for w in p.split(" ")})
    docs: list[list[str]] = [_distinct(base_docs, spans, first + i, seed) for i in range(n_distinct)]
    family = list(range(n_distinct))
    sets = shingle_sets(["\n\n".join(d) for d in docs], NGRAM)
    planted = []
    bounds = np.array([w for _, _, w in levels], dtype=float)
    for c in range(n_dups):
        parent = int(rng.integers(n_distinct, n_distinct + c)) if c and rng.random() < CHAIN else int(rng.integers(n_distinct))
        lo, hi, _ = levels[int(rng.choice(len(levels), p=bounds / bounds.sum()))]
        target = float(rng.uniform(lo, hi))
        kind = KINDS[int(rng.integers(len(KINDS)))]
        paras, j, kind = _edit(docs[parent], kind, target, (lo, hi), vocab, rng, sets[parent])
        docs.append(paras)
        family.append(family[parent])
        sets.append(shingle_sets(["\n\n".join(paras)], NGRAM)[0])
        planted.append((n_distinct + c, parent, j, kind))
    order = rng.permutation(len(docs))  # order[i]: the position of document i in the output
    texts: list[str] = [""] * len(docs)
    for i, d in enumerate(docs):
        texts[order[i]] = "\n\n".join(d)
    members: dict[int, list[int]] = {}
    for i, f in enumerate(family):
        members.setdefault(f, []).append(i)
    pairs = []
    for group in members.values():
        for x in range(len(group)):
            for y in range(x + 1, len(group)):
                a, b = group[x], group[y]
                oa, ob = sorted((int(order[a]), int(order[b])))
                pairs.append([oa, ob, round(_jaccard(sets[a], sets[b]), 4)])
    for a, b, j in _natural_pairs(sets[:n_distinct]):
        oa, ob = sorted((int(order[a]), int(order[b])))
        pairs.append([oa, ob, round(j, 4)])
    truth = {
        "n_docs": len(docs),
        "copies": sorted(int(order[i]) for i in range(n_distinct, len(docs))),
        "planted": [[int(order[c]), int(order[p]), round(j, 4), k] for c, p, j, k in planted],
        "pairs": sorted(pairs),
    }
    return texts, truth


def score(dropped_orders, truth: dict, roots: Optional[np.ndarray] = None, threshold: float = 0.8) -> dict:
    """Recall of the duplicate pairs (true J >= threshold), the fraction of distinct documents
    (no such partner) removed, precision of the removals, and the merged fraction per 0.05 of J."""
    dropped = np.asarray(dropped_orders, dtype=np.int64)
    removed = set(dropped.tolist())
    rep = dict(zip(dropped.tolist(), np.asarray(roots).tolist())) if roots is not None else None

    def merged(a: int, b: int) -> bool:
        if rep is None:
            return a in removed or b in removed
        return rep.get(a, a) == rep.get(b, b)

    pairs = truth["pairs"]
    dup = [(a, b) for a, b, j in pairs if j >= threshold]
    has_partner = {x for a, b in dup for x in (a, b)}
    distinct = truth["n_docs"] - len(has_partner)
    wrong = len(removed - has_partner)
    bins: dict[float, list[int]] = {}
    for c, p, j, _ in truth["planted"]:
        key = round(min(int(j * 20), 19) / 20, 2)
        hit = bins.setdefault(key, [0, 0])
        hit[0] += 1
        hit[1] += merged(min(c, p), max(c, p))
    return {
        f"recall_at_{threshold}": sum(merged(a, b) for a, b in dup) / max(len(dup), 1),
        "distinct_removed_fraction": wrong / max(distinct, 1),
        "precision": (len(removed) - wrong) / len(removed) if removed else 1.0,
        "duplicate_pairs": len(dup),
        "distinct_documents": distinct,
        "removed": len(removed),
        "by_j": {f"{k:.2f}-{k + 0.05:.2f}": (n, m / n) for k, (n, m) in sorted(bins.items())},
    }


_PARAGRAPHS: list[str] = []  # a writer process's paragraphs (loaded once per process)


def _load(corpus: Path) -> None:
    global _PARAGRAPHS
    _PARAGRAPHS = load_paragraphs(corpus)


def _write_part(path: Path, n_distinct: int, n_dups: int, seed: int, first: int) -> tuple[dict, int]:
    docs, truth = generate(_PARAGRAPHS, n_distinct, n_dups, seed, first=first)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            line = json.dumps({"text": d}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    return truth, written


def write_corpus(
    out: Path,
    mb: float,
    corpus: Path = DEFAULT_CORPUS,
    seed: int = 0,
    dup_fraction: float = 0.1,
    file_mb: float = 64,
    workers: int = 1,
) -> dict:
    """`mb` MB of planted JSONL under `out` (part-NNNNN.jsonl, each one `generate` call) and
    out/truth.json; returns the truth. The files are the same for any number of `workers`."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("part-*.jsonl"), out / "truth.json"]:
        old.unlink(missing_ok=True)
    _load(corpus)
    spans = _spans(_PARAGRAPHS, seed)
    mean_bytes = np.mean([sum(len(_PARAGRAPHS[i]) + 2 for i in s) for s in spans[:500]])
    per_file = max(2, int(min(file_mb, mb) * 1e6 / mean_bytes))
    n_dups = int(round(per_file * dup_fraction))
    n_distinct = per_file - n_dups
    truth: dict = {"n_docs": 0, "copies": [], "planted": [], "pairs": []}
    written, part, start = 0, 0, time.perf_counter()
    pool = ProcessPoolExecutor(workers, initializer=_load, initargs=(corpus,)) if workers > 1 else None
    try:
        while written < mb * 1e6:
            parts = range(part, part + workers)
            jobs = [(out / f"part-{p:05d}.jsonl", n_distinct, n_dups, seed, p * n_distinct) for p in parts]
            results = pool.map(_write_part, *zip(*jobs)) if pool else [_write_part(*jobs[0])]
            for p, (t, nbytes) in zip(parts, results):
                if written >= mb * 1e6:  # a parallel round went past the size: the same files as one worker
                    (out / f"part-{p:05d}.jsonl").unlink()
                    continue
                base = truth["n_docs"]
                truth["n_docs"] += t["n_docs"]
                truth["copies"] += [base + o for o in t["copies"]]
                truth["planted"] += [[base + c, base + q, j, k] for c, q, j, k in t["planted"]]
                truth["pairs"] += [[base + a, base + b, j] for a, b, j in t["pairs"]]
                written += nbytes
                print(
                    f"part-{p:05d}.jsonl: {written / 1e6:,.0f} MB, {truth['n_docs']:,} documents, {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
            part += workers
    finally:
        if pool:
            pool.shutdown()
    (out / "truth.json").write_text(json.dumps(truth))
    return truth


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mb", type=float, required=True, help="size of the JSONL to write, in MB")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dup-fraction", type=float, default=0.1, help="planted copies per document")
    p.add_argument("--file-mb", type=float, default=64, help="size of each JSONL file (one generate call), in MB")
    p.add_argument("--workers", type=int, default=1, help="processes writing files at once")
    args = p.parse_args()
    truth = write_corpus(args.out, args.mb, args.corpus, args.seed, args.dup_fraction, args.file_mb, args.workers)
    print(f"{truth['n_docs']:,} documents, {len(truth['copies']):,} planted copies; truth in {args.out / 'truth.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
