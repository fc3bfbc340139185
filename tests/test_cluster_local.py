"""The local two-node Ray cluster (cluster/local-two-node.sh) and job submission against it.

Two network namespaces on a subnet of their own (10.231.8.0/24 here, so a developer's cluster on
the default 10.231.7.0/24 is left alone), a Ray head in one and a worker node in the other.
Checked: both nodes alive at their namespace addresses; a task pinned to each node sees that
node's address on its own interface; every listening socket in either namespace is on the
namespace address or loopback; `llmtrain submit` / `jobs` work against the Jobs API (a job that
fails with our one-line error, a real two-step pretraining run with one worker per node); the
token is enforced; a failed `up` and `down` leave no namespace, link, file or process behind.

Needs root, iproute2 and gcc (CI has them); skipped otherwise. The cluster is started once for
the module and always brought down, even when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import need_shared

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local-two-node.sh"
RAY = Path(sys.executable).parent / "ray"
NAME, SUBNET = "llmtt", "10.231.8"
HEAD_IP, WORKER_IP = f"{SUBNET}.1", f"{SUBNET}.2"
STATE = Path(f"/tmp/llmtrain-cluster-{NAME}")
JOBS_API = f"http://{HEAD_IP}:8265"

pytestmark = pytest.mark.slow


def _missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "'ip netns' is not usable in this environment"
    if shutil.which("gcc") is None:
        return "gcc is needed to build cluster/bindshim.c"
    if not RAY.exists():
        return f"no ray executable beside {sys.executable}"
    return None


def script(
    *args: str, name: str = NAME, subnet: str = SUBNET, ray: Path = RAY, timeout: float = 180
) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLMTRAIN_CLUSTER_NAME=name, LLMTRAIN_CLUSTER_SUBNET=subnet, LLMTRAIN_RAY=str(ray))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def in_head(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return script("exec", "head", "--", *cmd, timeout=timeout)


def llmtrain(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return in_head("python", "-m", "llmtrain.cli", *args, timeout=timeout)


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def processes_of(subnet: str, netns_inodes: set[int] = frozenset()) -> list[str]:
    """Processes started by the script for `subnet` (their environment names the node address)
    or living in one of the given network namespaces."""
    found = []
    marker = f"LLMTRAIN_BIND_IP={subnet}.".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            net = os.stat(proc / "ns" / "net").st_ino
            comm = (proc / "comm").read_text().strip()
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        if any(item.startswith(marker) for item in environ.split(b"\0")) or net in netns_inodes:
            found.append(f"{proc.name} {comm}")
    return found


def assert_nothing_left(name: str, subnet: str, netns_inodes: set[int] = frozenset()) -> None:
    assert not {f"{name}-head", f"{name}-worker"} & namespaces()
    assert f"{name}-link" not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert not Path(f"/tmp/llmtrain-cluster-{name}").exists()
    assert not Path(f"/etc/netns/{name}-head").exists() and not Path(f"/etc/netns/{name}-worker").exists()
    assert processes_of(subnet, netns_inodes) == []


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    reason = _missing_requirement()
    if reason:
        pytest.skip(reason)
    script("down")  # leftovers of an interrupted earlier run of this module
    try:
        up = script("up")
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        inodes = {os.stat(f"/run/netns/{NAME}-{node}").st_ino for node in ("head", "worker")}
        yield {"status": up.stdout, "netns_inodes": inodes}
    finally:
        script("down")


def test_failed_up_cleans_up(tmp_path):
    """The head "starts" (a stand-in daemon that ignores SIGTERM, left running in the head
    namespace as `ray start` leaves its services), then the worker node refuses to start: `up`
    fails with a clear error and leaves nothing behind, the stubborn daemon included."""
    reason = _missing_requirement()
    if reason:
        pytest.skip(reason)
    name, subnet = "llmtf", "10.231.9"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").symlink_to(sys.executable)
    (fake / "ray").write_text(
        "#!/bin/sh\n"
        'case " $* " in *" --head "*)\n'
        "  nohup sh -c 'trap \"\" TERM; while :; do sleep 1; done' >/dev/null 2>&1 &\n"
        "  exit 0;;\n"
        "esac\n"
        'echo "fake ray: this node refuses to start" >&2\nexit 1\n'
    )
    (fake / "ray").chmod(0o755)
    script("down", name=name, subnet=subnet, ray=fake / "ray")
    t0 = time.monotonic()
    up = script("up", name=name, subnet=subnet, ray=fake / "ray")
    assert up.returncode == 2, up.stderr
    assert "ray start on the worker node failed" in up.stderr
    assert "fake ray: this node refuses to start" in up.stderr
    assert "cleaning up" in up.stderr
    assert_nothing_left(name, subnet)
    assert time.monotonic() - t0 < 30


def test_two_nodes_alive_at_namespace_addresses(cluster):
    status = script("status")
    assert status.returncode == 0, status.stderr
    nodes = [line.split() for line in status.stdout.splitlines() if " ALIVE " in line]
    assert sorted((n[0], n[1], n[3], n[4]) for n in nodes) == [
        ("head", HEAD_IP, "CPU=1", "GPU=0"),
        ("worker", WORKER_IP, "CPU=1", "GPU=0"),
    ]
    for node, ip in (("head", HEAD_IP), ("worker", WORKER_IP)):
        addrs = subprocess.run(["ip", "-n", f"{NAME}-{node}", "-br", "addr"], capture_output=True, text=True).stdout
        assert {line.split()[0].split("@")[0]: line.split()[2:] for line in addrs.splitlines()} == {
            "lo": ["127.0.0.1/8", "::1/128"],
            f"{NAME}-link": [f"{ip}/24"],
        }


PROBE = r"""
import fcntl, json, socket, struct, subprocess, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], logging_level="ERROR")

