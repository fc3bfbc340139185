"""The Ray runtime our jobs run on, shared by training (llmtrain.launch) and data preparation
(llmtrain.prepare_ray): the embedded single-machine runtime on 127.0.0.1 only, or an existing
cluster whose address is checked within seconds before `ray.init` waits on it.

    loopback_only(); ray.init(address="local", ...)     # embedded
    check_reachable("ray://head:10001"); ray.init(address="ray://head:10001")
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

from llmtrain import reachable
from llmtrain.errors import UserError


def loopback_only() -> None:
    """Make the embedded runtime a single-machine Ray whose services use 127.0.0.1 only.

    `ray.init(_node_ip_address="127.0.0.1")` is not enough: GCS and raylet still bind all
    interfaces. Ray's single-machine mode (the switch it uses on macOS/Windows) takes the node
    address from the loopback interface. The variable is read when Ray is imported and by the
    processes it starts, so set it in the environment and in Ray's constants if already loaded.
    Gloo's own connections are kept on loopback too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def check_reachable(address: str, timeout_s: float = reachable.CONNECT_TIMEOUT_S) -> None:
    """Fail within seconds, not hang, when the cluster address is wrong, refused or silent: a
    TCP connection within `timeout_s`, then an answer to an HTTP/2 preface within
    reachable.READ_TIMEOUT_S, as every gRPC server gives (the Ray Client server behind
    ray://HEAD:10001, the GCS behind HOST:6379)."""
    if address == "auto":
        return
    label = f"cluster.address={address}"
    forms = "use ray://HEAD:10001 (Ray Client), HOST:6379 (the GCS, from a cluster node) or auto"
    scheme = address.split("://", 1)[0] if "://" in address else None
    if scheme not in (None, "ray"):
        raise UserError(
            f"{label}: {scheme}:// is not a Ray cluster address; {forms} (http://HEAD:8265 is the Jobs API of `llmtrain submit --address`)"
        )
    parsed = urlparse(address if scheme else f"ray://{address}")
    try:
        port = parsed.port or (10001 if scheme == "ray" else 6379)
    except ValueError:
        raise UserError(f"{label}: invalid port; {forms}") from None
    if not parsed.hostname:
        raise UserError(f"{label}: no host name; {forms}")
    reachable.check_reachable(
        label,
        parsed.hostname,
        port,
        f"check the address ({'Ray Client listens on port 10001' if scheme else 'the GCS listens on port 6379'}) "
        "and that the cluster is running",
        timeout_s,
        hello=reachable.GRPC_HELLO,
    )


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
