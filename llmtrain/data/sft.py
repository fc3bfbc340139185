"""Supervised fine-tuning data: records -> conversations -> masked token ids, packed, cached.

    cache = build_cache(cfg.data, tokenizer, template, seq_len, seed=0, root=Path("runs/x/sft-cache"))
    split = SFTSplit(cache, "train")          # memory-mapped; SFTBatches (sft_batches.py) serves it

Records are read with `datasets` (JSON Lines, JSON arrays, Parquet; a file, a directory or a
glob) and become conversations (llmtrain/data/chat.py renders and masks them):
- `chat`: `{"messages": [{"role", "content"}, ...]}` (field `data.messages_field`);
- `pairs`: a prompt and a response field (`data.prompt_field` / `data.response_field`, e.g.
  question/answer); `data.template` (Python format syntax over the record) builds the prompt;
- `labelled`: `{"text", "label"}`; the prompt is `data.template` (default "{text}") and the
  answer the label's word (`data.label_words`, default the label itself). Validation examples
  also get one rendering per label, so accuracy is measured by each label word's log-probability.
A system message (`data.system_prompt`) may precede pairs and labelled prompts.

Examples longer than `data.seq_len` follow `data.truncation` (error with counts, drop, or cut
to seq_len). The validation split is `data.val_path` or a seeded `val_fraction` of the records.

The cache: `ROOT/<key>/` with the key a hash of the data files' bytes, the tokenizer's
fingerprint, the template's text and every setting above, so it is built once (on the driver,
before Ray starts) and each rank memory-maps it. Per split: `tokens.npy` (int32), `mask.npy`
(1 = assistant token), `starts.npy` (example offsets) and `rows.npy` (example offsets of each
packed row, examples stored in row order); `choices_*.npy` for labelled validation;
`meta.json` (counts, stop ids); `tokenizer/` with the chat template, for exports.
"""

from __future__ import annotations

import glob
import hashlib
import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llmtrain.data.atomic import atomic_dir
from llmtrain.data.chat import ROLES, ChatTemplate, TemplateError, check_mask, encode_conversations
from llmtrain.data.readers import first_bad_line
from llmtrain.data.sft_batches import pack_rows
from llmtrain.errors import UserError

CACHE_VERSION = 1
SUFFIXES = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
_CHUNK = 512


# ---------------------------------------------------------------------------------------------
# Files and records


def data_files(path: Path, key: str = "data.path") -> list[Path]:
    """The record files `path` names: a file, a directory (its JSONL/JSON/Parquet files) or a glob."""
    text = str(path)
    if glob.has_magic(text):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
    elif Path(path).is_dir():
        if (Path(path) / "manifest.json").is_file():
            raise UserError(
                f"{key}={path} is a prepared pretraining directory; SFT reads JSONL/JSON/Parquet records "
                "(chat messages, prompt/response pairs or text/label)"
            )
        files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."))
    elif Path(path).is_file():
        files = [Path(path)]
    else:
        raise UserError(f"{key}={path}: no such file or directory; point it at JSONL/JSON/Parquet records")
    if not files:
        raise UserError(f"{key}={path}: no .jsonl/.json/.parquet files found there")
    kinds = {SUFFIXES.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        odd = next((f for f in files if f.suffix not in SUFFIXES), files[0])
        raise UserError(f"{key}: {odd} is not JSONL/JSON/Parquet (or the files mix formats); convert the records to one of them")
    return files


def read_records(files: list[Path], key: str = "data.path"):
    """A `datasets.Dataset` of the records in `files` (no cache in the user's home)."""
    import tempfile

    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.logging.CRITICAL)  # a malformed file is our one-line error, not its log
    builder = SUFFIXES[files[0].suffix]
    with tempfile.TemporaryDirectory(prefix="llmtrain-sft-") as tmp:
        try:
            ds = datasets.load_dataset(
                builder, data_files=[str(f) for f in files], split="train", cache_dir=tmp, keep_in_memory=True
            )
        except Exception as err:  # pyarrow / datasets errors on malformed files
            for f in (f for f in files if f.suffix in (".jsonl", ".ndjson")):
                bad = first_bad_line(f)
                if bad is not None:
                    raise UserError(f"{key}: {f} line {bad[0]}: {bad[1]}; fix that line (one JSON object per line)") from None
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"{key}: cannot read {', '.join(map(str, files))} as records ({first}); "
                "fix the file (one JSON object per line, or a JSON array, or Parquet)"
            ) from None
    if len(ds) == 0:
        raise UserError(f"{key}: {', '.join(map(str, files))} holds no records")
    return ds


