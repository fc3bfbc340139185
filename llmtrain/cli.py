"""`llmtrain` command line: a thin layer over plain typed functions.

Each sub-command parses its arguments and calls one function from the module that owns the
work (imported lazily so `llmtrain --help` stays fast). A `UserError` anywhere prints one line
`llmtrain: error: ...` and exits with status 2; no traceback.

    llmtrain --help
    llmtrain tokenizer --input corpus/ --vocab-size 8000 --output tok/
    llmtrain prepare --input corpus/ --tokenizer tok/ --seq-len 256 --output data/
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from llmtrain.errors import UserError, run_main
from llmtrain.tasks import TASKS

Command = Callable[[argparse.Namespace], Optional[int]]
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Command]] = []


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register `fn(args)` as sub-command `name`; `arguments(parser)` declares its flags."""

    def register(fn: Command) -> Command:
        _COMMANDS.append((name, help, arguments, fn))
        return fn

    return register


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config keys")


# ---------------------------------------------------------------------------------------------
# Data


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text/JSONL/Parquet files, directories or globs")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--max-sentences", type=int, default=2_000_000, metavar="N", help="sample at most N training sentences")
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--text-column", default="text", help="column holding the text in JSONL/Parquet inputs")


@command("tokenizer", "train a sentencepiece BPE tokenizer (byte fallback, chat tokens)", _tokenizer_args)
def _tokenizer(args: argparse.Namespace) -> None:
    from llmtrain.data.tokenizer_train import train_tokenizer  # on use: `llmtrain --help` loads no torch/ray

    train_tokenizer(
        args.input,
        args.vocab_size,
        args.output,
        max_sentences=args.max_sentences,
        threads=args.threads,
        text_column=args.text_column,
    )


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input", nargs="+", required=True, metavar="PATH", help="text/JSONL/Parquet files, directories, globs or s3:// URIs"
    )
    p.add_argument("--tokenizer", metavar="DIR", help="our tokenizer dir or a Hugging Face checkpoint dir")
    p.add_argument("--seq-len", type=int, metavar="N")
    p.add_argument("--output", metavar="DIR|URI", help="a directory or an object-store prefix (s3://bucket/prefix)")
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F")
    p.add_argument("--shard-tokens", type=int, default=50_000_000, metavar="T", help="approximate tokens per shard")
    p.add_argument("--workers", type=int, default=None, metavar="W", help="default: all cores")
    p.add_argument("--min-chars", type=int, default=16, help="drop documents shorter than this after cleaning")
    p.add_argument("--text-column", default="text", help="column holding the text in JSONL/Parquet inputs")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "uint16", "uint32"], help="token dtype (auto: uint16 when the vocab fits)"
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    p.add_argument(
        "--stages",
        metavar="YAML",
        help="quality / pii / minhash settings (see configs/prepare/web.yaml); the flags below switch each on with its defaults",
    )
    p.add_argument("--quality", action="store_true", help="heuristic quality filters (Gopher/FineWeb defaults)")
    p.add_argument("--pii", action="store_true", help="redact e-mails, IPs, phone and card numbers, secrets")
    p.add_argument("--near-dedup", action="store_true", help="MinHash LSH near-duplicate removal")
    p.add_argument(
        "--executor",
        default="auto",
        choices=["auto", "local", "ray"],
        help="auto: this process for small inputs, Ray Data above 256 MB or with --cluster",
    )
    p.add_argument("--cluster", metavar="ADDRESS", help="run on an existing Ray cluster (ray://HEAD:10001, or auto on a node)")
    p.add_argument("--dry-run", action="store_true", help="show what each stage would drop or redact; write nothing")
    p.add_argument("--sample", type=int, default=1000, metavar="N", help="documents the --dry-run looks at")


def _stage_configs(args: argparse.Namespace) -> dict:
    from pathlib import Path

    import yaml

    stages: dict = {}
    if args.stages:
        try:
            stages = yaml.safe_load(Path(args.stages).read_text()) or {}
        except OSError as err:
            raise UserError(f"--stages {args.stages}: cannot read ({err.strerror}); check the path") from None
        except yaml.YAMLError as err:
            raise UserError(f"--stages {args.stages}: not valid YAML ({str(err).splitlines()[0]}); fix the file") from None
        unknown = sorted(set(stages) - {"quality", "pii", "minhash"}) if isinstance(stages, dict) else ["(not a mapping)"]
        if unknown:
            raise UserError(f"--stages {args.stages}: unknown section {unknown[0]}; use quality, pii and minhash")
    for flag, key in (("quality", "quality"), ("pii", "pii"), ("near_dedup", "minhash")):
        if getattr(args, flag):
            stages[key] = {**(stages.get(key) or {}), "enabled": True}
    return stages


