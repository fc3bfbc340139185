"""Object storage (S3, GCS; file:// and plain paths too) through `pyarrow.fs`: listing inputs,
streaming them, and publishing a prepared directory so that a partial upload is never taken for
a complete dataset.

    check_access("s3://bucket/data/tiny", write=True)     # one clear line if it cannot work
    files = list_files("s3://bucket/raw/*.jsonl.gz", {".jsonl"})
    with open_input(files[0].uri) as f: head = f.read(1 << 20)   # decompressed by name
    upload_dir(Path("/tmp/tiny"), "s3://bucket/data/tiny")  # manifest.json last
    verify_remote("s3://bucket/data/tiny")                 # `llmtrain verify s3://...`

Endpoint and credentials come from the standard AWS variables only: AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3; unset: AWS itself), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN (unset: the AWS SDK's chain, ~/.aws and instance roles) and AWS_REGION (or
AWS_DEFAULT_REGION; default us-east-1). Nothing here prints, logs or returns a secret, and error
messages are scrubbed of it; a URI holding credentials (s3://KEY:SECRET@bucket) is refused.
A filesystem object does carry the secret when pickled (pyarrow's own format): give Ray tasks
URIs and let them call `filesystem()`, rather than shipping a filesystem.

Publishing (`upload_dir`): a hidden marker `.llmtrain-upload` is written first, then every file
(a few threads, each object one PUT or one multipart upload), then `manifest.json`, then the
marker is removed. S3 (and SeaweedFS, GCS) make an object visible only when its upload is
complete: a PUT cut short is discarded by the server (its length is declared), and a multipart
upload exists only after CompleteMultipartUpload, so a killed upload leaves no part-object under
its key (only invisible parts, which a bucket lifecycle rule AbortIncompleteMultipartUpload
reclaims). One case pyarrow cannot abort: a Python exception while a stream is open closes, so
completes, it; `_put` then deletes that object. So a prefix is in one of four states
(`remote_state`): "none", "dataset" (manifest.json: complete), "partial" (our marker without a
manifest: an upload that died; safe to delete) or "other" (objects that are not ours: never
deleted for you).

Bytes are moved as they are: pyarrow's streams default to compressing or decompressing by file
name (compression="detect"), so every stream here but `open_input`'s passes compression=None.

Timeouts: connect 3 s, a request with no byte moving for 20 s is cut, 3 attempts; `check_access`
uses 3 s and 2 attempts, so a dead or silent endpoint is reported within seconds.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import secrets
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Collection, Optional
from urllib.parse import urlsplit

from llmtrain.data.atomic import atomic_file
from llmtrain.data.shards import (
    _REPREPARE,
    MANIFEST,
    TOKENIZER_DIR,
    parse_manifest,
)
from llmtrain.errors import UserError

UPLOAD_MARKER = ".llmtrain-upload"
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BLOCK = 8 << 20
_THREADS = 8
_cache: dict[tuple, object] = {}
_cache_lock = threading.Lock()


def is_uri(path: str | os.PathLike) -> bool:
    """True for "s3://...", "gs://...", "file://..."; False for plain paths (and Path objects)."""
    return isinstance(path, str) and bool(_URI.match(path))


# ---------------------------------------------------------------------------------------------
# Filesystems and errors


def _s3_settings() -> dict:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID") or None, os.environ.get("AWS_SECRET_ACCESS_KEY") or None
    if bool(key) != bool(secret):
        have, lack = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if key else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        raise UserError(f"{have} is set but {lack} is not; set both (or neither, to use ~/.aws or an instance role)")
    scheme, host = "https", None
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise UserError(f"AWS_ENDPOINT_URL={_redact(endpoint)}: not an http(s)://HOST[:PORT] URL; fix it")
        scheme, host = parts.scheme, parts.netloc
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    token = os.environ.get("AWS_SESSION_TOKEN") or None
    return {"scheme": scheme, "endpoint": host, "region": region, "key": key, "secret": secret, "token": token}


def _secrets() -> list[str]:
    return [s for s in (os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")) if s]


def _endpoint_name() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        return _redact(endpoint)
    return f"https://s3.{os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION') or 'us-east-1'}.amazonaws.com"


def _redact(text: str) -> str:
    text = re.sub(r"://[^/@]*@", "://***@", text)
    for s in _secrets():
        text = text.replace(s, "***")
    return text


def _s3(probe: bool):
    import pyarrow.fs as pafs

    s = _s3_settings()
    fingerprint = hashlib.sha256(f"{s['secret']}\0{s['token']}".encode()).hexdigest()
    key = ("s3", s["scheme"], s["endpoint"], s["region"], s["key"], fingerprint, probe)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = pafs.S3FileSystem(
                access_key=s["key"],
                secret_key=s["secret"],
                session_token=s["token"],
                region=s["region"],
                scheme=s["scheme"],
                endpoint_override=s["endpoint"],
                connect_timeout=3,
                request_timeout=3 if probe else 20,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2 if probe else 3),
            )
        return _cache[key]


def _split(location: str) -> tuple[str, str, str]:
    """(scheme, bucket, "/key") of a URI, taken literally: '?' and '#' are glob and key characters
    here, not a query and a fragment as urllib would have them."""
    scheme, _, rest = location.partition("://")
    bucket, slash, key = rest.partition("/")
    return scheme.lower(), bucket, slash + key


def _filesystem(location: str | os.PathLike, probe: bool = False):
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    scheme, bucket, key = _split(location)
    if "@" in bucket:
        raise UserError(
            f"{_redact(location)}: credentials do not belong in the URI (they would land in logs and manifests); "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
        )
    if scheme == "file":
        return pafs.LocalFileSystem(), str(Path(f"/{bucket}{key}" if bucket else key or "/").resolve())
    if scheme in ("s3", "gs", "gcs") and not bucket:
        raise UserError(f"{location}: no bucket in the URI; write {scheme}://BUCKET/PREFIX")
    path = f"{bucket}{key}".rstrip("/") or bucket
    if scheme == "s3":
        return _s3(probe), path
    if scheme in ("gs", "gcs"):
        with _cache_lock:
            if ("gs",) not in _cache:
                _cache[("gs",)] = pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=20))
            return _cache[("gs",)], path
    try:
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as err:
        raise UserError(
            f"{_redact(location)}: unsupported location ({_redact(str(err))}); use s3://, gs://, file:// or a path"
        ) from None


def filesystem(location: str | os.PathLike):
    """(pyarrow filesystem, path within it) for a URI or a plain path (absolute). S3 filesystems
    are cached per endpoint and credentials."""
    return _filesystem(location)


def _uri(location: str | os.PathLike, path: str) -> str:
    """The URI (or, for a plain path, the path) of `path` in `location`'s filesystem."""
    if not is_uri(location):
        return path
    scheme = _split(location)[0]
    return f"file://{path}" if scheme == "file" else f"{scheme}://{path}"