def detect_format(record: dict, data) -> str:
    if data.format != "auto":
        return data.format
    if data.messages_field in record:
        return "chat"
    if data.prompt_field in record and data.response_field in record:
        return "pairs"
    if data.text_field in record and data.label_field in record:
        return "labelled"
    raise UserError(
        f"data.format=auto: the first record has fields {', '.join(sorted(record))}, none of {data.messages_field!r}, "
        f"{data.prompt_field!r}+{data.response_field!r} or {data.text_field!r}+{data.label_field!r}; set data.format and the field names"
    )


def record_field(record: dict, name: str, where: str, key: str) -> Any:
    value = record.get(name)
    if value is None:
        raise UserError(
            f"{where} has no field {name!r} (fields: {', '.join(sorted(k for k, v in record.items() if v is not None))}); "
            f"set {key} or fix the record"
        )
    return value


def record_prompt(record: dict, data, field: str, field_key: str, where: str) -> str:
    if data.template is None:
        return str(record_field(record, field, where, field_key))
    for _, name, _, _ in string.Formatter().parse(data.template):
        if name is not None:
            record_field(record, name.split(".")[0].split("[")[0], where, "data.template")
    try:
        return data.template.format(**record)
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise UserError(f"data.template {data.template!r} cannot be filled from {where} ({err}); fix the template") from None


def checked_messages(items: list, where: str, label: str = "message") -> list[dict]:
    """{role, content} copies of `items`; a malformed message is a UserError naming it (1-based)."""
    out = []
    for j, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: {label} {j + 1} needs a string 'content' and a 'role'")
        if m.get("role") not in ROLES:
            raise UserError(
                f"{where}: {label} {j + 1} has unknown role {m.get('role')!r}; roles must be one of {', '.join(ROLES)}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def record_label(record: dict, data, where: str, label_words: Optional[dict[str, str]]) -> str:
    """A labelled record's label, which must be one of `label_words` (when given): SFT and
    `eval --task` refuse the same records."""
    label = str(record_field(record, data.label_field, where, "data.label_field"))
    if label_words is not None and label not in label_words:
        raise UserError(
            f"{where} has label {label!r}, not one of the label words ({', '.join(label_words)}); "
            "add it to data.label_words (eval: --label-word LABEL=WORD) or fix the record"
        )
    return label


def conversation(
    record: dict, fmt: str, data, where: str, label_words: Optional[dict[str, str]] = None, answer: Optional[str] = None
) -> list[dict]:
    """The conversation of one record (`answer` replaces a labelled record's own label word)."""
    if fmt == "chat":
        messages = record_field(record, data.messages_field, where, "data.messages_field")
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: {data.messages_field!r} must be a non-empty list of {{role, content}} messages")
        out = checked_messages(messages, where)
        if not any(m["role"] == "assistant" for m in out):
            raise UserError(f"{where}: no assistant message, so nothing to learn; every conversation needs an assistant turn")
        return out
    if fmt == "pairs":
        prompt = record_prompt(record, data, data.prompt_field, "data.prompt_field", where)
        response = str(record_field(record, data.response_field, where, "data.response_field"))
    else:  # labelled
        prompt = record_prompt(record, data, data.text_field, "data.text_field", where)
        if answer is None:
            label = record_label(record, data, where, label_words)
            answer = label_words[label] if label_words is not None else label
        response = answer
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# ---------------------------------------------------------------------------------------------
# The cache


def cache_key(data, tokenizer, template: ChatTemplate, seq_len: int, seed: int) -> str:
    files = data_files(data.path)
    val_files = data_files(data.val_path, "data.val_path") if data.val_path is not None else []
    settings = data.model_dump(mode="json", exclude={"path", "val_path", "cache_dir", "tokenizer"})
    h = hashlib.sha256(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "settings": settings,
                "seq_len": seq_len,
                "seed": seed,
                "tokenizer": tokenizer.fingerprint,
                "template": template.source,
                "stops": template.stop_ids,
            },
            sort_keys=True,
        ).encode()
    )
    for f in [*files, None, *val_files]:
        h.update(b"\0file\0")
        if f is not None:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:20]


