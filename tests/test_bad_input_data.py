"""Bad input on the prepared-data contract (issue 13, classes 3, 6, 7, 8): tokenizer, prepare,
verify, pretrain and eval --data refuse tampered manifests, swapped tokenizer copies, damaged
shards, sizes that make no sense and unwritable outputs in one line, on the driver, before
anything is written. Every row's broken input is a copy under its own {tmp}; the shared {data}
and {tok} are never modified.

    .venv/bin/pytest -q tests/test_bad_input_data.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bad_input import Case, Env, battery

CORPUS_FILE = "{stories}/../../data/corpus/tinystories_val_subset.txt"  # what {data} was prepared from
TEXT = "{tmp}/in.txt"
PRETRAIN = ["pretrain", "{config}", "data.path={tmp}/data", "run.dir={tmp}/run"]
REPREPARE = [
    "prepare",
    "--input",
    CORPUS_FILE,
    "--tokenizer",
    "{tok}",
    "--seq-len",
    "64",
    "--val-fraction",
    "0.02",
    "--output",
    "{tmp}/data",
]  # {data}'s own inputs and settings


# -- setup helpers: each returns a function of the row's Env ------------------------------------


def text_file(name: str = "in.txt", content: str = "Once upon a time there was a small dog.\n\nIt ran home.\n"):
    def setup(env: Env) -> None:
        (env.tmp / name).write_text(content)

    return setup


def both(*setups):
    def setup(env: Env) -> None:
        for s in setups:
            s(env)

    return setup


def data_copy(*edits):
    """{tmp}/data: a copy of {data}, then each `edit(directory)` applied."""

    def setup(env: Env) -> None:
        copy = env.tmp / "data"
        shutil.copytree(env.data, copy)
        for edit in edits:
            edit(copy)

    return setup


def manifest(edit, reseal: bool = False):
    """Edit manifest.json in place (`reseal`: recompute its manifest_sha256, as a careful forger would)."""

    def apply(directory: Path) -> None:
        from llmtrain.data.shards import seal_manifest

        m = json.loads((directory / "manifest.json").read_text())
        edit(m)
        (directory / "manifest.json").write_text(json.dumps(seal_manifest(m) if reseal else m, indent=1))

    return apply


def swap_tokenizer(directory: Path) -> None:
    """Replace the tokenizer copy by stories260K's (same vocab size, 512: another tokenizer)."""
    from conftest import STORIES260K

    shutil.rmtree(directory / "tokenizer")
    (directory / "tokenizer").mkdir()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(STORIES260K / name, directory / "tokenizer" / name)


def flip_byte(directory: Path) -> None:
    shard = directory / "train-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the token buffer: the size stays, the sha256 changes
    shard.write_bytes(bytes(data))


def truncate(directory: Path) -> None:
    shard = directory / "train-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])


def ids_beyond_vocab(directory: Path) -> None:
    """A resealed manifest whose vocab (300) is below the shards' ids (up to 511)."""
    manifest(lambda m: m["tokenizer"].update(vocab_size=300), reseal=True)(directory)


def zero_fingerprint(m: dict) -> None:
    m["tokenizer"]["fingerprint"] = "0" * 64


def vocab_50k(m: dict) -> None:
    m["tokenizer"]["vocab_size"] = 50_000


def old_schema(m: dict) -> None:
    m["schema_version"] = 1
    m.pop("manifest_sha256")


def make_dir_with(name: str):
    def setup(env: Env) -> None:
        (env.tmp / name).mkdir()
        (env.tmp / name / "notes.txt").write_text("mine\n")

    return setup


def prepare_argv(*extra: str, inputs: str = TEXT, output: str = "{tmp}/out", seq_len: str = "16") -> list[str]:
    return ["prepare", "--input", inputs, "--tokenizer", "{tok}", "--seq-len", seq_len, "--output", output, *extra]


def tokenizer_argv(*extra: str, inputs: str = TEXT, output: str = "{tmp}/tok") -> list[str]:
    return ["tokenizer", "--input", inputs, "--vocab-size", "512", "--output", output, *extra]