def link_address(ifname):
    # SIOCGIFADDR: the address of this process's own network interface, independent of Ray
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))
    return socket.inet_ntoa(packed[20:24])

@ray.remote(num_cpus=1)
class Probe:
    def where(self, ifname):
        return {"node_id": ray.get_runtime_context().get_node_id(),
                "ray_ip": ray.util.get_node_ip_address(), "link_ip": link_address(ifname)}

    def listeners(self):  # this node's namespace, while driver, workers and actors are alive
        return subprocess.run(["ss", "-Hltnu"], capture_output=True, text=True, check=True).stdout

nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
probes = {nid: Probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote()
          for nid in nodes}
print(json.dumps({
    "nodes": nodes,
    "where": {nid: ray.get(p.where.remote(sys.argv[2])) for nid, p in probes.items()},
    "listeners": {nodes[nid]: ray.get(p.listeners.remote()) for nid, p in probes.items()},
}))
"""


@pytest.fixture(scope="module")
def probe(cluster, tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE)
    out = in_head("python", str(path), f"{HEAD_IP}:6379", f"{NAME}-link")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_actor_pinned_to_each_node_sees_that_node_address(probe):
    assert sorted(probe["nodes"].values()) == [HEAD_IP, WORKER_IP]
    for node_id, seen in probe["where"].items():
        assert seen["node_id"] == node_id
        assert seen["ray_ip"] == seen["link_ip"] == probe["nodes"][node_id]


def _bad_listeners(ss_output: str, ip: str) -> tuple[list[str], set[int]]:
    allowed = {ip, "127.0.0.1", f"[::ffff:{ip}]", "[::ffff:127.0.0.1]", "[::1]"}
    bad, ports = [], set()
    for line in ss_output.splitlines():
        local = line.split()[4]  # Netid State Recv-Q Send-Q Local:Port Peer:Port
        host, _, port = local.rpartition(":")
        ports.add(int(port))
        if host.split("%")[0] not in allowed:
            bad.append(line)
    return bad, ports


def test_every_listener_is_on_the_namespace_address_or_loopback(cluster, probe):
    # As seen by an actor on each node while the driver and the actors were alive ...
    for ip, ss_output in probe["listeners"].items():
        bad, ports = _bad_listeners(ss_output, ip)
        assert bad == [], f"{ip}: listeners on other addresses:\n" + "\n".join(bad)
        assert len(ports) >= 5
    # ... and now, from outside, with only the Ray services running.
    for node, ip in (("head", HEAD_IP), ("worker", WORKER_IP)):
        ss = subprocess.run(["ip", "netns", "exec", f"{NAME}-{node}", "ss", "-Hltnu"], capture_output=True, text=True, check=True)
        bad, ports = _bad_listeners(ss.stdout, ip)
        assert bad == [], f"{node}: listeners on other addresses:\n" + "\n".join(bad)
        if node == "head":
            assert {6379, 8265, 10001} <= ports


def test_jobs_api_requires_the_token(cluster):
    out = in_head("env", "RAY_AUTH_MODE=disabled", "python", "-m", "llmtrain.cli", "jobs", "list", "--address", JOBS_API)
    assert out.returncode == 2
    assert "token authentication" in out.stderr and "RAY_AUTH_TOKEN_PATH" in out.stderr


def test_unreachable_address_fails_within_seconds(cluster):
    t0 = time.monotonic()
    out = llmtrain("jobs", "list", "--address", f"http://{WORKER_IP}:8265")  # no dashboard on the worker node
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"llmtrain: error: --address http://{WORKER_IP}:8265: nothing answers at {WORKER_IP}:8265 within 3 s "
        "(Connection refused); check the address (the dashboard port, 8265 by default) and that the cluster is up"
    ]
    assert time.monotonic() - t0 < 15


def test_submit_checks_the_cluster_resources(cluster):
    t0 = time.monotonic()
    out = llmtrain("submit", "configs/tiny-pretrain.yaml", "cluster.num_workers=4", "--address", JOBS_API)
    assert out.returncode == 2
    assert "cannot hold cluster.num_workers=4 x 1 CPU: missing 2 CPU (needs 4, has 2)" in out.stderr
    assert f"{HEAD_IP}: 1 CPU 0 GPU, {WORKER_IP}: 1 CPU 0 GPU" in out.stderr
    out = llmtrain("submit", "configs/tiny-pretrain.yaml", "cluster.use_gpu=true", "--address", JOBS_API)
    assert out.returncode == 2
    assert "missing 2 GPU (needs 2, has 0)" in out.stderr
    assert time.monotonic() - t0 < 30
    assert "submitted" not in out.stdout


def _job_id(stdout: str) -> str:
    match = re.search(r"^submitted (\S+) to ", stdout, re.M)
    assert match, stdout
    return match.group(1)


def test_submitted_job_fails_with_our_error_line(cluster, tmp_path):
    run_dir = tmp_path / "run"
    out = llmtrain(
        "submit",
        "configs/tiny-pretrain.yaml",
        f"data.path={tmp_path}/missing",
        f"run.dir={run_dir}",
        "--address",
        JOBS_API,
        "--follow",
    )
    assert out.returncode == 1, out.stderr
    job_id = _job_id(out.stdout)
    error = (
        f"llmtrain: error: {tmp_path}/missing: prepared data directory not found; run `llmtrain prepare` first or fix the path"
    )
    assert f"Running entrypoint for job {job_id}: python -m llmtrain.cli pretrain config.yaml" in out.stdout
    assert error in out.stdout  # the driver's own line, in the followed logs
    assert out.stderr.strip().splitlines()[-1] == f"llmtrain: job {job_id} FAILED: {error}"

    status = llmtrain("jobs", "status", job_id, "--address", JOBS_API)
    assert status.returncode == 0 and status.stdout.splitlines()[0] == f"{job_id} FAILED"
    logs = llmtrain("jobs", "logs", job_id, "--address", JOBS_API)
    assert logs.returncode == 0 and error in logs.stdout
    listing = llmtrain("jobs", "list", "--address", JOBS_API)
    assert re.search(rf"^{re.escape(job_id)}\s+FAILED\s", listing.stdout, re.M), listing.stdout
    stop = llmtrain("jobs", "stop", job_id, "--address", JOBS_API)
    assert stop.returncode == 0 and stop.stdout.strip() == f"{job_id}: was not running"
    unknown = llmtrain("jobs", "status", "llmtrain-no-such-job", "--address", JOBS_API)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith(f"llmtrain: error: no job llmtrain-no-such-job on {JOBS_API}")


SHIPPED = r"""
import json, os, ray, llmtrain
ray.init(address="auto", logging_level="ERROR")