def build_cache(data, tokenizer, template: ChatTemplate, seq_len: int, seed: int, root: Path) -> Path:
    """Tokenize `data` into ROOT/<key>/ unless that is already complete; returns the directory."""
    if data.path is None:
        raise UserError("no training data: set data.path=FILE (JSONL/JSON/Parquet records)")
    key = cache_key(data, tokenizer, template, seq_len, seed)
    target = Path(root) / key
    if (target / "meta.json").is_file():
        print(f"llmtrain: sft data: reusing {target} (same data, tokenizer, template and settings)", file=sys.stderr)
        return target
    files = data_files(data.path)
    records = read_records(files)
    fmt = detect_format(records[0], data)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    if data.val_path is not None:
        val_records = read_records(data_files(data.val_path, "data.val_path"), "data.val_path")
        val_order = np.random.default_rng(seed + 1).permutation(len(val_records))[: data.max_val_examples]
        train_order = order
    else:
        val_records = records
        n_val = min(data.max_val_examples, int(round(len(records) * data.val_fraction)))
        if data.val_fraction > 0 and len(records) > 1:
            n_val = max(n_val, 1)
        val_order, train_order = order[:n_val], order[n_val:]
    if data.max_examples is not None:
        train_order = train_order[: data.max_examples]
    label_words = _label_words(data, fmt, records, train_order)

    def named(fs: list[Path], path: Path):
        return lambda i: f"{fs[0] if len(fs) == 1 else path}: record {i + 1}"

    where = named(files, data.path)
    vwhere = named(data_files(data.val_path, "data.val_path"), data.val_path) if data.val_path is not None else where
    with atomic_dir(target, replace=True) as tmp:
        counts = {"format": fmt, "template": template.name, "seq_len": seq_len}
        train = _encode_split(records, train_order, fmt, data, tokenizer, template, seq_len, label_words, where, "train")
        counts["train"] = _write_split(tmp, "train", train, seq_len, data.packing)
        if len(val_order):
            val = _encode_split(val_records, val_order, fmt, data, tokenizer, template, seq_len, label_words, vwhere, "val")
            counts["val"] = _write_split(tmp, "val", val, seq_len, data.packing)
            if fmt == "labelled":
                counts["choices"] = _write_choices(
                    tmp, val_records, val_order, val["kept"], data, tokenizer, template, seq_len, label_words, vwhere
                )
        if not train["lengths"]:
            raise UserError(
                f"{data.path}: no training examples left ({_drop_summary(train)}); "
                "raise data.seq_len, set data.truncation=truncate, or check data.max_examples / data.val_fraction"
            )
        meta = {**counts, "stop_ids": sorted(train["stops"]), "label_words": label_words, "key": key, "pad_id": pad_id(tokenizer)}
        write_cache_files(tmp, tokenizer, template, meta)
    t = meta["train"]
    print(
        f"llmtrain: sft data ({fmt}, template {template.name}): {t['examples']:,} train examples in {t['rows']:,} rows "
        f"of {seq_len} ({t['fill']:.0%} filled), {t['supervised_tokens']:,} supervised tokens; "
        f"{meta.get('val', {}).get('examples', 0):,} validation; {_drop_summary(train)}; cache {target}",
        file=sys.stderr,
    )
    return target


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _label_words(data, fmt: str, records, train_order) -> Optional[dict[str, str]]:
    if fmt != "labelled":
        return None
    if data.label_words is not None:
        return dict(data.label_words)
    return {label: label for label in label_set(records, data.label_field, train_order)}


def _drop_summary(split: dict) -> str:
    parts = [f"{split['read']:,} read"]
    if split["too_long"]:
        parts.append(f"{split['too_long']:,} longer than seq_len ({split['policy']})")
    if split["no_target"]:
        parts.append(f"{split['no_target']:,} without answer tokens after truncation, dropped")
    return ", ".join(parts)


