"""Prepared shards in object storage, read through a checksummed, size-bounded cache on each node.

    data = open_prepared("s3://bucket/tiny")             # manifest + tokenizer fetched, no shard yet
    loader = TokenLoader("s3://bucket/tiny", ...)         # the batches of a local copy, bit for bit
    # llmtrain pretrain CONFIG data.path=s3://bucket/tiny data.cache_bytes=200GB

A prepared dataset in object storage has the local layout (manifest.json last, tokenizer/,
train-00000.arrow ...). `open_remote` reads and checks the manifest (its seal, as
`open_prepared` does), copies it and the tokenizer into this node's cache directory and returns a
`Prepared` whose shards are `CachedShard`s: manifest metadata now, arrays memory-mapped from the
local copy when a batch first touches them. The sample order does not depend on where the bytes
are, so batches, resume and world-size changes are those of the local directory.

Where. `data.cache_dir` (default $XDG_CACHE_HOME/llmtrain/shards, i.e. ~/.cache/...) holds one
directory per dataset version, `<name>-<sha256(URI, manifest_sha256)[:16]>`: a re-prepared
dataset at the same URI gets a new directory, and once every split is fetched it is itself a
prepared directory (`llmtrain verify` reads it). Every training process of a node uses the same
directory. Credentials come only from the node's AWS_* environment (llmtrain/data/objstore.py;
Ray workers inherit the driver's on the embedded runtime and have their node's on a cluster);
nothing here writes them anywhere.

Concurrency. One `ShardCache` per process and dataset (train and validation loaders share it;
the manifest is read once per process, so reopening the data for validation sends no request).
Processes of a node coordinate through the files alone: a shard is fetched under an exclusive
flock of `.state/<file>.lock` (a second process waits, then finds it there), streamed to a
unique `.<file>.<pid>.<random>.part` while its sha256 is computed, checked against the manifest
(size and sha256) and renamed into place; then `.state/<file>.ok` records the file's size, inode
and mtime. A file whose stat does not match its record is hashed again before use, and fetched
again if its bytes are wrong (a truncated or overwritten cache file); an object whose bytes
differ from the manifest twice in a row changed after the manifest was written: a `UserError`.

Eviction. Before each download, while the directory's shards plus this process's downloads in
progress and the new one would exceed `data.cache_bytes`, the least recently used shard outside
every pinned set goes (another process's shards first, oldest first); the tokenizer copy is not
counted. Pinned: the shards the current step maps and the prefetch window, and every shard of a
split read in the global shuffle (below). A shard another process evicted while this one maps it
stays readable (POSIX keeps an unlinked, mapped file) and is fetched again if it is opened anew;
the ranks of one node step together, so their windows coincide.

Prefetch. The loader knows the next samples as a pure function of (seed, g): each step it tells
the cache, through `SplitCache.want`, the shards its rank's next `prefetch_steps` steps read, in
order of first use. `FETCH_THREADS` threads fetch those first, then the rest of any split that
is cached whole, so in steady state a step maps only files already here; `stats` counts what
the consuming thread still had to wait for or fetch itself. Once a split cached whole is all
here the loader stops telling (`SplitCache.settled`): a warm cache costs a step what local
memory maps do.

The order and the cache - the decision. The loader's training order is a seeded permutation of
all rows of the split, so every step reads rows from anywhere: with whole-shard caching, a cache
smaller than the split would refetch most of the split every epoch (with S shards and a batch
of B rows, a step touches about min(S, B) of them). So a shuffled split is cached whole: its
shards are fetched ahead in first-use order and never evicted, and if the split does not fit in
`data.cache_bytes` the run is refused up front (on the driver, before any worker starts) with
one line that names both sizes; a node whose disk lacks the room fails its first step the same
way. Sequential reads (validation; `shuffle=False`) stream through a window of the
next `prefetch_steps` steps, so their cache may be much smaller than the split. A shard-block
shuffle (MosaicML streaming's py1b/py1e: shuffle shard order, then rows inside blocks of a few
shards, still a pure function of (seed, g)) would stream training data larger than a node's
disk; it is not implemented: it changes the order, so it would be an opt-in order of its own,
the same on local disk and S3, never a silent fallback when the cache is small.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from collections import Counter, OrderedDict, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from llmtrain.data import objstore
from llmtrain.data.shards import (
    MANIFEST,
    TOKENIZER_DIR,
    Prepared,
    Shard,
    Split,
    _open_shard,
    check_contents,
    parse_manifest,
    sha256_file,
)
from llmtrain.errors import UserError

DEFAULT_CACHE_BYTES = 64 << 30
FETCH_THREADS = 4
_CHUNK = 8 << 20
_ATTEMPTS = 3  # transient network errors; a wrong sha256 is retried once
_REPREPARE = "re-run `llmtrain prepare ... --output {uri} --force` to rebuild it"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "llmtrain" / "shards"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if base else name


# ---------------------------------------------------------------------------------------------
# Opening


def open_remote(uri: str, cache_dir: Optional[Path] = None, cache_bytes: Optional[int] = None) -> Prepared:
    """The prepared dataset at `uri` (s3://bucket/prefix), read through this node's cache. The
    manifest is read once per process: opening it again (each validation) sends no request, and
    the run keeps the dataset version it started with."""
    uri = uri.rstrip("/")
    parent = Path(cache_dir or default_cache_dir()).expanduser()
    with ShardCache._instances_lock:
        cache = ShardCache._instances.get((uri, parent))
    if cache is None or cache.closed:
        state = objstore.remote_state(uri)
        if state != "dataset":
            problem = {
                "partial": f"an upload that did not finish (shards, no {MANIFEST}: the manifest goes last)",
                "none": "nothing there",
                "other": f"not a prepared dataset (no {MANIFEST})",
            }[state]
            raise UserError(
                f"{uri}: {problem}; create it with `llmtrain prepare ... --output {uri}` (--force to replace) or fix data.path"
            )
        manifest = parse_manifest(objstore.read_bytes(f"{uri}/{MANIFEST}"), f"{uri}/{MANIFEST}")
        fs, base = objstore.filesystem(uri)
        key = hashlib.sha256(f"{uri}\n{manifest['manifest_sha256']}".encode()).hexdigest()[:16]
        name = uri.rsplit("/", 1)[-1] or "data"
        cache = ShardCache.shared(parent / f"{name}-{key}", fs, base, uri, manifest)
        cache.fetch_tokenizer()
    cache.cache_bytes = DEFAULT_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
    manifest, root = cache.manifest, cache.dir
    check_contents(root, manifest, where=uri)
    splits = {}
    for split_name, info in manifest["splits"].items():
        shards = [CachedShard(cache, entry) for entry in info["shards"]]
        split = Split(split_name, shards, int(manifest["seq_len"]))
        if split.rows != int(info["rows"]):
            raise UserError(
                f"{uri}/{MANIFEST}: split {split_name} says {info['rows']} rows but its shards hold {split.rows}; "
                + _REPREPARE.format(uri=uri)
            )
        split.cache = SplitCache(cache, split)
        splits[split_name] = split
    return Prepared(root, manifest, splits, uri=uri)


# ---------------------------------------------------------------------------------------------
# Shards of a remote split


class _Slot:
    """One mapping of a cached file; eviction empties it (holders map the file again)."""

    __slots__ = ("shard",)

    def __init__(self, shard: Optional[Shard]):
        self.shard = shard


class CachedShard:
    """A shard of a remote split: the manifest's numbers now, the arrays (those of
    `shards.Shard`) memory-mapped from the cache when first read."""

    __slots__ = ("file", "rows", "real_tokens", "next_token", "entry", "_cache", "_slot")

    def __init__(self, cache: ShardCache, entry: dict):
        self.file, self.rows, self.entry = entry["file"], int(entry["rows"]), entry
        self.real_tokens, self.next_token = int(entry["tokens"]), entry.get("next_token")
        self._cache, self._slot = cache, None

    @property
    def path(self) -> Path:
        return self._cache.dir / self.file

    def mapped(self) -> Shard:
        slot = self._slot
        shard = slot.shard if slot is not None else None
        if shard is None:
            self._slot = slot = self._cache.map(self.entry)
            shard = slot.shard
        return shard

    @property
    def tokens(self) -> np.ndarray:
        return self.mapped().tokens

    @property
    def starts_offsets(self) -> np.ndarray:
        return self.mapped().starts_offsets

    @property
    def starts_values(self) -> np.ndarray:
        return self.mapped().starts_values


class SplitCache:
    """What a loader tells the cache about one split (see the module docstring)."""

    def __init__(self, cache: ShardCache, split: Split):
        self.cache, self.split = cache, split
        self.files = [s.file for s in split.shards]
        self.bytes = sum(int(s.entry["bytes"]) for s in split.shards)
        self.settled = False  # cached whole and all here: nothing left to say (or pin)

    def require(self, whole: bool, window_rows: int) -> None:
        """Register how this split is read: `whole` (shuffled: every shard stays cached) or
        through windows of `window_rows` rows; refuse a cache too small for it."""
        self.settled = False
        if whole:
            need = self.bytes
        else:  # the most bytes any run of window_rows consecutive rows touches (from the last row of a shard on)
            sizes = np.array([int(s.entry["bytes"]) for s in self.split.shards], dtype=np.int64)
            total = np.concatenate([[0], np.cumsum(sizes)])
            first = self.split.first_row
            last = np.searchsorted(first, first[1:] - 1 + window_rows, side="left")  # one past the last shard touched
            need = int((total[np.minimum(last, len(sizes))] - total[:-1]).max())
        self.cache.require(self.split.name, self.files if whole else None, need)

    def want(self, rows: np.ndarray, current: int) -> None:
        """The split rows of the next steps in order (`rows[:current]`: this step's)."""
        if self.settled:
            return
        shard_of, _ = self.split.locate(rows)
        first = np.unique(shard_of, return_index=True)[1]
        order = shard_of[np.sort(first)]
        self.settled = self.cache.want(
            self.split.name, [self.files[k] for k in order], [self.files[k] for k in np.unique(shard_of[:current])]
        )


# ---------------------------------------------------------------------------------------------
# The cache


class ShardCache:
    """One dataset's directory in this node's cache, as this process uses it (module docstring)."""

    _instances: dict[tuple[str, Path], ShardCache] = {}  # (URI, cache_dir) -> this process's cache
    _instances_lock = threading.Lock()

    @classmethod
    def shared(cls, root: Path, fs, base: str, uri: str, manifest: dict) -> ShardCache:
        """This process's cache of `uri` in `root` (made on first use): train and val loaders share it."""
        with cls._instances_lock:
            cache = cls._instances.get((uri, root.parent))
            if cache is None or cache.closed or cache.dir != root:
                cache = cls._instances[(uri, root.parent)] = cls(root, fs, base, uri, manifest)
            return cache

    def __init__(self, root: Path, fs, base: str, uri: str, manifest: dict, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.dir, self.fs, self.base, self.uri, self.manifest = Path(root), fs, base, uri, manifest
        self.cache_bytes = cache_bytes
        self.entries = {e["file"]: e for info in manifest["splits"].values() for e in info["shards"]}
        self.stats: Counter = Counter()  # fetched, bytes_fetched, consumer_fetches, consumer_waits, corrupt, evicted
        self.closed = False
        self._cond = threading.Condition()
        self._ready: set[str] = set()  # verified on disk by this process
        self._inflight: set[str] = set()
        self._slots: dict[str, _Slot] = {}
        self._used: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._current: dict[str, list[str]] = {}  # split -> files of the step being built
        self._windows: dict[str, list[str]] = {}  # split -> the next steps' files, first use first
        self._whole: dict[str, list[str]] = {}  # split -> all its files (a shuffled split)
        self._needs: dict[str, int] = {}
        self._rest: deque[str] = deque()
        self._error: Optional[BaseException] = None
        self._threads: list[threading.Thread] = []
        self._evicting = threading.Lock()
        self._reserved = 0  # bytes of this process's downloads in progress (under _evicting)
        try:
            (self.dir / ".state").mkdir(parents=True, exist_ok=True)
            (self.dir / TOKENIZER_DIR).mkdir(exist_ok=True)
        except OSError as err:
            raise UserError(
                f"data.cache_dir: cannot create {self.dir} ({err.strerror}); set data.cache_dir to a writable directory"
            ) from None
        self._remove_stale_parts()
        manifest_copy = self.dir / MANIFEST
        if not manifest_copy.is_file():
            self._write_atomic(manifest_copy, json.dumps(manifest, indent=1).encode())

    # -- what the loader says -------------------------------------------------------------------

    def require(self, split: str, whole: Optional[list[str]], need: int) -> None:
        with self._cond:
            self._needs[split] = need
            if whole is not None and split not in self._whole:
                self._whole[split] = whole
                self._rest.extend(whole)
            total = sum(self._needs.values())
        if total > self.cache_bytes:
            splits = " + ".join(f"{s} {human(n)}" for s, n in self._needs.items())
            why = (
                "the shuffled order draws every step's rows from the whole split, so each node caches all of it"
                if whole is not None
                else "it holds the shards of the next steps"
            )
            raise UserError(
                f"data.cache_bytes={self.cache_bytes} ({human(self.cache_bytes)}) is too small for {self.uri} "
                f"({splits}): {why}; set data.cache_bytes >= {total} on a disk with the room (data.cache_dir)"
            )

    def _check_disk(self) -> None:
        """(On the first step: where batches are drawn, not on a driver.) The disk has the room."""
        need = sum(self._needs.values()) - sum(self._on_disk().values())
        free = shutil.disk_usage(self.dir).free
        if need > free:
            raise UserError(
                f"data.cache_dir={self.dir.parent}: {human(free)} free on this node, but caching {self.uri} needs "
                f"{human(need)} more; free disk space or set data.cache_dir to a larger disk"
            )

    def want(self, split: str, window: list[str], current: list[str]) -> bool:
        """Pin and fetch ahead what the split's next steps read; True once `split` is cached
        whole and every file of it is here (its whole-split pin is all it needs from then on)."""
        with self._cond:
            self._raise_error()
            self._windows[split], self._current[split] = window, current
            for f in current:
                self._used[f] = None
                self._used.move_to_end(f)
            if not self._threads:
                self._check_disk()
                for i in range(FETCH_THREADS):
                    t = threading.Thread(target=self._work, name=f"llmtrain-shard-fetch-{i}", daemon=True)
                    t.start()
                    self._threads.append(t)
            if self._next_wanted() is not None:  # wake the fetch threads only for work
                self._cond.notify_all()
            whole = self._whole.get(split)
            return whole is not None and all(f in self._ready for f in whole)

    def map(self, entry: dict) -> _Slot:
        """The mapped arrays of one shard: from the cache, else waited for (a prefetch thread is
        fetching it) or fetched here."""
        file = entry["file"]
        with self._cond:
            self._raise_error()
            slot = self._slots.get(file)
            if slot is not None and slot.shard is not None:
                return slot
            if file in self._inflight:
                self.stats["consumer_waits"] += 1
                while file in self._inflight and self._error is None:
                    self._cond.wait()
                self._raise_error()
            own = file not in self._ready or not (self.dir / file).is_file()
            if own:
                self._inflight.add(file)
        if own:
            fetched = False
            try:
                fetched = self._ensure(entry)
            finally:
                with self._cond:
                    self._inflight.discard(file)
                    self.stats["consumer_fetches"] += int(fetched)
                    self._cond.notify_all()
        shard = _open_shard(self.dir, entry, self.manifest)
        with self._cond:
            self._ready.add(file)
            slot = self._slots[file] = _Slot(shard)
            self._used[file] = None
            self._used.move_to_end(file)
        return slot

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until nothing wanted is left to fetch (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._next_wanted(peek=True) is not None or self._inflight:
                self._raise_error()
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{self.uri}: prefetch still busy after {timeout} s")
            self._raise_error()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)
        with self._instances_lock:
            if self._instances.get((self.uri, self.dir.parent)) is self:
                del self._instances[(self.uri, self.dir.parent)]

    def disk_bytes(self) -> int:
        """Bytes of shard files and partial downloads in this dataset's cache directory now."""
        return sum(self._on_disk(mine=True).values())

    # -- the prefetch threads --------------------------------------------------------------------

    def _pinned(self) -> set[str]:
        pinned: set[str] = set()
        for files in (*self._current.values(), *self._windows.values(), *self._whole.values()):
            pinned.update(files)
        return pinned

    def _next_wanted(self, peek: bool = False) -> Optional[str]:
        """(Under the lock.) The first wanted file not here and not being fetched."""
        for files in (*self._current.values(), *self._windows.values()):
            for f in files:
                if f not in self._ready and f not in self._inflight:
                    return f
        while self._rest:
            f = self._rest[0]
            if f not in self._ready and f not in self._inflight:
                return f
            self._rest.popleft()
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                file = None
                while not self.closed and self._error is None and (file := self._next_wanted()) is None:
                    self._cond.wait()
                if file is None:
                    return
                self._inflight.add(file)
            try:
                self._ensure(self.entries[file])
            except BaseException as err:  # noqa: BLE001 - handed to the consuming thread
                with self._cond:
                    self._error = err
                    self._inflight.discard(file)
                    self._cond.notify_all()
                return
            with self._cond:
                self._inflight.discard(file)
                self._ready.add(file)
                self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -- one file --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, file: str, blocking: bool = True) -> Iterator[bool]:
        with open(self.dir / ".state" / f"{file}.lock", "a+b") as fd:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _ensure(self, entry: dict) -> bool:
        """Make `entry`'s file present and verified; True if it was downloaded."""
        file = entry["file"]
        with self._locked(file):
            if self._good(entry):
                return False
            size = int(entry["bytes"])
            try:
                self._evict(incoming=size)  # room first: the bound holds while the download runs
                self._download(entry)
            finally:
                with self._evicting:
                    self._reserved -= size
        return True

    def _good(self, entry: dict) -> bool:
        """The cached file is the manifest's: its stat matches the record made when it was
        verified, or (no record, or another stat) its size and sha256 do. A bad file is removed."""
        path, record = self.dir / entry["file"], self.dir / ".state" / f"{entry['file']}.ok"
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        stamp = {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "sha256": entry["sha256"]}
        try:
            if json.loads(record.read_text()) == stamp:
                return True
        except (OSError, ValueError):
            pass
        if st.st_size == int(entry["bytes"]) and sha256_file(path) == entry["sha256"]:
            self._write_atomic(record, json.dumps(stamp).encode())
            return True
        with self._cond:
            self.stats["corrupt"] += 1
        path.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
        return False

    def _download(self, entry: dict) -> None:
        file, remote = entry["file"], _join(self.base, entry["file"])
        where = f"{self.uri}/{file}"
        wrong: list[str] = []
        for attempt in range(_ATTEMPTS):
            tmp = self.dir / f".{file}.{os.getpid()}.{secrets.token_hex(4)}.part"
            try:
                digest, size = self._stream(remote, tmp)
            except FileNotFoundError:
                tmp.unlink(missing_ok=True)
                raise UserError(
                    f"{where}: listed in the manifest but not in the bucket; " + _REPREPARE.format(uri=self.uri)
                ) from None
            except OSError as err:
                tmp.unlink(missing_ok=True)
                if err.errno == errno.ENOSPC:
                    raise UserError(
                        f"data.cache_dir={self.dir.parent}: disk full while fetching {where}; free space or lower data.cache_bytes"
                    ) from None
                if attempt + 1 == _ATTEMPTS:
                    raise objstore._explain(err, where, "fetching a shard") from None
                time.sleep(0.5 * 2**attempt)
                continue
            if size == int(entry["bytes"]) and digest == entry["sha256"]:
                path = self.dir / file
                os.replace(tmp, path)
                st = path.stat()
                stamp = {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "sha256": entry["sha256"]}
                self._write_atomic(self.dir / ".state" / f"{file}.ok", json.dumps(stamp).encode())
                with self._cond:
                    self.stats["fetched"] += 1
                    self.stats["bytes_fetched"] += size
                return
            tmp.unlink(missing_ok=True)
            wrong.append(f"{size:,} bytes, sha256 {digest[:12]}")
            if len(wrong) == 2:  # the same object twice: not a transfer error
                raise UserError(
                    f"{where}: the object changed after the manifest was written ({wrong[-1]}..., the manifest says "
                    f"{int(entry['bytes']):,} bytes, sha256 {entry['sha256'][:12]}...); " + _REPREPARE.format(uri=self.uri)
                )

    def _stream(self, remote: str, tmp: Path) -> tuple[str, int]:
        h, size = hashlib.sha256(), 0
        with self.fs.open_input_stream(remote) as src, open(tmp, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    def fetch_tokenizer(self) -> None:
        """The tokenizer copy (small, outside `cache_bytes`), each file checked by sha256."""
        for name, sha in self.manifest["tokenizer"]["files"].items():
            path = self.dir / TOKENIZER_DIR / name
            if path.is_file() and sha256_file(path) == sha:
                continue
            tmp = path.with_name(f".{name}.{os.getpid()}.{secrets.token_hex(4)}.part")
            try:
                digest, _ = self._stream(_join(self.base, f"{TOKENIZER_DIR}/{name}"), tmp)
            except FileNotFoundError:
                tmp.unlink(missing_ok=True)
                raise UserError(
                    f"{self.uri}/{TOKENIZER_DIR}/{name}: listed in the manifest but not in the bucket; "
                    + _REPREPARE.format(uri=self.uri)
                ) from None
            if digest != sha:
                tmp.unlink(missing_ok=True)
                raise UserError(
                    f"{self.uri}/{TOKENIZER_DIR}/{name}: the object changed after the manifest was written "
                    "(sha256 mismatch); " + _REPREPARE.format(uri=self.uri)
                )
            os.replace(tmp, path)

    # -- eviction --------------------------------------------------------------------------------

    def _on_disk(self, mine: bool = False) -> dict[str, int]:
        """Shard files and other processes' partial downloads (ours, counted in `_reserved`,
        only if `mine`) by name."""
        sizes, ours = {}, f".{os.getpid()}."
        with os.scandir(self.dir) as it:
            for e in it:
                if e.name.endswith(".part") and ours in e.name and not mine:
                    continue
                if e.name.endswith((".arrow", ".part")) and e.is_file(follow_symlinks=False):
                    try:
                        sizes[e.name] = e.stat().st_size
                    except FileNotFoundError:
                        pass
        return sizes

    def _evict(self, incoming: int = 0) -> None:
        """Least recently used unpinned shards out until the directory, this process's downloads
        in progress and `incoming` (then reserved for its download) fit in `cache_bytes`."""
        with self._evicting:
            self._reserved += incoming
            sizes = self._on_disk()
            total = sum(sizes.values()) + self._reserved
            if total <= self.cache_bytes:
                return
            with self._cond:
                pinned = self._pinned() | self._inflight
                used = {f: i for i, f in enumerate(self._used)}
            others = [f for f in sizes if f in self.entries and f not in pinned]
            mtime = {f: _mtime(self.dir / f) for f in others}
            # another process's (or an earlier run's) files first, oldest first; then ours, LRU first
            for f in sorted(others, key=lambda f: (f in used, used.get(f, 0), mtime[f])):
                if total <= self.cache_bytes:
                    break
                with self._locked(f, blocking=False) as got:
                    if not got:  # being fetched by another process
                        continue
                    (self.dir / f).unlink(missing_ok=True)
                    (self.dir / ".state" / f"{f}.ok").unlink(missing_ok=True)
                total -= sizes[f]
                with self._cond:
                    self._ready.discard(f)
                    self._used.pop(f, None)
                    slot = self._slots.pop(f, None)
                    if slot is not None:
                        slot.shard = None
                    self.stats["evicted"] += 1

    # -- files -----------------------------------------------------------------------------------

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _remove_stale_parts(self) -> None:
        """Partial downloads of processes that died (the pid in the name is gone)."""
        for path in [*self.dir.glob(".*.part"), *(self.dir / TOKENIZER_DIR).glob(".*.part")]:
            try:
                pid = int(path.name.rsplit(".", 3)[-3])
                os.kill(pid, 0)
            except (ValueError, IndexError):
                continue
            except ProcessLookupError:
                path.unlink(missing_ok=True)
            except PermissionError:
                continue


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
