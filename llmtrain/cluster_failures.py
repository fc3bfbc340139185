"""How a job ends when the cluster fails it: a bounded wait for resources, and one clear line.

Ray Train (2.60) restarts the worker group after a worker dies, up to `cluster.max_failures`
times, and each restart resumes from the newest complete checkpoint (llmtrain/train.py). When
a *node* is lost, the restart needs resources that are gone: Ray Train waits
`RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (default 60 s) for its placement group, counts that as
a controller failure and tries again, with no limit by default
(`FailureConfig.controller_failure_limit=-1`), so the job would wait forever, as it would at
start on a cluster that never frees enough resources. `failure_settings(cfg)` bounds this: the
wait is `cluster.resource_timeout_s` and no controller retry is allowed, so the job fails after
that time. (A worker death still spends `max_failures`; only the wait for resources is bounded.)

`forget_previous_run(run_dir)`: a new driver on the same run directory (a resubmitted job)
starts a new Ray Train run. Where it resumes is `train.resume`'s choice (llmtrain/train.py),
not the checkpoint list Ray Train kept for the previous driver (RUN_DIR/
checkpoint_manager_snapshot.json): that list also names checkpoints `checkpoint.keep` has since
pruned, and Ray Train then refuses to start at all (CheckpointManagerInitializationError).

`explain(err, cfg)` turns the two ways a cluster ends a job (workers lost beyond
`max_failures`, resources not available in time) into one line saying what was lost, the
newest complete checkpoint and how to continue; other failures keep Ray's own error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from llmtrain.checkpoint import find_latest
from llmtrain.errors import UserError

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class ClusterFailure(UserError):
    """The cluster ended the job (lost workers or nodes, resources not available): exit 3."""

    exit_code = 3


def failure_settings(cfg) -> dict[str, Any]:
    """Keyword arguments for Ray Train's FailureConfig; also sets the start timeout, which Ray
    Train reads from the environment and propagates from the driver to its controller."""
    os.environ[START_TIMEOUT_ENV] = f"{cfg.cluster.resource_timeout_s:g}"
    return {"max_failures": cfg.cluster.max_failures, "controller_failure_limit": 0}


def forget_previous_run(run_dir: Path) -> None:
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    (Path(run_dir) / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).unlink(missing_ok=True)


def explain(err: BaseException, cfg) -> Optional[ClusterFailure]:
    """One line for a job the cluster ended (None for any other failure)."""
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

    c = cfg.cluster
    resume = _resume_hint(Path(cfg.run.dir))
    failure = getattr(err, "controller_failure", None) if isinstance(err, ControllerError) else None
    if isinstance(failure, WorkerGroupStartupTimeoutError):
        per_worker = f"{c.cpus_per_worker:g} CPU" + (f" + {c.gpus_per_worker:g} GPU" if c.use_gpu else "")
        if c.placement != "pack":
            per_worker += f", placement {c.placement}"
        return ClusterFailure(
            f"the cluster did not provide cluster.num_workers={c.num_workers} x {per_worker} within "
            f"cluster.resource_timeout_s={c.resource_timeout_s:g} s (alive nodes: {_alive_nodes()}); "
            f"a node was lost or the cluster is busy: restart or add nodes, then {resume}"
        )
    if isinstance(failure, WorkerGroupStartupFailedError):
        why = " ".join(str(failure).split())[:300]
        return ClusterFailure(
            f"the workers could not be started ({why}); alive nodes: {_alive_nodes()}; "
            f"if a node was lost, restart or replace it, then {resume}"
        )
    if isinstance(err, WorkerGroupError):
        lost = {rank: _death(e) for rank, e in sorted(err.worker_failures.items())}
        lost = {rank: why for rank, why in lost.items() if why}
        if not lost:
            return None
        what = "; ".join(f"rank {rank} {why}" for rank, why in lost.items())
        return ClusterFailure(f"training stopped: {what}; no restart left (cluster.max_failures={c.max_failures}); {resume}")
    return None


def _death(err: BaseException) -> Optional[str]:
    """'on node IP: how it died' when `err` says a worker process or its node died, or that a
    collective lost its peer (gloo's view of the same death, often reported first)."""
    text = " ".join(str(err).split())
    peer = re.search(r"(?:Read error|Write error|Connection closed by peer) \[([^\]]+)\]:\d+", text)
    if peer and re.search(r"Connection (reset|closed) by peer", text):
        return f"lost its connection to the worker at {peer.group(1)} (that worker or its node died)"
    if "actor died" not in text and "health check failed" not in text.lower():
        return None
    ip = re.search(r"node_ip='([^']+)'|\bip: (\S+)", text)
    where = f"on {ip.group(1) or ip.group(2)} " if ip else ""
    if "node has died" in text or "node was terminated" in text:
        detail = re.search(r"node was terminated unexpectedly: ([^.;]+)", text)
        return f"{where}was lost with its node" + (f" ({detail.group(1).strip()})" if detail else "")
    return f"{where}died (its process exited)"


def _resume_hint(run_dir: Path) -> str:
    try:
        latest = find_latest(run_dir)
    except OSError:
        latest = None
    if latest is None:
        return "resubmit the job (no checkpoint was complete yet: it starts from step 0)"
    return f"resubmit with train.resume=auto to continue from {latest}"


def _alive_nodes() -> str:
    import ray

    if not ray.is_initialized():
        return "unknown"
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:  # the driver lost the cluster too
        return "unknown"
    return (
        ", ".join(
            f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU {n['Resources'].get('GPU', 0):g} GPU" for n in nodes
        )
        or "none"
    )
