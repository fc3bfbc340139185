"""llmtrain.data.objstore against a real S3 server (SeaweedFS's `weed mini` on 127.0.0.1,
tests/s3_support.py): listing and glob rules, decompressed reads, uploads that publish the
manifest last, the states of a prefix, `verify` of s3:// data, and each bad input (dead or silent
endpoint, wrong keys, missing bucket, damaged objects) as one line within seconds, secret-free.

    .venv/bin/python -m pytest -q tests/test_objstore.py
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import REPO

from llmtrain.cli import main
from llmtrain.data import objstore
from llmtrain.data.shards import MANIFEST, verify
from llmtrain.errors import UserError

TEXT = "Once upon a time there was a small dog.\n\nIt ran home.\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny prepared directory (several shards) from the README, built by the real prepare."""
    from llmtrain.data.prepare import prepare
    from llmtrain.data.tokenizer_train import train_tokenizer

    tmp = tmp_path_factory.mktemp("objstore_prepared")
    (tmp / "in").mkdir()
    (tmp / "in" / "readme.md").write_text((REPO / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    tok = train_tokenizer([str(tmp / "in")], 600, tmp / "tok")
    return Path(prepare([str(tmp / "in")], tok, seq_len=32, output=tmp / "data", val_fraction=0.1, shard_tokens=1500, workers=1))


def one_line_user_error(fn, within_s: float = 15.0, secret: str | None = None) -> str:
    """The message of the UserError `fn()` raises: one line, within `within_s`, without `secret`."""
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        fn()
    took = time.monotonic() - started
    message = str(info.value)
    assert "\n" not in message and took < within_s, (took, message)
    if secret:
        assert secret not in message
    return message


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The server itself


def test_server_listens_on_loopback_only(s3_server):
    listening = s3_server.listening()
    print(f"weed mini ready in {s3_server.started_s:.2f}s, listening on {listening}")
    assert f"127.0.0.1:{s3_server.ports['s3.port']}" in listening and len(listening) >= 5
    assert all(address.startswith("127.0.0.1:") for address in listening), listening


def test_is_uri_and_filesystem(tmp_path):
    import pyarrow.fs as pafs

    assert objstore.is_uri("s3://b/p") and objstore.is_uri("gs://b") and objstore.is_uri("file:///tmp")
    assert not objstore.is_uri("data/tiny") and not objstore.is_uri(tmp_path) and not objstore.is_uri("C:\\data")
    fs, path = objstore.filesystem(f"file://{tmp_path}/x/")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    assert objstore.filesystem("relative/dir")[1] == str(Path("relative/dir").resolve())


# ---------------------------------------------------------------------------------------------
# Reading


TREE = {
    "raw/a.txt": b"alpha",
    "raw/b.JSONL.gz": gzip.compress(b'{"text": "b"}\n'),
    "raw/notes.bin": b"\x00\x01",
    "raw/sub/c.jsonl": b'{"text": "c"}\n',
    "raw/sub/d.parquet": b"PAR1",
    "raw/sub/.e.txt": b"hidden",
    "raw/.cache/f.txt": b"hidden dir",
    "raw/subway/g.txt": b"not under raw/sub",
    "other.txt": b"outside",
}
SUFFIXES = {".txt", ".jsonl", ".parquet"}


@pytest.mark.parametrize(
    "location, expected",
    [
        ("raw", ["raw/a.txt", "raw/b.JSONL.gz", "raw/sub/c.jsonl", "raw/sub/d.parquet", "raw/subway/g.txt"]),
        ("raw/", ["raw/a.txt", "raw/b.JSONL.gz", "raw/sub/c.jsonl", "raw/sub/d.parquet", "raw/subway/g.txt"]),
        ("raw/sub", ["raw/sub/c.jsonl", "raw/sub/d.parquet"]),
        ("raw/notes.bin", ["raw/notes.bin"]),  # a named object is taken whatever its suffix
        ("raw/*.txt", ["raw/a.txt"]),
        ("raw/*", ["raw/a.txt", "raw/b.JSONL.gz", "raw/notes.bin", "raw/sub/c.jsonl", "raw/sub/d.parquet", "raw/subway/g.txt"]),
        ("raw/su?", ["raw/sub/c.jsonl", "raw/sub/d.parquet"]),
        ("raw/**/*.jsonl", ["raw/sub/c.jsonl"]),
        ("raw/**/*.txt", ["raw/a.txt", "raw/subway/g.txt"]),
        ("raw/[ab].*", ["raw/a.txt", "raw/b.JSONL.gz"]),
    ],
)
def test_list_files_rules(s3, tmp_path, location, expected):
    for key, data in TREE.items():
        s3.put(key, data)
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(data)
    remote = objstore.list_files(s3.uri(location), SUFFIXES)
    assert [f.path.split("/", 1)[1] for f in remote] == expected
    assert all(f.uri == f"s3://{f.path}" and f.size == len(TREE[f.path.split("/", 1)[1]]) and f.mtime_ns > 0 for f in remote)
    local = objstore.list_files(str(tmp_path / location), SUFFIXES)  # the same rules on a local tree
    assert [str(Path(f.path).relative_to(tmp_path)) for f in local] == expected


def test_list_files_errors(s3):
    s3.put("raw/a.bin", b"x")
    assert "no files match" in one_line_user_error(lambda: objstore.list_files(s3.uri("raw/*.txt"), SUFFIXES))
    assert "holds no input files" in one_line_user_error(lambda: objstore.list_files(s3.uri("raw"), SUFFIXES))
    assert "no such file, object or prefix" in one_line_user_error(lambda: objstore.list_files(s3.uri("nothing"), SUFFIXES))
    message = one_line_user_error(lambda: objstore.list_files("s3://no-such-bucket-x/raw", SUFFIXES))
    assert message.startswith("bucket 'no-such-bucket-x' does not exist")


def test_open_input_decompresses(s3):
    data = (TEXT * 200).encode()
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    s3.put("in/a.txt.gz", gzip.compress(data))
    s3.put("in/b.jsonl.zst", sink.getvalue().to_pybytes())
    s3.put("in/c.txt.bz2", bz2.compress(data))
    s3.put("in/d.txt", data)
    for name in ("a.txt.gz", "b.jsonl.zst", "c.txt.bz2", "d.txt"):
        with objstore.open_input(s3.uri(f"in/{name}")) as f:
            assert f.read() == data, name
    with objstore.open_input(s3.uri("in/a.txt.gz"), compression=None) as f:
        assert gzip.decompress(f.read()) == data
    with objstore.open_input(s3.uri("in/d.txt")) as f:  # line by line, as the JSON Lines rescan reads
        assert io.TextIOWrapper(f, encoding="utf-8").readline() == TEXT.splitlines(keepends=True)[0]
    assert "no such file or object" in one_line_user_error(lambda: objstore.open_input(s3.uri("in/none.txt")))


def test_bytes_and_download(s3, tmp_path):
    objstore.write_bytes(s3.uri("x/y.json"), b'{"a": 1}')
    assert objstore.read_bytes(s3.uri("x/y.json")) == b'{"a": 1}' == s3.get("x/y.json")
    objstore.write_bytes(s3.uri("x/z.gz"), b"not gzip")  # bytes as given: pyarrow's own default would gzip them
    assert s3.get("x/z.gz") == b"not gzip" == objstore.read_bytes(s3.uri("x/z.gz"))
    objstore.download(s3.uri("x/y.json"), tmp_path / "sub" / "y.json")
    assert (tmp_path / "sub" / "y.json").read_bytes() == b'{"a": 1}'
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["y.json"]  # no temp file left
    assert "no such file or object" in one_line_user_error(lambda: objstore.download(s3.uri("x/none"), tmp_path / "n"))
    assert not (tmp_path / "n").exists()


# ---------------------------------------------------------------------------------------------
# Publishing


def make_dir(root: Path) -> Path:
    for name, data in {"a.arrow": b"a" * 1000, "b.arrow": b"b" * 3000, "tokenizer/t.model": b"t", MANIFEST: b"{}"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_upload_dir_manifest_last(s3, tmp_path):
    src = make_dir(tmp_path / "src")
    location = s3.uri("data/tiny")
    assert objstore.remote_state(location) == "none"
    seen = []

    def on_upload(rel: str, size: int) -> None:
        seen.append((rel, size, objstore.remote_state(location)))  # what a reader sees meanwhile

    objstore.upload_dir(src, location, on_upload=on_upload)
    assert [rel for rel, _, _ in seen[:-1]] != [] and seen[-1][:2] == (MANIFEST, 2)
    assert sorted(rel for rel, _, _ in seen[:-1]) == ["a.arrow", "b.arrow", "tokenizer/t.model"]
    assert all(state == "partial" for _, _, state in seen[:-1]) and seen[-1][2] == "dataset"
    assert s3.keys("data/tiny") == [
        "data/tiny/a.arrow",
        "data/tiny/b.arrow",
        f"data/tiny/{MANIFEST}",
        "data/tiny/tokenizer/t.model",
    ]
    assert s3.get("data/tiny/b.arrow") == b"b" * 3000  # the upload marker is gone; the bytes are whole
    assert objstore.remote_state(location) == "dataset"
    assert "already holds a prepared dataset" in one_line_user_error(lambda: objstore.upload_dir(src, location))


def test_upload_that_dies_is_partial_then_replaced(s3, tmp_path):
    src = make_dir(tmp_path / "src")
    location = s3.uri("data/died")

    def die(rel: str, size: int) -> None:
        raise KeyboardInterrupt  # the process stopped mid-upload

    with pytest.raises(KeyboardInterrupt):
        objstore.upload_dir(src, location, on_upload=die)
    assert objstore.remote_state(location) == "partial" and f"data/died/{MANIFEST}" not in s3.keys("data/died")
    assert "an upload that did not finish" in one_line_user_error(lambda: objstore.verify_remote(location))
    s3.put("data/died/stale.arrow", b"from the run that died")
    objstore.upload_dir(src, location)  # a partial upload is deleted and rewritten
    assert objstore.remote_state(location) == "dataset" and "data/died/stale.arrow" not in s3.keys("data/died")
    objstore.delete_prefix(location)
    assert objstore.remote_state(location) == "none" and s3.keys("data/died") == []


def test_foreign_objects_are_not_ours(s3, tmp_path):
    s3.put("shared/report.csv", b"a,b\n")
    assert objstore.remote_state(s3.uri("shared")) == "other"
    message = one_line_user_error(lambda: objstore.upload_dir(make_dir(tmp_path / "src"), s3.uri("shared")))
    assert "not an llmtrain dataset" in message and s3.keys("shared") == ["shared/report.csv"]


def test_stream_cut_short_leaves_no_object(s3, tmp_path, monkeypatch):
    """pyarrow completes an S3 upload when its stream closes, even on an exception: `_put`
    deletes that object, so a failed read never leaves a part-file under the final key."""
    (tmp_path / "big.arrow").write_bytes(b"x" * 300_000)

    class Failing(io.FileIO):
        def read(self, n=-1):
            if self.tell() > 0:
                raise OSError("disk read error")
            return super().read(100_000)

    monkeypatch.setattr(objstore, "open", lambda path, mode: Failing(path, mode), raising=False)
    fs, path = objstore.filesystem(s3.uri("cut/big.arrow"))
    with pytest.raises(OSError, match="disk read error"):
        objstore._put(fs, tmp_path / "big.arrow", path)
    assert s3.keys("cut") == []


KILLED = """
import os, signal, sys
from llmtrain.data import objstore
fs, path = objstore.filesystem(sys.argv[1])
out = fs.open_output_stream(path, compression=None)
out.write(os.urandom(int(sys.argv[2])))
out.flush()
os.kill(os.getpid(), signal.SIGKILL)  # dies mid-upload: the stream is never closed
"""


@pytest.mark.parametrize("size", [100_000, 25 << 20])  # one buffered PUT; a multipart upload with parts sent
def test_killed_upload_leaves_no_object(s3, size):
    """What the server guarantees: an upload cut off by a dying process leaves no object."""
    done = subprocess.run([sys.executable, "-c", KILLED, s3.uri("killed/big.arrow"), str(size)], timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL
    assert s3.keys("killed") == [] and objstore.remote_state(s3.uri("killed")) == "none"


# ---------------------------------------------------------------------------------------------
# Verify


@pytest.fixture
def uploaded(s3, prepared) -> str:
    location = s3.uri("prepared/tiny")
    objstore.upload_dir(prepared, location)
    return location


def test_verify_remote_and_cli(uploaded, prepared, capsys):
    manifest = objstore.verify_remote(uploaded)
    assert manifest == json.loads((prepared / MANIFEST).read_text())
    assert "sha256 verified" in capsys.readouterr().out
    assert verify(uploaded, quiet=True) == manifest  # shards.verify takes a URI too
    assert main(["verify", uploaded]) == 0
    out = capsys.readouterr().out.strip()
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    assert out.startswith(f"llmtrain: {uploaded}: ok ({n} shards") and n > 2


def damage_shard(s3, location: str, manifest: dict, how: str) -> str:
    entry = manifest["splits"]["train"]["shards"][1]
    key = f"{location.split('/', 3)[3]}/{entry['file']}"
    data = s3.get(key)
    s3.put(key, data[:-100] if how == "truncate" else data[:500] + bytes([data[500] ^ 1]) + data[501:])
    return entry["file"]


@pytest.mark.parametrize("how", ["truncate", "change"])
def test_verify_catches_damaged_shard(s3, uploaded, prepared, capsys, how):
    manifest = json.loads((prepared / MANIFEST).read_text())
    name = damage_shard(s3, uploaded, manifest, how)
    message = one_line_user_error(lambda: objstore.verify_remote(uploaded))
    assert message.startswith(f"{uploaded}/{name}: ") and "truncated or changed after the manifest was written" in message
    assert ("bytes but the manifest says" if how == "truncate" else "sha256 does not match") in message
    assert "--force" in message
    assert main(["verify", uploaded]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("llmtrain: error: ") and name in err


def test_verify_catches_tampered_manifest_and_tokenizer(s3, uploaded, prepared):
    key = uploaded.split("/", 3)[3]
    s3.put(f"{key}/tokenizer/tokenizer.model", s3.get(f"{key}/tokenizer/tokenizer.model") + b"\0")
    assert "tokenizer copy was replaced or edited" in one_line_user_error(lambda: objstore.verify_remote(uploaded))
    manifest = json.loads((prepared / MANIFEST).read_text())
    manifest["tokenizer"]["vocab_size"] = 700
    s3.put(f"{key}/{MANIFEST}", json.dumps(manifest).encode())
    assert "does not match its own manifest_sha256" in one_line_user_error(lambda: objstore.verify_remote(uploaded))


def test_verify_missing(s3, capsys):
    assert "nothing there" in one_line_user_error(lambda: objstore.verify_remote(s3.uri("none")))
    assert main(["verify", "s3://no-such-bucket-v/data"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "llmtrain: error: bucket 'no-such-bucket-v' does not exist; create it (e.g. aws s3 mb s3://no-such-bucket-v) or fix the URI s3://no-such-bucket-v/data"
    )


# ---------------------------------------------------------------------------------------------
# Bad input: one line, within seconds, naming the variable to fix, never the secret


def test_unreachable_endpoint(s3, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for fn in (
        lambda: objstore.check_access(s3.uri("data"), write=True),
        lambda: objstore.list_files(s3.uri("raw"), SUFFIXES),
        lambda: objstore.verify_remote(s3.uri("data")),
    ):
        message = one_line_user_error(fn, within_s=10, secret=s3.server.secret_key)
        assert message == f"cannot reach the S3 endpoint {endpoint} (connection refused); check AWS_ENDPOINT_URL and the network"


def test_silent_endpoint(s3, monkeypatch, silent_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{silent_server}")
    message = one_line_user_error(lambda: objstore.check_access(s3.uri("data"), write=True), within_s=15)
    assert (
        message
        == f"cannot reach the S3 endpoint http://{silent_server} (no answer in time); check AWS_ENDPOINT_URL and the network"
    )


@pytest.mark.parametrize("wrong", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_wrong_credentials_name_the_variable_not_the_secret(s3, monkeypatch, tmp_path, wrong):
    bad_secret = "Wr0ng-Secret-Value-Never-Shown"
    monkeypatch.setenv(wrong, "LLMTRAINNOSUCHKEY" if wrong == "AWS_ACCESS_KEY_ID" else bad_secret)
    s3.put("raw/a.txt", b"alpha")
    messages = [
        one_line_user_error(fn, within_s=10, secret=s3.server.secret_key)
        for fn in (
            lambda: objstore.check_access(s3.uri("data"), write=False),
            lambda: objstore.check_access(s3.uri("data"), write=True),
            lambda: objstore.list_files(s3.uri("raw"), SUFFIXES),
            lambda: objstore.read_bytes(s3.uri("raw/a.txt")),
            lambda: objstore.upload_dir(make_dir(tmp_path / "src"), s3.uri("data")),
        )
    ]
    for message in messages:
        assert bad_secret not in message and s3.server.secret_key not in message and "AWS_SECRET_ACCESS_KEY" in message
    code = "InvalidAccessKeyId" if wrong == "AWS_ACCESS_KEY_ID" else "SignatureDoesNotMatch"
    assert code in messages[0] and code in messages[2]
    monkeypatch.setenv(wrong, getattr(s3.server, "access_key" if wrong == "AWS_ACCESS_KEY_ID" else "secret_key"))
    objstore.check_access(s3.uri("data"), write=True)  # the right keys work again (the cache is per credentials)


def test_missing_bucket_and_credentials_in_uri(s3, monkeypatch):
    message = one_line_user_error(lambda: objstore.check_access("s3://no-such-bucket-z/data", write=True))
    assert (
        message
        == "bucket 'no-such-bucket-z' does not exist; create it (e.g. aws s3 mb s3://no-such-bucket-z) or fix the URI s3://no-such-bucket-z/data"
    )
    message = one_line_user_error(lambda: objstore.check_access(f"s3://KEY:{s3.server.secret_key}@{s3.name}/d", write=False))
    assert "credentials do not belong in the URI" in message and s3.server.secret_key not in message
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not" in one_line_user_error(
        lambda: objstore.check_access(s3.uri("d"), write=False)
    )


def test_check_access_write_probe_leaves_nothing(s3):
    objstore.check_access(s3.uri("fresh/prefix"), write=True)
    assert s3.keys("fresh") == [] and objstore.remote_state(s3.uri("fresh/prefix")) == "none"
