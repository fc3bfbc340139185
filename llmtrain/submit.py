"""Submit training jobs to a running Ray cluster through the Ray Jobs API, and manage them.

    llmtrain submit configs/tiny-pretrain.yaml data.path=/shared/data run.dir=/shared/runs/x \\
        --address http://HEAD:8265 --follow
    llmtrain jobs list --address http://HEAD:8265
    llmtrain jobs logs JOB_ID --follow --address http://HEAD:8265

What travels with a job (a Ray runtime environment):
- `py_modules`: the `llmtrain` and `kernels` packages of this checkout, so every node runs
  exactly the code that was submitted (the cluster's image provides the dependencies);
- `working_dir`: one file, `config.yaml`, the fully resolved config with `cluster.address=auto`
  (the driver joins the cluster it runs on) and every path made absolute.
The entrypoint `python -m llmtrain.cli TASK config.yaml` runs on the head node.

Before anything is uploaded, two checks that fail in seconds instead of a job pending forever:
the address must answer (a TCP connection within 3 s, then an HTTP answer within 5 s, so a
port that accepts and never answers fails too: llmtrain/reachable.py), and the cluster's alive
nodes must be able to hold `cluster.num_workers` workers of `cluster.cpus_per_worker` CPUs (and
`gpus_per_worker` GPUs). Every later request to the Jobs API has a connect and a read timeout
(`CLIENT_TIMEOUT_S`; Ray's client sets none). Paths in the config (run.dir, data) must name
storage the cluster's nodes see; relative paths are made absolute against the submitting
directory, as for a local run.

Ray's Jobs API has no authentication of its own unless the cluster runs with token auth
(RAY_AUTH_MODE=token); the client then needs the same mode and the token (RAY_AUTH_TOKEN_PATH).
See cluster/README.md for exposing the endpoint safely.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import os
import re
import secrets
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import urlparse

from llmtrain import reachable
from llmtrain.config import FORWARDED_ENV, absolutize_paths, load_config, write_resolved_config
from llmtrain.errors import UserError
from llmtrain.tasks import TASKS

DEFAULT_PORT = 8265
CONNECT_TIMEOUT_S = reachable.CONNECT_TIMEOUT_S
# (connect, read) for every Jobs API request once the address answered: a read waits for the
# server's reply to one request (a job listing, an upload of this checkout's packages).
CLIENT_TIMEOUT_S = (CONNECT_TIMEOUT_S, 30.0)
JOB_CONFIG = "config.yaml"
# The packages shipped with every job (runtime_env py_modules).
PACKAGES = ("llmtrain", "kernels")
EXCLUDES = ["__pycache__/", "*.pyc", "*.so", ".pytest_cache/"]
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


# ---------------------------------------------------------------------------------------------
# Connecting


def normalize_address(address: Optional[str]) -> str:
    """`http(s)://host:port` of the Jobs API from --address or $RAY_API_SERVER_ADDRESS."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise UserError(
            f"no cluster address: pass --address http://HEAD:{DEFAULT_PORT} (the Ray dashboard / Jobs API) or set {ADDRESS_ENV}"
        )
    if "://" not in address:
        address = f"http://{address}"
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https"):
        raise UserError(
            f"--address {address}: the Jobs API is the dashboard's http address, e.g. http://HEAD:{DEFAULT_PORT} "
            "(ray:// is the Ray Client port, used by cluster.address)"
        )
    if not parsed.hostname:
        raise UserError(f"--address {address}: no host name; e.g. http://HEAD:{DEFAULT_PORT}")
    try:
        port = parsed.port
    except ValueError:
        raise UserError(f"--address {address}: invalid port; e.g. http://HEAD:{DEFAULT_PORT}") from None
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{parsed.scheme}://{host}:{port or DEFAULT_PORT}{parsed.path.rstrip('/')}"