def _join(location: str, name: str) -> str:
    return f"{str(location).rstrip('/')}/{name}"


def _explain(err: OSError, location: str, doing: str, write: bool = False, probe: bool = True) -> UserError:
    """An OSError from pyarrow as one line naming the problem and the fix (no secret in it). An
    S3 HEAD that is denied says no more than that: `probe` asks a listing why (wrong keys?)."""
    text = _redact(str(err))
    where = _redact(str(location))
    bucket = _split(location)[1] if is_uri(location) else ""
    code = re.search(r"AWS Error ([A-Z_]+)", text)
    code = code.group(1) if code else ""
    if code == "NETWORK_CONNECTION" or "curlCode" in text:
        curl = re.search(r"curlCode: (\d+)", text)
        why = {"7": "connection refused", "28": "no answer in time", "6": "host name does not resolve"}.get(
            curl.group(1) if curl else "", text.split("Details: ")[-1].split(";")[0].strip()
        )
        return UserError(f"cannot reach the S3 endpoint {_endpoint_name()} ({why}); check AWS_ENDPOINT_URL and the network")
    if "HTTP status 301" in text or "PermanentRedirect" in text:
        return UserError(
            f"bucket '{bucket}' is in another region than AWS_REGION={os.environ.get('AWS_REGION', '')!r}; set AWS_REGION to its region"
        )
    if code == "NO_SUCH_BUCKET":
        return UserError(f"bucket '{bucket}' does not exist; create it (e.g. aws s3 mb s3://{bucket}) or fix the URI {where}")
    if code == "INVALID_ACCESS_KEY_ID":
        return UserError(
            f"{where}: the S3 endpoint {_endpoint_name()} does not know the access key (InvalidAccessKeyId); "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to valid credentials"
        )
    if code == "SIGNATURE_DOES_NOT_MATCH":
        return UserError(
            f"{where}: the secret key does not match the access key (SignatureDoesNotMatch); "
            "check AWS_SECRET_ACCESS_KEY (and AWS_ACCESS_KEY_ID)"
        )
    if code in ("ACCESS_DENIED", "INVALID_TOKEN", "EXPIRED_TOKEN") or "AccessDenied" in text or "Forbidden" in text:
        if probe and "No response body" in text and _split(str(location))[0] == "s3":
            try:
                check_access(location, write=False)
            except UserError as precise:
                return precise
        return UserError(
            f"{where}: access denied while {doing}: the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are wrong, "
            f"expired, or not allowed to {'write' if write else 'read'} it; fix them or the bucket policy"
        )
    if isinstance(err, FileNotFoundError):
        return UserError(f"{where}: no such file or object; check the path")
    if isinstance(err, PermissionError):
        return UserError(f"{where}: permission denied while {doing}; fix the permissions or choose another location")
    first = re.sub(r"\s*\(Request ID: [^)]*\)", "", text.splitlines()[0] if text else type(err).__name__)
    return UserError(f"{where}: {doing} failed ({first}); check the location and the credentials")


