"""prepare with object storage on a real S3 server (SeaweedFS): inputs read from s3://, output
published under an s3:// prefix with the manifest last, verified, rerun as a no-op; a partial
upload is replaced, a prefix of someone else's objects is never touched."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain.cli import main
from llmtrain.data import objstore
from llmtrain.data.prepare import prepare
from llmtrain.errors import UserError


def _upload_corpus(s3, corpus_slice: Path) -> str:
    """The slice's files under s3://BUCKET/corpus/, the last one gzipped as JSON Lines."""
    files = sorted(corpus_slice.glob("*.txt"))
    for f in files[:-1]:
        s3.put(f"corpus/{f.name}", f.read_bytes())
    last = files[-1].read_text(encoding="utf-8").split("\n\n")
    s3.put("corpus/last.jsonl.gz", gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in last).encode()))
    return s3.uri("corpus/")


def _local_copy(s3, corpus_slice: Path, root: Path) -> Path:
    files = sorted(corpus_slice.glob("*.txt"))
    root.mkdir()
    for f in files[:-1]:
        (root / f.name).write_bytes(f.read_bytes())
    (root / "last.jsonl.gz").write_bytes(s3.get("corpus/last.jsonl.gz"))
    return root


def _shards(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.endswith(".arrow")}


def _remote_files(s3, prefix: str) -> dict[str, bytes]:
    return {k.removeprefix(prefix): s3.get(k) for k in s3.keys(prefix)}


def test_s3_inputs_and_output_give_the_local_bytes(s3, corpus_slice, small_tokenizer, tmp_path, capfd):
    corpus = _upload_corpus(s3, corpus_slice)
    local_in = _local_copy(s3, corpus_slice, tmp_path / "in")
    local = prepare([str(local_in)], small_tokenizer, 64, tmp_path / "local", val_fraction=0.05, shard_tokens=20_000)
    out = s3.uri("data/tiny")
    assert prepare([corpus], small_tokenizer, 64, out, val_fraction=0.05, shard_tokens=20_000) == out
    remote = _remote_files(s3, "data/tiny/")
    assert _shards(remote) == {p.name: p.read_bytes() for p in local.glob("*.arrow")}
    manifest = json.loads(remote["manifest.json"])
    assert manifest["splits"] == json.loads((local / "manifest.json").read_text())["splits"]
    assert all(i["path"].startswith(corpus) for i in manifest["build"]["inputs"])
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in remote["manifest.json"].decode()  # no credential is ever written
    assert objstore.remote_state(out) == "dataset"
    assert main(["verify", out]) == 0
    capfd.readouterr()
    prepare([corpus], small_tokenizer, 64, out, val_fraction=0.05, shard_tokens=20_000)  # a rerun: nothing to do
    assert "is up to date" in capfd.readouterr().err
    with pytest.raises(UserError, match="other inputs or settings; pass --force"):
        prepare([corpus], small_tokenizer, 32, out, val_fraction=0.05, shard_tokens=20_000)


def test_a_partial_upload_is_replaced_and_foreign_objects_are_never_touched(s3, corpus_slice, small_tokenizer):
    corpus = _upload_corpus(s3, corpus_slice)
    out = s3.uri("data/partial")
    objstore.start_upload(out)  # what an upload that died leaves: its marker and a shard, no manifest
    s3.put("data/partial/train-00000.arrow", b"truncated")
    assert objstore.remote_state(out) == "partial"
    prepare([corpus], small_tokenizer, 64, out, val_fraction=0.05)
    assert objstore.remote_state(out) == "dataset"
    objstore.verify_remote(out)
    s3.put("theirs/report.csv", b"a,b\n")
    with pytest.raises(UserError, match="not an llmtrain dataset"):
        prepare([corpus], small_tokenizer, 64, s3.uri("theirs"), force=True)
    assert s3.keys("theirs/") == ["theirs/report.csv"]


@pytest.mark.slow
def test_ray_data_reads_and_writes_s3_with_the_same_bytes(s3, s3_server, corpus_slice, small_tokenizer, tmp_path):
    """Ray workers read the inputs from S3 themselves (credentials from the environment only)."""
    corpus = _upload_corpus(s3, corpus_slice)
    reference = prepare(
        [corpus], small_tokenizer, 64, tmp_path / "ref", val_fraction=0.05, shard_tokens=20_000, minhash={"enabled": True}
    )
    out = s3.uri("data/ray")
    args = ["--input", corpus, "--tokenizer", str(small_tokenizer), "--seq-len", "64", "--output", out, "--val-fraction", "0.05"]
    args += ["--shard-tokens", "20000", "--near-dedup", "--executor", "ray", "--workers", "2"]
    run = subprocess.run([sys.executable, "-m", "llmtrain.cli", "prepare", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    remote = _remote_files(s3, "data/ray/")
    assert remote == {str(p.relative_to(reference)): p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in run.stderr