def check_reachable(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Before any Ray client call: a TCP connection to the Jobs API within `timeout_s`, and an
    HTTP answer to GET /api/version within reachable.READ_TIMEOUT_S."""
    parsed = urlparse(url)
    reachable.check_reachable(
        f"--address {url}",
        parsed.hostname,
        parsed.port,
        "check the address (the dashboard port, 8265 by default) and that the cluster is up",
        timeout_s,
        hello=reachable.http_hello(parsed.hostname),
        tls=parsed.scheme == "https",
    )


def connect(address: Optional[str]):
    """A `JobSubmissionClient` for a reachable cluster; every failure becomes one UserError line."""
    url = normalize_address(address)
    check_reachable(url)
    from ray.job_submission import JobSubmissionClient

    # Ray's client logs every upload and websocket close at INFO; our own lines say what matters.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)

    class BoundedClient(JobSubmissionClient):
        """Ray's client, with a connect and a read timeout on every request it makes."""

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", CLIENT_TIMEOUT_S)
            return super()._do_request(method, endpoint, **kwargs)

    with ray_errors(url):
        return BoundedClient(url)


class ray_errors:
    """Turn Ray client exceptions (connection, authentication, HTTP errors) into UserErrors."""

    def __init__(self, url: str, job_id: Optional[str] = None):
        self.url, self.job_id = url, job_id

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, (UserError, KeyboardInterrupt)):
            return False
        import requests
        from ray.exceptions import AuthenticationError

        text = " ".join(str(err).split())
        if isinstance(err, requests.exceptions.Timeout):
            raise UserError(
                f"{self.url} stopped answering (no reply within {CLIENT_TIMEOUT_S[1]:g} s); "
                "check that the cluster's head node and its dashboard are healthy, then retry"
            ) from None
        if isinstance(err, AuthenticationError) or re.search(r"status code 40[13]\b", text):
            raise UserError(
                f"{self.url} refused the request ({_first_sentence(text)}); the cluster uses token authentication: "
                "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the cluster's token file> (see cluster/README.md)"
            ) from None
        if self.job_id is not None and re.search(r"status code 404\b|does not exist", text):
            raise UserError(
                f"no job {self.job_id} on {self.url}; list the jobs with `llmtrain jobs list --address {self.url}`"
            ) from None
        if isinstance(err, (ConnectionError, OSError, RuntimeError)):
            raise UserError(f"{self.url}: {_first_sentence(text)}") from None
        return False


def _first_sentence(text: str, limit: int = 240) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Resources


@dataclass(frozen=True)
class Node:
    ip: str
    cpus: float
    gpus: float
    is_head: bool


def alive_nodes(url: str) -> list[Node]:
    """The cluster's alive nodes and their total CPUs/GPUs (Ray State API, through the dashboard)."""
    from ray.util.state import list_nodes

    with ray_errors(url):
        states = list_nodes(address=url, filters=[("state", "=", "ALIVE")], timeout=10, raise_on_missing_output=False)
    return sorted(
        (
            Node(s.node_ip, float(s.resources_total.get("CPU", 0)), float(s.resources_total.get("GPU", 0)), bool(s.is_head_node))
            for s in states
        ),
        key=lambda n: (not n.is_head, n.ip),
    )


def workers_that_fit(nodes: Iterable[Node], cpus_per_worker: float, gpus_per_worker: float, use_gpu: bool) -> int:
    """How many workers the nodes can hold at once (a worker never spans nodes)."""
    total = 0
    for n in nodes:
        slots = math.floor(n.cpus / cpus_per_worker + 1e-9)
        if use_gpu:
            slots = min(slots, math.floor(n.gpus / gpus_per_worker + 1e-9))
        total += max(slots, 0)
    return total


