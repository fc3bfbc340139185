"""Input files -> raw documents. Plain text, JSON Lines / JSON arrays, and Parquet; files,
directories (recursively) and globs.

    files = expand_inputs(["corpus/", "extra/*.jsonl"])
    for text in iter_documents(files[0], "text", stats, on_bytes=bar.update): ...

How each format becomes documents:
- **Plain text** (any name not listed below): documents are blocks separated by one or more
  blank (empty or whitespace-only) lines. A block longer than 64 MiB is cut at its last line
  break (or space) before the limit, and the cut is counted. Invalid UTF-8 is *replaced* by
  U+FFFD and counted per document; a file with NUL bytes, or with more than 1% invalid bytes,
  is rejected as not being UTF-8 text. A leading byte-order mark is dropped.
- **JSON Lines** (`.jsonl`, `.ndjson`, `.json` with one object per line) via `pyarrow.json`, and
  **JSON arrays** (`.json` starting with `[`) via the standard `json` module: one document per
  record, from the `text_column` field (missing/null = empty document).
- **Parquet** (`.parquet`, `.pq`) via `pyarrow.parquet`, streamed by record batch: one document
  per row of `text_column`.
JSON and Parquet readers validate UTF-8 themselves: a file they cannot decode is rejected.
Errors name the place 1-based, as editors do: the line of a JSON Lines file (found by a rescan
of the file with `json`, since pyarrow counts rows from 0 within each 16 MiB block), the record
of a JSON array or a Parquet file.
Directories are searched recursively for these suffixes (hidden files skipped), in sorted order.
Compressed files (`.gz`, `.zst`, `.bz2` after the format's suffix, e.g. `part-0.jsonl.zst`) are
decompressed while streaming. `list_inputs` also takes object-store URIs (`s3://bucket/prefix`,
`gs://...`, `file://...`, globs in the key), listed and opened through llmtrain.data.objstore
(pyarrow.fs), so a worker reads its input from wherever it lives. An uncompressed JSON Lines
file can also be read as byte ranges (`read_line_range`: the lines that begin in the range), so
one large file is several tasks of the pipeline; other formats are read whole.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, Union

from llmtrain.data.clean import CleanStats
from llmtrain.errors import UserError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}

_BLANK_LINES = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")
_CHUNK = 8 << 20
MAX_BLOCK = 64 << 20
_MAX_INVALID_FRACTION = 0.01

OnBytes = Callable[[int], object]


def _no_progress(n: int) -> None:
    return None


def expand_inputs(inputs: Sequence[str | os.PathLike], exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Files named by `inputs` (files, directories, globs), in order, each once; files inside
    the `exclude` directories (e.g. the output being written) are left out."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise UserError("no input given; pass --input with text/JSONL/Parquet files, directories or globs")
    files: list[Path] = []
    for item in map(str, inputs):
        path = Path(item)
        if glob.has_magic(item):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            found = [m for m in matches if m.is_file()] + [f for m in matches if m.is_dir() for f in _files_in(m)]
            if not found:
                raise UserError(f"--input {item}: no files match this pattern; check the path")
            files += found
        elif path.is_dir():
            found = _files_in(path)
            if not found:
                kinds = ", ".join(sorted(KNOWN_SUFFIXES))
                raise UserError(f"{item}: directory holds no input files ({kinds}); point --input at your data")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{item}: no such file or directory; check --input")
    skip = [Path(e).resolve() for e in exclude]
    files = [f for f in files if not any(f.resolve().is_relative_to(d) for d in skip)]
    if not files:
        raise UserError(f"--input {' '.join(map(str, inputs))}: no input files outside the output directory; check --input")
    unique: dict[Path, Path] = {}
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"{f}: not readable (permission denied); fix its permissions or leave it out of --input")
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _files_in(directory: Path) -> list[Path]:
    out = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / n for n in sorted(names) if not n.startswith(".") and format_suffix(n) in KNOWN_SUFFIXES]
    return out


@dataclass(frozen=True)
class InputFile:
    """One input: a local path or an object-store URI, with the size and mtime that identify
    this version of it (the rerun check of `prepare` compares them)."""

    location: str
    size: int
    mtime_ns: int

    def signature(self) -> dict:
        return {"path": self.location, "bytes": self.size, "mtime_ns": self.mtime_ns}


Source = Union[str, os.PathLike, InputFile]


def list_inputs(inputs: Sequence[str | os.PathLike], exclude: Sequence[str | os.PathLike] = ()) -> list[InputFile]:
    """`expand_inputs` for local paths and object-store URIs alike, in order, each once."""
    from llmtrain.data import objstore  # on use: local-only runs never import pyarrow.fs's S3 client

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[InputFile] = []
    local: list[str | os.PathLike] = []

    def flush() -> None:
        for f in expand_inputs(local, exclude=[e for e in exclude if not objstore.is_uri(e)]) if local else []:
            st = f.stat()
            out.append(InputFile(str(f.resolve()), st.st_size, st.st_mtime_ns))
        local.clear()

    if not inputs:
        expand_inputs(inputs)  # the one error for "no input"
    for item in inputs:
        if objstore.is_uri(item):
            flush()
            objstore.check_access(str(item), write=False)  # a dead endpoint fails in seconds, not after the client's retries
            out += [InputFile(r.uri, r.size, r.mtime_ns) for r in objstore.list_files(str(item), KNOWN_SUFFIXES)]
        else:
            local.append(item)
    flush()
    unique: dict[str, InputFile] = {}
    for f in out:
        unique.setdefault(f.location, f)
    return list(unique.values())


def format_suffix(name: str) -> str:
    """The suffix that names the format, past a compression suffix: 'a.jsonl.zst' -> '.jsonl'."""
    name = name.lower()
    suffix = os.path.splitext(name)[1]
    if suffix in COMPRESSION_SUFFIXES:
        suffix = os.path.splitext(name[: -len(suffix)])[1]
    return suffix


def compression_of(name: str) -> Optional[str]:
    return COMPRESSION_SUFFIXES.get(os.path.splitext(name.lower())[1])


def file_kind(path: Source) -> str:
    suffix = format_suffix(_location(path).rsplit("/", 1)[-1])
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSON_SUFFIXES:
        return "json"
    return "text"


def _location(path: Source) -> str:
    return path.location if isinstance(path, InputFile) else str(path)


def _open(path: Source) -> BinaryIO:
    """A binary stream of the (decompressed) bytes of a local file or an object."""
    location = _location(path)
    from llmtrain.data import objstore

    if objstore.is_uri(location):
        return objstore.open_input(location)
    codec = compression_of(location)
    if codec is None:
        return open(location, "rb")
    import pyarrow as pa

    return pa.input_stream(location, compression=codec)


def splittable(path: Source) -> bool:
    """JSON Lines read as byte ranges (`iter_documents(byte_range=...)`): uncompressed `.jsonl` /
    `.ndjson`, whose records are whole lines (a `.json` file may be an array)."""
    location = _location(path)
    return format_suffix(location.rsplit("/", 1)[-1]) in {".jsonl", ".ndjson"} and compression_of(location) is None


def _open_random(path: Source):
    location = _location(path)
    from llmtrain.data import objstore

    if objstore.is_uri(location):
        fs, inner = objstore.filesystem(location)
        return fs.open_input_file(inner)
    return open(location, "rb")


def _line_start(f, pos: int) -> int:
    """The offset of the first line that begins at or after `pos` (the file size if none)."""
    if pos == 0:
        return 0
    f.seek(pos - 1)
    at = pos - 1
    while chunk := f.read(1 << 16):
        newline = chunk.find(b"\n")
        if newline >= 0:
            return at + newline + 1
        at += len(chunk)
    return at


def read_line_range(path: Source, start: int, end: int) -> bytes:
    """The bytes of the whole lines that begin in [start, end): consecutive ranges cover every
    line of the file exactly once, whichever process reads which."""
    with _open_random(path) as f:
        begin, stop = _line_start(f, start), _line_start(f, end)
        f.seek(begin)
        return f.read(stop - begin)


def iter_documents(
    path: Source,
    text_column: str,
    stats: CleanStats,
    on_bytes: OnBytes = _no_progress,
    byte_range: Optional[tuple[int, int]] = None,
) -> Iterator[str]:
    """Raw documents of one file (see the module docstring for the rules per format), or of the
    lines beginning in `byte_range` of a `splittable` file."""
    kind = file_kind(path)
    name = _location(path)
    try:
        if byte_range is not None:
            yield from _iter_json_range(path, name, text_column, byte_range)
        elif kind == "parquet":
            yield from _iter_parquet(path, name, text_column, on_bytes)
        elif kind == "json":
            yield from _iter_json(path, name, text_column, on_bytes)
        else:
            yield from _iter_text(path, name, stats, on_bytes)
    except OSError as err:
        raise UserError(f"{name}: cannot read ({getattr(err, 'strerror', None) or err}); check the file") from None


# ---------------------------------------------------------------------------------------------
# Plain text


def _iter_text(source: Source, path: str, stats: CleanStats, on_bytes: OnBytes) -> Iterator[str]:
    counts = {"invalid": 0, "bytes": 0}
    with _open(source) as f:
        tail = b""
        first = True
        while True:
            chunk = f.read(_CHUNK)
            if first:
                first = False
                if b"\x00" in chunk[: 1 << 16]:
                    raise UserError(
                        f"{path}: not UTF-8 text (it contains NUL bytes: binary or UTF-16?); "
                        "convert it to UTF-8 (e.g. iconv -f utf-16 -t utf-8) or leave it out of --input"
                    )
                chunk = chunk.removeprefix(b"\xef\xbb\xbf")
            if not chunk:
                break
            on_bytes(len(chunk))
            parts = _BLANK_LINES.split(tail + chunk)
            tail = parts.pop()
            while len(tail) > MAX_BLOCK:
                cut = _cut_point(tail, MAX_BLOCK)
                parts.append(tail[:cut])
                tail = tail[cut:]
                stats.long_blocks_split += 1
            for block in parts:
                yield _decode(block, path, stats, counts)
        if tail:
            yield _decode(tail, path, stats, counts)
    _check_invalid(path, counts, final=True)


def _cut_point(block: bytes, limit: int) -> int:
    for sep in (b"\n", b" "):
        at = block.rfind(sep, 0, limit)
        if at > 0:
            return at + 1
    at = limit
    while at > 0 and 0x80 <= block[at] < 0xC0:  # never cut inside a UTF-8 sequence
        at -= 1
    return at or limit


def _decode(block: bytes, path: str, stats: CleanStats, counts: dict) -> str:
    counts["bytes"] += len(block)
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("utf-8", errors="replace")
        replaced = text.count("\ufffd") - block.count(b"\xef\xbf\xbd")
        stats.invalid_utf8_documents += 1
        stats.invalid_utf8_replacements += replaced
        counts["invalid"] += replaced
        _check_invalid(path, counts, final=False)
        return text


def _check_invalid(path: str, counts: dict, final: bool) -> None:
    invalid, total = counts["invalid"], max(counts["bytes"], 1)
    if invalid > _MAX_INVALID_FRACTION * total and (final or invalid >= 1000):
        raise UserError(
            f"{path}: not UTF-8 text ({invalid:,} invalid byte sequences in {total:,} bytes); "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out of --input"
        )


# ---------------------------------------------------------------------------------------------
# JSON / JSON Lines / Parquet


def _is_remote(location: str) -> bool:
    return "://" in location


def _column(names: Sequence[str], column: str, path: str) -> None:
    if column not in names:
        shown = ", ".join(names[:10]) or "none"
        raise UserError(f"{path}: no column '{column}' (columns: {shown}); pass --text-column NAME")


def _strings(values: list, path: str, column: str, first: int = 1) -> Iterator[str]:
    """The text of each value; `first` is the 1-based record number of values[0]."""
    for i, v in enumerate(values):
        if v is None:
            yield ""
        elif isinstance(v, str):
            yield v
        else:
            raise UserError(
                f"{path}: record {first + i}: column '{column}' holds {type(v).__name__} values, not text; "
                "pass --text-column NAME of a text column"
            )


def first_bad_line(path: Source, column: Optional[str] = None) -> tuple[int, str] | None:
    """(1-based line number, what is wrong) of the first line of a JSON Lines file that is not a
    JSON object (with a text, null or missing `column`, when given); None if every line is.
    pyarrow and datasets only say 'row N', counted from 0 (and, in pyarrow, per block)."""
    with io.TextIOWrapper(_open(path), encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                return number, f"not valid JSON: {err.msg} at column {err.colno}"
            if not isinstance(record, dict):
                return number, f"a JSON {type(record).__name__}, not an object"
            value = record.get(column) if column is not None else None
            if value is not None and not isinstance(value, str):
                return number, f"'{column}' is not text but {type(value).__name__}"
    return None


def _iter_json(src: Source, path: str, column: str, on_bytes: OnBytes) -> Iterator[str]:
    with _open(src) as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _iter_json_array(src, path, column, on_bytes)
        return
    import pyarrow as pa
    import pyarrow.json as pj

    local = not _is_remote(path) and compression_of(path) is None
    size = os.path.getsize(path) if local else None
    source = pa.OSFile(path) if local else _open(src)
    try:
        reader = pj.open_json(source, read_options=pj.ReadOptions(block_size=16 << 20))
        _column(reader.schema.names, column, path)
        done = records = 0
        for batch in reader:
            yield from _strings(batch.column(column).to_pylist(), path, column, records + 1)
            records += batch.num_rows
            if size is not None:
                pos = min(source.tell(), size)
                on_bytes(pos - done)
                done = pos
        if size is not None:
            on_bytes(size - done)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise _not_json_lines(src, path, column, err) from None
    finally:
        source.close()


def _not_json_lines(src: Source, path: str, column: str, err: Exception) -> UserError:
    """pyarrow's JSON error as our line: the 1-based line of the first bad record, found by a rescan."""
    bad = first_bad_line(src, column)
    reason = f"line {bad[0]}: {bad[1]}" if bad else str(err).splitlines()[0].split(" in row ")[0]
    return UserError(f"{path}: not valid JSON Lines ({reason}); fix the file or convert it to one JSON object per line")


