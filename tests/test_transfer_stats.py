"""benchmarks/transfer.py's bookkeeping: the labelled splits (nested, the LR-choice split inside
the main set and disjoint) and the Welch interval of a difference of means."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import need_shared
from runtime_support import benchmark


def test_splits_are_nested_and_the_validation_split_is_held_out(tmp_path):
    need_shared()
    transfer = benchmark("transfer")
    files = transfer.splits(argparse.Namespace(examples=200, curve=[50, 200, 400]), tmp_path)
    rows = {name: [json.loads(line)["text"] for line in path.read_text().splitlines()] for name, path in files.items()}
    assert [len(rows[f"train-{n}"]) for n in (50, 200, 400)] == [50, 200, 400]
    assert rows["train-400"][:200] == rows["train-200"] and rows["train-200"][:50] == rows["train-50"]
    assert rows["sweep-train"] + rows["sweep-val"] == rows["train-200"] and len(rows["sweep-val"]) == 40
    again = transfer.splits(argparse.Namespace(examples=200, curve=[50]), tmp_path / "again")
    assert again["train-200"].read_bytes() == files["train-200"].read_bytes()  # a fixed draw


def test_welch_interval():
    transfer = benchmark("transfer")
    # worked by hand: means 0.61 and 0.5233, variances 1e-4 and 6.33e-4, se 0.01563, df 2.61 -> t(2) = 4.303
    diff, low, high = transfer.welch_interval([0.60, 0.62, 0.61], [0.50, 0.55, 0.52])
    assert diff == pytest.approx(0.08667, abs=1e-4)
    assert (low, high) == (pytest.approx(0.0194, abs=2e-4), pytest.approx(0.1539, abs=2e-4))
    # many equal-variance values: the normal interval, +-1.96 se
    a, b = [0.0, 1.0] * 50, [0.5, 1.5] * 50
    diff, low, high = transfer.welch_interval(a, b)
    se = (2 * 0.25 * 100 / 99 / 100) ** 0.5
    assert diff == pytest.approx(-0.5) and high - diff == pytest.approx(1.96 * se, rel=1e-6)
