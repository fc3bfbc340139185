"""The torch process group of a Ray Train run, its rendezvous store bound where we choose.

Ray Train's torch backend (ray/train/torch/config.py, `_TorchBackend.on_start`) has every
worker call `init_process_group("env://")`: rank 0 then starts torch's TCPStore, which listens
on all interfaces (`*:PORT` in `ss -ltn`) whatever MASTER_ADDR says. Here rank 0 binds the
listening socket itself, on its node's Ray address (127.0.0.1 for the embedded runtime, which
is loopback-only; the node's own address on a cluster), and hands it to the store
(`TCPStore(master_listen_fd=...)`, honoured by torch's libuv store backend, the default); the
other ranks connect to that address, and every rank builds its process group on that store.
Everything else is Ray's: the environment it sets (MASTER_ADDR/PORT, LOCAL_RANK, ...), the
backend, the shutdown.

    TorchTrainer(..., torch_config=StoreBoundTorchConfig(backend="gloo"))

Gloo's own connections bind to the interface GLOO_SOCKET_IFNAME names (launch.py: `lo` for the
embedded runtime) or to the address the host name resolves to.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Optional

import ray
import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

# Rank 0's store, kept alive for the life of its process group (the process group holds it too).
_store: Optional[dist.TCPStore] = None


class StoreBoundTorchConfig(TorchConfig):
    """Ray Train's TorchConfig, with the store listening on the node address only."""

    @property
    def backend_cls(self):
        return _StoreBoundBackend


class _StoreBoundBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        backend = backend_config.backend or "gloo"
        world = len(worker_group)
        host, port = worker_group.execute_single(0, open_store, world, backend_config.timeout_s)
        worker_group.execute(_set_master, host=host, port=port)
        if not isinstance(worker_group, V1WorkerGroup):  # as Ray's own backend does
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    join,
                    backend=backend,
                    world_rank=rank,
                    world=world,
                    host=host,
                    port=port,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world)
            ]
        )


def open_store(world: int, timeout_s: float) -> tuple[str, int]:
    """On rank 0: a TCPStore server listening on this node's Ray address, on a free port."""
    global _store
    host = ray.util.get_node_ip_address()
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(max(world, 128))
    port = listener.getsockname()[1]
    _store = dist.TCPStore(
        host,
        port,
        world,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=listener.detach(),  # the store owns the socket from here on
        use_libuv=True,
    )
    return host, port


def join(backend: str, world_rank: int, world: int, host: str, port: int, timeout_s: float) -> None:
    """On every rank: the default process group, on rank 0's store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _store if world_rank == 0 else dist.TCPStore(host, port, world, is_master=False, timeout=timeout, use_libuv=True)
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:  # fail, not hang, on a timed-out collective (as Ray)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world, timeout=timeout)


def _set_master(host: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