def check_resources(cluster, nodes: list[Node], url: str) -> None:
    """Refuse a job the cluster can never place, naming what is missing."""
    n, cpw, gpw, use_gpu = cluster.num_workers, cluster.cpus_per_worker, cluster.gpus_per_worker, bool(cluster.use_gpu)
    fit = workers_that_fit(nodes, cpw, gpw, use_gpu)
    if fit >= n:
        return
    per_worker = f"{cpw:g} CPU" + (f" + {gpw:g} GPU" if use_gpu else "")
    missing = []
    have_cpu, have_gpu = sum(x.cpus for x in nodes), sum(x.gpus for x in nodes)
    if n * cpw > have_cpu:
        missing.append(f"{n * cpw - have_cpu:g} CPU (needs {n * cpw:g}, has {have_cpu:g})")
    if use_gpu and n * gpw > have_gpu:
        missing.append(f"{n * gpw - have_gpu:g} GPU (needs {n * gpw:g}, has {have_gpu:g})")
    largest_cpu = max((x.cpus for x in nodes), default=0)
    largest_gpu = max((x.gpus for x in nodes), default=0)
    if cpw > largest_cpu:
        missing.append(f"a node with {cpw:g} CPU for one worker (largest has {largest_cpu:g})")
    if use_gpu and gpw > largest_gpu:
        missing.append(f"a node with {gpw:g} GPU for one worker (largest has {largest_gpu:g})")
    if not missing:  # enough in total, but split across nodes so that workers do not fit
        missing.append(f"room for {n - fit} more worker(s): the nodes' resources are split so only {fit} fit")
    listing = ", ".join(f"{x.ip}: {x.cpus:g} CPU {x.gpus:g} GPU" for x in nodes) or "none"
    raise UserError(
        f"the cluster at {url} cannot hold cluster.num_workers={n} x {per_worker}: missing {'; '.join(missing)}; "
        f"alive nodes: {listing}; lower cluster.num_workers / cpus_per_worker / gpus_per_worker, add nodes, "
        "or pass --no-resource-check if the cluster autoscales"
    )


# ---------------------------------------------------------------------------------------------
# Submitting


def package_dirs() -> list[str]:
    """Directories of the packages that travel with a job (this checkout's or the installed ones)."""
    dirs = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            if name == "llmtrain":
                raise UserError("the llmtrain package was not found on this machine; install it (pip install -e .)")
            continue
        dirs.append(str(Path(list(spec.submodule_search_locations)[0]).resolve()))
    return dirs


def job_config(cfg, nodes: Optional[list[Node]]):
    """The config as the cluster will run it: cluster.address=auto, absolute paths, and use_gpu
    decided from the cluster (not from this machine) when the config leaves it open."""
    cfg = absolutize_paths(cfg)
    cfg.cluster.address = "auto"
    if cfg.cluster.use_gpu is None:
        if nodes is None:
            raise UserError("set cluster.use_gpu=true or false: without the resource check the cluster's GPUs are unknown")
        cfg.cluster.use_gpu = any(n.gpus > 0 for n in nodes)
    return cfg


def job_runtime_env(working_dir: str) -> dict:
    """The runtime environment of a job: `working_dir` (the resolved config) and this checkout's
    packages as `py_modules`, which Ray unpacks on every node and puts first on sys.path."""
    return {"working_dir": working_dir, "py_modules": package_dirs(), "excludes": EXCLUDES}


def job_entrypoint(task: str) -> str:
    """`python -m llmtrain.cli TASK config.yaml`, preceded by the settings a local run forwards
    to its workers (config.FORWARDED_ENV) when they are set here. They go on the command line,
    not in the job's env_vars: the driver forwards them to its workers through ray.init's
    runtime_env, and Ray refuses a job whose env_vars and the driver's name the same variable."""
    settings = [f"{key}={shlex.quote(os.environ[key])}" for key in FORWARDED_ENV if key in os.environ]
    return " ".join([*settings, f"python -m llmtrain.cli {task} {JOB_CONFIG}"])


