"""benchmarks/finetune_throughput.py's data plumbing: the HF side trains on exactly the rows
llmtrain's SFT loop serves, step by step, with the same supervised tokens (seconds; the
training runs themselves are the benchmark's, minutes each)."""

from __future__ import annotations

import argparse

import numpy as np
from runtime_support import benchmark

from llmtrain.data.sft import SFTSplit, read_meta
from llmtrain.data.sft_batches import IGNORE, SFTBatches


def test_hf_rows_are_llmtrain_steps(tmp_path):
    ft = benchmark("finetune_throughput")
    args = argparse.Namespace(work=tmp_path, data=ft.DEFAULT_DATA, seq_len=512, max_examples=64, workers=2)
    base = ft.build_base(tmp_path / "base", tiny=True)
    config = (base / "config.json").read_text()
    assert '"vocab_size": 151936' in config and '"tie_word_embeddings": true' in config
    cache, rows = ft.prepare_rows(args, base)
    ids, labels, pos = (np.load(rows / f"{k}.npy") for k in ("input_ids", "labels", "position_ids"))
    split, meta = SFTSplit.open(cache, "train"), read_meta(cache)
    micro, accum, world = 1, 2, 2
    global_batch = micro * accum * world
    ranks = [SFTBatches(split, 512, meta["pad_id"], micro, accum, r, world, seed=0) for r in range(world)]
    for step in range(3):  # step s of llmtrain = rows s*G .. s*G+G-1 of the export, rank r a contiguous share
        ours = [mb for r in ranks for mb in r.next_step()]
        window = slice(step * global_batch, (step + 1) * global_batch)
        np.testing.assert_array_equal(np.concatenate([mb["input_ids"].numpy() for mb in ours]), ids[window])
        np.testing.assert_array_equal(np.concatenate([mb["position_ids"].numpy() for mb in ours]), pos[window])
        our_labels = np.concatenate([mb["labels"].numpy() for mb in ours])
        np.testing.assert_array_equal(labels[window][:, 1:], our_labels[:, :-1])  # transformers shifts by one itself
        assert (labels[window][:, 0] == IGNORE).all() and (our_labels[:, -1] == IGNORE).all()
        supervised = int((our_labels != IGNORE).sum())
        assert supervised == int((labels[window][:, 1:] != IGNORE).sum()) > 0  # what each side counts per step
    # packed: several examples per row, position ids restarting at each (transformers' packed mask)
    restarts = (np.diff(pos, axis=1) != 1).sum(axis=1)
    assert restarts.max() >= 1
    assert ft.prepare_rows(args, base) == (cache, rows)  # reused, not rebuilt