def _iter_json_range(src: Source, path: str, column: str, byte_range: tuple[int, int]) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.json as pj

    data = read_line_range(src, *byte_range)
    if not data.strip():
        return
    try:
        table = pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(block_size=16 << 20))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise _not_json_lines(src, path, column, err) from None
    if column not in table.column_names:
        if byte_range[0] == 0:
            _column(table.column_names, column, path)
        yield from ("" for _ in range(table.num_rows))  # a later range whose records all lack it
        return
    yield from _strings(table.column(column).to_pylist(), path, column)


def _iter_json_array(src: Source, path: str, column: str, on_bytes: OnBytes) -> Iterator[str]:
    with _open(src) as f:
        data = f.read()
    try:
        records = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); fix the file") from None
    on_bytes(len(data))
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path}: expected a JSON array of objects (or JSON Lines); convert the file")
    if records:
        _column(sorted({k for r in records for k in r}), column, path)
    yield from _strings([r.get(column) for r in records], path, column)


def _iter_parquet(src: Source, path: str, column: str, on_bytes: OnBytes) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if _is_remote(path) or compression_of(path) is not None:  # Parquet needs random access
            with _open(src) as f:
                data = f.read()
            pf, size = pq.ParquetFile(pa.BufferReader(data)), len(data)
        else:
            pf, size = pq.ParquetFile(path), os.path.getsize(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]}); check the file") from None
    _column(pf.schema_arrow.names, column, path)
    rows = max(pf.metadata.num_rows, 1)
    done = records = 0
    try:
        for batch in pf.iter_batches(columns=[column], batch_size=8192):
            yield from _strings(batch.column(0).to_pylist(), path, column, records + 1)
            records += batch.num_rows
            step = size * batch.num_rows // rows
            on_bytes(step)
            done += step
        on_bytes(max(size - done, 0))
    except pa.ArrowInvalid as err:
        raise UserError(f"{path}: cannot decode Parquet data ({str(err).splitlines()[0]}); check the file") from None