@command(
    "prepare", "clean, filter, deduplicate, tokenize and pack text into Arrow token shards (local or Ray Data)", _prepare_args
)
def _prepare(args: argparse.Namespace) -> None:
    stages = _stage_configs(args)
    if args.dry_run:
        from llmtrain.data.preview import preview  # on use: `llmtrain --help` loads no torch/ray

        preview(args.input, sample=args.sample, text_column=args.text_column, min_chars=args.min_chars, **stages)
        return
    missing = [
        flag for flag, v in (("--tokenizer", args.tokenizer), ("--seq-len", args.seq_len), ("--output", args.output)) if v is None
    ]
    if missing:
        raise UserError(f"llmtrain prepare needs {', '.join(missing)} (only --dry-run runs without them)")
    from llmtrain.prepare_ray import prepare_job  # on use: `llmtrain --help` loads no torch/ray

    prepare_job(
        args.input,
        executor=args.executor,
        cluster=args.cluster,
        workers=args.workers,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        output=args.output,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        min_chars=args.min_chars,
        text_column=args.text_column,
        force=args.force,
        dtype=args.dtype,
        **stages,
    )


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a prepared directory")


@command("verify", "check every shard of a prepared directory against its manifest (sha256)", _verify_args)
def _verify(args: argparse.Namespace) -> None:
    from llmtrain.data.shards import verify  # on use: `llmtrain --help` loads no torch/ray

    verify(args.dir)


# ---------------------------------------------------------------------------------------------
# Training and models


@command("pretrain", "pretrain a decoder on prepared token shards (Ray Train + DeepSpeed ZeRO)", _config_args)
def _pretrain(args: argparse.Namespace) -> None:
    from llmtrain.config import load_config  # on use: `llmtrain --help` loads no torch/ray
    from llmtrain.launch import launch  # on use: `llmtrain --help` loads no torch/ray
    from llmtrain.run_summary import print_run_summary  # on use: `llmtrain --help` loads no torch/ray

    cfg = load_config(args.config, args.overrides)
    launch(cfg, "pretrain", started=_process_start())
    print_run_summary(cfg.run.dir)


@command("sft", "supervised fine-tuning, full or LoRA (a lora: section), of a run or a released checkpoint", _config_args)
def _sft(args: argparse.Namespace) -> None:
    _finetune("sft", args)


@command("dpo", "preference tuning (DPO, IPO, SimPO), full or LoRA, of a run or a released checkpoint", _config_args)
def _dpo(args: argparse.Namespace) -> None:
    _finetune("dpo", args)


def _finetune(task: str, args: argparse.Namespace) -> None:
    from llmtrain.config import load_config  # on use: `llmtrain --help` loads no torch/ray
    from llmtrain.launch import launch  # on use: `llmtrain --help` loads no torch/ray
    from llmtrain.run_summary import print_run_summary  # on use: `llmtrain --help` loads no torch/ray
    from llmtrain.tasks.sft import print_report  # on use: `llmtrain --help` loads no torch/ray

    cfg = load_config(args.config, args.overrides)
    launch(cfg, task, started=_process_start())
    print_run_summary(cfg.run.dir)
    print_report(cfg.run.dir)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (its newest checkpoint) or one checkpoint directory")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--step", type=int, default=None, help="export the checkpoint of this step instead of the newest")
    p.add_argument(
        "--merge", action="store_true", help="LoRA runs: write the base with the adapter merged (default: the adapter)"
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="dtype of the written weights (default: the base's, as its config.json says; fp32 for runs without a base)",
    )


@command(
    "export", "write a checkpoint as a Hugging Face model directory (any ZeRO stage), or a LoRA run's PEFT adapter", _export_args
)
def _export(args: argparse.Namespace) -> None:
    from llmtrain.export import export  # on use: `llmtrain --help` loads no torch/ray

    out = export(args.run_dir, args.output, step=args.step, merge=args.merge, dtype=args.dtype)
    print(f"exported {out}")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face-format directory (an export or a released checkpoint)")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter for MODEL_DIR (e.g. RUN_DIR/adapter)")
    p.add_argument("--data", metavar="PREPARED_DIR", help="perplexity on the validation split of a prepared directory")
    p.add_argument("--batches", type=int, default=16, metavar="N", help="perplexity: batches of 8 rows to read")
    p.add_argument("--task", metavar="FILE", help="accuracy on labelled JSONL/JSON/Parquet records (text, label)")
    p.add_argument("--template", default=None, help='prompt built from a record, e.g. "Review: {text}\\nSentiment:"')
    p.add_argument("--label-word", action="append", default=[], metavar="LABEL=WORD", help="the answer text of a label (repeat)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--chat-template", default="auto", help="auto | checkpoint | llmtrain | plain | completion | FILE.jinja")
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="accuracy: at most N records")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="generate a continuation (repeat)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


