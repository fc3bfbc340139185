"""Every address we connect to (a Ray cluster, the Jobs API) is checked here first, within a
bound: a TCP connection within a few seconds, then, where the protocol allows, a first byte of
the peer's answer within a few more. A wrong, refused or silent address (a port that accepts
and never answers: a firewall, a proxy, another service) fails with one line naming it and
what to check, instead of a client library's long retry loop or a wait without end.

    check_reachable("--address http://head:8265", "head", 8265, "check the dashboard port", hello=http_hello("head"))

`use_own_cluster` is the other half of "the cluster we talk to": the worker-process setup hook
that makes Ray's own helpers in our job's processes find our cluster, not another one on the machine.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Optional

from llmtrain.errors import UserError

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 5.0

# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray
# Client server) answers it at once with its own SETTINGS frame.
GRPC_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def http_hello(host: str, path: str = "/api/version") -> bytes:
    """A minimal HTTP/1.1 request (the Ray dashboard answers /api/version without a token)."""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def check_reachable(
    label: str,
    host: str,
    port: int,
    hint: str,
    timeout_s: float = CONNECT_TIMEOUT_S,
    hello: Optional[bytes] = None,
    read_timeout_s: float = READ_TIMEOUT_S,
    tls: bool = False,
) -> None:
    """Raise a UserError naming `label` (the setting the address came from) unless host:port
    accepts a TCP connection within `timeout_s` and, when `hello` is given, answers it with at
    least one byte within `read_timeout_s` (after a TLS handshake when `tls`); `hint` says
    what to check."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise UserError(f"{label}: nothing answers at {host}:{port} within {timeout_s:g} s ({reason}); {hint}") from None
    if hello is None:
        sock.close()
        return
    silent = f"{label}: {host}:{port} accepts connections but sends no answer within {read_timeout_s:g} s"
    try:
        sock.settimeout(read_timeout_s)
        if tls:  # the probe only asks whether a TLS server answers; the client verifies certificates
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(sock, server_hostname=host)
        sock.sendall(hello)
        answer = sock.recv(1)
    except TimeoutError:
        raise UserError(f"{silent} (a firewall, a proxy or another service on that port?); {hint}") from None
    except (OSError, ssl.SSLError) as err:
        raise UserError(f"{label}: {host}:{port} failed the first exchange ({err.strerror or err}); {hint}") from None
    finally:
        sock.close()
    if not answer:
        raise UserError(f"{label}: {host}:{port} closed the connection without answering (another service?); {hint}")


def use_own_cluster() -> None:
    """Ray `worker_process_setup_hook` of our jobs: RAY_ADDRESS names the cluster this worker
    process belongs to. Ray's helpers that look for a cluster by themselves (the State API
    client of Ray Train's placement-group cleaner) otherwise list every Ray instance on the
    machine with `ps` and fail ("Found multiple active Ray instances", a traceback in every run
    while a second job runs on the same machine) or pick another user's cluster."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
