"""User-facing errors: one clear line naming the problem and the fix, no traceback.

Anything a user can cause (a bad config key, a missing file, a corrupt shard) raises
`UserError`; `llmtrain.cli.main` prints it as a single line and exits with status 2.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A mistake in input or configuration that the user can fix; the message says how."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep the message to one line so it reads well on a terminal and in logs.
        super().__init__(" ".join(str(message).split()))


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds."""
    if not condition:
        raise UserError(message)


def run_main(fn: Callable[[], object]) -> int:
    """Every entry point's error path: a UserError prints one line `llmtrain: error: ...` and
    gives its exit code (no traceback); Ctrl-C gives 130; anything else is a bug and raises."""
    try:
        code = fn()
    except UserError as err:
        print(f"llmtrain: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("llmtrain: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0
