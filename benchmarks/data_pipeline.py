"""Data pipeline benchmark (issue 9, section 5): `llmtrain prepare` in-process and on Ray Data,
against Hugging Face `datasets` and datatrove, on one generated corpus, in one run.

    .venv/bin/python benchmarks/data_pipeline.py --json /tmp/dp.json   # 250 MB, ~10 min on 2 free cores
    .venv/bin/python benchmarks/data_pipeline.py --mb 3000 --peer-mb 300   # the issue's "few GB"
    .venv/bin/python benchmarks/data_pipeline.py --mb 45 --arms local,ray2-full-slice,datatrove

Corpus (generated once into `--work`, default /tmp/llmtrain-bench-data, reused, never committed):
- the real texts of ../shared/data/corpus (~21 MB) as benchmarks/planted_corpus.py's distinct
  documents (runs of whole paragraphs, 100-600 words; every paragraph once) plus planted
  near-copies of a quarter of them at known Jaccard similarities, in one file whose truth is
  saved beside it (planted_truth.json): ~29 MB;
- up to `--mb`, generated documents: sentence-recombined (paragraphs of sentences drawn from the
  whole corpus: nothing for near-dedup to erase among them), word-shuffled runs of real
  paragraphs (10%), exact copies of earlier ones (2%), low-quality ones the filters should drop
  (5%: short, bullet lists, one line repeated, hash tags), PII in 5% (e-mail addresses, public
  IPv4s, phone numbers); JSON Lines files of ~16 MB (`{"id", "text"}`), read by every arm.
The issue asks for a corpus of a few GB; the default is 250 MB so the whole run (corpus
generation included) fits about 10 minutes on 2 cores; `--mb 3000` gives the issue's size.

Arms (each in its own process; the input's page cache warmed first; imports not timed):
- `local`: today's single-machine prepare (executor "local": stage A in one thread, tokenizing on
  `--workers` threads): tokenize + pack (+ the exact dedup it always runs);
- `ray1`, `ray2`: the Ray Data path (llmtrain.prepare_ray.RayExecutor) with 1 and 2 workers, the
  same stages;
- `ray2-full`: Ray Data, 2 workers, every quality filter, PII redaction, exact and near dedup;
- `hf`: `datasets.load_dataset("json")` + `map(tokenize, num_proc=2)` + `group_texts` (the
  run_clm.py recipe) with transformers' loading of the same tokenizer directory;
- `datatrove`: LocalPipelineExecutor, 2 tasks on 2 workers: JsonlReader -> GopherQualityFilter
  -> GopherRepetitionFilter -> PIIFormatter -> JsonlWriter + MinhashDedupSignature;
  MinhashDedupBuckets (tasks = bands, as it requires); MinhashDedupCluster; JsonlReader ->
  MinhashDedupFilter -> DocumentTokenizer (.ds token files), with the same tokenizer's
  tokenizer.json and our MinHash shape (n-gram, bands, rows). Where it differs: DIFFERENCES.
  It runs at ~0.2 MB per CPU second (spaCy word splitting in three of its stages), so it gets a
  slice of the corpus (`--peer-mb`, default 45: the planted file and the first generated files),
  and `ray2-full-slice` runs our full pipeline on the same slice for the "1.5x datatrove" ratio.

Timing: Ray's start-up (`ray.init` of the embedded runtime) is timed apart from the job; MB/s,
tokens/s and every ratio use the job time, since a cluster is started once for many jobs and
start-up is a constant of seconds, not a rate (the JSON has the end-to-end figure too). The
job time includes Ray Data's worker and actor start-up, which a cluster pays per job. MB are
input bytes (10^6). "Per core" = MB/s divided by the cores the arm was given (workers, threads,
num_proc, tasks); CPU seconds of the arm's whole process tree (psutil, sampled every 0.2 s) are
reported too: on a machine shared with other work the wall clock is not the arm's alone, and
MB per CPU second is the comparison that survives it (printed beside each ratio).

Dedup quality on the planted part: our near-dedup (llmtrain.data.minhash.near_duplicates with
the pipeline's config, the single-process reference of what the pipeline removes) on every
planted document, and datatrove's (the documents its MinhashDedupFilter removed, by id) on the
planted documents its filters kept, scored by planted_corpus.score: recall of the pairs at
J >= 0.8, the fraction of distinct documents removed, precision.

Loader: tokens/s of `TokenLoader.next_step()` over shuffled batches of the `local` arm's output
vs gathering the same random rows from a numpy memmap of the same token bytes (target >= 50M).

datatrove needs the `bench` extra (datatrove, spacy, orjson, and xxhash < 4, which its MinHash
needs: xxhash 4 refuses str); without them that arm is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "benchmarks"))

DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "corpus"
DEFAULT_WORK = Path("/tmp/llmtrain-bench-data")
FILE_MB = 16
CORPUS_VERSION = 2  # bump when the generator changes

DIFFERENCES = [
    "word splitting: ours splits on whitespace (quality) and on ASCII-alnum runs (MinHash); datatrove uses spaCy's "
    "English tokenizer (spacy.blank('en')) for Gopher/FineWeb words and MinHash shingles",
    "FineWeb: ours runs only its line_punct_thr check; datatrove has it only inside FineWebQualityFilter, whose "
    "other checks cost a whole spaCy word split (~0.5 MB/s) even when switched off, so the datatrove arm leaves "
    "FineWeb out (less work for datatrove; its filters keep the documents our line-punctuation check drops)",
    "C4: neither side runs C4's filters (ours has none), so the datatrove arm does not either",
    "PII: datatrove's PIIFormatter does e-mails and public IPv4s; ours also redacts the kinds in PiiConfig (phones...)",
    "exact dedup: ours hashes every document; datatrove's arm relies on MinHash (an exact copy collides in every "
    "band), skipping its ExactDedup stages (less work for datatrove)",
    "near dedup: same n-gram/bands/rows; ours verifies candidates by signature agreement, datatrove takes every "
    "LSH candidate (more removed at J ~ 0.5-0.7)",
    "tokens: ours [BOS] doc [EOS] packed into seq_len rows in Arrow shards with a manifest; datatrove doc [EOS] in "
    "per-task .ds files, not shuffled (shuffle_documents=False), no DocumentTokenizerMerger",
    "intermediate: datatrove writes the filtered documents as uncompressed JSONL and reads them back for the "
    "dedup filter (its documented pattern); ours keeps them in memory / Ray's object store",
]


# ---------------------------------------------------------------------------------------------
# Corpus


_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORDS = ["alpha", "river", "market", "window", "signal", "garden", "engine", "letter", "silver", "harbor"]


def _pii(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return (
            f"Write to {rng.choice(_WORDS)}.{rng.choice(_WORDS)}{rng.randrange(1000)}@{rng.choice(_WORDS)}-mail.com for details."
        )
    if kind == 1:
        return f"The server at {rng.randint(11, 99)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)} answered."
    return f"Call +1 ({rng.randint(201, 989)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)} today."


def _low_quality(rng: random.Random, sentences: list[str]) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # too short for min_words
        return " ".join(rng.choice(sentences) for _ in range(2))[:200]
    if kind == 1:  # a bullet list
        return "\n".join(f"- {rng.choice(_WORDS)} {rng.choice(_WORDS)} {rng.randrange(100)}" for _ in range(40))
    if kind == 2:  # one line repeated (Gopher repetition)
        line = rng.choice(sentences)
        return "\n".join([line] * 30)
    return " ".join(f"#{rng.choice(_WORDS)}{rng.randrange(50)} {rng.choice(sentences)}" for _ in range(12))  # hash tags


def generated_documents(paragraphs: list[str], target_bytes: int, rng: random.Random):
    """Generated documents up to about `target_bytes` of UTF-8 (see the module docstring)."""
    sentences = [s for p in paragraphs for s in _SENTENCE.split(p) if 20 <= len(s) <= 400]
    made: list[str] = []
    total = 0
    while total < target_bytes:
        r = rng.random()
        if r < 0.02 and made:
            text = rng.choice(made)  # exact copy
        elif r < 0.07:
            text = _low_quality(rng, sentences)
        elif r < 0.17:  # words shuffled within each paragraph of a run of real paragraphs
            at = rng.randrange(len(paragraphs))
            out = []
            for p in paragraphs[at : at + rng.randint(3, 8)]:
                w = p.split()
                rng.shuffle(w)
                out.append(" ".join(w))
            text = "\n\n".join(out)
        else:  # sentence-recombined: paragraphs of random sentences of the whole corpus
            paras = [" ".join(rng.choice(sentences) for _ in range(rng.randint(2, 7))) for _ in range(rng.randint(2, 10))]
            text = "\n\n".join(paras)
        if rng.random() < 0.05:
            paras = text.split("\n\n")
            at = rng.randrange(len(paras))
            paras[at] = paras[at] + " " + _pii(rng)
            text = "\n\n".join(paras)
        made.append(text)
        total += len(text.encode()) + 30
        yield text


def _write_jsonl(directory: Path, prefix: str, docs, file_bytes: int) -> list[Path]:
    files, out, size, n = [], None, 0, 0
    for i, text in enumerate(docs):
        if out is None or size >= file_bytes:
            if out is not None:
                out.close()
            path = directory / f"{prefix}-{len(files):05d}.jsonl"
            files.append(path)
            out, size = open(path, "w", encoding="utf-8"), 0
        line = json.dumps({"id": f"{prefix}/{i}", "text": text}, ensure_ascii=False) + "\n"
        out.write(line)
        size += len(line.encode())
        n += 1
    if out is not None:
        out.close()
    return files


def build_corpus(work: Path, source: Path, mb: int, seed: int) -> Path:
    """The benchmark corpus in work/corpus-<mb>mb-s<seed>-v<version> (reused when complete): the
    real texts as planted_corpus's distinct documents (every paragraph once) plus planted
    near-copies of a quarter of them, then generated documents up to `mb`."""
    import planted_corpus

    directory = work / f"corpus-{mb}mb-s{seed}-v{CORPUS_VERSION}"
    if (directory / "meta.json").exists():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    start = time.perf_counter()
    paragraphs = planted_corpus.load_paragraphs(source)
    n_distinct = sum(len(p.split()) for p in paragraphs) // sum(planted_corpus.DOC_WORDS) * 2  # words / mean document words
    docs, truth = planted_corpus.generate(paragraphs, n_distinct, n_distinct // 4, seed)
    _write_jsonl(tmp / "data", "a-planted", docs, 1 << 40)  # one file: a document's order in it is its truth order
    (tmp / "planted_truth.json").write_text(json.dumps(truth))
    planted_bytes = sum(len(d.encode()) for d in docs)
    rest = max(0, mb * 1_000_000 - planted_bytes)
    rng = random.Random(seed)
    files = _write_jsonl(tmp / "data", "g-generated", generated_documents(paragraphs, rest, rng), FILE_MB << 20)
    meta = {
        "mb": mb,
        "seed": seed,
        "source": str(source),
        "planted_documents": len(docs),
        "planted_distinct": n_distinct,
        "planted_copies": len(truth["copies"]),
        "planted_bytes": planted_bytes,
        "generated_files": len(files),
        "bytes": sum(f.stat().st_size for f in (tmp / "data").iterdir()),
        "files": len(list((tmp / "data").iterdir())),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def build_slice(corpus: Path, peer_mb: int) -> Path:
    """corpus/slice-<peer_mb>mb: hard links to the planted file and the first generated files up
    to `peer_mb` MB (the peers too slow for the whole corpus run on it, and our arm beside them)."""
    directory = corpus / f"slice-{peer_mb}mb"
    if directory.is_dir():
        return directory
    tmp = corpus / f"slice-{peer_mb}mb.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    total = 0
    for f in sorted((corpus / "data").glob("*.jsonl")):  # a-planted-* first
        if total >= peer_mb * 1_000_000:
            break
        os.link(f, tmp / "data" / f.name)
        total += f.stat().st_size
    tmp.rename(directory)
    return directory


def data_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in (directory / "data").glob("*.jsonl"))


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    raise TypeError(type(x).__name__)


def warm(directory: Path) -> int:
    total = 0
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(16 << 20):
                    total += len(chunk)
    return total


# ---------------------------------------------------------------------------------------------
# CPU seconds of this process tree


class TreeCpu:
    """CPU seconds (user + system) of this process and all its descendants, sampled every
    `interval` s; a process that ends keeps its last sample (so up to `interval` of its time
    is missed)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.seen: dict[tuple[int, float], float] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.sample()
        self.base = dict(self.seen)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        procs = [self.me]
        try:
            procs += self.me.children(recursive=True)
        except self.psutil.Error:
            pass
        for p in procs:
            try:
                t = p.cpu_times()
                key = (p.pid, p.create_time())
            except self.psutil.Error:
                continue
            with self._lock:
                self.seen[key] = t.user + t.system

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def seconds(self) -> float:
        self.sample()
        with self._lock:
            return sum(v - self.base.get(k, 0.0) for k, v in self.seen.items())

    def stop(self) -> float:
        s = self.seconds()
        self._stop.set()
        return s


