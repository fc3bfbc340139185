"""Where this training process runs: rank, world size, device and process group.

The same training loop runs inside a Ray Train worker (the normal path: Ray Train has already
created the process group), under `torchrun` (RANK/WORLD_SIZE/MASTER_ADDR in the environment),
or as one plain process (tests, debugging). `WorkerContext.start()` figures out which, makes
sure a process group exists (gloo on CPU, NCCL on GPU), pins the device and sets LOCAL_RANK
explicitly so DeepSpeed's hostname-based guesses cannot pick the wrong device.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional

import torch
import torch.distributed as dist

from llmtrain.errors import UserError


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    in_ray: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @staticmethod
    def start(use_gpu: Optional[bool] = None) -> WorkerContext:
        in_ray = _in_ray_train_worker()
        if in_ray:
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
            device = ray.train.torch.get_device()
        else:
            rank = int(os.environ.get("RANK", 0))
            world = int(os.environ.get("WORLD_SIZE", 1))
            local = int(os.environ.get("LOCAL_RANK", 0))
            gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
            device = torch.device("cuda", local) if gpu else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            os.environ["LOCAL_RANK"] = str(device.index)
        else:
            os.environ["LOCAL_RANK"] = str(local)
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        if not dist.is_initialized():
            _init_process_group(rank, world, "nccl" if device.type == "cuda" else "gloo")
        return WorkerContext(rank=rank, world_size=world, local_rank=local, device=device, in_ray=in_ray)

    @staticmethod
    def single_process(device: str = "cpu") -> WorkerContext:
        """One process, no process group (e.g. `llmtrain eval`): collectives are identities."""
        return WorkerContext(rank=0, world_size=1, local_rank=0, device=torch.device(device), in_ray=False)

    def run_on_main(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on rank 0 while the other ranks wait; a UserError there stops every rank."""
        error: Optional[UserError] = None
        if self.is_main:
            try:
                fn()
            except UserError as err:
                error = err
        (failed,) = self.all_reduce_sum([1.0 if error is not None else 0.0])
        if error is not None:
            raise error
        if failed:
            raise UserError("rank 0 failed to prepare the task's inputs (its error is printed above); fix that and rerun")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all ranks (float64, on the collective's device)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        """Hand a finished checkpoint to Ray Train (no copy: it is already in the run directory)."""
        if not self.in_ray:
            return
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        checkpoint = Checkpoint(checkpoint_dir) if (checkpoint_dir and self.is_main) else None
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=os.path.basename(checkpoint_dir) if checkpoint_dir else None,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )

    def placement(self) -> list[dict[str, Any]]:
        """Where every rank runs (rank, node rank, node IP, hostname, pid, device), from all ranks."""
        me = {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "node_rank": 0,
            "node_ip": "127.0.0.1",
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
        }
        if self.in_ray:
            import ray
            import ray.train

            me["node_rank"] = ray.train.get_context().get_node_rank()
            me["node_ip"] = ray.util.get_node_ip_address()
        everyone: list[Any] = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(everyone, me)
        else:
            everyone = [me]
        return everyone

    def restored_checkpoint(self) -> Optional[str]:
        """After Ray Train restarted the worker group: the checkpoint it restores (else None)."""
        if not self.in_ray:
            return None
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return checkpoint.path if checkpoint is not None else None


def exit_process(code: int) -> NoReturn:
    """End a process that trained under torchrun or alone: flush, then leave without interpreter
    finalisation when a process group is alive. torch 2.13 can abort there (SIGABRT, "terminate
    called without an active exception", pytorch/pytorch#190489): gloo and autograd threads
    release tensors while the interpreter is being torn down. Everything we write is closed and
    renamed before this point; Ray Train workers end through Ray and never get here."""
    if not dist.is_initialized():
        sys.exit(code)
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _in_ray_train_worker() -> bool:
    ray = sys.modules.get("ray")  # a Ray worker has Ray loaded; elsewhere skip importing ray.train (~2 s)
    if ray is None or not ray.is_initialized():
        return False
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return True
    except Exception:
        return False


def _init_process_group(rank: int, world: int, backend: str) -> None:
    if world == 1 and "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
