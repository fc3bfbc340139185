"""SFT data: assistant-only masks (with the end-of-turn token), templates without generation
blocks, unusable templates reported, packing equal to examples run alone, the on-disk cache,
and resumable rank-sharded batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STORIES260K, need_shared
from runtime_support import tiny_data

from llmtrain.config import load_config
from llmtrain.data.chat import BUILTIN, ChatTemplate, check_mask, encode_conversations, resolve_template
from llmtrain.data.sft import Choices, SFTSplit, build_cache, read_meta
from llmtrain.data.sft_batches import SFTBatches, pack_rows, row_arrays
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.errors import UserError

CHAT = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Red, then green."},
    ],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
]
# A ChatML template as released instruct models ship it: no {% generation %} blocks.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The same with {% generation %} blocks (what transformers needs to mark the answers itself).
CHATML_MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """Our tokenizer (vocab 512, with the reserved chat tokens)."""
    need_shared()
    return load_tokenizer(tiny_data(tmp_path_factory.getbasetemp()).parent / "tok")


def _spans(tokenizer, ids, mask) -> list[str]:
    """The supervised stretches of an example, decoded with special tokens shown."""
    out, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return [tokenizer.hf().decode(s, skip_special_tokens=False) for s in out]


def test_builtin_template_masks_only_answers_and_their_end_token(tok):
    template = resolve_template("auto", tok)
    assert template.name == "llmtrain"
    end = tok.token_to_id("<|end|>")
    for conv, (ids, mask) in zip(CHAT, encode_conversations(template, tok, CHAT)):
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        spans = _spans(tok, ids, mask)
        assert spans == [a + "<|end|>" for a in answers]  # content + end-of-turn; never prompts or system text
        assert check_mask(ids, mask, template, tok, truncated=False) is None
        assert sum(1 for t, m in zip(ids, mask) if m and t == end) == len(answers)
    assert end in template.stop_ids


def test_plain_and_completion_templates_end_answers_with_eos(shared_dir):
    tokenizer = load_tokenizer(STORIES260K)  # a released tokenizer without chat tokens or template
    auto = resolve_template("auto", tokenizer)
    assert auto.name == "plain"
    for name in ("plain", "completion"):
        template = resolve_template(name, tokenizer)
        ((ids, mask),) = encode_conversations(template, tokenizer, [CHAT[1]])
        supervised = [t for t, m in zip(ids, mask) if m]
        assert supervised[-1] == tokenizer.eos_id
        assert tokenizer.decode(supervised[:-1]).strip() == "Hello there!"
        assert ids[0] == tokenizer.bos_id and not mask[0]
    with pytest.raises(UserError, match="needs the tokens <\\|system\\|> .* which the tokenizer .* lacks"):
        resolve_template("llmtrain", tokenizer)
    with pytest.raises(UserError, match="has no chat template"):
        resolve_template("checkpoint", tokenizer)


def _with_template(tok, tmp_path: Path, source: str):
    """A copy of `tok` whose own chat template is `source` (as a released checkpoint ships it)."""
    d = tmp_path / "tok-with-template"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(tok.path, d)
    (d / "llmtrain_tokenizer.json").unlink()  # read through tokenizer.json, like a released model
    (d / "chat_template.jinja").write_text(source)
    return load_tokenizer(d)


def test_checkpoint_template_without_generation_blocks(tok, tmp_path):
    """A released template has no {% generation %} blocks: the turns found by rendering prefixes
    are exactly the ones transformers marks when the same template has the blocks."""
    released = _with_template(tok, tmp_path, CHATML)
    template = resolve_template("auto", released)
    assert template.name == "checkpoint" and not template.has_generation_blocks
    reference = ChatTemplate("marked", CHATML_MARKED, template.stop_ids)
    assert reference.has_generation_blocks
    hf = released.hf()
    assert hf.apply_chat_template(CHAT[0], chat_template=CHATML, tokenize=False) == hf.apply_chat_template(
        CHAT[0], chat_template=CHATML_MARKED, tokenize=False
    )
    got = encode_conversations(template, released, CHAT)
    want = encode_conversations(reference, released, CHAT)
    assert got == want
    assert any(any(m) for _, m in got)


@pytest.mark.parametrize(
    "source, problem",
    [
        # assistant turns are never rendered: nothing to learn
        (
            "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}",
            "marks no assistant tokens",
        ),
        # a generation block around everything: prompts would be trained on
        (
            "{% generation %}{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}{% endgeneration %}",
            "marks every token as assistant output",
        ),
        # the end-of-turn token outside the block: generations would never stop
        (
            "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
            "<|end|>{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}",
            "would never learn to stop",
        ),
        # no blocks, and earlier turns render differently once later ones follow
        (
            "{% for m in messages %}{% if loop.last %}{{ m['content'] }}<|end|>{% else %}[{{ m['role'] }}]{% endif %}{% endfor %}",
            "cannot be located",
        ),
    ],
)
def test_unusable_templates_are_reported(tok, tmp_path, source, problem):
    path = tmp_path / "t.jinja"
    path.write_text(source)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHAT))
    cfg = load_config(None, [f"data.path={data}", f"data.chat_template={path}", "data.val_fraction=0"])
    template = resolve_template(cfg.data.chat_template, tok)
    with pytest.raises(UserError, match=problem) as err:
        build_cache(cfg.data, tok, template, 256, 0, tmp_path / "cache")
    assert f"{data}: record 1" in str(err.value)
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written


def test_pack_rows_best_fit():
    lengths = np.random.default_rng(0).integers(3, 60, size=500)
    order, rows = pack_rows(lengths, 64, packing=True)
    assert sorted(order.tolist()) == list(range(500))
    sizes = [int(lengths[order[a:b]].sum()) for a, b in zip(rows[:-1], rows[1:])]
    assert max(sizes) <= 64
    assert sum(sizes) / (64 * len(sizes)) > 0.9  # best-fit decreasing packs tightly
    order, rows = pack_rows(lengths, 64, packing=False)
    assert order.tolist() == list(range(500)) and rows.tolist() == list(range(501))


def test_row_arrays_restart_positions_and_cut_labels_at_example_ends():
    tokens = np.array([1, 10, 11, 12, 1, 20, 21], dtype=np.int32)
    mask = np.array([0, 0, 1, 1, 0, 1, 1], dtype=np.uint8)
    ids, labels, pos = row_arrays(tokens, mask, np.array([0, 4]), 10, pad_id=3)
    assert ids.tolist() == [1, 10, 11, 12, 1, 20, 21, 3, 3, 3]
    assert pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert labels.tolist() == [-100, 11, 12, -100, 20, 21, -100, -100, -100, -100]


def _pairs_file(path: Path, n: int = 60) -> Path:
    rng = np.random.default_rng(1)
    words = "red green blue cat dog sun moon tree river stone bird fish".split()
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(words, size=int(rng.integers(1, 8))))
            a = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
            f.write(json.dumps({"question": f"{i}: {q}?", "answer": a}) + "\n")
    return path


def _tiny_model(vocab: int):
    from llmtrain.model.decoder import Decoder
    from llmtrain.model.model_config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(
        "tiny",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Decoder(cfg).eval()


def test_packed_batch_gives_each_examples_loss_alone(tok, tmp_path):
    data = _pairs_file(tmp_path / "pairs.jsonl")
    cfg = load_config(
        None, [f"data.path={data}", "data.prompt_field=question", "data.response_field=answer", "data.val_fraction=0"]
    )
    template = resolve_template("auto", tok)
    cache = build_cache(cfg.data, tok, template, 96, 0, tmp_path / "cache")
    split = SFTSplit.open(cache, "train")
    model = _tiny_model(tok.vocab_size)
    multi = [r for r in range(split.num_rows) if len(split.row(r)[2]) >= 3]
    assert multi, "packing put several examples in a row"
    with torch.no_grad():
        for r in multi[:3]:
            tokens, mask, starts = split.row(r)
            ids, labels, pos = (torch.from_numpy(a)[None] for a in row_arrays(tokens, mask, starts, 96, 3))
            bounds = [*starts.tolist(), len(tokens)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                only = torch.full_like(labels, -100)
                only[0, a:b] = labels[0, a:b]
                packed = model(ids, position_ids=pos, labels=only)
                e_ids, e_labels, _ = (
                    torch.from_numpy(x)[None] for x in row_arrays(tokens[a:b], mask[a:b], np.array([0]), b - a, 3)
                )
                alone = model(e_ids, labels=e_labels)
                assert (only != -100).sum() == (e_labels != -100).sum() > 0
                torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # without packing: one example per row, the same supervised tokens in total
    unpacked = build_cache(cfg.data.model_copy(update={"packing": False}), tok, template, 96, 0, tmp_path / "cache")
    assert unpacked != cache
    a, b = read_meta(cache)["train"], read_meta(unpacked)["train"]
    assert a["supervised_tokens"] == b["supervised_tokens"] and a["examples"] == b["examples"] == b["rows"] > a["rows"]


def test_cache_is_keyed_by_data_tokenizer_and_template(tok, tmp_path):
    data = _pairs_file(tmp_path / "pairs.jsonl")
    cfg = load_config(None, [f"data.path={data}", "data.prompt_field=question", "data.response_field=answer"])
    template = resolve_template("auto", tok)
    first = build_cache(cfg.data, tok, template, 96, 0, tmp_path / "cache")
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert build_cache(cfg.data, tok, template, 96, 0, tmp_path / "cache") == first
    assert (first / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert (first / "tokenizer" / "chat_template.jinja").read_text() == BUILTIN["llmtrain"]
    other_template = build_cache(cfg.data, tok, resolve_template("plain", tok), 96, 0, tmp_path / "cache")
    _pairs_file(data, n=61)
    other_data = build_cache(cfg.data, tok, template, 96, 0, tmp_path / "cache")
    other_tok = build_cache(
        cfg.data, load_tokenizer(STORIES260K), resolve_template("plain", load_tokenizer(STORIES260K)), 96, 0, tmp_path / "cache"
    )
    assert len({first, other_template, other_data, other_tok}) == 4
    m = read_meta(other_data)
    assert m["train"]["read"] + m["val"]["read"] == 61


def test_batches_are_rank_shards_of_one_global_batch_and_resume_exactly(tok, tmp_path):
    data = _pairs_file(tmp_path / "pairs.jsonl", n=120)
    cfg = load_config(
        None, [f"data.path={data}", "data.prompt_field=question", "data.response_field=answer", "data.packing=false"]
    )
    cache = build_cache(cfg.data, tok, resolve_template("auto", tok), 96, 0, tmp_path / "cache")
    split = SFTSplit.open(cache, "train")

    def loader(rank, world, accum):
        return SFTBatches(split, 96, 3, micro_batch_size=2, grad_accum=accum, rank=rank, world_size=world, seed=5)

    single = loader(0, 1, 4)
    steps = [torch.cat([mb["input_ids"] for mb in single.next_step()]) for _ in range(40)]  # > 1 epoch
    ranks = [loader(r, 2, 2) for r in range(2)]
    for step in steps[:3]:
        assert torch.equal(torch.cat([torch.cat([mb["input_ids"] for mb in r.next_step()]) for r in ranks]), step)
    resumed = loader(0, 1, 4)
    resumed.load_state_dict(json.loads(json.dumps(single.state_dict())))
    fresh = loader(0, 1, 4)
    for _ in range(40):
        fresh.next_step()
    assert torch.equal(
        torch.cat([mb["input_ids"] for mb in resumed.next_step()]), torch.cat([mb["input_ids"] for mb in fresh.next_step()])
    )
    epoch = torch.cat(steps[: split.num_rows // 8])
    assert len({tuple(r.tolist()) for r in epoch}) == len(epoch)  # no row twice within an epoch
    with pytest.raises(UserError, match="not from this SFT data"):
        loader(0, 1, 4).load_state_dict({**single.state_dict(), "rows": 7})


def test_labelled_records_become_label_word_examples_and_choices(tok, tmp_path, shared_dir):
    data = shared_dir / "data" / "eval" / "sentiment_train.jsonl"
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            "data.max_examples=40",
            "data.max_val_examples=12",
            'data.template="Review: {text}\\nSentiment:"',
            "data.chat_template=completion",
            'data.label_words={positive: " good", negative: " bad"}',
            "data.truncation=drop",
        ],
    )
    cache = build_cache(cfg.data, tok, resolve_template("completion", tok), 256, 0, tmp_path / "cache")
    meta = read_meta(cache)
    assert meta["format"] == "labelled" and meta["train"]["examples"] + meta["train"]["too_long"] == 40
    split = SFTSplit.open(cache, "train")
    tokens, mask, starts = split.row(0)
    first = slice(0, int(starts[1]) if len(starts) > 1 else len(tokens))
    answer = tokens[first][mask[first] != 0]
    assert tok.decode(answer[:-1].tolist()).strip() in ("good", "bad") and answer[-1] == tok.eos_id
    choices = Choices.open(cache)
    assert choices.labels == ["positive", "negative"] and 0 < len(choices.gold) <= 12
    records = [json.loads(line) for line in data.read_text().splitlines()]
    texts = {r["text"]: r["label"] for r in records}
    for k in range(len(choices.gold)):
        cands = [choices.candidate(k * 2 + j) for j in range(2)]
        prompt = tok.decode(cands[0][0][cands[0][1] == 0].tolist()).removeprefix("Review: ").removesuffix("\nSentiment:")
        assert [tok.decode(t[m != 0][:-1].tolist()).strip() for t, m in cands] == ["good", "bad"]
        assert choices.labels[choices.gold[k]] == texts[prompt]
