"""Launch a training job on Ray: an embedded local runtime by default, or an existing cluster.

    llmtrain pretrain configs/tiny-pretrain.yaml run.dir=runs/tiny train.max_steps=50

The driver resolves the config (paths made absolute), checks what it can before spending any
start-up time (data, batch layout, model/data fit, the base's files, resume compatibility with
the model and the data position), starts or joins Ray, writes RUN_DIR/config.yaml (a failed
check or start leaves RUN_DIR as it was), and runs a Ray Train `TorchTrainer` whose workers each run
llmtrain.train.train_worker. A progress bar follows RUN_DIR/metrics.jsonl.

The embedded runtime binds to 127.0.0.1 and starts no dashboard. `cluster.address` joins an
existing cluster (`ray://HEAD:10001` through Ray Client, or `auto` on a cluster node).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from llmtrain.cluster_failures import explain, failure_settings, forget_previous_run
from llmtrain.config import FORWARDED_ENV, JobConfig, absolutize_paths, write_resolved_config
from llmtrain.data.atomic import unchanged_on_error
from llmtrain.errors import UserError
from llmtrain.metrics import StartupClock
from llmtrain.ray_runtime import check_reachable, loopback_only, unused_port
from llmtrain.tasks import get_task
from llmtrain.train import driver_step, train_worker

log = logging.getLogger("llmtrain")


def launch(cfg: JobConfig, task_name: str, started: Optional[float] = None) -> dict[str, Any]:
    """Run task `task_name` (llmtrain/tasks/) for `cfg` on Ray; returns the final metrics.
    `started`: when the command began (unix time), for the start-up breakdown the workers log."""
    clock = StartupClock(started)
    cfg = absolutize_paths(cfg)
    task = get_task(task_name)
    world = cfg.cluster.num_workers
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.dir={run_dir} is a file, not a directory; choose another run.dir")
    with unchanged_on_error(run_dir):  # every check passes before RUN_DIR keeps anything
        driver_step(cfg, task, world)  # inputs checked, caches built, a checkpoint to continue from checked
        clock.mark("driver")
        start_ray(cfg)
        clock.mark("ray_init")
        if cfg.cluster.use_gpu is None:
            cfg.cluster.use_gpu = _gpus_available(cfg)
        write_resolved_config(cfg, run_dir)
        forget_previous_run(run_dir)  # a resubmitted job resumes by train.resume, not by Ray's stale snapshot
    trainer = _trainer(cfg, task_name, cfg.cluster.use_gpu, clock)
    with ProgressBar(run_dir, cfg.train.max_steps):
        try:
            result = trainer.fit()
        except Exception as err:  # Ray wraps worker exceptions; surface a user mistake as one line
            user = find_user_error(err) or explain(err, cfg)
            if user is not None:
                raise user from None
            raise
    return dict(result.metrics or {})


def _trainer(cfg: JobConfig, task_name: str, use_gpu: bool, clock: StartupClock):
    from ray.train import FailureConfig, RunConfig, ScalingConfig  # ~1 s: only once the driver checks passed
    from ray.train.torch import TorchTrainer

    from llmtrain.process_group import StoreBoundTorchConfig

    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    run_dir = Path(cfg.run.dir)
    return _trainer_class(TorchTrainer)(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "task": task_name, "startup": clock.state()},
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.cluster.placement.upper(),
        ),
        # The experiment directory is the run directory itself, so checkpoints written there
        # by the workers are registered with Ray Train without a copy (checkpoint.py).
        run_config=RunConfig(
            storage_path=str(run_dir.parent),
            name=run_dir.name,
            failure_config=FailureConfig(**failure_settings(cfg)),  # bounded wait for resources
        ),
        # The process group's store listens on the node address only (llmtrain/process_group.py).
        torch_config=StoreBoundTorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def _trainer_class(torch_trainer: type) -> type:
    """TorchTrainer without Ray Data's callback: given no datasets, it still starts a
    DatasetManager actor, one more process importing ray.data (~3 s of CPU) while the workers
    start (benchmarks/startup.py); nothing here uses it. (A private hook of Ray Train v2; if it
    moves, the plain TorchTrainer runs.)"""
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:
        return torch_trainer

    class Trainer(torch_trainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if self.datasets or not isinstance(c, DatasetsCallback)]

    return Trainer


# ---------------------------------------------------------------------------------------------
# Ray runtime


def start_ray(cfg: JobConfig) -> None:
    address = cfg.cluster.address
    if address is None:
        loopback_only()
    import ray  # here, not at the top: _loopback_only sets what Ray reads when it is imported

    if ray.is_initialized():
        return
    # Ray Train's controller polls the workers at this interval and a checkpoint's report() waits
    # for the next poll: Ray's 2 s default delays every checkpoint, 0.1 s costs tokens/s on busy
    # cores (benchmarks/train_throughput.py); 1 s keeps both small.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address is None:
        # One machine: no node is preempted. Ray Train's watcher is one more actor process
        # starting while the workers load the model (benchmarks/startup.py).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # The raylet prestarts idle workers for the first driver; ours all carry this job's
        # runtime_env, so those never serve and only take CPU while Ray Train starts.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    env = {"TOKENIZERS_PARALLELISM": "false"}
    env.update({key: os.environ[key] for key in FORWARDED_ENV if key in os.environ})
    if address is None:  # one machine: gloo on loopback (interface names differ between machines)
        env["GLOO_SOCKET_IFNAME"] = os.environ["GLOO_SOCKET_IFNAME"]
    runtime_env: dict[str, Any] = {"env_vars": env}
    if address is None:
        needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
        # Our job's processes ask our instance only, whatever else runs on this machine
        # (reachable.use_own_cluster says what would go wrong otherwise).
        runtime_env["worker_process_setup_hook"] = "llmtrain.reachable.use_own_cluster"
        ray.init(
            # "local": always a new instance, never one that `ray start` on this machine or
            # RAY_ADDRESS names (ray.init(address=None) would join those).
            address="local",
            num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
            num_gpus=0 if cfg.cluster.use_gpu is False else None,
            include_dashboard=False,
            # No dashboard runs, but Ray still records its address (default 127.0.0.1:8265) and
            # Ray Train's placement-group cleaner asks the State API there about our controller:
            # another instance's dashboard on 8265 would answer "no such actor" and the cleaner
            # would remove our placement group. A port of our own where nothing listens.
            dashboard_port=unused_port(),
            runtime_env=runtime_env,
            log_to_driver=True,
            logging_level=logging.WARNING,
            # Ray's own actors log at ERROR only: without a dashboard (no State API) Ray Train's
            # placement-group cleaner would warn every second. Our workers set their own levels.
            logging_config=ray.LoggingConfig(log_level="ERROR"),
        )
        return
    check_reachable(address)
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, TimeoutError) as err:
        raise UserError(
            f"cluster.address={address}: could not connect ({err}); check the address and that the cluster is up"
        ) from None


def _gpus_available(cfg: JobConfig) -> bool:
    """Default for cluster.use_gpu: the embedded runtime looks at this machine's CUDA, a cluster
    at its nodes' GPUs (the driver may sit on a CPU-only head)."""
    if cfg.cluster.address is None:
        return torch.cuda.is_available()
    import ray  # loaded by start_ray already

    return ray.cluster_resources().get("GPU", 0) > 0


