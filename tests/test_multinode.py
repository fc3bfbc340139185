"""Multi-node training and fault tolerance on a real two-node Ray cluster
(cluster/local-two-node.sh: two network namespaces, one Ray node each, gloo over the veth link).

1. One worker on each node, pretraining and LoRA, ZeRO-2 and ZeRO-3: the loss line equals, bit
   for bit, the same job with both workers on one machine (torchrun; tests/fault_support.py).
2. One pretraining job (ZeRO-2, 16 steps, a checkpoint every 2, 2 kept, one worker per node)
   submitted with `llmtrain submit` and hit, in order, by (tests/fault_support.Injector):
     - SIGKILL of a training worker at two seeded random steps after the first checkpoint;
     - SIGKILL of a worker while checkpoint 8 is being written (LLMTRAIN_TEST_SAVE_PAUSE);
     - loss of the worker node (`local-two-node.sh kill worker`) while checkpoint 10 is being
       written: with no second node for its restart the job fails, within a bounded time
       (cluster.resource_timeout_s), with one line; the node is restarted and the job
       resubmitted;
     - the resubmitted job's driver stopped (`llmtrain jobs stop`) while checkpoint 12 is being
       written, and the job submitted once more (a driver restart).
   After every fault training resumes from the newest complete checkpoint; the finished run has
   the uninterrupted run's loss line and its parameters bit for bit.

The jobs of (1) run in the background while the job of (2) starts (each node advertises 2
CPUs so both fit); the worker node is killed only once they are done. The uninterrupted
references are built meanwhile too.

Needs root, iproute2 and gcc (CI has them); skipped otherwise. One cluster (`llmtm` on
10.231.11.0/24, apart from the other tests' clusters) serves the module and is always removed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import need_shared
from fault_support import (
    LORA,
    LORA_CONFIG,
    PRETRAIN,
    PRETRAIN_CONFIG,
    Fault,
    Injector,
    bitwise_equal,
    final_parameters,
    losses,
    reference_runs,
)
from runtime_support import tiny_data

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local-two-node.sh"
RAY = Path(sys.executable).parent / "ray"
NAME, SUBNET = "llmtm", "10.231.11"
HEAD_IP, WORKER_IP = f"{SUBNET}.1", f"{SUBNET}.2"
JOBS_API = f"http://{HEAD_IP}:8265"
SEED = 6  # the kill points and ranks below are a seeded random choice

PARITY = {  # name -> (task, config, overrides); each also runs once with a worker on each node
    "pretrain-zero3": ("pretrain", PRETRAIN_CONFIG, [*PRETRAIN, "train.max_steps=4", "zero.stage=3"]),
    "lora-zero2": ("sft", LORA_CONFIG, [*LORA, "train.max_steps=4", "zero.stage=2"]),
    "lora-zero3": ("sft", LORA_CONFIG, [*LORA, "train.max_steps=4", "zero.stage=3"]),
}
FAULT_JOB = [*PRETRAIN, "train.max_steps=16", "checkpoint.every=2", "checkpoint.keep=2", "zero.stage=2"]
SAVE_KILL_STEP = 8
PAUSE_S = 3
NODE_KILL_STEP = 10
DRIVER_STOP_STEP = 12
RESOURCE_TIMEOUT_S = 10


def _missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces (CI runs as root)"
    for tool in ("ip", "gcc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "'ip netns' is not usable in this environment"
    if not RAY.exists():
        return f"no ray executable beside {sys.executable}"
    return None


def script(*args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLMTRAIN_CLUSTER_NAME=NAME, LLMTRAIN_CLUSTER_SUBNET=SUBNET, LLMTRAIN_RAY=str(RAY), **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def in_head(*cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return script("exec", "head", "--", *cmd, timeout=timeout)


def cli(*args: str, env: tuple[str, ...] = (), timeout: float = 600) -> subprocess.CompletedProcess:
    """`llmtrain ...` run on the head node (a client of the cluster)."""
    return in_head("env", *env, "python", "-m", "llmtrain.cli", *args, timeout=timeout)


def _data(task: str, data: Path) -> list[str]:
    return [f"data.path={data}"] if task == "pretrain" else []  # LoRA: the config's pairs file


# ---------------------------------------------------------------------------------------------
# Fixtures: data, references (built in the background meanwhile), the cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    need_shared()
    if _missing_requirement():
        pytest.skip(_missing_requirement())
    return tiny_data(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def references(data, tmp_path_factory):
    """Uninterrupted one-machine runs of every job below, started now in the background."""
    jobs = {name: (task, config, [*overrides, *_data(task, data)]) for name, (task, config, overrides) in PARITY.items()}
    jobs["fault-job"] = ("pretrain", PRETRAIN_CONFIG, [*FAULT_JOB, f"data.path={data}"])
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(reference_runs, tmp_path_factory.getbasetemp(), jobs)
    yield future
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def cluster(references):
    script("down")  # leftovers of an interrupted earlier run of this module
    try:
        up = script("up", env={"LLMTRAIN_CLUSTER_CPUS": "2"})  # room for two jobs at once (below)
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        yield
    finally:
        down = script("down")
        assert down.returncode == 0, down.stderr


# ---------------------------------------------------------------------------------------------
# The two-node parity jobs run in the background while the fault job starts; the worker node is
# only killed once they are done.

_PARITY_DRIVER = """
import json, sys
from llmtrain.config import load_config
from llmtrain.launch import launch
for task, config, overrides in json.loads(sys.argv[1]):
    launch(load_config(config, overrides), task)