@command("eval", "perplexity on prepared data, accuracy on a labelled task, generations (optionally with an adapter)", _eval_args)
def _eval(args: argparse.Namespace) -> None:
    from llmtrain.evaluate import eval_command  # on use: `llmtrain --help` loads no torch/ray

    task = None
    if args.task is not None:
        from llmtrain.config import DataSection, cli_text  # on use: `llmtrain --help` loads no torch/ray

        words = dict(w.split("=", 1) for w in args.label_word if "=" in w)
        if len(words) != len(args.label_word):
            raise UserError("--label-word takes LABEL=WORD, e.g. --label-word positive=' positive'")
        task = DataSection(
            path=args.task,
            format="labelled",
            template=None if args.template is None else cli_text(args.template),
            label_words=words or None,
            text_field=args.text_field,
            label_field=args.label_field,
            chat_template=args.chat_template,
        )
    eval_command(
        args.model_dir,
        args.adapter,
        args.data,
        args.batches,
        task,
        args.limit,
        args.prompt,
        args.chat,
        args.max_new_tokens,
        args.temperature,
        args.seed,
        args.json,
    )


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face-format directory (an export or a released checkpoint)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, metavar="K")
    p.add_argument("--top-p", type=float, default=None, metavar="P")
    p.add_argument("--seed", type=int, default=None, metavar="S")


@command("generate", "complete prompts with a Hugging Face-format model (greedy or sampling, KV cache)", _generate_args)
def _generate(args: argparse.Namespace) -> None:
    from llmtrain.generate import complete  # on use: `llmtrain --help` loads no torch/ray

    texts = complete(
        args.model_dir,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    print("\n\n".join(texts))


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", metavar="PATH", help="text/JSONL/Parquet inputs (default: text shipped with Python)")
    p.add_argument("--output", default="runs/quickstart", metavar="DIR")
    p.add_argument("--steps", type=int, default=200, help="pretraining steps")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--sft-steps", type=int, default=60, help="steps of the SFT and of the LoRA run after pretraining (0: skip)")
    p.add_argument("--sft-data", metavar="FILE", help="chat or prompt/response records (default: made from the corpus)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override pretraining config keys")


@command(
    "quickstart",
    "tokenizer -> prepare -> pretrain (local Ray, 2 CPU workers) -> export -> generate -> SFT and LoRA",
    _quickstart_args,
)
def _quickstart(args: argparse.Namespace) -> None:
    from llmtrain.quickstart import quickstart  # on use: `llmtrain --help` loads no torch/ray

    quickstart(
        args.output,
        corpus=args.corpus,
        steps=args.steps,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        workers=args.workers,
        overrides=args.overrides,
        sft_steps=args.sft_steps,
        sft_data=args.sft_data,
    )


# ---------------------------------------------------------------------------------------------
# Clusters (Ray Jobs API)


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="the cluster's Jobs API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )


def _submit_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    _address_arg(p)
    p.add_argument("--task", default="pretrain", choices=list(TASKS), help="what the job runs (default: pretrain)")
    p.add_argument("--follow", action="store_true", help="print the job's logs until it ends; exit 0 only if it succeeded")
    p.add_argument(
        "--no-resource-check",
        action="store_true",
        help="submit even if the alive nodes cannot hold the workers (autoscaling clusters)",
    )


@command(
    "submit", "submit a training job to a Ray cluster (Jobs API) with this checkout's code and the resolved config", _submit_args
)
def _submit(args: argparse.Namespace) -> int:
    from llmtrain.submit import submit  # on use: `llmtrain --help` loads no torch/ray

    return submit(
        args.config, args.overrides, args.address, task=args.task, follow=args.follow, resource_check=not args.no_resource_check
    )


def _jobs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", metavar="JOB_ID", help="for status, logs and stop")
    _address_arg(p)
    p.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")


@command("jobs", "list jobs on a Ray cluster, or show the status / logs of one, or stop it", _jobs_args)
def _jobs(args: argparse.Namespace) -> int:
    from llmtrain.submit import jobs  # on use: `llmtrain --help` loads no torch/ray

    return jobs(args.action, args.job_id, args.address, follow=args.follow)


# ---------------------------------------------------------------------------------------------


def _process_start() -> float:
    """When this command's process started (unix time), for the start-up breakdown."""
    import psutil

    return psutil.Process().create_time()


class Parser(argparse.ArgumentParser):
    """argparse with our error format: one line naming the command and the fix, exit 2 (not the
    usage block; `--help` still prints it)."""

    def error(self, message: str):
        command = self.prog.removeprefix("llmtrain").strip()
        where = f"{command}: " if command else ""
        print(f"llmtrain: error: {where}{message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="llmtrain",
        description="Distributed training of decoder language models on Ray + DeepSpeed.",
    )
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, arguments, fn in _COMMANDS:
        p = subs.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        p.set_defaults(_fn=fn)
    return parser


def _submit_prepare_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="llmtrain submit prepare",
        description="submit `llmtrain prepare` to a Ray cluster (Jobs API); it runs on Ray Data there",
    )
    _prepare_args(p)
    _address_arg(p)
    p.add_argument("--follow", action="store_true", help="print the job's logs until it ends; exit 0 only if it succeeded")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["submit", "prepare"]:  # `llmtrain submit prepare --input ...`: prepare's own flags
        args = _submit_prepare_parser().parse_args(argv[2:])

        def submit_prepare() -> int:
            from llmtrain.submit import submit_prepare  # on use: `llmtrain --help` loads no torch/ray

            return submit_prepare(args, args.address, follow=args.follow)

        return run_main(submit_prepare)
    args = build_parser().parse_args(argv)
    return run_main(lambda: args._fn(args))


if __name__ == "__main__":
    sys.exit(main())