def check_access(location: str, write: bool) -> None:
    """A fast probe of `location` (endpoint, credentials, bucket; with `write`, a tiny object
    written and deleted under it): UserError one-liners within seconds."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location, probe=True)
    if isinstance(fs, pafs.LocalFileSystem):
        return
    nowhere = _join(path, f"{UPLOAD_MARKER}-probe-{secrets.token_hex(4)}")
    try:  # a listing (unlike HEAD) says why it fails; of a prefix that does not exist: cheap
        fs.get_file_info(pafs.FileSelector(nowhere, recursive=False))
    except FileNotFoundError:
        pass
    except OSError as err:
        raise _explain(err, location, "listing", probe=False) from None
    bucket = path.split("/")[0]
    if not isinstance(fs, pafs.S3FileSystem):  # S3 says NoSuchBucket above; GCS lists a missing bucket as empty
        try:
            missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as err:
            raise _explain(err, location, "looking up the bucket", probe=False) from None
        if missing:
            raise UserError(f"bucket '{bucket}' does not exist; create it or fix the URI {location}")
    if write:
        try:
            with fs.open_output_stream(nowhere, compression=None) as f:
                f.write(b"")
            fs.delete_file(nowhere)
        except OSError as err:
            raise _explain(err, location, "writing a test object", write=True, probe=False) from None


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class RemoteFile:
    uri: str  # what open_input takes (a plain path for local files)
    path: str  # within the filesystem ("bucket/key")
    size: int
    mtime_ns: int


def format_suffix(name: str) -> str:
    """The suffix that names the format, past a compression suffix: 'a.JSONL.gz' -> '.jsonl'."""
    name = name.lower()
    stem, suffix = os.path.splitext(name)
    return os.path.splitext(stem)[1] if suffix in COMPRESSION else suffix


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/") if part)


def list_files(location: str, suffixes: Collection[str]) -> list[RemoteFile]:
    """The files `location` names, sorted: an object (any name), a prefix (recursively: those whose
    `format_suffix` is in `suffixes`, or all when it is empty; hidden names skipped), or a glob
    in the key (`*` `?` `[..]` within a name, `**` across): matching objects, and the files of
    matching prefixes as for a prefix. The rules of local --input paths (readers.expand_inputs)."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    wanted = {s.lower() for s in suffixes}
    keep = lambda name: not wanted or format_suffix(name) in wanted  # noqa: E731
    parts = path.split("/")
    magic = [i for i, p in enumerate(parts) if re.search(r"[*?\[]", p)]
    try:
        if magic:
            if magic[0] == 0 and is_uri(location):
                raise UserError(f"{location}: a glob in the bucket name is not supported; name the bucket")
            base = "/".join(parts[: magic[0]]) or "/"
            pattern = _glob_regex(path)
            found = []
            for info in _walk(fs, base):
                rel = info.path[len(base) :].lstrip("/")
                if _hidden(rel):
                    continue
                segs = info.path.split("/")
                if pattern.fullmatch(info.path):
                    found.append(info)
                elif any(pattern.fullmatch("/".join(segs[:k])) for k in range(magic[0] + 1, len(segs))) and keep(info.base_name):
                    found.append(info)
            if not found:
                raise UserError(f"{location}: no files match this pattern; check the path")
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                found = [info]
            elif info.type == pafs.FileType.Directory:
                found = [i for i in _walk(fs, path) if not _hidden(i.path[len(path) :]) and keep(i.base_name)]
                if not found:
                    kinds = ", ".join(sorted(wanted)) or "any"
                    raise UserError(f"{location}: holds no input files ({kinds}); point --input at your data")
            else:
                if is_uri(location):
                    check_access(location, write=False)  # a missing bucket or bad credentials, said as such
                raise UserError(f"{location}: no such file, object or prefix; check --input")
    except OSError as err:
        raise _explain(err, location, "listing") from None
    found = sorted(found, key=lambda i: i.path)
    return [RemoteFile(_uri(location, i.path), i.path, int(i.size), int(i.mtime_ns or 0)) for i in found]