def submission_id(task: str, run_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(run_dir).name).strip("-") or "run"
    return f"llmtrain-{task}-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(
    config: str,
    overrides: list[str],
    address: Optional[str],
    task: str = "pretrain",
    follow: bool = False,
    resource_check: bool = True,
) -> int:
    """Submit `llmtrain TASK CONFIG overrides...` to the cluster; returns the CLI exit status."""
    if task not in TASKS:
        raise UserError(f"--task {task}: choose one of {', '.join(TASKS)}")
    url = normalize_address(address)
    cfg = load_config(config, overrides)  # a mistake in the config costs no network round trip
    client = connect(url)
    nodes = alive_nodes(url) if resource_check else None
    cfg = job_config(cfg, nodes)
    if nodes is not None:
        check_resources(cfg.cluster, nodes, url)
    job_id = submission_id(task, cfg.run.dir)
    with tempfile.TemporaryDirectory(prefix="llmtrain-submit-") as stage:
        write_resolved_config(cfg, stage)
        with ray_errors(url):
            client.submit_job(
                entrypoint=job_entrypoint(task),
                submission_id=job_id,
                runtime_env=job_runtime_env(stage),
                metadata={"llmtrain_task": task, "run_dir": str(cfg.run.dir)},
            )
    c = cfg.cluster
    shape = f"{c.num_workers} workers x {c.cpus_per_worker:g} CPU" + (f" + {c.gpus_per_worker:g} GPU" if c.use_gpu else "")
    print(f"submitted {job_id} to {url} ({task}, {shape})")
    print(f"  run.dir {cfg.run.dir}  (must be storage every node of the cluster sees)")
    if not follow:
        print(f"  follow: llmtrain jobs logs {job_id} --follow --address {url}")
        return 0
    return follow_job(client, url, job_id)


def submit_prepare(args, address: Optional[str], follow: bool = False) -> int:
    """Submit `llmtrain prepare ...` (parsed `args`) as a job that runs Ray Data on the cluster
    (`--cluster auto`). The tokenizer directory and the --stages file travel in the job's
    working_dir; inputs and the output must be object-store URIs or storage every node sees
    (local paths are made absolute against this directory, as for a training job)."""
    import shutil

    from llmtrain.data import objstore

    url = normalize_address(address)
    if args.tokenizer is None or args.seq_len is None or args.output is None:
        raise UserError("llmtrain submit prepare needs --tokenizer, --seq-len and --output")
    if args.dry_run:
        raise UserError("--dry-run runs here, not on a cluster: use `llmtrain prepare --dry-run ...`")
    client = connect(url)
    where = lambda p: p if objstore.is_uri(p) else str(Path(p).expanduser().resolve())  # noqa: E731
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", str(args.output).rstrip("/").rsplit("/", 1)[-1]).strip("-") or "data"
    job_id = f"llmtrain-prepare-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    with tempfile.TemporaryDirectory(prefix="llmtrain-submit-") as stage:
        tokenizer = Path(args.tokenizer)
        if not tokenizer.is_dir():
            raise UserError(f"--tokenizer {tokenizer}: not a directory; pass the tokenizer directory")
        shutil.copytree(tokenizer, Path(stage) / "tokenizer")
        cmd = ["prepare", "--input", *map(where, args.input), "--tokenizer", "tokenizer", "--seq-len", str(args.seq_len)]
        cmd += [
            "--output",
            where(args.output),
            "--val-fraction",
            str(args.val_fraction),
            "--shard-tokens",
            str(args.shard_tokens),
        ]
        cmd += ["--min-chars", str(args.min_chars), "--text-column", args.text_column, "--dtype", args.dtype, "--cluster", "auto"]
        cmd += ["--executor", "ray"] + (["--workers", str(args.workers)] if args.workers else [])
        cmd += [
            f
            for f, on in (
                ("--force", args.force),
                ("--quality", args.quality),
                ("--pii", args.pii),
                ("--near-dedup", args.near_dedup),
            )
            if on
        ]
        if args.stages:
            shutil.copyfile(args.stages, Path(stage) / "stages.yaml")
            cmd += ["--stages", "stages.yaml"]
        with ray_errors(url):
            client.submit_job(
                entrypoint="python -m llmtrain.cli " + " ".join(shlex.quote(c) for c in cmd),
                submission_id=job_id,
                runtime_env={"working_dir": stage, "py_modules": package_dirs(), "excludes": EXCLUDES},
                metadata={"llmtrain_task": "prepare", "output": where(args.output)},
            )
    print(f"submitted {job_id} to {url} (prepare on Ray Data, --cluster auto)")
    print(f"  output {where(args.output)}  (an object-store URI, or storage every node of the cluster sees)")
    if not follow:
        print(f"  follow: llmtrain jobs logs {job_id} --follow --address {url}")
        return 0
    return follow_job(client, url, job_id)