# ---------------------------------------------------------------------------------------------
# Arms (each runs in a child process: `--child ARM`)

ARMS = {  # data: "all" = the whole corpus, "slice" = the --peer-mb slice (datatrove and our arm beside it)
    "local": {"kind": "ours", "executor": "local", "stages": "tokenize", "data": "all"},
    "ray1": {"kind": "ours", "executor": "ray", "workers": 1, "stages": "tokenize", "data": "all"},
    "ray2": {"kind": "ours", "executor": "ray", "workers": 2, "stages": "tokenize", "data": "all"},
    "ray2-full": {"kind": "ours", "executor": "ray", "workers": 2, "stages": "full", "data": "all"},
    "local-full": {"kind": "ours", "executor": "local", "stages": "full", "data": "all"},
    "hf": {"kind": "hf", "data": "all"},
    "ray2-full-slice": {"kind": "ours", "executor": "ray", "workers": 2, "stages": "full", "data": "slice"},
    "datatrove": {"kind": "datatrove", "data": "slice"},
}
DEFAULT_ARMS = "local,ray1,ray2,ray2-full,hf,ray2-full-slice,datatrove"
LABELS = {
    "local": "llmtrain local (today's prepare)",
    "ray1": "llmtrain Ray Data, 1 worker",
    "ray2": "llmtrain Ray Data, 2 workers",
    "ray2-full": "llmtrain Ray Data, 2 w, full",
    "local-full": "llmtrain local, full",
    "hf": "HF datasets map + group_texts",
    "ray2-full-slice": "llmtrain Ray Data, 2 w, full [slice]",
    "datatrove": "datatrove, 2 tasks, full [slice]",
}
FULL = {"quality": {"enabled": True}, "pii": {"enabled": True}, "minhash": {"enabled": True}}


