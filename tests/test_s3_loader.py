"""Training data in S3 (llmtrain/data/shard_cache.py) on a real S3 server (SeaweedFS, tests/s3_support.py):
the batches, resume and losses of the same data on local disk; the per-node cache's integrity
checks, eviction bound and prefetch."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from llmtrain.config import load_config
from llmtrain.data import objstore, shard_cache
from llmtrain.data.loader import TokenLoader
from llmtrain.data.shard_cache import ShardCache
from llmtrain.data.shards import check_fits_model, open_prepared
from llmtrain.errors import UserError


@pytest.fixture
def aws(s3_server, monkeypatch):
    """This process's AWS_* variables point at the session's S3 server (conftest), as a node's
    environment would."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    yield s3_server
    for cache in list(ShardCache._instances.values()):  # each test starts with cold processes
        cache.close()


@pytest.fixture(scope="module")
def uploaded(s3_server, small_prepared) -> str:
    """`small_prepared` published to a bucket (manifest last)."""
    uri = f"s3://{s3_server.make_bucket()}/data"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        objstore.upload_dir(small_prepared, uri)
    return uri


def steps(loader: TokenLoader, n: int) -> list[list[dict]]:
    return [loader.next_step() for _ in range(n)]


def same(a: list[list[dict]], b: list[list[dict]]) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(torch.equal(p[k], q[k]) for p, q in zip(x, y) for k in ("input_ids", "labels", "position_ids"))
        for x, y in zip(a, b)
    )


def cache_of(loader: TokenLoader) -> ShardCache:
    return loader.splits[0].cache.cache


def shard_bytes(prepared: Path, split: str) -> int:
    manifest = json.loads((prepared / "manifest.json").read_text())
    return sum(int(s["bytes"]) for s in manifest["splits"][split]["shards"])


def test_batches_and_resume_equal_local_disk(aws, uploaded, small_prepared, tmp_path):
    layout = dict(micro_batch_size=4, grad_accum=2, world_size=2, seed=7)
    local = [TokenLoader(small_prepared, rank=r, **layout) for r in (0, 1)]
    remote = [TokenLoader(uploaded, rank=r, cache_dir=tmp_path / "cache", **layout) for r in (0, 1)]
    assert remote[0].num_rows == local[0].num_rows and len(remote[0].splits[0].shards) > 4
    whole = [steps(lo, 12) for lo in local]
    first = [steps(lo, 5) for lo in remote]
    state = remote[0].state_dict()
    assert state["sources"][0]["path"] == uploaded  # the URI, not a folded path
    for cache in list(ShardCache._instances.values()):  # a new process: cold cache instance, same files
        cache.close()
    resumed = [TokenLoader(uploaded, rank=r, cache_dir=tmp_path / "cache", **layout) for r in (0, 1)]
    for lo in resumed:
        lo.load_state_dict(state)
    rest = [steps(lo, 7) for lo in resumed]
    for r in (0, 1):
        assert same(first[r] + rest[r], whole[r])
    # the local run's state resumes the S3 run too: the position is (seed, g), not where the bytes are
    local_state = local[0].state_dict()
    again = TokenLoader(uploaded, rank=0, cache_dir=tmp_path / "cache", **layout)
    again.load_state_dict(local_state)
    assert same(steps(again, 2), steps(local[0], 2))
    # messages name the URI; the tokenizer copy is local (and checked)
    with pytest.raises(UserError, match=f"^{uploaded} holds token ids up to 1999 but model.preset=tiny has 10"):
        check_fits_model(again.data[0], 10, "model.preset=tiny", None, "fix it")
    assert again.tokenizer_dir == cache_of(again).dir / "tokenizer" and again.data[0].where == uploaded
    # the training split's cache is a byte-for-byte copy (the val split is fetched when validation reads it)
    cache_of(again).wait_idle()
    for shard in open_prepared(small_prepared).split("train").shards:
        assert (cache_of(again).dir / shard.file).read_bytes() == shard.path.read_bytes()