def _walk(fs, base: str) -> list:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File]


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:[^/]*/)*"  # any number of directories, none included
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out += fnmatch.translate(pattern[i : end + 1])[4:-3]  # '(?s:[..])\Z' -> '[..]'
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def open_input(location: str, compression: Optional[str] = "detect"):
    """A readable pyarrow stream of `location`; "detect" decompresses .gz / .zst / .bz2 by name
    (None: the raw bytes). Remote objects are read through a 4 MiB buffer."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    if compression == "detect":
        compression = COMPRESSION.get(os.path.splitext(path.lower())[1])
    buffer = None if isinstance(fs, pafs.LocalFileSystem) else 4 << 20
    try:
        return fs.open_input_stream(path, compression=compression, buffer_size=buffer)
    except OSError as err:
        raise _explain(err, location, "opening") from None


def read_bytes(location: str) -> bytes:
    fs, path = _filesystem(location)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    except OSError as err:
        raise _explain(err, location, "reading") from None


def write_bytes(location: str, data: bytes) -> None:
    """One object (or file, through a temp name) holding `data`, whole or not at all."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                tmp.write_bytes(data)
        else:
            with fs.open_output_stream(path, compression=None) as f:
                f.write(data)
    except OSError as err:
        raise _explain(err, location, "writing", write=True) from None


def download(location: str, local_path: Path) -> None:
    """Copy an object to `local_path` (through a temp name beside it)."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    fs, path = _filesystem(location)
    try:
        with atomic_file(local_path) as tmp, fs.open_input_stream(path, compression=None) as src, open(tmp, "wb") as dst:
            while chunk := src.read(_BLOCK):
                dst.write(chunk)
    except OSError as err:
        raise _explain(err, location, "downloading") from None


# ---------------------------------------------------------------------------------------------
# Publishing


def remote_state(location: str) -> str:
    """ "none" (nothing under the prefix), "dataset" (manifest.json), "partial" (our upload marker
    and no manifest: an upload that died; delete and rewrite it) or "other" (objects that are not
    an llmtrain upload: leave them alone)."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    try:
        if fs.get_file_info(_join(path, MANIFEST)).type == pafs.FileType.File:
            return "dataset"
        if fs.get_file_info(_join(path, UPLOAD_MARKER)).type == pafs.FileType.File:
            return "partial"
        try:
            return "other" if fs.get_file_info(pafs.FileSelector(path, recursive=False)) else "none"
        except FileNotFoundError:
            return "none"
    except OSError as err:
        raise _explain(err, location, "listing") from None


