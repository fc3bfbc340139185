"""Complete-or-absent outputs: files and directories are built under a hidden sibling temp name
and renamed when done.

    with atomic_dir(Path("data/tiny"), replace=force) as tmp:
        (tmp / "manifest.json").write_text(...)
    # data/tiny now exists with everything, or (on any exception) not at all

The temp dir lives beside the target (same filesystem, so the final rename is atomic) and is
removed on failure, so an interrupted or failed run leaves nothing half-written. A process
killed outright (SIGKILL, a lost node) cannot remove it: its name records the owner's pid and
host, and the next `atomic_dir` for the same target removes the temp dirs of owners on this
host that are no longer running.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from llmtrain.errors import UserError


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir; on success it becomes `target` (an existing one only if `replace`
    or empty). On any exception the temp dir is deleted and `target` is left untouched."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a directory; choose another output path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}@{socket.gethostname()}-", dir=target.parent))
    except OSError as err:
        raise UserError(f"cannot create {target}: {err.strerror}; choose a writable output directory") from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are ordinary directories
        yield tmp
        _commit(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_orphans(target: Path) -> None:
    """Delete the temp dirs beside `target` whose owner (pid@host in the name) was this host's
    and no longer runs: what a killed run left."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.tmp-(\d+)@(.+)-[a-z0-9_]+$")
    host = socket.gethostname()
    for sibling in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        m = pattern.match(sibling.name)
        if m and m.group(2) == host and sibling.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _commit(tmp: Path, target: Path, replace: bool) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if is_empty_dir(target):
        target.rmdir()
        os.rename(tmp, target)
        return
    if not replace:
        raise UserError(f"{target} already exists; remove it or choose another output directory")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / target.name)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success it replaces `path` in one rename, so
    readers see the old file or the new one, never a part. On any exception it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


@contextmanager
def unchanged_on_error(root: str | os.PathLike, keep_bytes: int = 4 << 20) -> Iterator[None]:
    """Leave the directory `root` as it was if the block raises: whatever was created under it
    (or `root` itself, and parents made for it) is removed, and files that existed and were at
    most `keep_bytes` (configs, pointers, markers) get their old bytes back. For a driver's
    checks and caches before a job starts: a failed check leaves the run directory untouched."""
    root = Path(root)
    created_top = None if root.exists() else _topmost_missing(root)
    before: dict[Path, bytes | None] = {}
    if root.is_dir():
        for p in root.rglob("*"):
            small = p.is_file() and not p.is_symlink() and p.stat().st_size <= keep_bytes
            before[p] = p.read_bytes() if small else None
    try:
        yield
    except BaseException:
        if created_top is not None:
            shutil.rmtree(created_top, ignore_errors=True)
        elif root.is_dir():
            for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
                if p in before:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            for p, data in before.items():
                if data is not None and (not p.is_file() or p.read_bytes() != data):
                    p.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_file(p) as tmp:
                        tmp.write_bytes(data)
        raise


def _topmost_missing(path: Path) -> Path:
    """The outermost of `path` and its parents that does not exist yet."""
    top = path
    for parent in path.parents:
        if parent.exists():
            break
        top = parent
    return top