def arm_ours(spec: dict, data: Path, tok: Path, seq_len: int, out: Path, workers: int) -> dict:
    from llmtrain.data.prepare import prepare
    from llmtrain.prepare_ray import RayExecutor

    stages = FULL if spec["stages"] == "full" else {}
    n = spec.get("workers", workers)
    shutil.rmtree(out, ignore_errors=True)
    cpu = TreeCpu()
    startup = 0.0
    executor = None
    if spec["executor"] == "ray":
        t = time.perf_counter()
        executor = RayExecutor(n)
        startup = time.perf_counter() - t
    cpu_start = cpu.seconds()
    t = time.perf_counter()
    try:
        prepare(
            [str(data)], tokenizer=str(tok), seq_len=seq_len, output=str(out), workers=n, executor=executor, force=True, **stages
        )
        seconds = time.perf_counter() - t
        cpu_s = cpu.stop() - cpu_start
    finally:
        if executor is not None:
            executor.close()
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "seconds": seconds,
        "startup_s": startup,
        "cpu_s": cpu_s,
        "cores": n,
        "tokens": int(manifest["totals"]["tokens"]),
        "documents": int(manifest["totals"]["documents"]),
        "stages": manifest.get("stages"),
    }


def arm_hf(data: Path, tok: Path, seq_len: int, work: Path, num_proc: int) -> dict:
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    cache = work / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)
    files = sorted(str(f) for f in data.glob("*.jsonl"))
    cpu = TreeCpu()
    t = time.perf_counter()
    hf_tok = AutoTokenizer.from_pretrained(str(tok))
    raw = datasets.load_dataset("json", data_files={"train": files}, cache_dir=str(cache))["train"]
    raw = raw.remove_columns([c for c in raw.column_names if c != "text"])

    def tokenize(batch):
        return hf_tok(batch["text"])

    tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(concatenated["input_ids"]) // seq_len) * seq_len
        result = {k: [t[i : i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    seconds = time.perf_counter() - t
    cpu_s = cpu.stop()
    out = {"seconds": seconds, "startup_s": 0.0, "cpu_s": cpu_s, "cores": num_proc, "tokens": len(grouped) * seq_len}
    out["documents"] = len(raw)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def arm_datatrove(data: Path, tok: Path, work: Path, tasks: int) -> dict:
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    from llmtrain.data.minhash import MinHashConfig

    ours = MinHashConfig(enabled=True)
    cfg = MinhashConfig(n_grams=ours.ngram, num_buckets=ours.bands, hashes_per_bucket=ours.rows, seed=ours.seed)
    root = work / "datatrove"
    shutil.rmtree(root, ignore_errors=True)
    d = {k: str(root / k) for k in ("filtered", "sigs", "buckets", "remove", "removed", "tokens", "logs")}
    tokenizer_json = str(tok / "tokenizer.json")
    stage1 = [
        JsonlReader(str(data), glob_pattern="*.jsonl", text_key="text", id_key="id"),
        GopherQualityFilter(),
        GopherRepetitionFilter(),
        PIIFormatter(),
        JsonlWriter(d["filtered"], compression=None),
        MinhashDedupSignature(output_folder=d["sigs"], config=cfg),
    ]
    stage4 = [
        JsonlReader(d["filtered"], text_key="text", id_key="id"),
        MinhashDedupFilter(input_folder=d["remove"], exclusion_writer=JsonlWriter(d["removed"], compression=None)),
        DocumentTokenizer(
            output_folder=d["tokens"], tokenizer_name_or_path=tokenizer_json, eos_token="</s>", shuffle_documents=False
        ),
    ]
    executors = [
        (
            "signature",
            LocalPipelineExecutor(stage1, tasks=tasks, workers=tasks, logging_dir=d["logs"] + "/1", skip_completed=False),
        ),
        (
            "buckets",
            LocalPipelineExecutor(
                [MinhashDedupBuckets(input_folder=d["sigs"], output_folder=d["buckets"], config=cfg)],
                tasks=cfg.num_buckets,
                workers=tasks,
                logging_dir=d["logs"] + "/2",
                skip_completed=False,
            ),
        ),
        (
            "cluster",
            LocalPipelineExecutor(
                [MinhashDedupCluster(input_folder=d["buckets"], output_folder=d["remove"], config=cfg)],
                tasks=1,
                logging_dir=d["logs"] + "/3",
                skip_completed=False,
            ),
        ),
        (
            "filter+tokenize",
            LocalPipelineExecutor(stage4, tasks=tasks, workers=tasks, logging_dir=d["logs"] + "/4", skip_completed=False),
        ),
    ]
    cpu = TreeCpu()
    t = time.perf_counter()
    per_stage = {}
    for name, ex in executors:
        s = time.perf_counter()
        ex.run()
        per_stage[name] = round(time.perf_counter() - s, 2)
    seconds = time.perf_counter() - t
    cpu_s = cpu.stop()
    tokens = sum(f.stat().st_size for f in Path(d["tokens"]).rglob("*.ds")) // 2
    removed = []
    for f in Path(d["removed"]).rglob("*.jsonl"):
        with open(f) as fh:
            removed += [json.loads(line)["id"] for line in fh]
    kept_after_filters, planted_kept = 0, []
    for f in Path(d["filtered"]).rglob("*.jsonl"):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                kept_after_filters += 1
                doc_id = json.loads(line)["id"]
                if doc_id.startswith("a-planted/"):
                    planted_kept.append(doc_id)
    shutil.rmtree(root, ignore_errors=True)
    return {
        "seconds": seconds,
        "startup_s": 0.0,
        "cpu_s": cpu_s,
        "cores": tasks,
        "tokens": int(tokens),
        "documents": kept_after_filters - len(removed),
        "per_stage_s": per_stage,
        "near_removed": len(removed),
        "removed_ids": removed,
        "planted_kept_ids": planted_kept,
        "minhash": {"n_grams": cfg.n_grams, "num_buckets": cfg.num_buckets, "hashes_per_bucket": cfg.hashes_per_bucket},
    }


def loader_speed(prepared: Path, micro_batch: int, grad_accum: int, seconds: float) -> dict:
    import numpy as np

    from llmtrain.data.loader import TokenLoader
    from llmtrain.data.shards import open_prepared

    loader = TokenLoader(prepared, split="train", micro_batch_size=micro_batch, grad_accum=grad_accum, seed=0, shuffle=True)
    L = loader.seq_len
    for _ in range(5):
        loader.next_step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for mb in loader.next_step():
            assert mb["input_ids"].shape == (micro_batch, L)
        steps += 1
    ours = steps * micro_batch * grad_accum * L / (time.perf_counter() - start)

    split = open_prepared(prepared).split("train")  # baseline: the same token bytes as one raw file, memmapped
    raw = prepared.parent / (prepared.name + ".tokens.bin")
    with open(raw, "wb") as f:
        for shard in split.shards:
            shard.tokens.tofile(f)
    mm = np.memmap(raw, dtype=split.shards[0].tokens.dtype, mode="r", shape=(split.rows, L))
    rng = np.random.default_rng(0)
    per_step = micro_batch * grad_accum
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = mm[rng.integers(0, split.rows, per_step)].astype(np.int64)
        assert batch.shape == (per_step, L)
        steps += 1
    baseline = steps * per_step * L / (time.perf_counter() - start)
    raw.unlink()
    return {"loader_tokens_per_s": ours, "memmap_tokens_per_s": baseline, "micro_batch": micro_batch, "grad_accum": grad_accum}


def restrict(truth: dict, keep: list[int]) -> dict:
    """`truth` for the documents `keep` only (renumbered 0..len(keep)-1 in their order)."""
    new = {old: i for i, old in enumerate(sorted(keep))}
    pairs = [[new[a], new[b], j] for a, b, j in truth["pairs"] if a in new and b in new]
    planted = [[new[c], new[p], j, k] for c, p, j, k in truth["planted"] if c in new and p in new]
    return {"n_docs": len(new), "copies": sorted(new[c] for c in truth["copies"] if c in new), "planted": planted, "pairs": pairs}


def dedup_quality(corpus: Path, datatrove: dict | None) -> dict:
    """Our near-dedup (the pipeline's MinHash config, single-process reference) on every planted
    document, and datatrove's removals on the planted documents that passed its filters, each
    scored against the truth."""
    import numpy as np
    import planted_corpus

    from llmtrain.data.minhash import MinHashConfig, near_duplicates

    truth = json.loads((corpus / "planted_truth.json").read_text())
    texts, ids = [], []
    for f in sorted((corpus / "data").glob("a-planted-*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                texts.append(rec["text"])
                ids.append(rec["id"])
    cfg = MinHashConfig(enabled=True)
    t = time.perf_counter()
    dropped = near_duplicates(texts, np.arange(len(texts)), cfg)
    out = {"ours": planted_corpus.score([int(x) for x in dropped], truth), "ours_seconds": round(time.perf_counter() - t, 2)}
    if datatrove is not None:
        index = {name: i for i, name in enumerate(ids)}
        kept = sorted(index[r] for r in datatrove["planted_kept_ids"])
        new = {old: i for i, old in enumerate(kept)}
        theirs = sorted(new[index[r]] for r in datatrove["removed_ids"] if r in index)
        out["datatrove"] = planted_corpus.score(theirs, restrict(truth, kept))
        out["datatrove_filtered_out"] = len(texts) - len(kept)
    return out


def child(args) -> int:
    spec = ARMS.get(args.child)
    out_dir = args.work / "out" / args.child
    if args.child == "loader":
        result = loader_speed(args.work / "out" / "local", args.micro_batch, args.grad_accum, args.loader_seconds)
    elif args.child == "dedup":
        theirs = json.loads(args.datatrove_removed.read_text()) if args.datatrove_removed else None
        result = dedup_quality(args.corpus_dir, theirs)
    else:
        data = args.data_dir / "data"
        if spec["kind"] == "ours":
            result = arm_ours(spec, data, args.tokenizer, args.seq_len, out_dir, args.workers)
        elif spec["kind"] == "hf":
            result = arm_hf(data, args.tokenizer, args.seq_len, args.work, args.workers)
        else:
            result = arm_datatrove(data, args.tokenizer, args.work, args.workers)
    args.result.write_text(json.dumps(result, default=_jsonable))
    return 0


# ---------------------------------------------------------------------------------------------
# Driver

_PHASES = re.compile(r"llmtrain: time: (.*)")


def run_child(name: str, args, data_dir: Path | None = None, extra: list[str] = ()) -> dict | None:
    result = args.work / "results" / f"{name}.json"
    log = args.work / "logs" / f"{name}.log"
    result.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--result", str(result), "--corpus-dir", str(args.corpus_dir)]
    cmd += ["--data-dir", str(data_dir or args.corpus_dir), "--work", str(args.work), "--tokenizer", str(args.tokenizer)]
    cmd += ["--seq-len", str(args.seq_len), "--workers", str(args.workers), "--micro-batch", str(args.micro_batch)]
    cmd += ["--grad-accum", str(args.grad_accum), "--loader-seconds", str(args.loader_seconds), *extra]
    start = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if rc != 0 or not result.exists():
        tail = text.strip().splitlines()[-15:]
        print(f"  {name}: FAILED (exit {rc}, {wall:.0f}s); log {log}:\n    " + "\n    ".join(tail), flush=True)
        return None
    r = json.loads(result.read_text())
    r["process_wall_s"] = round(wall, 1)
    phases = _PHASES.findall(text)
    if phases:
        r["phases"] = phases[-1].strip()
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="the real texts the corpus is generated from")
    p.add_argument("--mb", type=int, default=250, help="corpus size in MB (the issue asks for a few GB: --mb 3000)")
    p.add_argument("--peer-mb", type=int, default=45, help="MB of the slice the datatrove arm (and ours beside it) runs on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache: corpus, tokenizer, outputs, logs")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of: {', '.join(ARMS)}")
    p.add_argument("--tokenizer", type=Path, default=None, help="default: train one (--vocab-size) on --corpus, untimed")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2, help="cores given to the local, hf and datatrove arms")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--loader-seconds", type=float, default=3.0, help="0 skips the loader measurement")
    p.add_argument("--json", type=Path, default=None, help="write the results here too")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--corpus-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--datatrove-removed", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if "datatrove" in arms:
        import importlib.util

        missing = [m for m in ("datatrove", "spacy", "orjson") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"datatrove arm skipped: {', '.join(missing)} not installed (pip install -e '.[bench]')", flush=True)
            arms.remove("datatrove")

    began = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    args.corpus_dir = build_corpus(args.work, args.corpus, args.mb, args.seed)
    meta = json.loads((args.corpus_dir / "meta.json").read_text())
    print(
        f"corpus: {args.corpus_dir} ({meta['bytes'] / 1e6:.0f} MB in {meta['files']} files: {meta['planted_bytes'] / 1e6:.1f} MB "
        f"real texts with {meta['planted_copies']:,} planted near-copies, the rest generated; ready in {time.perf_counter() - began:.0f}s)",
        flush=True,
    )
    slice_dir = build_slice(args.corpus_dir, args.peer_mb)
    sizes = {"all": data_bytes(args.corpus_dir) / 1e6, "slice": data_bytes(slice_dir) / 1e6}
    print(f"slice for datatrove: {slice_dir} ({sizes['slice']:.0f} MB: the planted file and the first generated files)")
    if args.tokenizer is None:
        from llmtrain.data.tokenizer_train import train_tokenizer

        args.tokenizer = Path(train_tokenizer([str(args.corpus)], args.vocab_size, args.work / f"tokenizer-{args.vocab_size}"))
    print(f"tokenizer {args.tokenizer}; seq_len {args.seq_len}; {os.cpu_count()} cores on this machine", flush=True)

    results: dict = {}
    for name in arms:
        where = ARMS[name]["data"]
        data_dir = args.corpus_dir if where == "all" else slice_dir
        warm(data_dir / "data")
        print(f"- {name} ({sizes[where]:.0f} MB) ...", flush=True)
        r = run_child(name, args, data_dir)
        if r is not None:
            r["mb"] = sizes[where]
            results[name] = r
            s = r["seconds"]
            print(
                f"  {s:.1f}s (+{r['startup_s']:.1f}s start-up), {r['mb'] / s:.2f} MB/s, {r['cpu_s']:.0f} CPU-s, "
                f"{r['tokens'] / 1e6:.1f}M tokens" + (f"; {r['phases']}" if "phases" in r else ""),
                flush=True,
            )
        if name != "local":
            shutil.rmtree(args.work / "out" / name, ignore_errors=True)

    loader = None
    if "local" in results and args.loader_seconds > 0:
        loader = run_child("loader", args)
    extra = []
    if "datatrove" in results:
        path = args.work / "results" / "datatrove_removed.json"
        path.write_text(json.dumps({k: results["datatrove"].pop(k) for k in ("removed_ids", "planted_kept_ids")}))
        extra = ["--datatrove-removed", str(path)]
    dedup = run_child("dedup", args, extra=extra)

    report = summarize(results, meta, loader, dedup, args)
    report["wall_s"] = round(time.perf_counter() - began, 1)
    print(f"\nwhole run {report['wall_s']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
        print(f"results: {args.json}")
    failed = [a for a in arms if a not in results]
    return 1 if failed or dedup is None else 0


def summarize(results: dict, meta: dict, loader, dedup, args) -> dict:
    rows = {}
    base = results.get("local")
    for name, r in results.items():
        mb = r["mb"]
        mbps = mb / r["seconds"]
        rows[name] = {
            "label": LABELS[name],
            "mb": round(mb, 1),
            "seconds": round(r["seconds"], 2),
            "startup_s": round(r["startup_s"], 2),
            "cores": r["cores"],
            "mb_per_s": round(mbps, 3),
            "mb_per_s_per_core": round(mbps / r["cores"], 3),
            "mb_per_cpu_s": round(mb / max(r["cpu_s"], 1e-9), 3),
            "end_to_end_mb_per_s": round(mb / (r["seconds"] + r["startup_s"]), 3),
            "tokens": r["tokens"],
            "tokens_per_s": round(r["tokens"] / r["seconds"]),
            "tokens_per_s_per_core": round(r["tokens"] / r["seconds"] / r["cores"]),
            "cpu_s": round(r["cpu_s"], 1),
            **{k: r[k] for k in ("stages", "per_stage_s", "near_removed", "documents") if k in r},
        }
    for row in rows.values():
        row["ratio_vs_local_per_core"] = round(row["mb_per_s_per_core"] / rows["local"]["mb_per_s_per_core"], 3) if base else None

    print()
    print(
        "MB/s and tokens/s over the job time (Ray's start-up apart, in 'start'); per core = / cores given (the 'cores' column);"
    )
    print("MB/CPU-s = MB per CPU second of the arm's whole process tree; 'x local' = MB/s per core over the local arm's")
    head = f"{'arm':<38}{'MB':>6}{'cores':>6}{'s':>8}{'start':>6}{'MB/s':>7}{'MB/s/core':>10}{'MB/CPU-s':>9}{'Mtok/s':>8}{'x local':>8}"
    print(head)
    print("-" * len(head))
    for row in rows.values():
        ratio = f"{row['ratio_vs_local_per_core']:.2f}" if row["ratio_vs_local_per_core"] is not None else "-"
        print(
            f"{row['label']:<38}{row['mb']:6.0f}{row['cores']:6d}{row['seconds']:8.1f}{row['startup_s']:6.1f}{row['mb_per_s']:7.2f}"
            f"{row['mb_per_s_per_core']:10.2f}{row['mb_per_cpu_s']:9.2f}{row['tokens_per_s'] / 1e6:8.2f}{ratio:>8}"
        )

    ray = [f"{row['label']} {row['end_to_end_mb_per_s']:.2f}" for row in rows.values() if row["startup_s"] > 0]
    if ray:
        print("end to end, Ray start-up included (MB/s): " + "; ".join(ray))

    targets = []

    def target(name: str, value, goal: float, unit: str = "x", cpu_value=None):
        if value is None:
            targets.append({"target": name, "value": None, "goal": goal, "met": None})
            print(f"  {name}: not measured (an arm is missing)")
            return
        met = value >= goal
        extra = f"; per CPU second: {cpu_value:.2f}{unit}" if cpu_value is not None else ""
        targets.append({"target": name, "value": round(value, 3), "goal": goal, "met": met, "by_cpu_seconds": cpu_value})
        print(f"  {name}: {value:.2f}{unit} (goal >= {goal}{unit}) {'met' if met else 'NOT met'}{extra}")

    g = lambda a, k: rows[a][k] if a in rows else None  # noqa: E731
    ratio = lambda a, b, k: g(a, k) / g(b, k) if a in rows and b in rows else None  # noqa: E731
    print("\ntargets:")
    target(
        "Ray tokenize+pack per core vs local per core (2 workers vs 2 threads)",
        ratio("ray2", "local", "mb_per_s_per_core"),
        0.9,
        cpu_value=ratio("ray2", "local", "mb_per_cpu_s"),
    )
    target(
        "Ray tokenize+pack, 1 worker per core vs local per core",
        ratio("ray1", "local", "mb_per_s_per_core"),
        0.9,
        cpu_value=ratio("ray1", "local", "mb_per_cpu_s"),
    )
    scaling = ratio("ray2", "ray1", "mb_per_s")
    target("Ray 2 workers vs 1 (MB/s)", scaling, 1.8)
    if scaling is not None:
        print(f"    scaling efficiency 1 -> 2 workers: {scaling / 2:.0%}")
    target(
        "full pipeline MB/s per core (Ray, 2 workers)",
        g("ray2-full", "mb_per_s_per_core"),
        2.0,
        unit=" MB/s",
        cpu_value=g("ray2-full", "mb_per_cpu_s"),
    )
    target(
        "full pipeline vs datatrove, same stages and slice (per core)",
        ratio("ray2-full-slice", "datatrove", "mb_per_s_per_core"),
        1.5,
        cpu_value=ratio("ray2-full-slice", "datatrove", "mb_per_cpu_s"),
    )
    if "ray2-full" in rows and "stages" in rows["ray2-full"]:
        st = rows["ray2-full"]["stages"]
        q = {k: v for k, v in st["quality"]["dropped"].items() if v}
        print(f"\nray2-full stages: quality dropped {sum(q.values()):,} ({q}); PII redacted {st['pii']['redacted']}; ", end="")
        print(f"exact removed {st['dedup']['exact_removed']:,}, near removed {st['dedup']['near_removed']:,}")
    if "datatrove" in rows:
        print(f"datatrove stages (s): {rows['datatrove']['per_stage_s']}; near removed {rows['datatrove']['near_removed']:,}")
    if dedup:
        print(f"\nnear-dedup on the planted part ({meta.get('planted_documents', 0):,} documents):")
        for who in ("ours", "datatrove"):
            if who in dedup:
                print(f"  {who}: {_score_line(dedup[who])}")
        if "datatrove_filtered_out" in dedup:
            n = dedup["datatrove_filtered_out"]
            print(f"  (ours on every planted document; datatrove on those its filters kept: {n:,} were filtered out first)")
    if loader:
        print(
            f"\nloader next_step {loader['loader_tokens_per_s'] / 1e6:.1f}M tok/s (target >= 50M: "
            f"{'met' if loader['loader_tokens_per_s'] >= 50e6 else 'NOT met'}); numpy memmap gather {loader['memmap_tokens_per_s'] / 1e6:.1f}M tok/s"
        )
    print("\nstage matching with datatrove (where the arms differ):")
    for d in DIFFERENCES:
        print(f"  - {d}")
    return {
        "corpus": meta,
        "arms": rows,
        "targets": targets,
        "dedup_planted": dedup,
        "loader": loader,
        "differences": DIFFERENCES,
        "settings": {"seq_len": args.seq_len, "workers": args.workers, "tokenizer": str(args.tokenizer)},
    }


def _score_line(s: dict) -> str:
    recall = next(v for k, v in s.items() if k.startswith("recall_at_"))
    return (
        f"recall of pairs at J >= 0.8 {recall:.3f} ({s['duplicate_pairs']:,} pairs), distinct documents removed "
        f"{s['distinct_removed_fraction']:.4f} (of {s['distinct_documents']:,}), precision {s['precision']:.3f} ({s['removed']:,} removed)"
    )


if __name__ == "__main__":
    sys.exit(main())
