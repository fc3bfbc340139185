"""Two embedded runs on one machine at once: both succeed, print no traceback, each on a Ray
instance of its own, and every socket their processes listen on (Ray's services, the torch
store of the process group, gloo) is on loopback, checked with `ss` while they train.

Before: each run printed a PlacementGroupCleanerMonitor traceback ("Found multiple active Ray
instances": Ray Train's cleaner found the cluster by listing every Ray on the machine;
llmtrain/reachable.py use_own_cluster), and the TCPStore of rank 0 listened on `*:PORT`
(llmtrain/process_group.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import need_shared
from runtime_support import BASE, CONFIG, REPO, losses, subprocess_env, tiny_data

pytestmark = pytest.mark.slow

LOOPBACK = {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}
STEPS = 12


def descendants(root: int) -> set[int]:
    """`root` and every process below it (Ray's services and workers are children of the driver)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children.get(pid, []))
    return found


def listeners() -> list[tuple[str, str, int]]:
    """(local address:port, process name, pid) of every listening TCP socket (`ss -Hltnp`)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        local = line.split()[3]  # State Recv-Q Send-Q Local:Port Peer:Port Process
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', line):
            rows.append((local, name, int(pid)))
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    need_shared()
    return tiny_data(tmp_path_factory.getbasetemp())


def test_two_embedded_runs_at_once_stay_apart_and_listen_on_loopback(data, tmp_path):
    runs = {name: tmp_path / name for name in ("a", "b")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "llmtrain.cli", "pretrain", str(CONFIG), *BASE, f"data.path={data}"]
            + [f"run.dir={run_dir}", f"train.max_steps={STEPS}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
            cwd=REPO,
        )
        for name, run_dir in runs.items()
    }
    seen: dict[str, set[tuple[str, str, int]]] = {name: set() for name in procs}
    deadline = time.monotonic() + 400
    while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        tree = {name: descendants(p.pid) for name, p in procs.items() if p.poll() is None}
        for row in listeners():
            for name, pids in tree.items():
                if row[2] in pids:
                    seen[name].add(row)
        time.sleep(0.3)
    outputs = {}
    for name, p in procs.items():
        if p.poll() is None:
            p.kill()
        outputs[name] = p.communicate()[0]
    for name, p in procs.items():
        out = outputs[name]
        assert p.returncode == 0, f"run {name} failed:\n{out[-4000:]}"
        assert "Traceback" not in out and "multiple active Ray" not in out, f"run {name}:\n{out[-4000:]}"
        assert sorted(losses(runs[name])) == list(range(1, STEPS + 1)), f"run {name}: metrics incomplete"
        exposed = sorted({row for row in seen[name] if row[0].rpartition(":")[0].split("%")[0] not in LOOPBACK})
        assert exposed == [], f"run {name}: listening beyond loopback: {exposed}"
        # The sampling saw the training itself: listeners of the rank-0 worker (its store and gloo).
        rank0 = json.loads((runs[name] / "placement.json").read_text())[0]["pid"]
        assert any(row[2] == rank0 for row in seen[name]), f"run {name}: rank 0 (pid {rank0}) never seen: {sorted(seen[name])}"
    gcs = {name: {row[0] for row in seen[name] if row[1] == "gcs_server"} for name in procs}
    assert gcs["a"] and gcs["b"] and not gcs["a"] & gcs["b"], f"the runs shared a Ray instance: {gcs}"


def test_the_store_listens_on_the_node_address_only(monkeypatch):
    """Rank 0's TCPStore, as process_group.open_store makes it (one process, no Ray): on the
    node address (here loopback), where torch's own store listens on `*:PORT`."""
    import ray.util
    import torch.distributed as dist

    from llmtrain import process_group

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # as launch.py sets it for the embedded runtime
    # Only this test's listeners count: earlier tests in the same process may have left their own.
    earlier = {row for row in listeners() if row[2] == os.getpid()}
    host, port = process_group.open_store(world=1, timeout_s=30)
    try:
        mine = [row for row in listeners() if row[2] == os.getpid() and row not in earlier]
        assert (f"127.0.0.1:{port}", port) in {(row[0], int(row[0].rpartition(":")[2])) for row in mine}, mine
        assert all(row[0].rpartition(":")[0] in LOOPBACK for row in mine), mine
        process_group.join("gloo", world_rank=0, world=1, host=host, port=port, timeout_s=30)
        assert dist.get_world_size() == 1
        mine = [row for row in listeners() if row[2] == os.getpid() and row not in earlier]
        assert all(row[0].rpartition(":")[0] in LOOPBACK for row in mine), mine
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        process_group._store = None