CASES = [
    # -- tokenizer: the output is checked before any input is read ------------------------------
    Case("tok-output-is-a-file", tokenizer_argv(output="{tmp}/out.txt"), "is a file, not a directory",
         within_s=15, setup=both(text_file(), text_file("out.txt", "keep me\n")), unchanged=["{tmp}/out.txt"]),
    Case("tok-output-under-a-file", tokenizer_argv(output="{tmp}/plain/tok"), "cannot create",
         within_s=15, setup=both(text_file(), text_file("plain", "keep me\n")), unchanged=["{tmp}/plain"]),
    Case("tok-output-exists", tokenizer_argv(output="{tmp}/taken"), "already exists",
         within_s=15, setup=both(text_file(), make_dir_with("taken")), unchanged=["{tmp}/taken"]),
    Case("tok-missing-input", tokenizer_argv(inputs="{tmp}/nope.txt"), "no such file or directory",
         within_s=15, unchanged=["{tmp}/tok"]),
    Case("tok-empty-input-dir", tokenizer_argv(inputs="{tmp}/empty"), "directory holds no input files",
         within_s=15, setup=lambda env: (env.tmp / "empty").mkdir(), unchanged=["{tmp}/tok"]),
    Case("tok-blank-text", tokenizer_argv(), "no text after cleaning",
         within_s=15, setup=text_file(content="\n   \n\t\n"), unchanged=["{tmp}/tok"]),
    Case("tok-utf16-input", tokenizer_argv(inputs="{tmp}/u16.txt"), "not UTF-8 text",
         within_s=15, setup=lambda env: (env.tmp / "u16.txt").write_bytes("Some text.\n".encode("utf-16")),
         unchanged=["{tmp}/tok"]),
    Case("tok-vocab-too-small", ["tokenizer", "--input", TEXT, "--vocab-size", "100", "--output", "{tmp}/tok"],
         "--vocab-size 100 is too small", within_s=15, setup=text_file(), unchanged=["{tmp}/tok"]),
    # -- prepare: each argument its own bound; sizes against the corpus; the output first ---------
    Case("prep-seq-len-beyond-corpus", prepare_argv(seq_len="1000000000"), "is longer than the corpus",
         within_s=20, setup=text_file(), unchanged=["{tmp}/out"]),
    Case("prep-seq-len-beyond-corpus-big-shards", prepare_argv("--shard-tokens", "1000000000", seq_len="1000000000"),
         "99.99% padding", within_s=20, setup=text_file(), unchanged=["{tmp}/out"]),
    Case("prep-seq-len-1", prepare_argv(seq_len="1"), "--seq-len 1 is too small", within_s=15,
         setup=text_file(), unchanged=["{tmp}/out"]),
    Case("prep-shard-tokens-0", prepare_argv("--shard-tokens", "0"), "--shard-tokens 0 must be at least 1",
         within_s=15, setup=text_file(), unchanged=["{tmp}/out"]),
    Case("prep-val-fraction-1", prepare_argv("--val-fraction", "1"), "--val-fraction 1.0 must be in [0, 1)",
         within_s=15, setup=text_file(), unchanged=["{tmp}/out"]),
    Case("prep-output-is-a-file", prepare_argv(output="{tmp}/out.txt"), "is a file, not a directory",
         within_s=15, setup=both(text_file(), text_file("out.txt", "keep me\n")), unchanged=["{tmp}/out.txt"]),
    Case("prep-output-under-a-file", prepare_argv(output="{tmp}/plain/out"), "cannot create",
         within_s=15, setup=both(text_file(), text_file("plain", "keep me\n")), unchanged=["{tmp}/plain"]),
    Case("prep-output-not-prepared", prepare_argv(output="{tmp}/taken"), "is not a prepared directory",
         within_s=15, setup=both(text_file(), make_dir_with("taken")), unchanged=["{tmp}/taken"]),
    Case("prep-output-other-inputs", prepare_argv(output="{tmp}/data"), "other inputs or settings",
         within_s=15, setup=both(text_file(), data_copy()), unchanged=["{tmp}/data"]),
    Case("prep-damaged-output-is-rebuilt", REPREPARE, "is damaged", code=0, within_s=45, setup=data_copy(flip_byte)),
    Case("prep-older-output-is-rebuilt", REPREPARE, "written by another llmtrain (manifest schema version 1)", code=0,
         within_s=45, setup=data_copy(manifest(old_schema), manifest(lambda m: m["build"]["settings"].update(schema_version=1)))),
    Case("prep-missing-tokenizer", ["prepare", "--input", TEXT, "--tokenizer", "{tmp}/nope", "--seq-len", "16",
                                    "--output", "{tmp}/out"],
         "tokenizer directory not found", within_s=15, setup=text_file(), unchanged=["{tmp}/out"]),
    Case("prep-empty-input", prepare_argv(inputs="{tmp}/empty.txt"), "no documents left after cleaning",
         within_s=15, setup=text_file("empty.txt", ""), unchanged=["{tmp}/out"]),
    Case("prep-bad-parquet", prepare_argv(inputs="{tmp}/x.parquet"), "not a readable Parquet file",
         within_s=15, setup=text_file("x.parquet", "this is no parquet\n"), unchanged=["{tmp}/out"]),
    Case("prep-jsonl-without-text-column", prepare_argv(inputs="{tmp}/x.jsonl"), "no column 'text'",
         within_s=15, setup=text_file("x.jsonl", '{"body": "hello there, a record"}\n'), unchanged=["{tmp}/out"]),
    # -- verify: the manifest seals itself and the tokenizer copy ---------------------------------
    Case("verify-zeroed-fingerprint", ["verify", "{tmp}/data"], "does not match its own manifest_sha256",
         within_s=15, setup=data_copy(manifest(zero_fingerprint)), unchanged=["{tmp}/data"]),
    Case("verify-vocab-edited", ["verify", "{tmp}/data"], "does not match its own manifest_sha256",
         within_s=15, setup=data_copy(manifest(vocab_50k)), unchanged=["{tmp}/data"]),
    Case("verify-vocab-edited-resealed", ["verify", "{tmp}/data"], "is not the one the manifest records (vocab 50000",
         within_s=15, setup=data_copy(manifest(vocab_50k, reseal=True)), unchanged=["{tmp}/data"]),
    Case("verify-swapped-tokenizer", ["verify", "{tmp}/data"], "the tokenizer copy was replaced or edited",
         within_s=15, setup=data_copy(swap_tokenizer), unchanged=["{tmp}/data"]),
    Case("verify-edited-shard", ["verify", "{tmp}/data"], "sha256 does not match the manifest",
         within_s=15, setup=data_copy(flip_byte), unchanged=["{tmp}/data"]),
    Case("verify-truncated-shard", ["verify", "{tmp}/data"], "truncated or replaced",
         within_s=15, setup=data_copy(truncate), unchanged=["{tmp}/data"]),
    Case("verify-ids-beyond-vocab", ["verify", "{tmp}/data"], "but the manifest's tokenizer has 300 ids",
         within_s=15, setup=data_copy(ids_beyond_vocab), unchanged=["{tmp}/data"]),
    Case("verify-older-schema", ["verify", "{tmp}/data"], "written by an older llmtrain",
         within_s=15, setup=data_copy(manifest(old_schema)), unchanged=["{tmp}/data"]),
    Case("verify-missing-shard", ["verify", "{tmp}/data"], "shard listed in the manifest is missing",
         within_s=15, setup=data_copy(lambda d: (d / "train-00000.arrow").unlink()), unchanged=["{tmp}/data"]),
    Case("verify-not-prepared", ["verify", "{tmp}"], "not a prepared directory", within_s=15),
    # -- pretrain: every check on the driver, before Ray starts; RUN_DIR untouched ----------------
    Case("pretrain-zeroed-fingerprint", PRETRAIN, "does not match its own manifest_sha256", within_s=20,
         setup=data_copy(manifest(zero_fingerprint)), unchanged=["{tmp}/run", "{tmp}/data"]),
    Case("pretrain-vocab-edited", PRETRAIN, "does not match its own manifest_sha256", within_s=20,
         setup=data_copy(manifest(vocab_50k)), unchanged=["{tmp}/run", "{tmp}/data"]),
    Case("pretrain-vocab-edited-resealed", PRETRAIN, "is not the one the manifest records (vocab 50000", within_s=20,
         setup=data_copy(manifest(vocab_50k, reseal=True)), unchanged=["{tmp}/run", "{tmp}/data"]),
    Case("pretrain-swapped-tokenizer", PRETRAIN, "the tokenizer copy was replaced or edited", within_s=20,
         setup=data_copy(swap_tokenizer), unchanged=["{tmp}/run", "{tmp}/data"]),
    Case("pretrain-ids-beyond-vocab", PRETRAIN, "but the manifest's tokenizer has 300 ids", within_s=20,
         setup=data_copy(ids_beyond_vocab), unchanged=["{tmp}/run", "{tmp}/data"]),
    Case("pretrain-truncated-shard", PRETRAIN, "truncated or replaced", within_s=20,
         setup=data_copy(truncate), unchanged=["{tmp}/run", "{tmp}/data"]),
    Case("pretrain-older-schema", PRETRAIN, "written by an older llmtrain", within_s=20,
         setup=data_copy(manifest(old_schema)), unchanged=["{tmp}/run", "{tmp}/data"]),
    Case("pretrain-model-from-other-tokenizer",
         ["pretrain", "{config}", "data.path={data}", "model.from={stories}", "run.dir={tmp}/run"],
         "was prepared with another tokenizer (vocab 512) than model.from=", within_s=20, unchanged=["{tmp}/run"]),
    Case("pretrain-missing-data", ["pretrain", "{config}", "data.path={tmp}/nope", "run.dir={tmp}/run"],
         "prepared data directory not found", within_s=20, unchanged=["{tmp}/run"]),
    Case("pretrain-rows-longer-than-model", PRETRAIN[:2] + ["data.path={data}", "model.max_seq_len=32", "run.dir={tmp}/run"],
         "data seq_len 64 is longer than the model's 32 positions", within_s=20, unchanged=["{tmp}/run"]),
    # -- eval --data: the model's tokenizer against the data's -----------------------------------
    Case("eval-data-other-tokenizer", ["eval", "{stories}", "--data", "{data}"], "was prepared with another tokenizer",
         within_s=30),
    Case("eval-data-zeroed-fingerprint", ["eval", "{stories}", "--data", "{tmp}/data"],
         "does not match its own manifest_sha256", within_s=30, setup=data_copy(manifest(zero_fingerprint)),
         unchanged=["{tmp}/data"]),
]  # fmt: skip

test_case = battery(CASES)