"""


@pytest.fixture(scope="module")
def parity_driver(cluster, data, tmp_path_factory):
    """One driver on the head (cluster.address=auto) running the PARITY jobs in turn,
    strict_spread: one worker on each node."""
    base = tmp_path_factory.mktemp("two-node")
    dirs = {name: base / name for name in PARITY}
    jobs = [
        [
            task,
            str(config),
            [*overrides, *_data(task, data), f"run.dir={dirs[name]}", "cluster.address=auto", "cluster.placement=strict_spread"],
        ]
        for name, (task, config, overrides) in PARITY.items()
    ]
    (base / "driver.py").write_text(_PARITY_DRIVER)
    log = open(base / "driver.log", "w")
    env = dict(os.environ, LLMTRAIN_CLUSTER_NAME=NAME, LLMTRAIN_CLUSTER_SUBNET=SUBNET, LLMTRAIN_RAY=str(RAY))
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "exec", "head", "--", "python", str(base / "driver.py"), json.dumps(jobs)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    yield {"proc": proc, "dirs": dirs, "log": base / "driver.log"}
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()


def _parity_done(parity_driver, timeout: float = 600) -> dict[str, Path]:
    proc = parity_driver["proc"]
    rc = proc.wait(timeout=timeout)
    assert rc == 0, parity_driver["log"].read_text()[-5000:]
    return parity_driver["dirs"]


# ---------------------------------------------------------------------------------------------
# Faults


@pytest.fixture(scope="module")
def scenario(cluster, data, tmp_path_factory, references, parity_driver):
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    rng = random.Random(SEED)
    job = {"id": None}

    def kill_worker_node():
        try:  # job A waits in its save of checkpoint NODE_KILL_STEP meanwhile
            parity_driver["proc"].wait(timeout=600)
        except subprocess.TimeoutExpired:
            pass  # the parity tests report it; the scenario goes on
        out = script("kill", "worker")
        job["node_killed"] = time.time()
        assert out.returncode == 0, out.stderr

    def stop_driver():
        out = cli("jobs", "stop", job["id"], "--address", JOBS_API, timeout=60)
        assert out.returncode == 0, out.stderr

    first = rng.randint(3, 4)
    faults = [
        Fault("step", first, rank=rng.randrange(2)),
        Fault("step", rng.randint(first + 2, 6), rank=rng.randrange(2)),
        Fault("save", SAVE_KILL_STEP, rank=rng.randrange(2)),
        Fault("save", NODE_KILL_STEP, action=kill_worker_node),
        Fault("save", DRIVER_STOP_STEP, action=stop_driver),
    ]
    injector = Injector(run_dir, faults)
    args = [
        "submit",
        str(PRETRAIN_CONFIG),
        *FAULT_JOB,
        f"data.path={data}",
        f"run.dir={run_dir}",
        "cluster.placement=strict_spread",
        "cluster.max_failures=4",
    ]  # 3 restarts; the 4th (node lost) waits for resources
    where = ("--address", JOBS_API)
    result = {"run_dir": run_dir, "faults": faults}
    injector.start()
    try:
        # Job A: two worker deaths and a death in a checkpoint write are restarts within the
        # job; the node loss ends it (no second node) after cluster.resource_timeout_s.
        pauses = f"LLMTRAIN_TEST_SAVE_PAUSE={SAVE_KILL_STEP}:{PAUSE_S},{NODE_KILL_STEP}:600"
        a = cli(*args, f"cluster.resource_timeout_s={RESOURCE_TIMEOUT_S}", *where, "--follow", env=(pauses,))
        result["a"], result["a_end"] = a, time.time()
        _keep_log(run_dir, "job-a", a)
        assert faults[3].at_time, f"job A ended before the node was lost:\n{a.stdout[-3000:]}\n{a.stderr[-2000:]}"
        up = script("start", "worker")
        assert up.returncode == 0, up.stderr
        # Job B: resubmitted; its driver is stopped while checkpoint DRIVER_STOP_STEP is written.
        b = cli(
            *args, "cluster.resource_timeout_s=60", *where, env=(f"LLMTRAIN_TEST_SAVE_PAUSE={DRIVER_STOP_STEP}:600",), timeout=120
        )
        assert b.returncode == 0, b.stdout + b.stderr
        job["id"] = re.search(r"^submitted (\S+) to ", b.stdout, re.M).group(1)
        deadline = time.monotonic() + 300
        status = ""
        while time.monotonic() < deadline and not re.match(rf"{re.escape(job['id'])} (STOPPED|FAILED|SUCCEEDED)\b", status):
            assert injector.error is None, injector.error
            time.sleep(2)
            status = cli("jobs", "status", job["id"], "--address", JOBS_API, timeout=60).stdout
        result["b_status"] = status
        # Job C: submitted again, runs to the end.
        result["c"] = cli(*args, "cluster.resource_timeout_s=60", *where, "--follow")
        _keep_log(run_dir, "job-c", result["c"])
        injector.join(timeout=60)
    finally:
        injector.stop()
    assert injector.error is None, injector.error
    result["reference"] = references.result()["fault-job"]
    print(f"\nfault scenario (seed {SEED}):")
    for f in faults:
        print("  " + f.describe())
    result["node_to_failure_s"] = result["a_end"] - job["node_killed"]
    print(f"  node lost -> job A ended (FAILED) after {result['node_to_failure_s']:.1f} s")
    return result


def _keep_log(run_dir: Path, name: str, out: subprocess.CompletedProcess) -> None:
    (run_dir.parent / f"{name}.log").write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)


def test_worker_deaths_resume_from_the_newest_checkpoint(scenario):
    for fault in scenario["faults"][:2]:
        assert fault.killed_pid is not None and fault.last_step >= 3  # after the first checkpoint (step 2)
        assert fault.resumed_from == fault.newest_checkpoint, fault.describe()
        assert 0 <= fault.steps_lost <= fault.last_step - 2


def test_death_during_a_checkpoint_write_falls_back_to_the_previous_one(scenario):
    fault = scenario["faults"][2]
    assert fault.last_step == SAVE_KILL_STEP  # killed inside the save of step 8, before it was complete
    assert fault.newest_checkpoint == SAVE_KILL_STEP - 2 and fault.resumed_from == SAVE_KILL_STEP - 2, fault.describe()
    checkpoints = sorted(p.name for p in (scenario["run_dir"] / "checkpoints").iterdir())
    assert checkpoints == ["step_00000014", "step_00000016"]  # the partial one was replaced, nothing left over


def test_node_loss_fails_within_the_resource_timeout_with_one_line(scenario):
    a, fault = scenario["a"], scenario["faults"][3]
    assert a.returncode == 1, a.stdout[-3000:]
    last = a.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"llmtrain: job \S+ FAILED: llmtrain: error: the cluster did not provide cluster\.num_workers=2 x 1 CPU, "
        rf"placement strict_spread within cluster\.resource_timeout_s={RESOURCE_TIMEOUT_S} s \(alive nodes: "
        rf"{re.escape(HEAD_IP)}: 2 CPU 0 GPU\); a node was lost or the cluster is busy: restart or add nodes, then "
        rf"resubmit with train\.resume=auto to continue from {re.escape(str(scenario['run_dir']))}/checkpoints/step_\d{{8}}",
        last,
    ), last
    # Crash -> one restart attempt -> RESOURCE_TIMEOUT_S waiting for a second node -> failed.
    assert scenario["node_to_failure_s"] < RESOURCE_TIMEOUT_S + 50
    # Lost during the save of checkpoint 10: the resubmitted job continued from 8.
    assert fault.last_step == NODE_KILL_STEP
    assert fault.newest_checkpoint == fault.resumed_from == NODE_KILL_STEP - 2, fault.describe()


def test_resubmitted_job_continues_after_its_driver_is_stopped(scenario):
    fault = scenario["faults"][4]
    assert scenario["b_status"].split()[1:2] == ["STOPPED"], scenario["b_status"]
    c = scenario["c"]
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-2000:]
    assert fault.last_step == DRIVER_STOP_STEP  # stopped while checkpoint 12 was being written
    assert fault.newest_checkpoint == fault.resumed_from == DRIVER_STOP_STEP - 2, fault.describe()
    placement = json.loads((scenario["run_dir"] / "placement.json").read_text())
    assert {p["node_ip"] for p in placement} == {HEAD_IP, WORKER_IP}


def test_finished_run_is_bitwise_the_uninterrupted_one(scenario):
    run, reference = scenario["run_dir"], scenario["reference"]
    want = losses(reference)
    assert sorted(want) == list(range(1, 17))
    assert losses(run) == want  # one line per step, every value identical
    assert bitwise_equal(final_parameters(run), final_parameters(reference))


# ---------------------------------------------------------------------------------------------
# One worker per node == both workers on one machine


@pytest.mark.parametrize("name", list(PARITY))
def test_one_worker_per_node_matches_one_machine(name, parity_driver, references):
    run = _parity_done(parity_driver)[name]
    placement = json.loads((run / "placement.json").read_text())
    assert sorted(p["node_ip"] for p in placement) == [HEAD_IP, WORKER_IP]  # one worker on each node
    got, want = losses(run), losses(references.result()[name])
    assert sorted(want) == [1, 2, 3, 4]
    assert got == want  # bit for bit: gloo over the veth link sums as on one machine
