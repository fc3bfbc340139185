"""Generation with the KV cache: greedy decoding of stories260K equals transformers' token for
token and the text documented in ../shared/data/README.md; sampling options; the CLI."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import STORIES260K
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from llmtrain.cli import main
from llmtrain.errors import UserError
from llmtrain.generate import generate
from llmtrain.model.decoder import Decoder
from llmtrain.model.hf import load_hf_model
from llmtrain.model.model_config import ModelConfig

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

PROMPT = "Once upon a time"


def documented_greedy_text(shared_dir) -> str:
    readme = (shared_dir / "data" / "README.md").read_text()
    match = re.search(r'Greedy decoding of "Once upon a time" gives: "(.+?)"', readme, flags=re.S)
    assert match, "README no longer documents the stories260K greedy output"
    return " ".join(match.group(1).split())


@pytest.fixture(scope="module")
def stories(shared_dir):
    return load_hf_model(STORIES260K), AutoTokenizer.from_pretrained(str(STORIES260K), local_files_only=True)


def test_greedy_matches_transformers_token_for_token(stories, shared_dir):
    model, tok = stories
    ids = tok(PROMPT)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(STORIES260K).eval()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False)[0].tolist()
    got = generate(model, ids, max_new_tokens=60, eos_id=model.config.eos_token_id)
    assert got == expected
    assert tok.decode(got[:45], skip_special_tokens=True) == documented_greedy_text(shared_dir)


def test_sampling_options(stories):
    model, tok = stories
    ids = tok(PROMPT)["input_ids"]
    greedy = generate(model, ids, 30)
    assert generate(model, ids, 30, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(model, ids, 30, temperature=1.0, top_p=1e-6, seed=3) == greedy
    a = generate(model, ids, 30, temperature=1.0, seed=11)
    assert a == generate(model, ids, 30, temperature=1.0, seed=11)
    draws = {tuple(generate(model, ids, 30, temperature=1.5, seed=s)) for s in range(4)}
    assert len(draws) > 1 and all(len(d) == len(ids) + 30 for d in draws)
    with pytest.raises(UserError, match="--top-p"):
        generate(model, ids, 5, temperature=1.0, top_p=1.5)


def test_eos_stops_and_batches_match_single_rows(stories):
    model, tok = stories
    ids = tok(PROMPT)["input_ids"]
    greedy = generate(model, ids, 20)
    stop = greedy[len(ids) + 3]
    assert stop not in greedy[len(ids) : len(ids) + 3]
    assert generate(model, ids, 20, eos_id=stop) == greedy[: len(ids) + 4]

    other = tok("The little dog")["input_ids"][: len(ids)]
    batch = torch.tensor([ids, other])
    out = generate(model, batch, 12)
    assert out.shape == (2, len(ids) + 12)
    assert out[0].tolist() == generate(model, ids, 12) and out[1].tolist() == generate(model, other, 12)


def test_prompt_longer_than_positions_is_refused():
    torch.manual_seed(0)
    model = Decoder(
        ModelConfig.from_preset(
            "tiny",
            vocab_size=50,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
        )
    )
    assert len(generate(model, [1, 2, 3], 13)) == 16
    with pytest.raises(UserError, match="exceeds the model's 16 positions"):
        generate(model, [1, 2, 3], 14)


def test_cli_generate(shared_dir, capsys, tmp_path):
    assert main(["generate", str(STORIES260K), "--prompt", PROMPT, "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out.strip() == documented_greedy_text(shared_dir)

    assert (
        main(
            [
                "generate",
                str(STORIES260K),
                "--prompt",
                PROMPT,
                "--prompt",
                "The cat",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0.9",
                "--top-k",
                "20",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    texts = capsys.readouterr().out.strip().split("\n\n")
    assert len(texts) == 2 and texts[0].startswith(PROMPT) and texts[1].startswith("The cat")

    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmtrain: error:") and "config.json" in err and err.count("\n") == 1
