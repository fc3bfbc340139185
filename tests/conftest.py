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


def need_shared() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED} (CI always has it; set LLMTRAIN_SHARED)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    need_shared()
    return SHARED