def delete_prefix(location: str) -> None:
    """Delete every object under the prefix (the prefix itself stays usable)."""
    fs, path = _filesystem(location)
    try:
        fs.delete_dir_contents(path, missing_dir_ok=True)
    except OSError as err:
        raise _explain(err, location, "deleting", write=True) from None


def start_upload(location: str) -> None:
    """Mark the prefix as being written (`remote_state` "partial" until a manifest is there).
    `upload_dir` does this; a pipeline writing objects itself calls it first."""
    write_bytes(_join(location, UPLOAD_MARKER), b'{"llmtrain": "upload in progress; complete once manifest.json exists"}\n')


def finish_upload(location: str) -> None:
    """Remove the upload marker (after the manifest is written)."""
    fs, path = _filesystem(location)
    try:
        fs.delete_file(_join(path, UPLOAD_MARKER))
    except FileNotFoundError:
        pass
    except OSError as err:
        raise _explain(err, location, "finishing the upload", write=True) from None


def _put(fs, src: Path, dst: str) -> None:
    """Upload one file whole: a failure while streaming deletes what pyarrow completed on close."""
    try:
        with open(src, "rb") as f, fs.open_output_stream(dst, compression=None) as out:
            while chunk := f.read(_BLOCK):
                out.write(chunk)
    except BaseException:
        try:
            fs.delete_file(dst)
        except OSError:
            pass
        raise


def upload_dir(
    local_dir: Path, location: str, last: str = MANIFEST, on_upload: Optional[Callable[[str, int], None]] = None
) -> None:
    """Publish every file under `local_dir` (recursively) as objects under `location`, `last`
    (relative to `local_dir`) after all others are uploaded and their sizes checked; the prefix
    must be empty or hold a partial upload (deleted first). `on_upload(relative path, bytes)` is
    called as each object completes. See the module docstring for what a reader can see."""
    import pyarrow.fs as pafs

    local_dir = Path(local_dir)
    files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    state = remote_state(location)
    if state == "dataset":
        raise UserError(f"{location} already holds a prepared dataset; delete it first (prepare --force does) or choose another")
    if state == "other":
        raise UserError(f"{location} holds objects that are not an llmtrain dataset; choose an empty prefix or delete them")
    if state == "partial":
        delete_prefix(location)
    fs, path = _filesystem(location)
    sizes = {rel: (local_dir / rel).stat().st_size for rel in files}
    done = threading.Lock()

    def one(rel: str) -> None:
        _put(fs, local_dir / rel, _join(path, rel))
        if on_upload is not None:
            with done:
                on_upload(rel, sizes[rel])

    start_upload(location)
    first = [rel for rel in files if rel != last]
    try:
        with ThreadPoolExecutor(max_workers=min(_THREADS, max(1, len(first)))) as pool:
            futures = [pool.submit(one, rel) for rel in first]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        remote = {i.path[len(path) :].lstrip("/"): i.size for i in listed if i.type == pafs.FileType.File}
        wrong = [rel for rel in first if remote.get(rel) != sizes[rel]]
        if wrong:
            raise UserError(
                f"{_join(location, wrong[0])}: {remote.get(wrong[0])} bytes after the upload, not {sizes[wrong[0]]}; "
                "the upload is incomplete (no manifest written): run it again"
            )
        if last in sizes:
            one(last)
    except OSError as err:
        raise UserError(
            f"{_explain(err, location, 'uploading', write=True)} (the upload is incomplete and marked so: no manifest.json "
            "was written, and the next prepare replaces it)"
        ) from None
    finish_upload(location)


# ---------------------------------------------------------------------------------------------
# Verifying


