"""The bad-input battery, part 1: configs and overrides, and the jobs that read them (pretrain,
sft, dpo), export, eval and generate. One row per mistake (tests/bad_input.py): the exit code,
the phrase of the one-line error, no traceback, a time bound, and the run or output directory
exactly as before (every check runs on the driver before Ray or any worker starts)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from bad_input import Case, Env, battery
from runtime_support import torchrun

_lock = threading.Lock()


def finished_run(env: Env) -> Path:
    """A 2-step single-process pretraining run with checkpoints at steps 1 and 2 (made once)."""
    run = env.tmp.parent / "_finished-run"
    with _lock:
        if not (run / "checkpoints" / "step_00000002").is_dir():
            torchrun(1, [f"data.path={env.data}", f"run.dir={run}", "train.max_steps=2", "checkpoint.every=1", "zero.stage=1"])
    return run


def other_data(env: Env) -> Path:
    """The same corpus and tokenizer prepared with another validation split: other rows."""
    from conftest import CORPUS

    from llmtrain.data.prepare import prepare

    out = env.tmp.parent / "_other-data"
    with _lock:
        if not (out / "manifest.json").is_file():
            prepare(
                [str(CORPUS / "tinystories_val_subset.txt")],
                tokenizer=str(env.tok),
                seq_len=64,
                output=str(out),
                val_fraction=0.1,
            )
    return out


def copy_run(env: Env) -> None:
    shutil.copytree(finished_run(env), env.tmp / "run")


def write(name: str, text: str):
    return lambda env: (env.tmp / name).write_text(text)


def write_bytes(name: str, data: bytes):
    return lambda env: (env.tmp / name).write_bytes(data)


def jsonl(name: str, records: list, extra: str = ""):
    return write(name, "".join(json.dumps(r) + "\n" for r in records) + extra)


def base_copy(damage=None):
    """stories260K copied to {tmp}/base, then `damage(base_dir)`."""

    def setup(env: Env) -> None:
        base = env.tmp / "base"
        shutil.copytree(env.stories, base)
        if damage is not None:
            damage(base)

    return setup


def truncate_weights(base: Path) -> None:
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def garbage_weights(base: Path) -> None:
    (base / "model.safetensors").write_bytes(b"\xff" * 64)


def edit_config(**fields):
    def damage(base: Path) -> None:
        config = json.loads((base / "config.json").read_text())
        config.update(fields)
        (base / "config.json").write_text(json.dumps(config))

    return damage


def only_pickle(base: Path) -> None:
    (base / "model.safetensors").rename(base / "pytorch_model.bin")


def both(*setups):
    def setup(env: Env) -> None:
        for s in setups:
            s(env)

    return setup


PAIRS = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(40)]
LABELLED = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(40)]
PRE = ["pretrain", "{config}", "data.path={data}", "run.dir={tmp}/run", "cluster.num_workers=1"]
SFT = ["sft", "{repo}/configs/tiny-sft.yaml", "model.from={tmp}/base", "data.path={tmp}/pairs.jsonl", "run.dir={tmp}/run"]
RUN = ["{tmp}/run"]

CASES = [
    # -- the command line itself: one line, not a usage block
    Case("cli-unknown-command", ["nope"], "invalid choice: 'nope'"),
    Case("cli-no-command", [], "the following arguments are required: COMMAND"),
    Case(
        "cli-missing-flag",
        ["prepare", "--input", "x", "--tokenizer", "{tok}", "--seq-len", "64"],
        "llmtrain prepare needs --output (only --dry-run runs without them)",
    ),
    Case(
        "cli-not-a-number",
        ["prepare", "--input", "x", "--tokenizer", "{tok}", "--seq-len", "abc", "--output", "{tmp}/o"],
        "argument --seq-len: invalid int value: 'abc'",
        unchanged=["{tmp}/o"],
    ),
    Case("cli-unknown-task", ["submit", "{config}", "--task", "distill"], "submit: argument --task: invalid choice: 'distill'"),
    Case("cli-unknown-flag", ["export", "{tmp}/run", "--output", "{tmp}/o", "--mrege"], "unrecognized arguments: --mrege"),
    # -- config files
    Case("config-empty-file", ["pretrain", "{tmp}/empty.yaml"], "the config file is empty", setup=write("empty.yaml", "")),
    Case(
        "config-only-comments",
        ["pretrain", "{tmp}/c.yaml", "run.dir={tmp}/run"],
        "the config file is empty",
        setup=write("c.yaml", "# train:\n#   max_steps: 3\n"),
        unchanged=RUN,
    ),
    Case("config-missing", ["pretrain", "{tmp}/nope.yaml"], "config file not found"),
    Case(
        "config-invalid-yaml",
        ["sft", "{tmp}/c.yaml"],
        "invalid YAML at line 3",
        setup=write("c.yaml", "train:\n  max_steps: [3\n"),
    ),
    Case(
        "config-top-level-list", ["pretrain", "{tmp}/c.yaml"], "top level must be a mapping", setup=write("c.yaml", "- train\n")
    ),
    Case(
        "config-binary-file", ["dpo", "{tmp}/c.yaml"], "not a UTF-8 text file", setup=write_bytes("c.yaml", b"\xff\xfe\x00\x81")
    ),
    Case(
        "config-unknown-key-in-file",
        ["pretrain", "{tmp}/c.yaml"],
        "train.max_stpes: unknown key (did you mean 'max_steps'?)",
        setup=write("c.yaml", "train:\n  max_stpes: 3\n"),
    ),
    # -- overrides: typed by the schema, errors name the override
    Case(
        "override-unknown-key",
        [*PRE, "train.max_stpes=3"],
        "override train.max_stpes=3: train.max_stpes: unknown key",
        unchanged=RUN,
    ),
    Case("override-unknown-section", [*PRE, "trian.max_steps=3"], "did you mean 'train'?", unchanged=RUN),
    Case("override-without-equals", [*PRE, "train.max_steps"], "expected key.sub=value", unchanged=RUN),
    Case("override-empty-key-part", [*PRE, "train..max_steps=3"], "expected key.sub=value", unchanged=RUN),
    Case("override-wrong-type", [*PRE, "train.max_steps=many"], "override train.max_steps=many: train.max_steps:", unchanged=RUN),
    Case(
        "override-bad-structured-value",
        [*PRE, "data.label_words=[a"],
        "override data.label_words=[a: not a valid value",
        unchanged=RUN,
    ),
    Case("override-into-a-value", [*PRE, "train=5", "train.max_steps=3"], "'train' is not a section", unchanged=RUN),
    Case(
        "override-out-of-range",
        [*PRE, "zero.stage=4"],
        "override zero.stage=4: zero.stage: Input should be less than or equal to 3",
    ),
    Case("override-bad-choice", [*PRE, "data.format=xml"], "override data.format=xml: data.format: Input should be"),
    Case("override-offload-needs-stage-3", [*PRE, "zero.offload_params=true"], "offload_params needs stage 3", unchanged=RUN),
    Case(
        "stop-at-step-beyond-max-steps",
        [*PRE, "train.max_steps=10", "train.stop_at_step=50"],
        "stop_at_step=50 is beyond max_steps=10",
        unchanged=RUN,
    ),
    # a prompt with ': ' and '{...}' is text, not YAML: the job gets as far as the (missing) data
    Case(
        "override-template-is-text",
        [*SFT, "data.template=Review: {{text}}\\nSentiment:", "data.format=labelled", "data.path={tmp}/nope.jsonl"],
        "data.path",
        setup=base_copy(),
        unchanged=RUN,
    ),
    Case(
        "override-system-prompt-is-text",
        [*SFT, "data.system_prompt=Note: be nice", "data.path={tmp}/nope.jsonl"],
        "data.path",
        setup=base_copy(),
        unchanged=RUN,
    ),
    # -- pretrain: batch layout, data, model, resume
    Case("pretrain-workers-do-not-divide-batch", [*PRE, "cluster.num_workers=3"], "is not divisible", unchanged=RUN),
    Case("pretrain-no-data", ["pretrain", "{config}", "data.path=null", "run.dir={tmp}/run"], "no training data", unchanged=RUN),
    Case("pretrain-missing-data", [*PRE[:2], "data.path={tmp}/nothing", "run.dir={tmp}/run"], "not found", unchanged=RUN),
    Case(
        "pretrain-seq-len-beyond-positions", [*PRE, "model.max_seq_len=32"], "longer than the model's 32 positions", unchanged=RUN
    ),
    Case("pretrain-unknown-preset", [*PRE, "model.preset=huge"], "huge", unchanged=RUN),
    Case("pretrain-run-dir-is-a-file", [*PRE[:3], "run.dir={tmp}/f"], "not a directory", setup=write("f", "x")),
    Case(
        "pretrain-truncated-base",
        [*PRE, "model.from={tmp}/base"],
        "truncated download or copy",
        setup=base_copy(truncate_weights),
        unchanged=RUN,
        within_s=30,
    ),
    Case(
        "resume-with-other-data",
        [*PRE[:2], "data.path=" + "{tmp}/../_other-data", "run.dir={tmp}/run", "cluster.num_workers=1", "zero.stage=1"],
        "holds checkpoint step_00000002 of another run",
        setup=both(copy_run, other_data),
        unchanged=RUN,
        within_s=40,
    ),
    Case(
        "resume-other-world-size",
        [*PRE[:4], "cluster.num_workers=2", "zero.stage=1"],
        "was written by 1 workers, this run has 2",
        setup=copy_run,
        unchanged=RUN,
        within_s=40,
    ),
    Case(
        "resume-other-zero-stage",
        [*PRE, "zero.stage=2"],
        "written with zero.stage=1",
        setup=copy_run,
        unchanged=RUN,
        within_s=40,
    ),
    Case(
        "resume-never-with-checkpoints",
        [*PRE, "zero.stage=1", "train.resume=never"],
        "already holds checkpoints and train.resume=never",
        setup=copy_run,
        unchanged=RUN,
        within_s=40,
    ),
    Case("resume-from-missing-path", [*PRE, "train.resume={tmp}/nope"], "no such checkpoint directory", unchanged=RUN),
    # -- sft: the base and the records, all checked before anything is written
    Case(
        "sft-truncated-base",
        SFT,
        "truncated download or copy",
        setup=both(base_copy(truncate_weights), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case(
        "sft-garbage-weights",
        SFT,
        "header unreadable",
        setup=both(base_copy(garbage_weights), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case(
        "sft-model-vocab-below-tokenizer",
        SFT,
        "the tokenizer has 512 tokens but model",
        setup=both(base_copy(edit_config(vocab_size=100)), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case(
        "sft-config-does-not-match-weights",
        SFT,
        "the weights do not belong to this config",
        setup=both(base_copy(edit_config(intermediate_size=96)), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case(
        "sft-unsupported-architecture",
        SFT,
        "gpt2",
        setup=both(base_copy(edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"])), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case(
        "sft-pickle-weights-only",
        SFT,
        "safetensors only",
        setup=both(base_copy(only_pickle), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case("sft-base-missing", SFT, "model.from=", setup=jsonl("pairs.jsonl", PAIRS), unchanged=RUN),
    Case(
        "sft-no-base-no-tokenizer",
        ["sft", "{repo}/configs/tiny-sft.yaml", "model.from=null", "data.path={tmp}/p.jsonl", "run.dir={tmp}/run"],
        "sft needs a base",
        setup=jsonl("p.jsonl", PAIRS),
        unchanged=RUN,
    ),
    Case("sft-data-missing", SFT, "pairs.jsonl", setup=base_copy(), unchanged=RUN),
    Case(
        "sft-bad-json-line",
        SFT,
        "pairs.jsonl line 41: not valid JSON",
        setup=both(base_copy(), jsonl("pairs.jsonl", PAIRS, '{"prompt": "x", "response": \n')),
        unchanged=RUN,
    ),
    Case(
        "sft-unknown-label",
        [*SFT, "data.format=labelled", "data.label_words={{pos: ' good'}}"],
        "has label 'neg', not one of the label words (pos)",
        setup=both(base_copy(), jsonl("pairs.jsonl", LABELLED)),
        unchanged=RUN,
    ),
    Case(
        "sft-template-field-missing",
        [*SFT, "data.template=Q: {{question}}"],
        "has no field 'question'",
        setup=both(base_copy(), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case(
        "sft-no-assistant-turn",
        [*SFT, "data.format=chat"],
        "no assistant message",
        setup=both(base_copy(), jsonl("pairs.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4)),
        unchanged=RUN,
    ),
    Case(
        "sft-seq-len-beyond-positions",
        [*SFT, "data.seq_len=100000"],
        "is longer than the model's",
        setup=both(base_copy(), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case(
        "sft-given-preference-data",
        [*SFT, "data.format=preference"],
        "train it with `llmtrain dpo`",
        setup=both(base_copy(), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case(
        "sft-failed-check-keeps-existing-run-dir",
        [*SFT, "data.format=labelled", "data.label_words={{pos: ' good', neg: ' bad'}}"],
        "has label",
        setup=both(
            base_copy(),
            jsonl("pairs.jsonl", LABELLED[:1] + [{"text": "x", "label": "?"}]),
            lambda env: (env.tmp / "run").mkdir(),
            write("run/config.yaml", "earlier: run\n"),
        ),
        unchanged=RUN,
    ),
    Case(
        "sft-lora-target-matches-nothing",
        [*SFT, "lora.target_modules=[nope_proj]"],
        "'nope_proj' selects nothing to adapt",
        setup=both(base_copy(), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case(
        "sft-freeze-layers-out-of-range",
        [*SFT, "finetune.freeze_layers=0-99"],
        "the model has 5 blocks (0-4)",
        setup=both(base_copy(), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    # -- dpo
    Case(
        "dpo-reference-missing",
        [
            "dpo",
            "{repo}/configs/tiny-dpo.yaml",
            "model.from={stories}",
            "data.path={tmp}/p.jsonl",
            "run.dir={tmp}/run",
            "dpo.reference={tmp}/nope",
        ],
        "dpo.reference=",
        setup=jsonl("p.jsonl", PAIRS),
        unchanged=RUN,
    ),
    Case(
        "dpo-given-sft-pairs",
        ["dpo", "{repo}/configs/tiny-dpo.yaml", "model.from={tmp}/base", "data.path={tmp}/pairs.jsonl", "run.dir={tmp}/run"],
        "chosen",
        setup=both(base_copy(), jsonl("pairs.jsonl", PAIRS)),
        unchanged=RUN,
    ),
    Case(
        "dpo-ipo-with-label-smoothing",
        ["dpo", "{repo}/configs/tiny-dpo.yaml", "dpo.loss_type=ipo", "dpo.label_smoothing=0.1", "run.dir={tmp}/run"],
        "label_smoothing is not defined for loss_type=ipo",
        unchanged=RUN,
    ),
    # -- export
    Case(
        "export-step-that-does-not-exist",
        ["export", "{tmp}/run", "--step", "99", "--output", "{tmp}/out"],
        "complete checkpoints are at steps 1, 2",
        setup=copy_run,
        unchanged=["{tmp}/out"],
        within_s=40,
    ),
    Case(
        "export-not-a-run", ["export", "{tmp}", "--output", "{tmp}/out"], "no complete checkpoint found", unchanged=["{tmp}/out"]
    ),
    Case(
        "export-all-checkpoints-damaged",
        ["export", "{tmp}/run", "--output", "{tmp}/out"],
        "no complete checkpoint found",
        setup=both(copy_run, lambda env: [p.unlink() for p in (env.tmp / "run" / "checkpoints").rglob("*optim_states.pt")]),
        unchanged=["{tmp}/out"],
        within_s=40,
    ),
    Case(
        "export-merge-of-a-released-model",
        ["export", "{stories}", "--output", "{tmp}/out", "--merge"],
        "no complete checkpoint found",
        unchanged=["{tmp}/out"],
    ),
    # -- quickstart: every flag and override checked before its first file
    Case(
        "quickstart-zero-steps",
        ["quickstart", "--steps", "0", "--output", "{tmp}/q"],
        "--steps 0: must be at least 1",
        unchanged=["{tmp}/q"],
    ),
    Case(
        "quickstart-missing-corpus",
        ["quickstart", "--corpus", "{tmp}/nope", "--output", "{tmp}/q"],
        "--corpus",
        unchanged=["{tmp}/q"],
    ),
    Case(
        "quickstart-tiny-vocab",
        ["quickstart", "--vocab-size", "10", "--output", "{tmp}/q"],
        "--vocab-size 10: must be at least 512",
        unchanged=["{tmp}/q"],
    ),
    Case(
        "quickstart-bad-override",
        ["quickstart", "--output", "{tmp}/q", "train.lr=fast"],
        "override train.lr=fast",
        unchanged=["{tmp}/q"],
    ),
    # -- eval and generate
    Case(
        "eval-adapter-missing", ["eval", "{stories}", "--adapter", "{tmp}/nope", "--prompt", "hi"], "not a PEFT adapter directory"
    ),
    Case("eval-nothing-to-do", ["eval", "{stories}"], "nothing to evaluate"),
    Case("eval-model-dir-missing", ["eval", "{tmp}/nope", "--prompt", "hi"], "no config.json"),
    Case(
        "eval-label-word-without-equals",
        ["eval", "{stories}", "--task", "{tmp}/t.jsonl", "--label-word", "pos"],
        "takes LABEL=WORD",
    ),
    Case(
        "eval-unknown-label",
        ["eval", "{stories}", "--task", "{tmp}/t.jsonl", "--label-word", "pos= good"],
        "has label 'neg', not one of the label words (pos)",
        setup=jsonl("t.jsonl", LABELLED),
    ),
    Case(
        "eval-template-field-missing",
        ["eval", "{stories}", "--task", "{tmp}/t.jsonl", "--template", "Q: {{question}}\\nA:"],
        "has no field 'question'",
        setup=jsonl("t.jsonl", LABELLED),
    ),
    Case("eval-task-file-missing", ["eval", "{stories}", "--task", "{tmp}/t.jsonl"], "t.jsonl"),
    Case(
        "generate-no-weights",
        ["generate", "{tmp}/base", "--prompt", "hi"],
        "no model.safetensors",
        setup=base_copy(lambda b: (b / "model.safetensors").unlink()),
    ),
    Case(
        "generate-negative-temperature",
        ["generate", "{stories}", "--prompt", "hi", "--temperature", "-1"],
        "--temperature -1: must be >= 0",
    ),
    Case(
        "generate-zero-new-tokens",
        ["generate", "{stories}", "--prompt", "hi", "--max-new-tokens", "0"],
        "--max-new-tokens 0: must be >= 1",
    ),
    Case(
        "generate-top-p-out-of-range",
        ["generate", "{stories}", "--prompt", "hi", "--top-p", "1.5"],
        "--top-p 1.5: must be in (0, 1]",
    ),
]

test_case = battery(CASES)
