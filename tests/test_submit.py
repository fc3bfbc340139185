"""`llmtrain submit` / `llmtrain jobs` without a cluster: address handling, the time-bounded
reachability check (refused and silent ports on loopback), the resource fit and its message,
the config a job carries, and one-line errors with exit status 2.

The same commands against a real two-node cluster are in tests/test_cluster_local.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtrain.config import load_config
from llmtrain.errors import UserError
from llmtrain.submit import (
    Node,
    _failure_line,
    check_reachable,
    check_resources,
    job_config,
    normalize_address,
    package_dirs,
    submission_id,
    workers_that_fit,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-pretrain.yaml"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=env
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(
    "given, expected",
    [
        ("10.0.0.5", "http://10.0.0.5:8265"),
        ("head.internal:9000", "http://head.internal:9000"),
        ("http://head:8265/", "http://head:8265"),
        ("https://ray.example.org", "https://ray.example.org:8265"),
        ("http://[fd00::5]:8265", "http://[fd00::5]:8265"),
    ],
)
def test_address_forms(given, expected):
    assert normalize_address(given) == expected


def test_address_from_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "10.1.2.3:8265")
    assert normalize_address(None) == "http://10.1.2.3:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    with pytest.raises(UserError, match=r"no cluster address: pass --address http://HEAD:8265"):
        normalize_address(None)


def test_ray_client_address_is_refused_with_the_fix():
    with pytest.raises(UserError, match=r"the Jobs API is the dashboard's http address.*ray:// is the Ray Client port"):
        normalize_address("ray://head:10001")


def test_refused_port_fails_at_once():
    port = closed_port()
    t0 = time.monotonic()
    with pytest.raises(UserError, match=rf"nothing answers at 127.0.0.1:{port} within 3 s \(Connection refused\)"):
        check_reachable(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 1


def test_silent_port_fails_after_the_timeout():
    """A listener whose backlog is full drops new SYNs: the connection neither succeeds nor is
    refused, like a firewalled host. The check gives up after its timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        held = socket.create_connection(("127.0.0.1", port), timeout=1)  # fills the backlog
        try:
            t0 = time.monotonic()
            with pytest.raises(UserError, match=rf"nothing answers at 127.0.0.1:{port} within 0.5 s \(timed out\)"):
                check_reachable(f"http://127.0.0.1:{port}", timeout_s=0.5)
            assert 0.4 < time.monotonic() - t0 < 2
        finally:
            held.close()


def test_cli_unreachable_is_one_line_and_exit_2():
    port = closed_port()
    for args in (["jobs", "list"], ["jobs", "logs", "some-job"], ["submit", str(CONFIG)]):
        out = cli(*args, "--address", f"http://127.0.0.1:{port}")
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"llmtrain: error: --address http://127.0.0.1:{port}: nothing answers")


def test_cli_config_mistakes_come_before_any_network_call():
    out = cli("submit", str(CONFIG), "train.max_stpes=3", "--address", f"http://127.0.0.1:{closed_port()}")
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == "llmtrain: error: override train.max_stpes=3: train.max_stpes: unknown key (did you mean 'max_steps'?)"
    )


def test_cli_jobs_needs_a_job_id():
    out = cli("jobs", "status", "--address", "http://127.0.0.1:1")
    assert out.returncode == 2
    assert out.stderr.strip() == "llmtrain: error: llmtrain jobs status needs a JOB_ID (see `llmtrain jobs list`)"


# ---------------------------------------------------------------------------------------------
# Resources


CPU_NODES = [Node("10.0.0.1", 1, 0, True), Node("10.0.0.2", 1, 0, False)]
GPU_NODES = [Node("10.0.0.1", 8, 0, True), Node("10.0.0.2", 32, 4, False), Node("10.0.0.3", 32, 4, False)]


def cluster_section(**overrides):
    return load_config(None, [f"cluster.{k}={v}" for k, v in overrides.items()]).cluster


def test_workers_never_span_nodes():
    assert workers_that_fit(CPU_NODES, 1, 1, use_gpu=False) == 2
    assert workers_that_fit(CPU_NODES, 2, 1, use_gpu=False) == 0  # 2 CPUs in total, but 1 per node
    assert workers_that_fit(CPU_NODES, 0.5, 1, use_gpu=False) == 4
    assert workers_that_fit(GPU_NODES, 4, 1, use_gpu=True) == 8  # the CPU-only head holds none
    assert workers_that_fit(GPU_NODES, 8, 1, use_gpu=True) == 8
    assert workers_that_fit(GPU_NODES, 10, 1, use_gpu=True) == 6  # 3 per 32-CPU node
    assert workers_that_fit(GPU_NODES, 1, 0.5, use_gpu=True) == 16


def test_enough_resources_pass():
    check_resources(cluster_section(num_workers=2, use_gpu="false"), CPU_NODES, "http://h:8265")
    check_resources(cluster_section(num_workers=8, cpus_per_worker=4, use_gpu="true"), GPU_NODES, "http://h:8265")


def test_missing_cpus_are_named():
    with pytest.raises(UserError) as err:
        check_resources(cluster_section(num_workers=4, use_gpu="false"), CPU_NODES, "http://h:8265")
    assert str(err.value) == (
        "the cluster at http://h:8265 cannot hold cluster.num_workers=4 x 1 CPU: missing 2 CPU (needs 4, has 2); "
        "alive nodes: 10.0.0.1: 1 CPU 0 GPU, 10.0.0.2: 1 CPU 0 GPU; lower cluster.num_workers / cpus_per_worker / "
        "gpus_per_worker, add nodes, or pass --no-resource-check if the cluster autoscales"
    )


