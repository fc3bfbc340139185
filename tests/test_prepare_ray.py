"""prepare on Ray Data: the same bytes as in-process for 1 and 2 workers, with every stage on, a
worker killed mid-job, compressed and JSONL inputs; the driver killed leaves nothing complete."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtrain.data.prepare import prepare
from llmtrain.data.quality import QualityConfig, quality_reason
from llmtrain.data.shards import open_prepared, verify
from llmtrain.data.tokenizer import load_tokenizer

STAGES = ["--quality", "--pii", "--near-dedup"]
# Quality thresholds loosened for a corpus of hard-wrapped paragraphs (Gopher's 50-word minimum
# and FineWeb's lines-ending-in-punctuation ratio would drop most of them): the stage still
# runs, and drops the short lines of plays and verse.
QUALITY = {"enabled": True, "min_words": 20, "min_punctuation_lines_ratio": None}


def _corpus(corpus_slice: Path, root: Path) -> Path:
    """corpus_slice, plus a gzipped JSONL file with near and exact copies of its paragraphs and
    documents carrying PII, so that every stage has something to do."""
    out = root / "corpus"
    out.mkdir()
    paragraphs = []
    for src in sorted(corpus_slice.glob("*.txt")):
        (out / src.name).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
        paragraphs += [p for p in src.read_text(encoding="utf-8").split("\n\n") if len(p.split()) > 60][:5]
    records = []
    for i, p in enumerate(paragraphs):
        words = p.split()
        records += [p, p]  # two copies: at least one exact duplicate, whatever the corpus file's own block is
        records.append(" ".join(words[:-2] + ["indeed", "so"]))  # a near copy: the last two words changed
        records.append(f"Write to user{i}@example.com or call +1 415-555-01{i:02d} about this: " + " ".join(words[:40]))
    with gzip.open(out / "extra.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": r}) + "\n")
    return out, paragraphs


def _cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "prepare", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        **kw,
    )


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(corpus_slice, small_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("prep_ray")
    corpus, paragraphs = _corpus(corpus_slice, root)
    stages = root / "stages.yaml"
    stages.write_text(json.dumps({"quality": QUALITY}))
    common = [
        "--input", str(corpus), "--tokenizer", str(small_tokenizer), "--seq-len", "64", "--shard-tokens", "20000",
        "--val-fraction", "0.05", "--stages", str(stages), *STAGES,
    ]  # fmt: skip
    out = prepare(
        [str(corpus)], small_tokenizer, seq_len=64, output=root / "local", val_fraction=0.05, shard_tokens=20_000,
        quality=QUALITY, pii={"enabled": True}, minhash={"enabled": True},
    )  # fmt: skip
    return root, common, out, paragraphs


def test_every_stage_counts_into_the_manifest(reference):
    _, _, out, paragraphs = reference
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stages"]
    assert sum(stages["quality"]["dropped"].values()) > 0
    cfg = QualityConfig.from_dict(QUALITY)
    passing = sum(quality_reason(p, cfg) is None for p in paragraphs)  # their copies pass too, and are removed
    assert passing >= 20
    assert stages["pii"]["redacted"]["email"] >= passing and stages["pii"]["redacted"]["phone"] >= passing
    assert stages["dedup"]["exact_removed"] >= passing  # the exact copies (and the corpus's own repeats)
    assert passing <= stages["dedup"]["near_removed"] <= passing + 5  # the near copies (and a few of the corpus's own)
    data = open_prepared(out)
    tok = load_tokenizer(out / "tokenizer")
    text = "".join(
        tok.decode(s.tokens.reshape(-1)[: s.real_tokens].astype(int).tolist())
        for name in ("train", "val")
        for s in data.splits[name].shards
    )
    assert "example.com" not in text and "415-555" not in text
    assert "EMAIL" in text


@pytest.mark.slow
def test_ray_data_gives_the_same_bytes_for_1_and_2_workers_and_after_a_killed_worker(reference):
    root, common, local, _ = reference
    expected = _files(local)
    one = _cli([*common, "--output", str(root / "ray1"), "--executor", "ray", "--workers", "1"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert _files(root / "ray1") == expected
    marker = root / "killed"
    two = _cli(
        [*common, "--output", str(root / "ray2"), "--executor", "ray", "--workers", "2"],
        env={"LLMTRAIN_TEST_KILL_UNIT": f"3:{marker}"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert marker.exists(), "the test hook never killed a worker"
    assert _files(root / "ray2") == expected
    verify(root / "ray2")


@pytest.mark.slow
def test_a_killed_driver_leaves_no_output_and_the_rerun_completes(reference):
    root, common, local, _ = reference
    out = root / "killed-driver"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtrain.cli", "prepare", *common, "--output", str(out), "--executor", "ray", "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".killed-driver.tmp-") for p in root.iterdir()):
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only the hidden temp dir: nothing named like the output
    assert [p for p in root.iterdir() if p.name.startswith(".killed-driver.tmp-")]
    again = _cli([*common, "--output", str(out), "--executor", "local"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert _files(out) == _files(local)
    assert not [p for p in root.iterdir() if p.name.startswith(".killed-driver.tmp-")]  # the rerun removed the dead run's


def test_dry_run_counts_what_the_real_run_drops_and_writes_nothing(reference, capfd):
    from llmtrain.data.preview import preview

    root, _, out, _ = reference
    before = sorted(root.rglob("*"))
    counts = preview([str(root / "corpus")], sample=10**9, quality=QUALITY, pii={"enabled": True}, minhash={"enabled": True})
    report = capfd.readouterr().err
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    for name, n in stages["quality"]["dropped"].items():
        assert counts.get(f"quality.{name}", 0) == n, name
    for kind, n in stages["pii"]["redacted"].items():
        assert counts.get(f"pii.{kind}", 0) == n, kind
    assert counts["dedup.exact"] == stages["dedup"]["exact_removed"]
    assert counts["dedup.near"] == stages["dedup"]["near_removed"]
    assert counts["kept"] == json.loads((out / "manifest.json").read_text())["totals"]["documents"]
    assert "e.g. Write to user0@example.com" in report and "-> Write to <EMAIL>" in report  # an example, before and after
    assert sorted(root.rglob("*")) == before  # nothing written


def _variants(shared_corpus: Path, out: Path, files: int, mb: float = 2.0) -> Path:
    """`files` text files of ~`mb` MB each: paragraphs of the corpus, each made unique per file."""
    out.mkdir()
    paragraphs = [
        p for f in sorted(shared_corpus.glob("*.txt")) for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()
    ]
    per_file = int(mb * 1e6 / (sum(map(len, paragraphs)) / len(paragraphs)))
    for i in range(files):
        start = (i * per_file) % len(paragraphs)
        chosen = [paragraphs[(start + j) % len(paragraphs)] + f" [{i}.{j}]" for j in range(per_file)]
        (out / f"part-{i:03d}.txt").write_text("\n\n".join(chosen), encoding="utf-8")
    return out


@pytest.mark.slow
def test_worker_memory_does_not_grow_with_the_corpus(shared_dir, small_tokenizer, tmp_path):
    """Peak RSS of the processes that run stage A on 1x and 4x the corpus (4 vs 16 files of
    1.5 MB, 2 workers, near-dedup on so signatures are kept too): within 1.25x of each other."""
    from conftest import CORPUS

    peaks = []
    for n in (4, 16):
        corpus = _variants(CORPUS, tmp_path / f"in{n}", n, mb=1.5)
        run = _cli(
            [
                "--input",
                str(corpus),
                "--tokenizer",
                str(small_tokenizer),
                "--seq-len",
                "256",
                "--output",
                str(tmp_path / f"out{n}"),
            ]
            + ["--near-dedup", "--executor", "ray", "--workers", "2"]
        )
        assert run.returncode == 0, run.stderr[-3000:]
        peaks.append(float(re.search(r"peak memory of a stage-A process: (\d+) MB", run.stderr).group(1)))
    print(f"stage-A peak RSS, 1x and 4x the corpus: {peaks} MB")
    assert peaks[1] <= 1.25 * peaks[0], peaks


def test_a_large_jsonl_file_read_as_byte_ranges_gives_the_whole_file_bytes(small_tokenizer, corpus_slice, tmp_path):
    """Stage A cuts a JSON Lines file into byte ranges (units) so that a few large files still
    spread over the workers; the ranges cover every line once, so the output is the same bytes."""
    import llmtrain.data.pipeline as pipeline
    from llmtrain.data.readers import list_inputs

    lines = [json.dumps({"text": p}) for f in sorted(corpus_slice.glob("*.txt")) for p in f.read_text().split("\n\n")]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "all.jsonl").write_text("\n".join(lines) + "\n")
    whole = prepare([str(tmp_path / "in")], small_tokenizer, 64, tmp_path / "whole", shard_tokens=20_000)
    original = pipeline.CHUNK_BYTES
    try:
        pipeline.CHUNK_BYTES = 10_007  # ranges that begin and end mid-line
        plan = pipeline.plan_units(list_inputs([str(tmp_path / "in")]), pipeline.CHUNK_BYTES)
        assert len(plan) > 50
        ranged = prepare([str(tmp_path / "in")], small_tokenizer, 64, tmp_path / "ranged", shard_tokens=20_000)
    finally:
        pipeline.CHUNK_BYTES = original
    assert _files(ranged) == _files(whole)
