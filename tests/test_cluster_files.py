"""The cloud cluster definitions in cluster/ are consistent and would run llmtrain as written:
the launcher YAML passes Ray's own schema; the KubeRay manifests' entrypoint is a valid
`llmtrain` command whose config and overrides load, whose paths are on the shared volume every
pod mounts, and whose workers fit the worker pods; image, Ray version, auth and volumes agree
across files and with cluster/Dockerfile. (Running them needs a cloud account: unmeasured.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def ray_cluster_specs() -> dict[str, dict]:
    """name -> RayClusterSpec, from the RayCluster and the RayJob manifests."""
    (cluster,) = docs("kuberay-raycluster.yaml")
    (job,) = docs("kuberay-rayjob.yaml")
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    return {"raycluster": cluster["spec"], "rayjob": job["spec"]["rayClusterSpec"]}


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(group["groupName"], group["template"]["spec"]) for group in spec["workerGroupSpecs"]]
    return out


# ---------------------------------------------------------------------------------------------
# Cluster launcher


def test_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "aws"
    workers = config["available_node_types"]["gpu_worker"]
    assert re.match(r"^(g5|g6|p4d|p4de|p5)\.", workers["node_config"]["InstanceType"])


def test_launcher_keeps_the_jobs_api_private_and_authenticated():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert (
        "RAY_AUTH_MODE=token ray start --head" in head and "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in worker
    )
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/llmtrain-aws-token"


def test_launcher_installs_this_checkout_and_shares_one_path():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert config["file_mounts"]["/home/ubuntu/llmtrain"] == "."  # `ray up` from the repository root
    assert {".venv", ".git", "runs"} <= set(config["rsync_exclude"])
    setup = "\n".join(config["setup_commands"])
    assert setup.index("torch==2.13.0") < setup.index("pip install --python ~/venv/bin/python -e ~/llmtrain")
    export = "\n".join(config["head_setup_commands"])
    mount = "\n".join(config["worker_setup_commands"])
    assert "/mnt/shared $subnet(rw" in export
    assert "$RAY_HEAD_IP:/mnt/shared /mnt/shared" in mount


# ---------------------------------------------------------------------------------------------
# Image and KubeRay


def test_image_ray_version_matches_manifests_and_pyproject():
    from packaging.specifiers import SpecifierSet

    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu$", dockerfile(), re.M)
    assert base, "cluster/Dockerfile: ARG RAY_IMAGE=rayproject/ray:X.Y.Z-py311-gpu"
    version = base.group(1)
    for name, spec in ray_cluster_specs().items():
        assert spec["rayVersion"] == version, name
    pyproject = (REPO / "pyproject.toml").read_text()
    ray_range = re.search(r'"ray\[train,default\]([^"]+)"', pyproject).group(1)
    assert version in SpecifierSet(ray_range)


def test_image_copies_what_exists_and_skips_the_venv():
    for sources in re.findall(r"^COPY --chown=ray:users (.+) \S+$", dockerfile(), re.M):
        for src in sources.split():
            assert (REPO / src).exists(), src
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


def test_manifests_share_image_auth_and_volume():
    (pvc,) = docs("kuberay-storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for name, spec in ray_cluster_specs().items():
        assert spec["authOptions"] == {"mode": "token"}, name
        for group, pod in pod_templates(spec):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            assert claims == {"shared": pvc["metadata"]["name"]}, (name, group)
            for container in pod["containers"]:
                images.add(container["image"])
                mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
                assert mounts["shared"] == "/mnt/shared", (name, group)
    assert images == {"llmtrain:0.1.0"}
    assert "-t REGISTRY/llmtrain:0.1.0" in (CLUSTER / "README.md").read_text()


def test_rayjob_entrypoint_is_a_valid_llmtrain_run():
    from llmtrain.cli import build_parser
    from llmtrain.config import load_config
    from llmtrain.submit import Node, workers_that_fit

    (job,) = docs("kuberay-rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "llmtrain"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "pretrain"
    # The image copies configs/ into its WORKDIR.
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile(), re.M).group(1)
    assert args.config.startswith(workdir + "/")
    cfg = load_config(REPO / Path(args.config).relative_to(workdir), args.overrides)
    assert cfg.cluster.address == "auto" and cfg.cluster.use_gpu is True and cfg.cluster.max_failures > 0
    for path in (cfg.run.dir, cfg.data.path):
        assert str(path).startswith("/mnt/shared/"), path

    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no training worker on the head
    nodes = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes += [Node(group["groupName"], float(limits["cpu"]), float(limits["nvidia.com/gpu"]), False)] * group["replicas"]
    fit = workers_that_fit(nodes, cfg.cluster.cpus_per_worker, cfg.cluster.gpus_per_worker, use_gpu=True)
    assert fit >= cfg.cluster.num_workers


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_gpu_workers_request_gpus_and_shared_memory(name):
    spec = ray_cluster_specs()["raycluster" if "raycluster" in name else "rayjob"]
    for _group, pod in pod_templates(spec)[1:]:
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
        shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_readme_lists_every_file_in_cluster():
    readme = (CLUSTER / "README.md").read_text()
    listed = set(re.findall(r"^\| `([^`]+)`", readme, re.M))
    present = {p.name for p in CLUSTER.iterdir() if p.is_file() and p.name != "README.md"}
    assert present - {"Dockerfile.dockerignore"} == {name.split(" ")[0] for name in listed}
