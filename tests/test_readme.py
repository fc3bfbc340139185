"""The README's first screen: exactly two commands, the second is what CI runs, and the first
(the quickstart) really works end to end on the Python-shipped corpus (with fewer steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from runtime_support import llmtrain

REPO = Path(__file__).resolve().parents[1]


def first_screen_commands() -> list[str]:
    screen = "\n".join(REPO.joinpath("README.md").read_text().splitlines()[:25])
    blocks = re.findall(r"```bash\n(.*?)```", screen, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_first_screen_holds_two_commands_and_ci_runs_the_second():
    commands = first_screen_commands()
    assert len(commands) == 2, commands
    assert "llmtrain quickstart" in commands[0]
    assert "pytest" in commands[1]
    ci = REPO.joinpath(".ci", "run").read_text()
    assert commands[1] in ci.splitlines(), "the CI script runs the README's test command"


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    proc = llmtrain(
        "quickstart",
        "--output",
        str(out),
        "--steps",
        "40",
        "--vocab-size",
        "1024",
        "--seq-len",
        "128",
        "train.log_every=10",
        "train.val_every=0",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    start, end = re.search(r"val loss:\s+([\d.]+) -> ([\d.]+)", text).groups()
    assert float(end) < float(start) - 0.5, "pretraining visibly learns"
    assert "[quickstart] corpus: text shipped with Python" in text
    assert re.search(r"\[quickstart\] generate 'The meaning of' -> 'The meaning of.+'", text)
    for where in ("tokenizer", "data", "pretrain", "model"):
        assert str(out / where) in text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.vocab_size == tok.vocab_size == 1024
