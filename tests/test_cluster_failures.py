"""How the driver ends a job the cluster failed (llmtrain/cluster_failures.py), without a cluster: Ray
Train's own exception types carrying the messages measured on the two-node cluster
(tests/test_multinode.py runs the real thing)."""

from __future__ import annotations

import json
import os

import pytest

from llmtrain.cluster_failures import START_TIMEOUT_ENV, ClusterFailure, explain, failure_settings, forget_previous_run
from llmtrain.config import load_config

# What Ray reported on the two-node cluster (tests/test_multinode.py), shortened.
NODE_DIED = (
    "A worker health check failed.\nWorker info: Worker(\n  actor=Actor(RayTrainWorker, c1222d90),\n  metadata=ActorMetadata(\n"
    "    hostname='vm',\n    node_ip='10.231.10.2',\n    pid=30718,\n  ),\n)\nThe actor died unexpectedly before finishing this task.\n"
    "\tclass_name: RayTrainWorker\n\tip: 10.231.10.2\nThe actor died because its node has died. Node Id: 643cc79b\n"
    "\tthe actor's node was terminated unexpectedly: health check failed due to missing too many heartbeats"
)
PEER_RESET = (
    "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[10.231.10.2]:20111: Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application."
)


@pytest.fixture
def cfg(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000006"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 6, "files": {}}))
    return load_config(
        None,
        [
            f"run.dir={run}",
            "cluster.num_workers=2",
            "cluster.use_gpu=false",
            "cluster.max_failures=1",
            "cluster.resource_timeout_s=45",
        ],
    )


def test_failure_settings_bound_the_wait_for_resources(cfg, monkeypatch):
    from ray.train import FailureConfig

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    settings = failure_settings(cfg)
    assert settings == {"max_failures": 1, "controller_failure_limit": 0}
    assert os.environ[START_TIMEOUT_ENV] == "45"  # Ray Train propagates it from the driver to its controller
    assert FailureConfig(**settings).controller_failure_limit == 0


def test_resources_not_available_in_time(cfg):
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    err = explain(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)), cfg)
    assert isinstance(err, ClusterFailure) and err.exit_code == 3
    assert str(err) == (
        "the cluster did not provide cluster.num_workers=2 x 1 CPU within cluster.resource_timeout_s=45 s "
        "(alive nodes: unknown); a node was lost or the cluster is busy: restart or add nodes, then resubmit with "
        f"train.resume=auto to continue from {cfg.run.dir}/checkpoints/step_00000006"
    )


def test_workers_lost_beyond_max_failures(cfg):
    from ray.train import WorkerGroupError

    err = explain(WorkerGroupError("...", {0: RuntimeError(PEER_RESET), 1: RuntimeError(NODE_DIED)}), cfg)
    assert str(err) == (
        "training stopped: rank 0 lost its connection to the worker at 10.231.10.2 (that worker or its node died); "
        "rank 1 on 10.231.10.2 was lost with its node (health check failed due to missing too many heartbeats); "
        f"no restart left (cluster.max_failures=1); resubmit with train.resume=auto to continue from "
        f"{cfg.run.dir}/checkpoints/step_00000006"
    )
    killed = "The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\tip: 127.0.0.1"
    assert str(explain(WorkerGroupError("...", {1: RuntimeError(killed)}), cfg)).startswith(
        "training stopped: rank 1 on 127.0.0.1 died (its process exited); no restart left"
    )


def test_other_failures_keep_rays_error(cfg, tmp_path):
    from ray.train import ControllerError, WorkerGroupError

    assert explain(WorkerGroupError("...", {0: ValueError("a bug in the training loop")}), cfg) is None
    assert explain(ControllerError(RuntimeError("something else")), cfg) is None
    assert explain(RuntimeError("not from Ray Train"), cfg) is None
    empty = load_config(None, [f"run.dir={tmp_path / 'fresh'}", "cluster.use_gpu=false"])
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError

    msg = str(explain(ControllerError(WorkerGroupStartupFailedError("the node died while the worker started")), empty))
    assert msg.startswith("the workers could not be started (the node died while the worker started);")
    assert msg.endswith(
        "if a node was lost, restart or replace it, then resubmit the job (no checkpoint was complete yet: it starts from step 0)"
    )


def test_a_new_driver_forgets_ray_trains_snapshot_of_the_previous_one(tmp_path):
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    snapshot.write_text("{}")
    forget_previous_run(tmp_path)
    assert not snapshot.exists()
    forget_previous_run(tmp_path)  # nothing to forget: fine