def find_user_error(err: BaseException) -> Optional[UserError]:
    """The first UserError inside Ray's wrappers (worker failures, causes), if any."""
    seen: set[int] = set()
    stack: list[Any] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack.extend((getattr(e, "worker_failures", None) or {}).values())
        stack.extend([getattr(e, "controller_failure", None), getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


class ProgressBar:
    """Follows RUN_DIR/metrics.jsonl from the driver (workers write it) in a tqdm bar."""

    def __init__(self, run_dir: Path, total: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total = total
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _follow(self) -> None:
        bar, offset = None, 0
        while True:
            stopping = self._stop.wait(0.5)
            if self.path.exists():
                if self.path.stat().st_size < offset:  # rewritten by a resumed run
                    offset = 0
                with open(self.path) as f:
                    f.seek(offset)
                    chunk = f.read()
                if "\n" in chunk:
                    lines, offset = chunk[: chunk.rindex("\n")], offset + chunk.rindex("\n") + 1
                    for line in lines.splitlines():
                        entry = json.loads(line)
                        if "loss" not in entry:
                            continue
                        if bar is None:
                            bar = tqdm(total=self.total, desc="train", unit="step", dynamic_ncols=True)
                        bar.n = entry["step"]
                        bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}", refresh=False)
                        bar.refresh()
            if stopping:
                break
        if bar is not None:
            bar.close()
