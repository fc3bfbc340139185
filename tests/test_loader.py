"""TokenLoader: batch semantics, permutation epochs, bitwise resume, world-size changes, mixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmtrain.data.loader import TokenLoader
from llmtrain.data.prepare import prepare
from llmtrain.data.sample_order import MixtureSchedule, Permutation
from llmtrain.data.shards import open_prepared, split_rows
from llmtrain.errors import UserError


def expected_row(split, r: int, bos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input, labels and positions of row r, derived from the split's whole token stream."""
    L = split.seq_len
    stream = np.concatenate([s.tokens.reshape(-1) for s in split.shards]).astype(np.int64)
    real = split.tokens
    inputs = stream[r * L : (r + 1) * L]
    nxt = np.arange(r * L + 1, (r + 1) * L + 1)
    labels = np.where(nxt < real, stream[np.minimum(nxt, len(stream) - 1)], -100)
    resets = (np.arange(L) == 0) | (inputs == bos) | (np.arange(r * L, (r + 1) * L) == real)
    last_reset = np.maximum.accumulate(np.where(resets, np.arange(L), 0))
    return inputs, labels, np.arange(L) - last_reset


def samples(batches: list[dict]) -> list[tuple[np.ndarray, ...]]:
    out = []
    for mb in batches:
        for i in range(mb["input_ids"].shape[0]):
            out.append(tuple(mb[k][i].numpy() for k in ("input_ids", "labels", "position_ids")))
    return out


def run(loader: TokenLoader, steps: int) -> list[list[dict]]:
    return [loader.next_step() for _ in range(steps)]


def same(a: list[list[dict]], b: list[list[dict]]) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(torch.equal(p[k], q[k]) for p, q in zip(x, y) for k in p) for x, y in zip(a, b)
    )