def _sha256_object(fs, path: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with fs.open_input_stream(path, compression=None) as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _read_manifest(location: str) -> dict:
    where = _join(location, MANIFEST)
    state = remote_state(location)
    if state != "dataset":
        problem = {
            "partial": "an upload that did not finish (no manifest.json yet)",
            "none": "nothing there",
            "other": "not a prepared dataset (no manifest.json)",
        }[state]
        raise UserError(f"{location}: {problem}; create it with `llmtrain prepare --output {location}` (--force to replace)")
    return parse_manifest(read_bytes(where), where)  # the checks every local reader runs


def _check_tokenizer_copy(location: str, manifest: dict) -> None:
    """The objects under tokenizer/ are the manifest's (sha256 each) and load as its tokenizer."""
    from llmtrain.data.tokenizer import load_tokenizer

    fs, path = _filesystem(location)
    copy = _join(location, TOKENIZER_DIR)
    want = manifest["tokenizer"]["files"]
    base = _join(path, TOKENIZER_DIR)
    have = {i.path[len(base) + 1 :]: i for i in _walk(fs, base) if not _hidden(i.path[len(base) :])}
    with tempfile.TemporaryDirectory(prefix="llmtrain-verify-") as tmp:
        for name in sorted(set(want) | set(have)):
            if name not in have:
                problem = "is missing"
            elif name not in want:
                problem = "was not part of the tokenizer the data was prepared with"
            else:
                data = read_bytes(_join(copy, name))
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
                if hashlib.sha256(data).hexdigest() == want[name]:
                    continue
                problem = "differs from the file the data was prepared with (sha256 mismatch)"
            raise UserError(f"{copy}/{name}: {problem}: the tokenizer copy was replaced or edited; restore it or {_REPREPARE}")
        tok = load_tokenizer(Path(tmp))
        fingerprint, vocab = tok.fingerprint, tok.vocab_size  # read from the files: before they go
    t = manifest["tokenizer"]
    if fingerprint != t["fingerprint"] or vocab != int(t["vocab_size"]):
        raise UserError(f"{copy}: this tokenizer (vocab {vocab}) is not the one the manifest records; {_REPREPARE}")


def verify_remote(location: str, quiet: bool = False) -> dict:
    """`llmtrain verify URI`: the manifest's seal, the tokenizer copy (hashes, and loaded), and
    every shard streamed: its size and sha256 must be the manifest's. Returns the manifest."""
    import pyarrow.fs as pafs

    manifest = _read_manifest(location)
    _check_tokenizer_copy(location, manifest)
    fs, path = _filesystem(location)
    entries = [e for split in manifest["splits"].values() for e in split["shards"]]
    try:
        listed = {i.path[len(path) :].lstrip("/"): i for i in _walk(fs, path)} if entries else {}
    except OSError as err:
        raise _explain(err, location, "listing") from None
    changed = "was truncated or changed after the manifest was written"
    for e in entries:
        info = listed.get(e["file"])
        if info is None or info.type != pafs.FileType.File:
            raise UserError(f"{_join(location, e['file'])}: shard listed in the manifest is missing; {_REPREPARE}")
        if info.size != int(e["bytes"]):
            raise UserError(
                f"{_join(location, e['file'])}: {info.size:,} bytes but the manifest says {int(e['bytes']):,}: it {changed}; {_REPREPARE}"
            )

    def digest(entry: dict) -> tuple[str, int]:
        try:
            return _sha256_object(fs, _join(path, entry["file"]))
        except OSError as err:
            raise _explain(err, _join(location, entry["file"]), "reading") from None

    with ThreadPoolExecutor(max_workers=min(_THREADS, max(1, len(entries)))) as pool:
        futures = [pool.submit(digest, e) for e in entries]
        try:
            for e, future in zip(entries, futures):
                sha, size = future.result()
                if sha != e["sha256"] or size != int(e["bytes"]):
                    raise UserError(
                        f"{_join(location, e['file'])}: sha256 does not match the manifest: it {changed}; {_REPREPARE}"
                    )
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    if not quiet:
        tokens = sum(int(e["tokens"]) for e in entries)
        print(f"llmtrain: {location}: ok ({len(entries)} shards, {tokens:,} tokens, sha256 verified)")
    return manifest
