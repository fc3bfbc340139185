"""Bad input to `llmtrain prepare`'s stages, executors and object storage (issue 9, section 6):
thresholds out of range, unknown settings, executor flags that contradict each other, an S3
endpoint that refuses or never answers: one line naming the problem and the fix, exit 2, within
seconds, and the output never created. (Wrong credentials and a missing bucket need the S3
server: tests/test_prepare_s3.py.)

    .venv/bin/pytest -q tests/test_bad_input_prepare.py
"""

from __future__ import annotations

from bad_input import Case, Env, battery

CORPUS_FILE = "{stories}/../../data/corpus/tinystories_val_subset.txt"
PREPARE = ["prepare", "--input", CORPUS_FILE, "--tokenizer", "{tok}", "--seq-len", "64", "--output", "{tmp}/out"]
S3_ENV = {"AWS_ACCESS_KEY_ID": "llmtrain-test", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret", "AWS_REGION": "us-east-1"}


def stages(text: str):
    def setup(env: Env) -> None:
        (env.tmp / "stages.yaml").write_text(text)

    return setup


def row(id: str, yaml_text: str, phrase: str) -> Case:
    return Case(
        id, [*PREPARE, "--stages", "{tmp}/stages.yaml"], phrase, within_s=20, setup=stages(yaml_text), unchanged=["{tmp}/out"]
    )


CASES = [
    row(
        "threshold-out-of-range",
        "quality:\n  max_symbol_word_ratio: 1.5\n",
        "quality.max_symbol_word_ratio 1.5 must be in [0, 1]",
    ),
    row("quality-unknown-key", "quality:\n  min_wrds: 3\n", "quality.min_wrds is not a setting; valid keys:"),
    row("unknown-section", "dedupe:\n  enabled: true\n", "unknown section dedupe; use quality, pii and minhash"),
    row("minhash-bands-zero", "minhash:\n  bands: 0\n", "minhash.bands = 0: must be an integer in 1..127"),
    row("pii-unknown-kind", "pii:\n  kinds: [ssn]\n", "'ssn' is not a PII kind"),
    row("stages-not-yaml", "quality: [\n", "not valid YAML"),
    Case(
        "local-with-cluster",
        [*PREPARE, "--executor", "local", "--cluster", "ray://head:10001"],
        "cannot use --cluster",
        within_s=20,
    ),
    Case("workers-zero", [*PREPARE, "--executor", "ray", "--workers", "0"], "--workers 0 must be at least 1", within_s=20),
    Case(
        "no-tokenizer",
        ["prepare", "--input", CORPUS_FILE, "--seq-len", "64", "--output", "{tmp}/out"],
        "needs --tokenizer",
        within_s=20,
    ),
    Case(
        "s3-output-refused",
        [*PREPARE[:-1], "s3://bucket/data"],
        "cannot reach the S3 endpoint http://127.0.0.1:1 (connection refused); check AWS_ENDPOINT_URL",
        within_s=15,
        env={**S3_ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"},
    ),
    Case(
        "s3-input-silent",
        ["prepare", "--input", "s3://bucket/corpus/", "--tokenizer", "{tok}", "--seq-len", "64", "--output", "{tmp}/out"],
        "(no answer in time); check AWS_ENDPOINT_URL",
        within_s=25,
        env={**S3_ENV, "AWS_ENDPOINT_URL": "http://{silent}"},
        unchanged=["{tmp}/out"],
    ),
    Case(
        "s3-credentials-in-uri",
        [*PREPARE[:-1], "s3://AKIAEXAMPLE:hunter2@bucket/data"],
        "credentials",
        within_s=15,
        env={**S3_ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"},
    ),
]

test_case = battery(CASES)
