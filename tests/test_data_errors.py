"""Bad input on the data path: one `llmtrain: error:` line naming problem and fix, exit status 2,
no traceback, and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, STORIES260K

from llmtrain.cli import main
from llmtrain.config import load_config
from llmtrain.data.loader import TokenLoader
from llmtrain.errors import UserError


def cli_error(args: list[str], capfd) -> str:
    capfd.readouterr()
    code = main(args)
    err = capfd.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if "llmtrain: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0].split("llmtrain: error: ", 1)[1]


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert leftovers == []


def prepare_args(inputs, tokenizer, output, seq_len=64, *extra) -> list[str]:
    inputs = [inputs] if isinstance(inputs, (str, Path)) else inputs
    return [
        "prepare",
        "--input",
        *map(str, inputs),
        "--tokenizer",
        str(tokenizer),
        "--seq-len",
        str(seq_len),
        "--output",
        str(output),
        *extra,
    ]


def test_missing_input(small_tokenizer, tmp_path, capfd):
    out = tmp_path / "out"
    msg = cli_error(prepare_args(tmp_path / "nope.txt", small_tokenizer, out), capfd)
    assert "nope.txt: no such file or directory; check --input" in msg
    assert_nothing_written(out)
    msg = cli_error(prepare_args(str(tmp_path / "*.jsonl"), small_tokenizer, out), capfd)
    assert "no files match" in msg
    (tmp_path / "empty").mkdir()
    assert "holds no input files" in cli_error(prepare_args(tmp_path / "empty", small_tokenizer, out), capfd)
    assert_nothing_written(out)


def test_unreadable_input(small_tokenizer, corpus_slice, tmp_path, capfd, monkeypatch):
    f = tmp_path / "secret.txt"
    shutil.copy(corpus_slice / "inaugural.txt", f)
    f.chmod(0)
    if os.geteuid() == 0:  # root may read anything: let the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == f else real_access(p, mode, **kw))
    out = tmp_path / "out"
    msg = cli_error(prepare_args(f, small_tokenizer, out), capfd)
    assert "secret.txt: not readable (permission denied); fix its permissions or leave it out of --input" in msg
    assert_nothing_written(out)


def test_empty_after_cleaning(small_tokenizer, tmp_path, capfd):
    (tmp_path / "short.txt").write_text("hi\n\nok\n\n   \n\nyes\n\n\x07\x07\n")
    out = tmp_path / "out"
    msg = cli_error(prepare_args(tmp_path / "short.txt", small_tokenizer, out), capfd)
    assert msg.startswith("no documents left after cleaning (4 documents read: 0 kept, 1 empty, 3 shorter than 16 chars")
    assert "lower --min-chars" in msg
    assert_nothing_written(out)


def test_not_utf8_is_rejected_with_counts(small_tokenizer, corpus_slice, tmp_path, capfd):
    text = (corpus_slice / "austen_6novels.txt").read_text().replace("e", "é")
    (tmp_path / "latin1.txt").write_bytes(text.encode("latin-1", errors="replace"))
    out = tmp_path / "out"
    msg = cli_error(prepare_args(tmp_path / "latin1.txt", small_tokenizer, out), capfd)
    assert "latin1.txt: not UTF-8 text (" in msg and "invalid byte sequences" in msg and "iconv" in msg
    assert_nothing_written(out)
    (tmp_path / "utf16.txt").write_bytes("Some perfectly fine text, in UTF-16.\n".encode("utf-16"))
    assert "contains NUL bytes" in cli_error(prepare_args(tmp_path / "utf16.txt", small_tokenizer, out), capfd)
    assert_nothing_written(out)


def test_seq_len_bounds(small_tokenizer, corpus_slice, tmp_path, capfd):
    out = tmp_path / "out"
    assert "--seq-len 1 is too small" in cli_error(prepare_args(corpus_slice, small_tokenizer, out, 1), capfd)
    msg = cli_error(prepare_args(corpus_slice / "tinystories_val_subset.txt", STORIES260K, out, 1024), capfd)
    assert "--seq-len 1024 is longer than the 512 positions" in msg and "use --seq-len <= 512" in msg
    assert_nothing_written(out)


def _large_vocab_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    rust = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir()
    rust.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "[UNK]"}))
    return directory


def test_vocab_larger_than_shard_dtype(corpus_slice, tmp_path, capfd):
    tok = _large_vocab_tokenizer(tmp_path / "tok")
    out = tmp_path / "out"
    msg = cli_error(prepare_args(corpus_slice / "inaugural.txt", tok, out, 64, "--dtype", "uint16"), capfd)
    assert "70,002 token ids, more than uint16 shards can hold; use --dtype uint32" in msg
    assert_nothing_written(out)


@pytest.fixture
def damaged(small_prepared, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(small_prepared, copy)
    return copy


def test_truncated_shard(damaged, capfd):
    shard = damaged / "train-00001.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    msg = cli_error(["verify", str(damaged)], capfd)
    assert str(shard) in msg and "truncated" in msg and "--force" in msg
    with pytest.raises(UserError, match="train-00001.arrow"):
        TokenLoader(damaged)


def test_flipped_byte(damaged, capfd):
    shard = damaged / "train-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the token buffer: only the checksum can tell
    shard.write_bytes(bytes(data))
    msg = cli_error(["verify", str(damaged)], capfd)
    assert str(shard) in msg and "sha256 does not match the manifest" in msg


def edit_manifest(directory: Path, edit, reseal: bool = False) -> None:
    from llmtrain.data.shards import seal_manifest

    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(seal_manifest(manifest) if reseal else manifest))


def test_unknown_manifest_schema_version(damaged, capfd):
    edit_manifest(damaged, lambda m: m.update(schema_version=99), reseal=True)
    msg = cli_error(["verify", str(damaged)], capfd)
    assert "manifest schema version 99 is not supported (this llmtrain reads version 2)" in msg
    with pytest.raises(UserError, match="schema version 99"):
        TokenLoader(damaged)


def test_older_manifest_asks_for_a_rebuild(damaged, capfd):
    edit_manifest(damaged, lambda m: m.update(schema_version=1))
    msg = cli_error(["verify", str(damaged)], capfd)
    assert "written by an older llmtrain (manifest schema version 1" in msg and "llmtrain prepare ... --force" in msg


@pytest.mark.parametrize(
    "field, edit",
    [
        ("vocab_size", lambda m: m["tokenizer"].update(vocab_size=50_000)),
        ("fingerprint", lambda m: m["tokenizer"].update(fingerprint="0" * 64)),
        ("max_token_id", lambda m: m["splits"]["train"]["shards"][0].update(max_token_id=5)),
    ],
)
def test_edited_manifest_is_refused_by_every_reader(damaged, capfd, field, edit):
    edit_manifest(damaged, edit)
    assert "does not match its own manifest_sha256" in cli_error(["verify", str(damaged)], capfd)
    with pytest.raises(UserError, match="manifest_sha256"):
        TokenLoader(damaged)


def test_resealed_manifest_is_still_checked(damaged, capfd, small_tokenizer):
    """Hand-edited and re-hashed: the cheap checks and `verify` still compare against the data."""
    edit_manifest(damaged, lambda m: m["tokenizer"].update(vocab_size=1000), reseal=True)  # ids up to 1999
    with pytest.raises(UserError, match=r"holds token ids up to \d+ but the manifest's tokenizer has 1000 ids"):
        TokenLoader(damaged)
    edit_manifest(damaged, lambda m: m["tokenizer"].update(vocab_size=4000), reseal=True)
    assert "is not the one the manifest records (vocab 4000" in cli_error(["verify", str(damaged)], capfd)
    edit_manifest(damaged, lambda m: [s.update(max_token_id=100) for s in m["splits"]["train"]["shards"]], reseal=True)
    edit_manifest(damaged, lambda m: m["tokenizer"].update(vocab_size=2000), reseal=True)
    TokenLoader(damaged)  # the cheap check trusts the recorded maximum; verify recounts it
    assert ", but the manifest says 100 (vocab size 2000)" in cli_error(["verify", str(damaged)], capfd)


def test_swapped_tokenizer_copy(damaged, capfd):
    shutil.rmtree(damaged / "tokenizer")
    shutil.copytree(STORIES260K, damaged / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    msg = cli_error(["verify", str(damaged)], capfd)
    assert str(damaged / "tokenizer") in msg and "the tokenizer copy was replaced or edited" in msg
    with pytest.raises(UserError, match="tokenizer copy was replaced"):
        TokenLoader(damaged)


def test_not_a_prepared_directory(tmp_path, capfd):
    assert "not a prepared directory" in cli_error(["verify", str(tmp_path)], capfd)
    assert "not found" in cli_error(["verify", str(tmp_path / "missing")], capfd)


def test_mixture_weight_not_positive(small_prepared, tmp_path):
    with pytest.raises(UserError, match="weights must be > 0"):
        TokenLoader([(small_prepared, 1.0), (small_prepared, 0)])
    with pytest.raises(UserError, match="data.mixture.0.weight: mixture weight must be > 0"):
        load_config(None, [f"data.mixture=[{{path: {small_prepared}, weight: -1}}]"])


def test_config_unknown_key(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("data:\n  pathh: data/tiny\n")
    with pytest.raises(UserError, match=r"data.pathh: unknown key \(did you mean 'path'\?\)"):
        load_config(cfg)


def test_output_that_is_not_a_prepared_dir(small_tokenizer, corpus_slice, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        msg = cli_error(prepare_args(corpus_slice / "inaugural.txt", small_tokenizer, out, 64, *extra), capfd)
        assert "exists and is not a prepared directory" in msg
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_bad_json_inputs(small_tokenizer, tmp_path, capfd):
    out = tmp_path / "out"
    (tmp_path / "a.jsonl").write_text('{"body": "A perfectly long enough document."}\n')
    msg = cli_error(prepare_args(tmp_path / "a.jsonl", small_tokenizer, out), capfd)
    assert "no column 'text' (columns: body); pass --text-column NAME" in msg
    (tmp_path / "b.jsonl").write_text('{"text": "fine document here, long enough"}\n\n{"text": oops}\n')
    msg = cli_error(prepare_args(tmp_path / "b.jsonl", small_tokenizer, out), capfd)
    assert "not valid JSON Lines (line 3: not valid JSON" in msg  # 1-based, as an editor counts (pyarrow: row 1)
    (tmp_path / "c.jsonl").write_text('{"text": "fine document here, long enough"}\n{"text": 5}\n')
    msg = cli_error(prepare_args(tmp_path / "c.jsonl", small_tokenizer, out), capfd)
    assert "line 2: 'text' is not text but int" in msg
    (tmp_path / "d.json").write_text('[{"text": "fine document here, long enough"}, {"text": 5}]')
    assert "d.json: record 2: column 'text' holds int values" in cli_error(
        prepare_args(tmp_path / "d.json", small_tokenizer, out), capfd
    )
    assert_nothing_written(out)


def test_check_fits_model(small_prepared, small_tokenizer):
    from llmtrain.data.shards import check_fits_model, open_prepared

    data = open_prepared(small_prepared)
    check_fits_model(data, 2000, "m", small_tokenizer, "fix")  # its own tokenizer, a vocabulary that holds every id
    with pytest.raises(UserError, match=rf"holds token ids up to {data.max_token_id} but m has 1000 token ids \(0..999\); fix"):
        check_fits_model(data, 1000, "m", None, "fix")
    with pytest.raises(UserError, match=r"prepared with another tokenizer \(vocab 2000\) than m's \(vocab 512"):
        check_fits_model(data, 2000, "m", STORIES260K, "fix")


def test_tokenizer_command_errors(corpus_slice, small_tokenizer, tmp_path, capfd):
    out = tmp_path / "tok"
    args = ["tokenizer", "--input", str(corpus_slice / "inaugural.txt"), "--output", str(out)]
    assert "--vocab-size 100 is too small" in cli_error(args + ["--vocab-size", "100"], capfd)
    msg = cli_error(args + ["--vocab-size", "60000"], capfd)
    assert "could not train a 60,000-token vocabulary" in msg and "smaller --vocab-size" in msg
    assert_nothing_written(out)
    missing = cli_error(prepare_args(corpus_slice, tmp_path / "no-tok", tmp_path / "d"), capfd)
    assert "tokenizer directory not found" in missing


def test_cli_subprocess_exit_status(tmp_path):
    """The installed entry point: status 2 and a single line on stderr, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "verify", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("llmtrain: error:")
