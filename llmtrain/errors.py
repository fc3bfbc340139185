"""User-facing errors: one clear line naming the problem and the fix, no traceback.

Anything a user can cause (a bad config key, a missing file, a corrupt shard) raises
`UserError`; `llmtrain.cli.main` prints it as a single line and exits with status 2.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
