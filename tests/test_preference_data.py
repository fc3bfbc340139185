"""Preference data (llmtrain/data/preference.py): both record forms supervise only the answers
(with their end-of-turn token), identical pairs and missing fields, truncation (prompt first,
then answers) with its counts, the cache key, packed pairs whose per-sequence log-probs equal
each sequence run alone, and resumable rank-sharded batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need_shared
from runtime_support import tiny_data

from llmtrain.config import load_config
from llmtrain.data.chat import encode_conversations, resolve_template
from llmtrain.data.preference import PreferenceBatches, PreferenceSplit, build_preference_cache, fit_pair, pair_conversations
from llmtrain.data.sft import read_meta
from llmtrain.data.sft_batches import row_arrays
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.errors import UserError
from llmtrain.tasks.dpo_loss import batch_logprobs

WORDS = "red green blue cat dog sun moon tree river stone bird fish".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """Our tokenizer (vocab 512, with the reserved chat tokens)."""
    need_shared()
    return load_tokenizer(tiny_data(tmp_path_factory.getbasetemp()).parent / "tok")


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _random_records(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    say = lambda k: " ".join(rng.choice(WORDS, size=int(rng.integers(1, k))))  # noqa: E731
    return [{"prompt": f"{i}: {say(8)}?", "chosen": say(10), "rejected": f"no {say(10)}"} for i in range(n)]


def _cfg(path: Path, *overrides: str):
    return load_config(None, [f"data.path={path}", "data.val_fraction=0", *overrides])


def _build(tok, path: Path, root: Path, seq_len: int = 256, *overrides: str, template: str = "auto"):
    return build_preference_cache(_cfg(path, *overrides).data, tok, resolve_template(template, tok), seq_len, 0, root)


def _supervised(tok, ids, mask) -> list[str]:
    """The supervised stretches of a sequence, decoded with special tokens shown."""
    out, cur = [], []
    for t, m in zip([*ids, -1], [*mask, 0]):
        if m:
            cur.append(int(t))
        elif cur:
            out.append(tok.hf().decode(cur, skip_special_tokens=False))
            cur = []
    return out


# ---------------------------------------------------------------------------------------------
# Records


FORMS = [
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Red, then green."},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Another colour?"},
        ],
        "chosen": {"role": "assistant", "content": "Yes: teal."},
        "rejected": [{"role": "assistant", "content": "No."}],
    },
    {"messages": [{"role": "user", "content": "Say hi."}], "chosen": "Hi!", "rejected": "Go away."},
    {
        "prompt": [{"role": "user", "content": "Count to two."}],
        "chosen": [{"role": "assistant", "content": "One, two."}],
        "rejected": "Three.",
    },
]
ANSWERS = [("Blue.", "Red, then green."), ("Yes: teal.", "No."), ("Hi!", "Go away."), ("One, two.", "Three.")]


def test_both_record_forms_supervise_only_the_answers_and_their_end_token(tok, tmp_path):
    data = _write(tmp_path / "forms.jsonl", FORMS)
    cache = _build(tok, data, tmp_path / "cache", 320, "data.system_prompt=Answer in English.")
    split = PreferenceSplit.open(cache, "train")
    assert split.num_pairs == 4 and split.num_rows == 1  # four short pairs packed into one row
    hf = tok.hf()
    for k in range(split.num_pairs):
        record = int(split.records[k])
        for (ids, mask), answer in zip(split.pair(k), ANSWERS[record]):
            assert _supervised(tok, ids, mask) == [answer + "<|end|>"]  # the answer and its end token, nothing else
            text = hf.decode(ids.tolist(), skip_special_tokens=False)
            assert ("<|system|>\nAnswer in English." in text) == (record == 0)  # system_prompt: the prompt form only
            if record == 1:
                assert "<|assistant|>\nHello.<|end|>" in text  # the shared assistant turn is prompt, unsupervised
    end = tok.token_to_id("<|end|>")
    assert read_meta(cache)["stop_ids"] == [end]

    mb = PreferenceBatches(split, 320, 3, micro_batch_size=1, grad_accum=1, rank=0, world_size=1, seed=0).next_step()[0]
    ids, labels, seq_ids = mb["input_ids"][0], mb["labels"][0], mb["seq_ids"][0]
    assert torch.equal(seq_ids == -1, labels == -100)
    assert mb["chosen_index"].tolist() == [0, 2, 4, 6] and mb["rejected_index"].tolist() == [1, 3, 5, 7]
    assert mb["pair_ids"].tolist() == [0, 1, 2, 3]
    for s in range(8):
        k, side = divmod(s, 2)
        targets = labels[seq_ids == s]
        want = [t for t, m in zip(*split.pair(k)[side]) if m]
        assert targets.tolist() == want and targets[-1] == end  # labels: exactly the answer tokens, end token last
        assert mb["response_lengths"][s] == len(want)
        where = torch.nonzero(seq_ids == s).flatten()
        assert torch.equal(labels[where], ids[where + 1])  # labels[t] is the next token


def test_identical_pairs_are_counted_and_dropped(tok, tmp_path):
    records = _random_records(10)
    for i in (2, 5, 7):
        records[i]["rejected"] = records[i]["chosen"]
    meta = read_meta(_build(tok, _write(tmp_path / "d.jsonl", records), tmp_path / "cache"))
    assert meta["train"]["read"] == 10 and meta["train"]["pairs"] == 7 and meta["train"]["dropped"]["identical"] == 3
    same = [{**r, "rejected": r["chosen"]} for r in records[:4]]
    with pytest.raises(UserError, match="no training pairs left \\(4 read, 4 with chosen identical to rejected, dropped\\)"):
        _build(tok, _write(tmp_path / "same.jsonl", same), tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [meta["key"]]  # nothing half-written


@pytest.mark.parametrize(
    "change, overrides, message",
    [
        (
            lambda r: r.pop("rejected"),
            [],
            "record 3 has no field 'rejected' \\(fields: chosen, prompt\\); set data.rejected_field",
        ),
        (lambda r: r.pop("prompt"), [], "record 3 has no field 'prompt' .* set data.prompt_field"),
        (lambda r: None, ["data.chosen_field=better"], "record \\d has no field 'better' .* set data.chosen_field"),
        (lambda r: r.update(chosen=[{"role": "user", "content": "x"}]), [], "record 3: 'chosen' has no assistant message"),
        (
            lambda r: r.update(rejected=[{"role": "bot", "content": "x"}]),
            [],
            "record 3: 'rejected' message 1 has unknown role 'bot'",
        ),
    ],
)
def test_missing_or_malformed_fields_name_the_file_record_and_field(tok, tmp_path, change, overrides, message):
    records = _random_records(5)
    change(records[2])
    data = _write(tmp_path / "d.jsonl", records)
    with pytest.raises(UserError, match=f"{data}: {message}"):
        _build(tok, data, tmp_path / "cache", 256, *overrides)


def test_sft_formats_are_refused(tok, tmp_path):
    with pytest.raises(UserError, match="data.format=pairs is an SFT format"):
        _build(tok, _write(tmp_path / "d.jsonl", _random_records(3)), tmp_path / "cache", 256, "data.format=pairs")


# ---------------------------------------------------------------------------------------------
# Truncation


def test_fit_pair_cuts_prompts_first_then_answers_and_never_empties_an_answer():
    assert fit_pair((10, 10), (5, 6), 64) == ((10, 10), (5, 6))  # fits: unchanged
    assert fit_pair((40, 41), (5, 6), 64) == ((26, 26), (5, 6))  # prompts cut from the left only
    assert fit_pair((40, 40), (30, 10), 64) == ((16, 16), (22, 10))  # prompts at seq_len // 4, the longer answer cut
    rng = np.random.default_rng(0)
    for _ in range(2000):
        seq_len = int(rng.integers(8, 300))
        prompts, responses = tuple(int(x) for x in rng.integers(1, 400, 2)), tuple(int(x) for x in rng.integers(1, 400, 2))
        (pc, pr), (rc, rr) = fit_pair(prompts, responses, seq_len)
        assert pc + pr + rc + rr <= seq_len
        if (rc, rr) != responses:  # answers are cut only once both prompts are down to the floor
            assert (pc, pr) == tuple(min(p, seq_len // 4) for p in prompts)
        for kept, full in zip((rc, rr), responses):  # every answer keeps >= seq_len // 4 tokens: never empty
            assert min(full, seq_len // 4) <= kept <= full


def test_truncation_policies_and_their_counts(tok, tmp_path):
    seq_len = 64
    long_prompt = "Tell me: " + " ".join(WORDS * 3)
    records = [
        {"prompt": long_prompt, "chosen": "Blue.", "rejected": "Red."},  # only the prompt is cut
        {"prompt": long_prompt, "chosen": " ".join(WORDS * 2), "rejected": "Red."},  # prompt, then the long answer
        {"prompt": long_prompt, "chosen": " ".join(WORDS * 3) + " yes", "rejected": " ".join(WORDS * 3) + " no"},  # same, cut
        *({"prompt": f"{i}?", "chosen": "sun", "rejected": "moon"} for i in range(6)),  # fit as they are
    ]
    data = _write(tmp_path / "d.jsonl", records)
    template = resolve_template("auto", tok)
    cache = _build(tok, data, tmp_path / "cache", seq_len)
    meta = read_meta(cache)["train"]
    assert meta["truncated"] == {"prompt": 3, "response": 2}  # pairs 2 and 3 needed both cuts
    assert meta["dropped"] == {"identical": 0, "identical_after_truncation": 1, "too_long": 0, "no_response": 0}
    split = PreferenceSplit.open(cache, "train")
    kept = {int(r): k for k, r in enumerate(split.records)}
    assert sorted(kept) == [0, 1, *range(3, 9)]
    for record in (0, 1):
        full = [
            encode_conversations(template, tok, [conv])[0]
            for conv in pair_conversations(records[record], _cfg(data).data, "x")[:2]
        ]
        for (ids, mask), (full_ids, full_mask) in zip(split.pair(kept[record]), full):
            first, full_first = int(np.argmax(mask)), full_mask.index(1)
            assert ids[:first].tolist() == full_ids[full_first - first : full_first]  # the prompt's end is kept
            assert first >= min(full_first, seq_len // 4)
            answer = full_ids[full_first:]
            if record == 0 or len(answer) <= 10:
                assert ids[first:].tolist() == answer  # short answers are whole (with <|end|> and its newline)
            else:
                assert ids[first:].tolist() == answer[: len(ids) - first] and len(ids) - first < len(answer)  # cut right
    for r in range(split.num_rows):
        assert len(split.row(r)[0]) <= seq_len

    dropped = read_meta(_build(tok, data, tmp_path / "cache", seq_len, "data.pair_truncation=drop"))["train"]
    assert dropped["pairs"] == 6 and dropped["dropped"]["too_long"] == 3 and dropped["truncated"] == {"prompt": 0, "response": 0}
    with pytest.raises(
        UserError,
        match=f"{data}: 3 of 9 train pairs do not fit seq_len 64 as one row \\(chosen \\+ rejected, "
        "longest \\d+ tokens\\); set data.pair_truncation=prompt_first or drop",
    ):
        _build(tok, data, tmp_path / "cache", seq_len, "data.pair_truncation=error")


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_is_reused_on_the_same_key_and_rebuilt_on_a_change(tok, tmp_path):
    data = _write(tmp_path / "d.jsonl", _random_records(20))
    root = tmp_path / "cache"
    first = _build(tok, data, root)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert _build(tok, data, root) == first and (first / "meta.json").stat().st_mtime_ns == stamp  # reused as is
    assert (first / "tokenizer" / "chat_template.jinja").is_file()
    others = {
        _build(tok, data, root, 128),
        _build(tok, data, root, 256, "data.pair_truncation=drop"),
        _build(tok, data, root, 256, "data.chosen_field=rejected", "data.rejected_field=chosen"),
        _build(tok, data, root, template="plain"),
        build_preference_cache(_cfg(data).data, tok, resolve_template("auto", tok), 256, 1, root),  # seed
    }
    _write(data, _random_records(21))
    others.add(_build(tok, data, root))
    assert first not in others and len(others) == 6
    meta = read_meta(first)
    assert meta["pad_id"] == tok.pad_id and meta["train"]["pairs"] == 20 and "val" not in meta


# ---------------------------------------------------------------------------------------------
# Batches


def test_packed_pairs_give_each_sequences_logprob_alone(tok, tmp_path):
    from llmtrain.model.decoder import Decoder
    from llmtrain.model.model_config import ModelConfig

    cache = _build(tok, _write(tmp_path / "d.jsonl", _random_records(30)), tmp_path / "cache", 128)
    split = PreferenceSplit.open(cache, "train")
    rows = sorted(range(split.num_rows), key=lambda r: -len(split.row(r)[3]))[:2]
    assert len(split.row(rows[0])[3]) >= 2, "packing put several pairs in a row"
    batches = PreferenceBatches(split, 128, 3, micro_batch_size=2, grad_accum=1, rank=0, world_size=1, seed=0)
    mb = batches.micro_batch(rows)
    torch.manual_seed(0)
    model = Decoder(
        ModelConfig.from_preset(
            "tiny",
            vocab_size=tok.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    with torch.no_grad():
        packed = batch_logprobs(model, mb)
        ce = model(mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"], reduction="none")
        assert ce.shape == mb["labels"].shape and torch.all(ce[mb["labels"] == -100] == 0)
        torch.testing.assert_close(ce.sum(), model(mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"]))
        alone = []
        for r in rows:
            tokens, mask, starts, _ = split.row(r)
            for a, b in zip(starts, [*starts[1:], len(tokens)]):
                ids, labels, _ = (torch.from_numpy(x)[None] for x in row_arrays(tokens[a:b], mask[a:b], np.array([0]), b - a, 3))
                alone.append(-model(ids, labels=labels, reduction="none").sum())
    assert len(packed) == len(alone) == 2 * len(mb["pair_ids"]) >= 6
    torch.testing.assert_close(packed, torch.stack(alone), rtol=0, atol=1e-5)


def test_per_token_loss_gradients_equal_autograd_through_the_logits():
    from llmtrain.model.decoder import Decoder
    from llmtrain.model.model_config import ModelConfig

    torch.manual_seed(0)
    model = Decoder(
        ModelConfig.from_preset(
            "tiny",
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    )
    ids = torch.randint(0, 96, (2, 12))
    labels = torch.where(torch.rand(2, 12) < 0.5, torch.randint(0, 96, (2, 12)), -100)
    weights = torch.randn(2, 12)
    (model(ids, labels=labels, reduction="none") * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ce = torch.nn.functional.cross_entropy(model(ids).reshape(-1, 96), labels.reshape(-1), reduction="none").view(2, 12)
    (ce * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_batches_resume_exactly_and_two_ranks_serve_what_one_does(tok, tmp_path):
    cache = _build(tok, _write(tmp_path / "d.jsonl", _random_records(120)), tmp_path / "cache", 96)
    split = PreferenceSplit.open(cache, "train")

    def loader(rank, world, accum, **kw):
        return PreferenceBatches(split, 96, 3, micro_batch_size=2, grad_accum=accum, rank=rank, world_size=world, seed=5, **kw)

    def step(b):
        mbs = b.next_step()
        return {k: torch.cat([mb[k] for mb in mbs]) for k in ("input_ids", "labels", "position_ids", "pair_ids")}

    single = loader(0, 1, 4)
    steps = [step(single) for _ in range(split.num_rows // 8 + 2)]  # past one epoch
    ranks = [loader(r, 2, 2) for r in range(2)]
    for s in steps[:3]:
        parts = [step(r) for r in ranks]
        for k in s:
            assert torch.equal(torch.cat([p[k] for p in parts]), s[k]), k
    epoch = torch.cat([s["pair_ids"] for s in steps[: split.num_rows // 8]])
    assert len(set(epoch.tolist())) == len(epoch)  # no pair twice within an epoch

    resumed = loader(0, 1, 4)
    resumed.load_state_dict(json.loads(json.dumps(single.state_dict())))
    a, b = resumed.next_step(), single.next_step()
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    with pytest.raises(UserError, match="not from this preference data"):
        loader(0, 1, 4).load_state_dict({**single.state_dict(), "kind": "sft"})

    val = loader(0, 1, 4, wrap=False, shuffle=False)
    served = []
    for _ in range(split.num_rows // 8 + 1):  # the last step is padded with empty rows
        for mb in val.next_step():
            served += mb["pair_ids"].tolist()
            assert len(mb["chosen_index"]) == len(mb["pair_ids"]) and len(mb["response_lengths"]) == 2 * len(mb["pair_ids"])
    assert served == list(range(split.num_pairs))
    empty = val.next_step()[0]  # past the end: valid, pair-less micro-batches
    assert empty["pair_ids"].numel() == 0 and torch.all(empty["seq_ids"] == -1) and torch.all(empty["labels"] == -100)