def _encode_split(records, order, fmt, data, tokenizer, template, seq_len, label_words, where, name) -> dict:
    out = {
        "ids": [],
        "masks": [],
        "lengths": [],
        "kept": [],
        "stops": set(),
        "read": len(order),
        "too_long": 0,
        "no_target": 0,
        "policy": {"error": "error", "drop": "dropped", "truncate": "truncated"}[data.truncation],
    }
    longest = 0
    for begin in range(0, len(order), _CHUNK):
        idx = [int(i) for i in order[begin : begin + _CHUNK]]
        convs = [conversation(records[i], fmt, data, where(i), label_words) for i in idx]
        encoded = encode_records(template, tokenizer, convs, idx, where)
        for i, (ids, mask) in zip(idx, encoded):
            truncated = len(ids) > seq_len
            if truncated:
                out["too_long"] += 1
                longest = max(longest, len(ids))
                if data.truncation != "truncate":
                    continue
                ids, mask = ids[:seq_len], mask[:seq_len]
                if not any(mask[1:]):
                    out["no_target"] += 1
                    continue
            problem = check_mask(ids, mask, template, tokenizer, truncated)
            if problem:
                raise UserError(f"{where(i)}: {problem}")
            if not truncated:
                out["stops"].add(int(ids[max(t for t in range(len(mask)) if mask[t])]))
            out["ids"].append(np.asarray(ids, dtype=np.int32))
            out["masks"].append(np.asarray(mask, dtype=np.uint8))
            out["lengths"].append(len(ids))
            out["kept"].append(i)
    if data.truncation == "error" and out["too_long"]:
        raise UserError(
            f"{data.path if name == 'train' else data.val_path or data.path}: {out['too_long']:,} of {len(order):,} "
            f"{name} examples are longer than seq_len {seq_len} (longest {longest:,} tokens); "
            "set data.truncation=drop or truncate, or raise data.seq_len"
        )
    return out


def encode_records(template, tokenizer, convs, idx, where):
    try:
        return encode_conversations(template, tokenizer, convs)
    except TemplateError:
        for i, conv in zip(idx, convs):  # find the record the template fails on
            try:
                encode_conversations(template, tokenizer, [conv])
            except TemplateError as err:
                raise UserError(
                    f"{where(i)}: chat template {template.name} cannot render it ({err}); "
                    "fix the record or choose another data.chat_template"
                ) from None
        raise


def _write_split(tmp: Path, name: str, split: dict, seq_len: int, packing: bool) -> dict:
    lengths = np.asarray(split["lengths"], dtype=np.int64)
    order, rows = pack_rows(lengths, seq_len, packing)
    ids = [split["ids"][i] for i in order]
    masks = [split["masks"][i] for i in order]
    starts = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths[order], out=starts[1:])
    np.save(tmp / f"{name}_tokens.npy", np.concatenate(ids) if ids else np.zeros(0, np.int32))
    np.save(tmp / f"{name}_mask.npy", np.concatenate(masks) if masks else np.zeros(0, np.uint8))
    np.save(tmp / f"{name}_starts.npy", starts)
    np.save(tmp / f"{name}_rows.npy", rows)
    supervised = int(sum(int(m[1:].sum()) for m in masks))
    return {
        "examples": len(order),
        "rows": len(rows) - 1,
        "tokens": int(starts[-1]),
        "supervised_tokens": supervised,
        "fill": float(starts[-1] / max(1, (len(rows) - 1) * seq_len)),
        "too_long": split["too_long"],
        "no_target": split["no_target"],
        "read": split["read"],
    }


