"""Complete-or-absent output directories: build in a hidden sibling temp dir, rename when done.

    with atomic_dir(Path("data/tiny"), replace=force) as tmp:
        (tmp / "manifest.json").write_text(...)
    # data/tiny now exists with everything, or (on any exception) not at all

The temp dir lives beside the target (same filesystem, so the final rename is atomic) and is
removed on failure, so an interrupted or failed run leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise UserError(f"cannot create {target}: {err.strerror}; choose a writable output directory") from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are ordinary directories
        yield tmp
        _commit(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