def test_batches_match_the_token_stream_over_a_full_epoch(small_prepared):
    loader = TokenLoader(small_prepared, micro_batch_size=8, grad_accum=2, seed=3)
    split = open_prepared(small_prepared).split("train")
    n, G = loader.num_rows, loader.global_batch
    assert n == split.rows and loader.seq_len == 64 and loader.vocab_size == 2000
    steps = -(-n // G)
    got = samples([mb for step in run(loader, steps) for mb in step])
    rows = loader.rows_for(np.arange(steps * G))[1]
    assert sorted(rows[:n].tolist()) == list(range(n))  # an epoch is a permutation of all rows
    assert rows[:n].tolist() != list(range(n))
    shard_ends = set((split.first_row[1:] - 1).tolist())
    assert shard_ends <= set(rows[:n].tolist())  # rows whose label comes from the next shard are covered
    for (inputs, labels, positions), r in zip(got, rows):
        exp = expected_row(split, int(r), bos=1)
        assert np.array_equal(inputs, exp[0]) and np.array_equal(labels, exp[1]) and np.array_equal(positions, exp[2])
    mb = loader.next_step()[0]
    assert all(t.dtype == torch.int64 and t.shape == (8, 64) and t.is_contiguous() for t in mb.values())


def test_val_is_sequential_and_its_size_is_cheap(small_prepared):
    val = TokenLoader(small_prepared, split="val", micro_batch_size=4, grad_accum=1, shuffle=False)
    split = open_prepared(small_prepared).split("val")
    assert val.num_rows == split.rows == split_rows(small_prepared, "val") > 0
    got = samples([mb for step in run(val, -(-val.num_rows // 4)) for mb in step])
    for r, (inputs, labels, positions) in enumerate(got):
        exp = expected_row(split, r % split.rows, bos=1)
        assert np.array_equal(inputs, exp[0]) and np.array_equal(labels, exp[1]) and np.array_equal(positions, exp[2])
    last_labels = got[split.rows - 1][1]
    assert last_labels[-1] == -100  # nothing follows the end of the split
    assert val.has_split("val") and val.has_split("train")


def test_resume_is_bitwise_identical(small_prepared):
    kwargs = dict(micro_batch_size=2, grad_accum=3, rank=1, world_size=2, seed=11)
    full = run(TokenLoader(small_prepared, **kwargs), 9)
    first = TokenLoader(small_prepared, **kwargs)
    run(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # travels through a checkpoint as JSON
    assert set(state) >= {"seed", "epoch", "cursor"} and state["cursor"] == 4 * 12
    resumed = TokenLoader(small_prepared, **(kwargs | {"seed": 999}))  # the state's seed wins
    resumed.load_state_dict(state)
    assert same(run(resumed, 5), full[4:])
    assert not same(run(TokenLoader(small_prepared, **(kwargs | {"seed": 12})), 1), full[:1])


def test_world_size_change_continues_the_same_global_sequence(small_prepared):
    def global_samples(mb: int, ga: int, world: int, steps: int, state=None) -> list:
        loaders = [
            TokenLoader(small_prepared, micro_batch_size=mb, grad_accum=ga, rank=r, world_size=world, seed=5)
            for r in range(world)
        ]
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(state)
        out = []
        for _ in range(steps):
            for loader in loaders:  # rank order, then micro-batch order = global batch order
                out += samples(loader.next_step())
        return out, loaders[0].state_dict()

    reference, _ = global_samples(4, 2, 1, 6)  # global batch 8
    for mb, ga, world in [(2, 2, 2), (1, 2, 4), (1, 8, 1)]:
        got, _ = global_samples(mb, ga, world, 6)
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, reference))
    # switch from 2 ranks to 4 ranks after 3 steps
    _, state = global_samples(2, 2, 2, 3)
    tail, _ = global_samples(1, 2, 4, 3, state)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(tail, reference[24:]))


def test_epoch_boundary_inside_a_batch(small_prepared):
    one = TokenLoader(small_prepared, micro_batch_size=1, grad_accum=1, seed=2)
    n = one.num_rows
    per_sample = [samples(one.next_step())[0][0] for _ in range(n + 5)]
    epoch0 = {s.tobytes() for s in per_sample[:n]}
    assert len(epoch0) == n  # every row exactly once (rows are distinct text)
    assert [s.tobytes() for s in per_sample[n:]] != [s.tobytes() for s in per_sample[:5]]  # a new order
    assert one.state_dict()["epoch"] == 1 and one.state_dict()["cursor"] == 5
    big = TokenLoader(small_prepared, micro_batch_size=4, grad_accum=2, seed=2)
    big.load_state_dict({**one.state_dict(), "epoch": 0, "cursor": n - 3})
    spanning = [s[0] for s in samples(big.next_step())]
    assert all(np.array_equal(a, b) for a, b in zip(spanning, per_sample[n - 3 : n + 5]))


def test_state_from_other_data_is_refused(small_prepared, small_tokenizer, corpus_slice, tmp_path):
    other = prepare([str(corpus_slice / "inaugural.txt")], small_tokenizer, 64, tmp_path / "other")
    state = TokenLoader(other).state_dict()
    loader = TokenLoader(small_prepared)
    with pytest.raises(UserError, match="belongs to other data"):
        loader.load_state_dict(state)
    with pytest.raises(UserError, match="malformed"):
        loader.load_state_dict({"seed": 0})


@pytest.fixture(scope="module")
def second_source(small_tokenizer, corpus_slice, tmp_path_factory):
    return prepare(
        [str(corpus_slice / "tinyshakespeare.txt")], small_tokenizer, 64, tmp_path_factory.mktemp("mix") / "shakespeare"
    )


def test_mixture_is_weighted_deterministic_and_resumable(small_prepared, second_source):
    sources = [(small_prepared, 1.0), (second_source, 3.0)]
    loader = TokenLoader(sources, micro_batch_size=4, grad_accum=2, seed=1)
    assert loader.tokenizer_dir == small_prepared / "tokenizer" and loader.manifest["seq_len"] == 64
    steps = run(loader, 250)  # 2000 samples = 2 whole schedule blocks
    shares = loader.realized_shares()
    assert shares == {str(small_prepared): 0.25, str(second_source): 0.75}
    # every sample really is a row of the source the schedule gave it to
    src, rows = loader.rows_for(np.arange(2000))
    splits = [open_prepared(p).split("train") for p, _ in sources]
    for (inputs, labels, _), s, r in zip(samples([mb for st in steps for mb in st]), src, rows):
        exp = expected_row(splits[int(s)], int(r), bos=1)
        assert np.array_equal(inputs, exp[0]) and np.array_equal(labels, exp[1])
    # the small source ran through more than one epoch, each a permutation of its rows
    n_small = splits[1].rows
    small_rows = rows[src == 1]
    assert len(small_rows) > n_small and sorted(small_rows[:n_small].tolist()) == list(range(n_small))
    # resume in O(1) from the state after 100 steps
    again = TokenLoader(sources, micro_batch_size=8, grad_accum=1, seed=1)
    first = TokenLoader(sources, micro_batch_size=4, grad_accum=2, seed=1)
    run(first, 100)
    again.load_state_dict(first.state_dict())
    tail = samples([mb for st in run(again, 150) for mb in st])
    ref = samples([mb for st in steps[100:] for mb in st])
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(tail, ref)) and len(tail) == len(ref)


def test_mixture_needs_same_tokenizer_and_seq_len(small_prepared, small_tokenizer, shared_dir, corpus_slice, tmp_path):
    from conftest import STORIES260K

    other_len = prepare([str(corpus_slice / "inaugural.txt")], small_tokenizer, 32, tmp_path / "len32")
    with pytest.raises(UserError, match="same --seq-len"):
        TokenLoader([(small_prepared, 1), (other_len, 1)])
    other_tok = prepare([str(corpus_slice / "tinystories_val_subset.txt")], STORIES260K, 64, tmp_path / "stories")
    with pytest.raises(UserError, match="same tokenizer"):
        TokenLoader([(small_prepared, 1), (other_tok, 1)])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n, monkeypatch):
    perm = Permutation(n, key=42)
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    monkeypatch.setattr(Permutation, "TABLE_MAX", 0)  # evaluated per call instead of tabulated
    lazy = Permutation(n, key=42)
    assert lazy.table is None and np.array_equal(lazy(np.arange(n)), out)
    if n >= 64:
        assert not np.array_equal(Permutation(n, key=43)(np.arange(n)), out)
        assert np.mean(out == np.arange(n)) < 0.1


def test_mixture_schedule_consumes_each_source_in_order():
    mix = MixtureSchedule([0.5, 0.3, 0.2], seed=0, block=100)
    src, local = mix.assign(np.arange(1000))
    for s, count in enumerate([50, 30, 20]):
        assert (src[:100] == s).sum() == count
        assert local[src == s].tolist() == list(range(10 * count))  # no sample skipped or repeated
    assert mix.samples_before(150).tolist() == np.bincount(src[:150], minlength=3).tolist()
    tiny = MixtureSchedule([1000.0, 1.0], seed=0)
    assert tiny.counts.min() >= 1  # every source is sampled


def test_bad_layout_and_sources(small_prepared):
    with pytest.raises(UserError, match="invalid batch layout"):
        TokenLoader(small_prepared, rank=2, world_size=2)
    with pytest.raises(UserError, match="must be > 0"):
        TokenLoader([(small_prepared, 1.0), (small_prepared, 0.0)])
    with pytest.raises(UserError, match="must be > 0"):
        TokenLoader([(small_prepared, -2)])