def make_choices(records, order, kept, data, tokenizer, template, seq_len, label_words, where) -> Optional[Choices]:
    """Labelled validation: each kept example rendered once per label word, gold = its label's
    index (examples whose rendering does not fit seq_len are left out; an unknown label is refused)."""
    labels = list(label_words)
    keep = set(int(i) for i in kept)
    convs, gold, owners = [], [], []
    for i in (int(i) for i in order):
        if i not in keep:
            continue
        gold.append(labels.index(record_label(records[i], data, where(i), label_words)))
        convs += [conversation(records[i], "labelled", data, where(i), label_words, answer=label_words[w]) for w in labels]
        owners += [i] * len(labels)
    encoded = encode_records(template, tokenizer, convs, owners, where) if convs else []
    flat_ids, flat_mask, lengths, gold_kept = [], [], [], []
    for k in range(len(gold)):
        group = encoded[k * len(labels) : (k + 1) * len(labels)]
        if any(len(ids) > seq_len for ids, _ in group):
            continue
        gold_kept.append(gold[k])
        for ids, mask in group:
            flat_ids.append(np.asarray(ids, np.int32))
            flat_mask.append(np.asarray(mask, np.uint8))
            lengths.append(len(ids))
    if not gold_kept:
        return None
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return Choices(np.concatenate(flat_ids), np.concatenate(flat_mask), starts, np.asarray(gold_kept, dtype=np.int64), labels)


def label_set(records, field: str, order) -> list[str]:
    """The distinct labels of the records at `order`, sorted."""
    if field not in records.column_names:
        raise UserError(f"data.label_field={field!r}: the records have no such field (fields: {', '.join(records.column_names)})")
    column = records.select_columns([field])[field]
    return sorted({str(column[int(i)]) for i in order if column[int(i)] is not None})


def _write_choices(tmp, records, order, kept, data, tokenizer, template, seq_len, label_words, where) -> dict:
    choices = make_choices(records, order, kept, data, tokenizer, template, seq_len, label_words, where)
    if choices is None:
        return {"examples": 0, "labels": list(label_words)}
    for part in ("tokens", "mask", "starts", "gold"):
        np.save(tmp / f"choices_{part}.npy", getattr(choices, part))
    return {"examples": len(choices.gold), "labels": choices.labels}


# ---------------------------------------------------------------------------------------------
# Reading the cache


def write_cache_files(tmp: Path, tokenizer, template: ChatTemplate, meta: dict) -> None:
    """What every tokenized cache ends with: the tokenizer (with the chat template it was rendered
    with, for exports) and meta.json."""
    tokenizer.save(tmp / "tokenizer")
    if template.name != "checkpoint":
        (tmp / "tokenizer" / "chat_template.jinja").write_text(template.source, encoding="utf-8")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def read_meta(cache: Path) -> dict:
    return json.loads((Path(cache) / "meta.json").read_text())


@dataclass
class SFTSplit:
    """One split of a cache, memory-mapped: examples stored in row order."""

    tokens: np.ndarray
    mask: np.ndarray
    starts: np.ndarray  # [examples + 1] token offsets
    rows: np.ndarray  # [rows + 1] example offsets

    @classmethod
    def open(cls, cache: Path, name: str) -> Optional[SFTSplit]:
        cache = Path(cache)
        if not (cache / f"{name}_rows.npy").is_file():
            return None
        load = lambda part: np.load(cache / f"{name}_{part}.npy", mmap_mode="r")  # noqa: E731
        return cls(load("tokens"), load("mask"), load("starts"), load("rows"))

    @property
    def num_rows(self) -> int:
        return len(self.rows) - 1

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, assistant mask, example start offsets within the row) of row r."""
        first, last = int(self.rows[r]), int(self.rows[r + 1])
        a, b = int(self.starts[first]), int(self.starts[last])
        return self.tokens[a:b], self.mask[a:b], np.asarray(self.starts[first:last]) - a


@dataclass
class Choices:
    """Labelled validation examples, each rendered once per label (for accuracy)."""

    tokens: np.ndarray
    mask: np.ndarray
    starts: np.ndarray
    gold: np.ndarray
    labels: list[str]

    @classmethod
    def open(cls, cache: Path) -> Optional[Choices]:
        cache = Path(cache)
        meta = read_meta(cache)
        if "choices" not in meta or not meta["choices"]["examples"]:
            return None
        load = lambda part: np.load(cache / f"choices_{part}.npy", mmap_mode="r")  # noqa: E731
        return cls(load("tokens"), load("mask"), load("starts"), load("gold"), meta["choices"]["labels"])

    def candidate(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.starts[k]), int(self.starts[k + 1])
        return self.tokens[a:b], self.mask[a:b]