@ray.remote(num_cpus=1)
def where():
    import llmtrain
    return ray.util.get_node_ip_address(), llmtrain.__file__

ips = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
print(json.dumps({"driver": llmtrain.__file__,
                  "tasks": ray.get([where.options(resources={f"node:{ip}": 0.01}).remote() for ip in ips])}))
"""

SUBMIT_SHIPPED = r"""
import json, sys, time
from ray.job_submission import JobSubmissionClient
from llmtrain.submit import job_runtime_env
client = JobSubmissionClient(sys.argv[1])
job = client.submit_job(entrypoint="python shipped.py", runtime_env=job_runtime_env(sys.argv[2]))
while not client.get_job_status(job).is_terminal():
    time.sleep(0.5)
print(json.dumps({"status": str(client.get_job_status(job)), "logs": client.get_job_logs(job)}))
"""


def test_every_node_imports_the_submitted_llmtrain(cluster, tmp_path):
    """A job's runtime environment (the one `llmtrain submit` builds) puts the shipped copy of
    llmtrain first on both nodes, ahead of the cluster's installed one (here the repo's
    editable install, visible on both nodes)."""
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "shipped.py").write_text(SHIPPED)
    (tmp_path / "submit.py").write_text(SUBMIT_SHIPPED)
    out = in_head("python", str(tmp_path / "submit.py"), JOBS_API, str(stage))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED", result["logs"][-3000:]
    seen = json.loads(result["logs"].strip().splitlines()[-1])
    shipped = re.compile(
        rf"^{re.escape(str(STATE))}/(head|worker)/session_[^/]+/runtime_resources/py_modules_files/_ray_pkg_[0-9a-f]+/llmtrain/__init__\.py$"
    )

    def node_of(path: str) -> str:
        match = shipped.match(path)
        assert match, f"llmtrain imported from {path}, not from the job's py_modules"
        return match.group(1)

    assert node_of(seen["driver"]) == "head"
    assert {ip: node_of(path) for ip, path in seen["tasks"]} == {HEAD_IP: "head", WORKER_IP: "worker"}


def test_submitted_pretraining_runs_one_worker_on_each_node(cluster, tmp_path_factory):
    need_shared()
    sys.path.insert(0, str(Path(__file__).parent))
    from runtime_support import tiny_data

    data = tiny_data(tmp_path_factory.mktemp("cluster-data"))
    run_dir = tmp_path_factory.mktemp("cluster-run") / "run"
    out = llmtrain(
        "submit",
        "configs/tiny-pretrain.yaml",
        f"data.path={data}",
        f"run.dir={run_dir}",
        "train.max_steps=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.val_every=0",
        "train.val_batches=1",
        "checkpoint.every=0",
        "cluster.num_workers=2",
        "cluster.placement=spread",
        "--address",
        JOBS_API,
        "--follow",
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"job {_job_id(out.stdout)} SUCCEEDED"
    # Ray Train names each worker's node; one worker ran on each.
    assert re.search(rf"\(ip={re.escape(HEAD_IP)}, pid=\d+\) world_rank=\d", out.stdout), out.stdout[-3000:]
    assert re.search(rf"\(ip={re.escape(WORKER_IP)}, pid=\d+\) world_rank=\d", out.stdout), out.stdout[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2]
    assert (run_dir / "checkpoints" / "step_00000002" / "meta.json").is_file()
    resolved = (run_dir / "config.yaml").read_text()
    assert "address: auto" in resolved and f"path: {data}" in resolved


def test_submitted_prepare_runs_on_both_nodes_and_gives_the_local_bytes(cluster, corpus_slice, small_tokenizer, tmp_path):
    """`llmtrain submit prepare`: Ray Data on the two nodes (one CPU each) writes the bytes the
    in-process run writes on one machine, every shard and the manifest."""
    from llmtrain.data.prepare import prepare

    args = ["--input", str(corpus_slice), "--tokenizer", str(small_tokenizer), "--seq-len", "64", "--shard-tokens", "20000"]
    args += ["--val-fraction", "0.05", "--near-dedup", "--pii"]
    reference = prepare(
        [str(corpus_slice)], small_tokenizer, 64, tmp_path / "local", val_fraction=0.05, shard_tokens=20_000,
        minhash={"enabled": True}, pii={"enabled": True},
    )  # fmt: skip
    out = llmtrain(
        "submit", "prepare", *args, "--output", str(tmp_path / "cluster"), "--address", JOBS_API, "--follow", timeout=300
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "on Ray Data with 2 worker(s) on 2 nodes" in out.stdout, out.stdout[-3000:]
    files = lambda d: {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}  # noqa: E731
    assert files(tmp_path / "cluster") == files(reference)


def test_up_again_is_a_no_op(cluster):
    t0 = time.monotonic()
    again = script("up")
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stderr
    assert time.monotonic() - t0 < 30


def test_down_stops_everything_and_is_safe_twice(cluster):
    first = script("down")
    assert first.returncode == 0, first.stderr
    assert_nothing_left(NAME, SUBNET, cluster["netns_inodes"])
    second = script("down")
    assert second.returncode == 0, second.stderr
    status = script("status")
    assert status.returncode == 1 and status.stdout.startswith("down")