def test_validation_streams_through_a_small_cache(aws, uploaded, small_prepared, tmp_path):
    """A sequential read keeps only the window of the next steps: the cache stays under
    cache_bytes while the whole split passes through, and the batches are the local ones."""
    budget = shard_bytes(small_prepared, "train") // 3
    kw = dict(split="train", micro_batch_size=8, grad_accum=1, shuffle=False, seed=0)
    local = TokenLoader(small_prepared, **kw)
    remote = TokenLoader(uploaded, cache_dir=tmp_path / "c", cache_bytes=budget, prefetch_steps=2, **kw)
    cache = cache_of(remote)
    peak, done = [0], threading.Event()

    def sample() -> None:  # the directory's size while downloads run, not only between steps
        while not done.is_set():
            peak[0] = max(peak[0], cache.disk_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(-(-remote.num_rows // 8)):
            assert same([remote.next_step()], [local.next_step()])
    finally:
        done.set()
        sampler.join()
    assert 0 < peak[0] <= budget
    assert cache.stats["evicted"] > 0 and cache.stats["fetched"] >= len(remote.splits[0].shards)


def test_prefetch_runs_ahead_of_the_loader(aws, uploaded, tmp_path, monkeypatch):
    """In steady state the consuming thread neither fetches nor waits: the prefetch threads have
    every shard by then (the shuffled split is cached whole, first-use order first)."""
    loader = TokenLoader(uploaded, micro_batch_size=8, grad_accum=2, seed=1, cache_dir=tmp_path / "c")
    cache = cache_of(loader)
    loader.next_step()  # the first step starts the prefetch threads (and may wait for its shards)
    cache.wait_idle()
    assert cache.stats["fetched"] == len(loader.splits[0].shards)
    before = (cache.stats["consumer_fetches"], cache.stats["consumer_waits"])

    class Unreachable:  # the network gone: any request fails
        def __getattr__(self, name):
            raise AssertionError(f"a request ({name}) in steady state")

    monkeypatch.setattr(cache, "fs", Unreachable())
    monkeypatch.setattr(objstore, "remote_state", Unreachable().__getattr__)
    steps(loader, 30)
    assert (cache.stats["consumer_fetches"], cache.stats["consumer_waits"]) == before
    assert cache.stats["fetched"] == len(loader.splits[0].shards)  # nothing fetched twice
    reopened = TokenLoader(uploaded, micro_batch_size=8, grad_accum=2, seed=1, cache_dir=tmp_path / "c")
    reopened.load_state_dict(loader.state_dict())  # e.g. the validation loader, or a resumed one: no request either
    assert same(steps(reopened, 3), steps(loader, 3))


def test_sequential_prefetch_keeps_ahead_of_a_slower_consumer(aws, uploaded, small_prepared, tmp_path):
    """Streaming with a cache smaller than the split: a consumer that takes longer per step than
    a fetch never waits after the first step."""
    kw = dict(split="train", micro_batch_size=32, grad_accum=1, shuffle=False)
    loader = TokenLoader(uploaded, cache_dir=tmp_path / "c", cache_bytes=shard_bytes(small_prepared, "train") // 2, **kw)
    cache = cache_of(loader)
    loader.next_step()
    cache.wait_idle()
    before = cache.stats["consumer_fetches"] + cache.stats["consumer_waits"]
    for _ in range(-(-loader.num_rows // 32) - 1):
        time.sleep(0.02)  # the step's compute
        loader.next_step()
    assert cache.stats["consumer_fetches"] + cache.stats["consumer_waits"] == before
    assert cache.stats["evicted"] > 0


def test_corrupt_cache_files_are_refetched(aws, uploaded, small_prepared, tmp_path):
    loader = TokenLoader(uploaded, micro_batch_size=8, cache_dir=tmp_path / "c")
    loader.next_step()
    cache = cache_of(loader)
    cache.wait_idle()
    root = cache.dir
    cache.close()
    flipped, cut = root / "train-00001.arrow", root / "train-00002.arrow"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte off
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-10])
    again = TokenLoader(uploaded, micro_batch_size=8, cache_dir=tmp_path / "c")
    local = TokenLoader(small_prepared, micro_batch_size=8)
    assert same(steps(again, 20), steps(local, 20))
    cache = cache_of(again)
    cache.wait_idle()
    assert (cache.stats["corrupt"], cache.stats["fetched"]) == (2, 2)
    assert flipped.read_bytes() == (small_prepared / flipped.name).read_bytes()


def test_object_changed_after_the_manifest_is_one_line(aws, uploaded, small_prepared, tmp_path):
    fs, path = objstore.filesystem(uploaded)
    name = "train-00003.arrow"
    original = (small_prepared / name).read_bytes()
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        loader = TokenLoader(uploaded, micro_batch_size=8, cache_dir=tmp_path / "c")
        with pytest.raises(UserError) as err:
            for _ in range(100):
                loader.next_step()
            cache_of(loader).wait_idle()
    finally:
        with fs.open_output_stream(f"{path}/{name}") as f:
            f.write(original)
    msg = str(err.value)
    assert "\n" not in msg and f"{uploaded}/{name}" in msg and "changed after the manifest was written" in msg
    assert "--force" in msg


def test_a_shuffled_split_larger_than_the_cache_is_refused(aws, uploaded, small_prepared, tmp_path, monkeypatch):
    need = shard_bytes(small_prepared, "train")
    with pytest.raises(UserError) as err:
        TokenLoader(uploaded, cache_dir=tmp_path / "c", cache_bytes=need - 1)
    msg = str(err.value)
    assert "\n" not in msg and f"data.cache_bytes={need - 1}" in msg and f">= {need}" in msg and uploaded in msg
    loader = TokenLoader(uploaded, cache_dir=tmp_path / "c", cache_bytes=need)  # exactly the split: fine
    # the node's free disk is checked where batches are drawn (a driver on another machine does not)
    full = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(shard_cache.shutil, "disk_usage", lambda path: full)
    with pytest.raises(UserError, match=rf"^data.cache_dir={tmp_path / 'c'}: 1000 B free on this node, but caching"):
        loader.next_step()


def test_missing_and_partial_datasets_are_one_line(aws, small_prepared, tmp_path):
    bucket = aws.make_bucket()
    with pytest.raises(UserError, match=r"^s3://.*/nothing: nothing there; create it with `llmtrain prepare"):
        open_prepared(f"s3://{bucket}/nothing", tmp_path)
    partial = f"s3://{bucket}/partial"
    objstore.start_upload(partial)
    objstore.write_bytes(f"{partial}/train-00000.arrow", (small_prepared / "train-00000.arrow").read_bytes())
    with pytest.raises(UserError, match="an upload that did not finish"):
        TokenLoader(partial, cache_dir=tmp_path)


def test_processes_of_a_node_fetch_each_shard_once(aws, uploaded, tmp_path):
    """Two caches on one directory (two training processes of a node): the flock makes the
    second wait for the first's download instead of fetching the same object again."""
    a = TokenLoader(uploaded, micro_batch_size=8, rank=0, world_size=2, cache_dir=tmp_path / "c")
    ShardCache._instances.clear()  # rank 1 is another process: its own cache instance
    b = TokenLoader(uploaded, micro_batch_size=8, rank=1, world_size=2, cache_dir=tmp_path / "c")
    ca, cb = cache_of(a), cache_of(b)
    assert ca is not cb and ca.dir == cb.dir
    for _ in range(3):
        a.next_step()
        b.next_step()
    ca.wait_idle()
    cb.wait_idle()
    assert ca.stats["fetched"] + cb.stats["fetched"] == len(a.splits[0].shards)
    ca.close()


def test_config_takes_an_s3_uri_and_cache_settings(tmp_path):
    cfg = load_config(None, ["data.path=s3://bucket/pre/fix", "data.cache_bytes=200GB", f"data.cache_dir={tmp_path}"])
    assert (cfg.data.path, cfg.data.cache_bytes, cfg.data.cache_dir) == ("s3://bucket/pre/fix", 200_000_000_000, tmp_path)
    assert load_config(None, []).data.cache_bytes == 64 << 30
    mix = load_config(None, ["data.mixture=[{path: s3://b/a, weight: 1}, {path: local, weight: 1}]"]).data.mixture
    assert [m.path for m in mix] == ["s3://b/a", Path("local")]
    with pytest.raises(UserError, match=r"data.cache_bytes: at least 1 MiB .*200GB"):
        load_config(None, ["data.cache_bytes=64"])


def test_warm_cache_throughput_matches_local_mmap(aws, uploaded, small_prepared, tmp_path):
    """Warm cache vs local memory maps, interleaved in one run (printed; a loose floor)."""
    kw = dict(micro_batch_size=32, grad_accum=2, seed=3)
    local, remote = TokenLoader(small_prepared, **kw), TokenLoader(uploaded, cache_dir=tmp_path / "c", **kw)
    remote.next_step()
    cache_of(remote).wait_idle()
    best = {"local": float("inf"), "s3": float("inf")}
    for _ in range(5):
        for name, loader in (("local", local), ("s3", remote)):
            t = time.perf_counter()
            steps(loader, 40)
            best[name] = min(best[name], time.perf_counter() - t)
    rows = 40 * 64
    ratio = best["local"] / best["s3"]
    print(f"\nloader rows/s: local mmap {rows / best['local']:,.0f}, warm S3 cache {rows / best['s3']:,.0f}, ratio {ratio:.2f}")
    assert ratio > 0.5


@pytest.mark.slow
def test_pretrain_from_s3_trains_as_from_local_disk(aws, tmp_path, tmp_path_factory):
    """The training loop (`llmtrain.train` under torchrun, 2 ranks; the Ray launch runs the same
    loop) with data.path=s3://..., stopped after 3 steps and resumed in a new process: the
    losses of the same run straight through on the local shards, and the credentials nowhere in
    the run directory."""
    from runtime_support import losses, tiny_data, torchrun

    data = tiny_data(tmp_path_factory.getbasetemp())
    uri = f"s3://{aws.make_bucket()}/tiny"
    objstore.upload_dir(data, uri)
    runs = {"local": tmp_path / "local", "s3": tmp_path / "s3"}
    common = ["train.max_steps=6", "zero.stage=1", "train.val_batches=1", f"data.cache_dir={tmp_path / 'cache'}"]
    torchrun(2, [*common, f"data.path={data}", f"run.dir={runs['local']}"])
    torchrun(2, [*common, f"data.path={uri}", f"run.dir={runs['s3']}", "train.stop_at_step=3"])
    assert sorted(losses(runs["s3"])) == [1, 2, 3]
    torchrun(2, [*common, f"data.path={uri}", f"run.dir={runs['s3']}", "train.resume=auto"])
    assert losses(runs["s3"]) == losses(runs["local"]) and len(losses(runs["s3"])) == 6
    secret, key = aws.secret_key.encode(), aws.access_key.encode()
    for f in runs["s3"].rglob("*"):
        if f.is_file():
            body = f.read_bytes()
            assert secret not in body and key not in body, f
    assert any((tmp_path / "cache").glob("tiny-*/train-00000.arrow"))
