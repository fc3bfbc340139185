"""One reachability check for every address we connect to (a Ray cluster, the Jobs API): a TCP
connection within a few seconds, so a wrong or silent address fails with one line instead of a
client library's long retry loop."""

from __future__ import annotations

import socket

from llmtrain.errors import UserError


def check_reachable(label: str, host: str, port: int, hint: str, timeout_s: float = 3.0) -> None:
    """Raise a UserError naming `label` (the setting the address came from) unless host:port
    accepts a TCP connection within `timeout_s`; `hint` says what to check."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise UserError(f"{label}: nothing answers at {host}:{port} within {timeout_s:g} s ({reason}); {hint}") from None