# ---------------------------------------------------------------------------------------------
# Managing jobs


def follow_job(client, url: str, job_id: str) -> int:
    """Print the job's logs as they come until it ends; 0 if it succeeded, else 1."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        with ray_errors(url, job_id):
            try:
                asyncio.run(tail())
            except RuntimeError as err:  # the log stream closed early; the status below decides
                if "does not exist" in str(err):
                    raise
            return _final_status(client, url, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (llmtrain jobs stop {job_id} --address {url})", file=sys.stderr)
        return 130


def _final_status(client, url: str, job_id: str, wait_s: float = 30.0) -> int:
    deadline = time.monotonic() + wait_s
    info = client.get_job_info(job_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    if str(info.status) == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", file=sys.stderr)
        return 0
    reason = _failure_line(client.get_job_logs(job_id)) or " ".join((info.message or "").split())
    if not reason.startswith("llmtrain: error:"):  # ours is one line already, with the fix at its end
        reason = _first_sentence(reason)
    print(f"llmtrain: job {job_id} {info.status}: {reason}", file=sys.stderr)
    return 1


def _failure_line(logs: str) -> str:
    """The line that says why a job failed: our one-line error if there is one, else the last line."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("llmtrain: error:")]
    return ours[-1] if ours else (lines[-1] if lines else "")


def jobs(action: str, job_id: Optional[str], address: Optional[str], follow: bool = False) -> int:
    """`llmtrain jobs list|status|logs|stop`."""
    if action != "list" and not job_id:
        raise UserError(f"llmtrain jobs {action} needs a JOB_ID (see `llmtrain jobs list`)")
    if job_id is not None and not JOB_ID.fullmatch(job_id):  # it becomes part of a URL path
        raise UserError(
            f"{job_id!r} is not a job id (letters, digits and _ - . : only, e.g. llmtrain-pretrain-tiny-20260101-120000-1a2b "
            "or raysubmit_...); see `llmtrain jobs list`"
        )
    url = normalize_address(address)
    client = connect(url)
    with ray_errors(url, job_id):
        if action == "list":
            return _list(client)
        if action == "status":
            info = client.get_job_info(job_id)
            print(f"{job_id} {info.status}")
            if info.message:
                print(" ".join(info.message.split()))
            return 0
        if action == "logs":
            if follow:
                return follow_job(client, url, job_id)
            sys.stdout.write(client.get_job_logs(job_id))
            return 0
        if action == "stop":
            client.get_job_info(job_id)  # an unknown id is an error, not "was not running"
            stopped = client.stop_job(job_id)
            print(f"{job_id}: {'stop requested' if stopped else 'was not running'}")
            return 0
    raise UserError(f"llmtrain jobs {action}: choose list, status, logs or stop")


def _list(client) -> int:
    rows = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if not rows:
        print("no jobs")
        return 0
    print(f"{'JOB_ID':48s} {'STATUS':10s} {'STARTED':19s} ENTRYPOINT")
    for j in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        print(f"{(j.submission_id or j.job_id or '-'):48s} {str(j.status):10s} {started:19s} {j.entrypoint}")
    return 0
