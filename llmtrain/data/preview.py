"""`llmtrain prepare --dry-run --sample N`: what each stage would do to the first N documents,
with examples, and nothing written.

    llmtrain prepare --input corpus/ --quality --pii --near-dedup --dry-run --sample 500

The same stage functions as the real run (llmtrain.data.pipeline), over the first N documents
in input order: cleaning drops, each quality filter's drops, each PII kind's redactions (the
text around each, before and after), exact and near duplicates within the sample (near copies
are only found when both are in the sample). Returns the counts as a dict (tests read it).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from itertools import islice
from typing import Sequence

import numpy as np

from llmtrain.data import minhash
from llmtrain.data.clean import CleanStats, clean_text, content_hash
from llmtrain.data.pii import redact
from llmtrain.data.quality import quality_reason
from llmtrain.data.readers import iter_documents, list_inputs
from llmtrain.errors import UserError

EXAMPLES = 3
WIDTH = 160


def _documents(inputs: Sequence[str], text_column: str, stats: CleanStats):
    for f in list_inputs(inputs):
        yield from iter_documents(f, text_column, stats)


def _show(text: str) -> str:
    flat = text.replace("\n", " \u23ce ")
    return flat if len(flat) <= WIDTH else flat[: WIDTH - 3] + "..."


def preview(inputs: Sequence[str], sample: int = 1000, text_column: str = "text", min_chars: int = 16, **stages) -> dict:
    """Print the dry-run report for the first `sample` documents; return its counts."""
    from llmtrain.data.prepare import stage_settings

    if sample < 1:
        raise UserError(f"--sample {sample} must be at least 1")
    s = stage_settings(text_column, min_chars, 0.0, stages.get("quality"), stages.get("pii"), stages.get("minhash"))
    stats = CleanStats(min_chars=min_chars)
    drops: dict[str, list[str]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    redactions: dict[str, list[str]] = defaultdict(list)
    kept: list[str] = []
    seen: dict[int, int] = {}
    for raw in islice(_documents(inputs, text_column, stats), sample):
        before = (stats.dropped_empty, stats.dropped_short)
        text = clean_text(raw, stats)
        if text is None:
            reason = "empty" if stats.dropped_empty > before[0] else "short"
            counts[f"clean.{reason}"] += 1
            drops[f"clean.{reason}"].append(raw)
            continue
        reason = quality_reason(text, s.quality) if s.quality.enabled else None
        if reason is not None:
            counts[f"quality.{reason}"] += 1
            drops[f"quality.{reason}"].append(text)
            continue
        if s.pii.enabled:
            redacted, found = redact(text, s.pii)
            for kind, n in found.items():
                counts[f"pii.{kind}"] += n
                redactions[kind].append(f"{_show(text)}\n        -> {_show(redacted)}")
            text = redacted
        key = content_hash(text)
        if key in seen:
            counts["dedup.exact"] += 1
            drops["dedup.exact"].append(text)
            continue
        seen[key] = len(kept)
        kept.append(text)
    near_pairs: list[tuple[str, str]] = []
    if s.minhash.enabled and kept:
        orders = np.arange(len(kept), dtype=np.int64)
        sigs = minhash.signatures(kept, s.minhash)
        edges = minhash.candidate_edges(minhash.band_keys(sigs, s.minhash), orders, sigs, s.minhash)  # verified as the run does
        drop, roots = minhash.clusters(edges) if len(edges) else (orders[:0], orders[:0])
        near_pairs = [(kept[int(d)], kept[int(r)]) for d, r in zip(drop, roots)]
        counts["dedup.near"] = len(drop)
    _print(stats, counts, drops, redactions, near_pairs, len(kept) - counts.get("dedup.near", 0), s)
    return {"read": stats.documents_read, "kept": len(kept) - counts.get("dedup.near", 0), **counts}


def _print(stats: CleanStats, counts, drops, redactions, near_pairs, kept: int, s) -> None:
    say = lambda msg="": print(msg, file=sys.stderr)  # noqa: E731
    say(f"dry run over the first {stats.documents_read:,} documents: {kept:,} would be kept (nothing is written)")
    stages = [("clean", True), ("quality", s.quality.enabled), ("pii", s.pii.enabled), ("dedup", True)]
    for stage, on in stages:
        if not on:
            say(f"  {stage}: off")
            continue
        names = sorted(k for k in counts if k.startswith(stage + "."))
        if stage == "dedup" and not s.minhash.enabled:
            names = [n for n in names if n != "dedup.near"]
        if not names:
            say(f"  {stage}: nothing {'redacted' if stage == 'pii' else 'dropped'}")
        for name in names:
            verb = "redacted" if stage == "pii" else "dropped"
            say(f"  {name}: {counts[name]:,} {verb}")
            if stage == "pii":
                examples = redactions[name.split(".", 1)[1]]
            elif name == "dedup.near":
                examples = [f"{_show(a)}\n        ~ {_show(b)}" for a, b in near_pairs]
            else:
                examples = [_show(t) for t in drops[name]]
            for example in examples[:EXAMPLES]:
                say(f"      e.g. {example}")
