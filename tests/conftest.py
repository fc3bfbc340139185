"""Shared fixtures: the real data in ../shared, and small prepared artifacts built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMTRAIN_SHARED", REPO.parent / "shared")).resolve()
CORPUS = SHARED / "data" / "corpus"
STORIES260K = SHARED / "checkpoints" / "stories260K"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def backend():
    """kernels.set_backend, with the dispatch backend restored after the test."""
    import kernels

    before = kernels.dispatch._backend
    yield kernels.set_backend
    kernels.dispatch._backend = before


def need_shared() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED} (CI always has it; set LLMTRAIN_SHARED)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    need_shared()
    return SHARED


# Data-path artifacts (llmtrain.data), built once per session from slices of the real corpus.


@pytest.fixture(scope="session")
def corpus_slice(shared_dir, tmp_path_factory) -> Path:
    """The first ~120 KB of every corpus file, cut at a line break (or a space)."""
    out = tmp_path_factory.mktemp("corpus_slice")
    for src in sorted(CORPUS.glob("*.txt")):
        text = src.read_text(encoding="utf-8")[:120_000]
        cut = text.rfind("\n") if "\n" in text else text.rfind(" ")
        (out / src.name).write_text(text[:cut], encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def small_tokenizer(corpus_slice, tmp_path_factory) -> Path:
    """Our sentencepiece tokenizer (2,000 tokens) trained on `corpus_slice`."""
    from llmtrain.data.tokenizer_train import train_tokenizer

    return train_tokenizer([str(corpus_slice)], 2000, tmp_path_factory.mktemp("tokenizer") / "tok")


@pytest.fixture(scope="session")
def small_prepared(corpus_slice, small_tokenizer, tmp_path_factory) -> Path:
    """`corpus_slice` prepared with `small_tokenizer`: seq_len 64, several shards, 5% val."""
    from llmtrain.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    return prepare([str(corpus_slice)], small_tokenizer, seq_len=64, output=out, val_fraction=0.05, shard_tokens=20_000)


# The bad-input battery (tests/bad_input.py): a silent TCP peer and the inputs every row starts from.


@pytest.fixture(scope="session")
def silent_server():
    """host:port of a local TCP server that accepts connections and never answers."""
    from bad_input import SilentServer

    server = SilentServer()
    yield server.address
    server.close()


@pytest.fixture(scope="session")
def battery_env(tmp_path_factory, silent_server):
    from bad_input import Env
    from runtime_support import CONFIG, tiny_data

    need_shared()
    data = tiny_data(tmp_path_factory.getbasetemp())
    return Env(
        tmp=tmp_path_factory.mktemp("battery"),
        data=data,
        tok=data.parent / "tok",
        stories=STORIES260K,
        config=CONFIG,
        silent=silent_server,
    )


# Object storage: a real S3 server (SeaweedFS, tests/s3_support.py), started once per session.


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from s3_support import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket (`s3.name`, `s3.uri(key)`) with AWS_ENDPOINT_URL and the keys set for the test."""
    from s3_support import use_server

    return use_server(s3_server, monkeypatch)