def test_missing_gpus_and_oversized_workers_are_named():
    with pytest.raises(UserError, match=r"x 4 CPU \+ 1 GPU: missing 4 GPU \(needs 12, has 8\);"):
        check_resources(cluster_section(num_workers=12, cpus_per_worker=4, use_gpu="true"), GPU_NODES, "http://h:8265")
    with pytest.raises(UserError, match=r"missing a node with 2 CPU for one worker \(largest has 1\);"):
        check_resources(cluster_section(num_workers=1, cpus_per_worker=2, use_gpu="false"), CPU_NODES, "http://h:8265")
    with pytest.raises(UserError, match=r"missing room for 1 more worker\(s\): the nodes' resources are split so only 6 fit"):
        check_resources(cluster_section(num_workers=7, cpus_per_worker=10, use_gpu="true"), GPU_NODES, "http://h:8265")


# ---------------------------------------------------------------------------------------------
# What a job carries


def test_job_config_runs_on_the_cluster_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = job_config(load_config(CONFIG, ["data.path=data/x", "run.dir=runs/y"]), CPU_NODES)
    assert cfg.cluster.address == "auto"
    assert cfg.data.path == tmp_path / "data" / "x" and cfg.run.dir == tmp_path / "runs" / "y"
    assert cfg.cluster.use_gpu is False  # decided by the cluster's GPUs, not this machine's
    assert job_config(load_config(CONFIG, ["cluster.use_gpu=null"]), GPU_NODES).cluster.use_gpu is True
    assert job_config(load_config(CONFIG, ["cluster.use_gpu=false"]), GPU_NODES).cluster.use_gpu is False
    with pytest.raises(UserError, match="set cluster.use_gpu=true or false"):
        job_config(load_config(CONFIG, []), None)


def test_packages_shipped_are_this_checkout():
    assert package_dirs() == [str(REPO / "llmtrain"), str(REPO / "kernels")]


def test_submission_id_names_task_and_run():
    job_id = submission_id("pretrain", Path("/shared/runs/My Run.v2"))
    assert job_id.startswith("llmtrain-pretrain-My-Run-v2-")
    assert submission_id("pretrain", Path("/x/r")) != submission_id("pretrain", Path("/x/r"))


def test_failure_line_prefers_our_error():
    logs = "Running entrypoint\nsome warning\nllmtrain: error: data.path: not found; fix it\n"
    assert _failure_line(logs) == "llmtrain: error: data.path: not found; fix it"
    assert _failure_line("Traceback ...\nValueError: boom\n\n") == "ValueError: boom"
    assert _failure_line("") == ""


def test_job_entrypoint_carries_the_forwarded_settings(monkeypatch):
    from llmtrain.submit import job_entrypoint

    for key in ("LLMTRAIN_KERNELS", "TRITON_INTERPRET", "LLMTRAIN_TEST_SAVE_PAUSE"):
        monkeypatch.delenv(key, raising=False)
    assert job_entrypoint("pretrain") == "python -m llmtrain.cli pretrain config.yaml"
    monkeypatch.setenv("LLMTRAIN_KERNELS", "torch")
    monkeypatch.setenv("LLMTRAIN_TEST_SAVE_PAUSE", "8:3,10:60 x")
    # On the command line, not in the job's env_vars: Ray refuses a job whose env_vars and the
    # driver's ray.init(runtime_env) name the same variable.
    assert (
        job_entrypoint("sft")
        == "LLMTRAIN_KERNELS=torch LLMTRAIN_TEST_SAVE_PAUSE='8:3,10:60 x' python -m llmtrain.cli sft config.yaml"
    )
    assert "env_vars" not in __import__("llmtrain.submit", fromlist=["x"]).job_runtime_env("/tmp")


# ---------------------------------------------------------------------------------------------
# Peers that accept a connection: the answer is bounded too (llmtrain/reachable.py)


def test_silent_peer_fails_after_the_read_timeout():
    """A port that accepts and never answers (the hang of issue 13): the HTTP probe gives up."""
    from bad_input import SilentServer

    server = SilentServer()
    try:
        t0 = time.monotonic()
        with pytest.raises(
            UserError,
            match=rf"--address http://{server.address}: {server.address} accepts connections but sends no answer within 5 s",
        ):
            check_reachable(f"http://{server.address}")
        assert 4.5 < time.monotonic() - t0 < 7
    finally:
        server.close()


def test_a_real_http_server_passes_the_probe():
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501: an answer
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def test_a_grpc_server_answers_the_cluster_probe():
    """What cluster.address points at (the Ray Client server, the GCS) is a gRPC server: it
    answers the HTTP/2 preface at once. The silent server does not."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from bad_input import SilentServer

    from llmtrain.launch import check_reachable as check_cluster

    server = grpc.server(ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    silent = SilentServer()
    try:
        check_cluster(f"ray://127.0.0.1:{port}")
        check_cluster(f"127.0.0.1:{port}")
        with pytest.raises(UserError, match=r"cluster.address=ray://.*accepts connections but sends no answer within 5 s"):
            check_cluster(f"ray://{silent.address}")
    finally:
        server.stop(0)
        silent.close()
