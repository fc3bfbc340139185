"""Typed job configuration: YAML file + dotted `key.sub=value` overrides -> `JobConfig`.

Every section forbids unknown keys. A mistake becomes one `UserError` line that names the
file, the key and the fix, e.g.

    configs/tiny-pretrain.yaml: train.max_stpes: unknown key (did you mean 'max_steps'?)

Usage:
    cfg = load_config("configs/tiny-pretrain.yaml", ["train.max_steps=20", "zero.stage=3"])
    write_resolved_config(cfg, cfg.run.dir)   # RUN_DIR/config.yaml
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmtrain.data.atomic import atomic_write_text
from llmtrain.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class RunSection(Section):
    dir: Path = Path("runs/default")
    seed: int = 0


class ModelSection(Section):
    preset: str = "tiny"
    """Named architecture preset (llmtrain.model.presets); ignored when `from` is set."""
    from_: Optional[str] = Field(default=None, alias="from")
    """Start from weights: a Hugging Face checkpoint directory, one of our run directories,
    or one checkpoint directory inside a run."""
    vocab_size: Optional[int] = Field(default=None, ge=2)
    """Default: the tokenizer's vocabulary size (from the data manifest)."""
    max_seq_len: Optional[int] = Field(default=None, ge=2)
    activation_checkpointing: Optional[bool] = None
    """Recompute each block's activations in the backward pass. Default: on for QLoRA
    (`lora.quantize`, as peft's prepare_model_for_kbit_training does), off otherwise."""


def _location(path: Any) -> Any:
    """An object-store URI (s3://bucket/prefix) stays text (a Path would fold its //); anything
    else path-like becomes a Path (pydantic reports the rest)."""
    from llmtrain.data.objstore import is_uri  # on use: `llmtrain --help` loads no numpy

    return path if path is None or is_uri(path) or not isinstance(path, (str, os.PathLike)) else Path(path)


class MixtureEntry(Section):
    path: Union[Path, str]
    """A prepared directory or an object-store URI of one (s3://bucket/prefix)."""
    weight: float

    @field_validator("path", mode="before")
    @classmethod
    def _uri_or_path(cls, path: Any) -> Any:
        return _location(path)

    @field_validator("weight")
    @classmethod
    def _positive(cls, weight: float) -> float:
        if not weight > 0:
            raise ValueError(f"mixture weight must be > 0, got {weight}; give every source a positive weight or remove it")
        return weight


class DataSection(Section):
    path: Optional[Union[Path, str]] = None
    """Pretraining: a prepared directory (`llmtrain prepare`), or its object-store URI
    (s3://bucket/prefix; credentials from the AWS_* environment), read through each node's shard
    cache (`cache_dir`, `cache_bytes`). SFT: a JSONL/JSON/Parquet file."""
    mixture: list[MixtureEntry] = Field(default_factory=list)
    """Pretraining alternative to `path`: several prepared directories with sampling weights."""

    # SFT (`llmtrain sft`; llmtrain/data/sft.py) and preference data (llmtrain/data/preference.py):
    # how records become training examples.
    format: Literal["auto", "chat", "pairs", "labelled", "preference"] = "auto"
    """chat: {"messages": [{"role", "content"}, ...]}; pairs: prompt/response fields; labelled:
    text/label fields turned into prompt -> label word by `template`; auto: from the first record.
    preference (`llmtrain dpo`; llmtrain/data/preference.py): a prompt (or `messages`) with a
    chosen and a rejected answer; preference data reads only this format (auto means it too)."""
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    text_field: str = "text"
    label_field: str = "label"
    chosen_field: str = "chosen"
    """preference: the preferred answer (a string, one {role, content} message or a list of them)."""
    rejected_field: str = "rejected"
    """preference: the dispreferred answer, in the same forms as `chosen_field`."""
    template: Optional[str] = None
    """Prompt built from a record's fields (Python format syntax), e.g. "Review: {text}\nSentiment:"."""
    label_words: Optional[dict[str, str]] = None
    """labelled: the response text for each label (default: the label itself)."""
    system_prompt: Optional[str] = None
    """pairs/labelled: a system message put before every prompt."""
    chat_template: str = "auto"
    """auto | checkpoint | llmtrain | plain | completion | PATH.jinja (llmtrain/data/chat.py)."""
    tokenizer: Optional[Path] = None
    """Default: the base model's tokenizer (needed when training from a preset)."""
    seq_len: Optional[int] = Field(default=None, ge=8)
    """Row length; default: the model's positions, at most 2048."""
    packing: bool = True
    """Several examples per row (attention stays inside each); false: one padded example per row."""
    truncation: Literal["error", "drop", "truncate"] = "error"
    """Examples longer than seq_len: stop with their count, drop them, or cut them to seq_len."""
    pair_truncation: Literal["prompt_first", "drop", "error"] = "prompt_first"
    """preference: a pair's chosen + rejected sequences share one row, so together they must fit
    seq_len. prompt_first: cut the prompt from the left (down to seq_len/4 tokens per sequence),
    then the answers from the right; drop: drop such pairs; error: stop with their count."""
    max_examples: Optional[int] = Field(default=None, ge=1)
    """Train on a seeded random subset of this many examples."""
    val_path: Optional[Path] = None
    """Validation records; default: `val_fraction` of `path`, held out."""
    val_fraction: float = Field(default=0.05, ge=0, lt=1)
    max_val_examples: int = Field(default=1000, ge=1)
    cache_dir: Optional[Path] = None
    """SFT/DPO: the tokenized-data cache, keyed by data + tokenizer + template (default:
    RUN_DIR/sft-cache). Pretraining from object storage: each node's shard cache, one directory
    per dataset version (default: ~/.cache/llmtrain/shards; llmtrain/data/shard_cache.py)."""
    cache_bytes: ByteSize = ByteSize(64 << 30)
    """Pretraining from object storage: the most each node's cache of the dataset may hold
    (bytes, or a size such as 200GB or 64GiB). The shuffled training split is cached whole and
    must fit; validation streams through a window of the next steps."""

    @field_validator("path", mode="before")
    @classmethod
    def _uri_or_path(cls, path: Any) -> Any:
        return _location(path)

    @field_validator("cache_bytes")
    @classmethod
    def _cache_size(cls, size: int) -> int:
        if size < 1 << 20:
            raise ValueError(f"at least 1 MiB ({1 << 20}); give a size such as 200GB or 64GiB")
        return size

    @field_validator("val_path", "tokenizer", "cache_dir")
    @classmethod
    def _absolute(cls, path: Optional[Path]) -> Optional[Path]:
        return None if path is None else Path(path).expanduser().resolve()


class TrainSection(Section):
    max_steps: int = Field(default=100, ge=1)
    global_batch_size: int = Field(default=8, ge=1)
    """Sequences per optimizer step over all ranks (= micro_batch_size x grad accumulation x world)."""
    micro_batch_size: int = Field(default=2, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=10, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(default=0.2, gt=0, le=1)
    """WSD only: the final fraction of steps over which the LR decays to min_lr."""
    schedule_offset: int = Field(default=0, ge=0)
    """Continue a schedule instead of starting one: this run's step s takes the LR of step
    s + schedule_offset of a (schedule_offset + max_steps)-step schedule, so no second warmup
    (Megatron's checkpoint scheduler). For continued pretraining on a base run's schedule, set it
    to the base's steps; 0 (default): a fresh schedule, warmup included."""
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)
    """0 disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU (bf16 matmul is ~100x slower on AVX2 CPUs)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in run.dir if there is one;
    never: start fresh (refuses a run.dir that has checkpoints); or a checkpoint path."""
    stop_at_step: Optional[int] = Field(default=None, ge=1)
    """Save a checkpoint and exit at this step without changing the schedule (time-limited or
    preemptible jobs, like Megatron's exit interval); a rerun with resume=auto continues."""
    log_every: int = Field(default=1, ge=1)
    val_every: int = Field(default=0, ge=0)
    """Validation every N steps; 0 = only before the first and after the last step."""
    val_batches: int = Field(default=4, ge=1)
    """Validation size in global batches (the same rows whatever the number of workers)."""
    val_at_start: bool = True
    """Validate (and take the task's before-training measurements) before the first step of a
    fresh run. false: the first step comes sooner (a 0.5B base: ~30 s on 2 CPU cores) and
    step 0 has no validation loss to compare with."""
    max_bad_steps: int = Field(default=5, ge=1)
    """Abort after this many consecutive steps with a NaN/inf loss (each is skipped)."""

    @model_validator(mode="after")
    def _stop_within_schedule(self) -> TrainSection:
        if self.stop_at_step is not None and self.stop_at_step > self.max_steps:
            raise ValueError(
                f"stop_at_step={self.stop_at_step} is beyond max_steps={self.max_steps}, so it would never stop there; "
                "set train.stop_at_step <= train.max_steps (or drop it)"
            )
        return self


class ZeroSection(Section):
    stage: int = Field(default=2, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> ZeroSection:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3; set zero.stage=3 or zero.offload_params=false")
        return self


class CheckpointSection(Section):
    every: int = Field(default=0, ge=0)
    """Save every N steps (and always at the end); 0 = only at the end."""
    keep: int = Field(default=3, ge=1)


class ClusterSection(Section):
    address: Optional[str] = None
    """None: an embedded local Ray runtime. Else an existing cluster (`ray://host:10001` or `auto`)."""
    num_workers: int = Field(default=2, ge=1)
    use_gpu: Optional[bool] = None
    """Default: true when the embedded runtime's machine has CUDA, or the cluster has GPUs."""
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=1, gt=0)
    max_failures: int = Field(default=0, ge=-1)
    """Worker-group restarts Ray Train allows (-1 = unlimited); each resumes from the newest checkpoint."""
    resource_timeout_s: float = Field(default=300, gt=0)
    """How long the workers may wait for their CPUs/GPUs, at start and when restarting after a
    failure (e.g. a lost node), before the job fails naming what is missing (else Ray Train would
    wait forever); raise it for autoscaling clusters."""
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"
    """How Ray places workers on nodes: pack (fill nodes first), spread (best effort across
    nodes), strict_* (required; strict_spread = at most one worker per node)."""


class KernelsSection(Section):
    backend: Literal["auto", "triton", "torch"] = "auto"
    """auto: Triton on CUDA, PyTorch reference elsewhere. `LLMTRAIN_KERNELS` overrides."""


class LoraSection(Section):
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = Field(default_factory=list)
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023,
    https://arxiv.org/abs/2312.03732; peft's use_rslora): the update's size stops shrinking with r."""
    loraplus_lr_ratio: float = Field(default=1.0, gt=0)
    """LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): the B matrices train at
    train.lr x this ratio, the A matrices at train.lr (the paper's advice: 16; 1 = plain LoRA)."""
    quantize: Optional[Literal["nf4", "fp4"]] = None
    """QLoRA: hold the frozen base's Linear layers in 4 bits (bitsandbytes Linear4bit, NF4 or FP4
    with blocks of 64; Dettmers et al. 2023, https://arxiv.org/abs/2305.14314); the adapters,
    embeddings and norms stay in full precision, the matmuls run in the training precision."""
    double_quant: bool = True
    """QLoRA: quantize the per-block scales too (8-bit, blocks of 256), 0.516 instead of 0.5625
    bytes per base parameter (the paper's setting; peft/transformers' bnb_4bit_use_double_quant)."""


class FinetuneSection(Section):
    """Which parameters train in full fine-tuning, and what the end-of-run report measures (sft only)."""

    freeze: list[str] = Field(default_factory=list)
    """Parameter-name patterns (fnmatch) to freeze, e.g. "model.embed_tokens.*"."""
    freeze_layers: Optional[str] = None
    """Blocks to freeze: indices and inclusive ranges, e.g. "0-5" or "0,1,4-7"."""
    layer_lr_decay: float = Field(default=1.0, gt=0, le=1)
    """Layer-wise LR decay: block i of L trains at lr x decay^(L-i), embeddings at decay^(L+1)."""
    eval_examples: int = Field(default=500, ge=1)
    """Validation examples scored for the task accuracy (labelled data) before and after."""
    base_val_path: Optional[Path] = None
    """Pretraining validation data (a prepared dir) for the forgetting report; default: the base run's."""

    @field_validator("freeze_layers", mode="before")
    @classmethod
    def _layer_spec(cls, spec: Any) -> Optional[str]:
        import re

        if isinstance(spec, int) and not isinstance(spec, bool):
            spec = str(spec)  # one block, as YAML reads `freeze_layers: 0`
        if isinstance(spec, str) and not re.fullmatch(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*", spec):
            raise ValueError("expected block indices and ranges like '0-5' or '0,1,4-7'")
        return spec

    @field_validator("base_val_path")
    @classmethod
    def _absolute(cls, path: Optional[Path]) -> Optional[Path]:
        return None if path is None else Path(path).expanduser().resolve()


class DpoSection(Section):
    """Preference tuning (`llmtrain dpo`): the loss of llmtrain/tasks/dpo_loss.py and its reference.

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) for the chosen y_w
    and rejected y_l (log-probabilities summed over the answer); the reference is the starting
    model, frozen."""

    beta: float = Field(default=0.1, gt=0)
    """How far the policy may move from the reference: higher beta means less deviation (DPO,
    Rafailov et al. 2023, https://arxiv.org/abs/2305.18290). For ipo it is the regularisation
    tau of the IPO paper; for simpo the reward scale (SimPO's settings are much larger than DPO's)."""
    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta h). ipo: (h_avg - 1/(2 beta))^2, h on per-token averaged log-ratios,
    as TRL does (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17). simpo: reference-free,
    -log sigmoid(beta (avg log pi(y_w) - avg log pi(y_l)) - simpo_gamma) (Meng et al. 2024,
    https://arxiv.org/abs/2405.14734)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """sigmoid/simpo: the probability that a preference label is flipped; > 0 gives conservative
    DPO, -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (cDPO, Mitchell 2023,
    https://ericmitchell.ai/cdpo.pdf). Not defined for ipo."""
    simpo_gamma: float = Field(default=0.5, ge=0)
    """simpo: the target reward margin gamma (TRL's `simpo_gamma`, same default)."""
    precompute_reference: bool = False
    """Score the training pairs with the reference once before training and keep only those
    log-probabilities, so no reference model is held during training (sigmoid/ipo)."""
    reference: Optional[str] = None
    """The reference model, if not the starting model (`model.from`): a Hugging Face directory or
    one of our runs, of the policy's shape and tokenizer; held as a frozen copy."""

    @model_validator(mode="after")
    def _consistent(self) -> DpoSection:
        if self.label_smoothing > 0 and self.loss_type == "ipo":
            raise ValueError("label_smoothing is not defined for loss_type=ipo; set dpo.label_smoothing=0 or use sigmoid/simpo")
        if self.reference is not None and self.loss_type == "simpo":
            raise ValueError("simpo uses no reference model; drop dpo.reference or use loss_type sigmoid/ipo")
        if self.precompute_reference and self.loss_type == "simpo":
            raise ValueError(
                "simpo uses no reference model, so there is nothing to precompute; set dpo.precompute_reference=false"
            )
        return self


class JobConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    zero: ZeroSection = Field(default_factory=ZeroSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    kernels: KernelsSection = Field(default_factory=KernelsSection)
    lora: Optional[LoraSection] = None
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    dpo: Optional[DpoSection] = None

    @model_validator(mode="after")
    def _quantized_base_fits_zero(self) -> JobConfig:
        if self.lora is not None and self.lora.quantize is not None and self.zero.stage == 3:
            raise ValueError(
                f"lora.quantize={self.lora.quantize} holds the base in bitsandbytes 4-bit layers, which ZeRO-3 "
                "cannot partition; use zero.stage=0, 1 or 2 (the 4-bit base is small enough to sit whole on each rank)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), source_name: str | None = None) -> JobConfig:
    """Read `path` (YAML mapping; None = all defaults), apply `key.sub=value` overrides, validate.
    An error in a key an override set names the override, any other the file."""
    where = source_name or (str(path) if path is not None else "<defaults>")
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    given: dict[tuple[str, ...], str] = {}
    for item in overrides:
        given[_apply_override(raw, item)] = item
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        loc = tuple(str(p) for p in err.errors()[0]["loc"])
        item = next((given[k] for k in sorted(given, key=len, reverse=True) if loc[: len(k)] == k), None)
        raise UserError(f"{f'override {item}' if item else where}: {_describe(err, raw)}") from None


# Forwarded from the driver to every worker when set (machine-independent settings only).
FORWARDED_ENV = ("LLMTRAIN_KERNELS", "TRITON_INTERPRET", "LLMTRAIN_TEST_SAVE_PAUSE")  # the last: a test hook (checkpoint.py)


def absolutize_paths(cfg: JobConfig) -> JobConfig:
    """Workers may start in another directory: make every path in the config absolute."""
    cfg = cfg.model_copy(deep=True)
    cfg.run.dir = Path(cfg.run.dir).expanduser().resolve()
    if isinstance(cfg.data.path, Path):  # a URI (str) stays as it is
        cfg.data.path = Path(cfg.data.path).expanduser().resolve()
    for entry in cfg.data.mixture:
        if isinstance(entry.path, Path):
            entry.path = Path(entry.path).expanduser().resolve()
    if cfg.model.from_:
        cfg.model.from_ = str(Path(cfg.model.from_).expanduser().resolve())
    if cfg.dpo is not None and cfg.dpo.reference:
        cfg.dpo.reference = str(Path(cfg.dpo.reference).expanduser().resolve())
    if cfg.train.resume not in ("auto", "never"):
        cfg.train.resume = str(Path(cfg.train.resume).expanduser().resolve())
    return cfg


def write_resolved_config(cfg: JobConfig, run_dir: str | os.PathLike) -> Path:
    """Write the fully resolved config to RUN_DIR/config.yaml (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: invalid YAML{at}: {getattr(err, 'problem', err)}; fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; pass a YAML config (see configs/)") from None
    if data is None:  # an empty file (or only comments) is a mistake, not a request for the defaults
        raise UserError(f"{path}: the config file is empty; start from one of configs/ (e.g. configs/tiny-pretrain.yaml)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections (run:, model:, train:, ...)")
    return data


# Text fields whose values hold prose (prompts): typed on a command line, \n and \t in them are a
# newline and a tab, as in the YAML file's double-quoted strings.
PROSE_FIELDS = {("data", "template"), ("data", "system_prompt")}


def cli_text(text: str) -> str:
    """A prompt typed on the command line: `\\n` -> newline, `\\t` -> tab, `\\\\` -> backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _apply_override(raw: dict[str, Any], item: str) -> tuple[str, ...]:
    """Set one `key.sub=value` in `raw`; returns the key's path. A text field (str, path, a choice)
    takes the text after `=` as it is; YAML reads only the others (numbers, booleans, lists,
    mappings), and `null` or nothing clears an optional field."""
    key, sep, text = item.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not key.strip() or any(not part for part in parts):
        raise UserError(f"override '{item}': expected key.sub=value, e.g. train.max_steps=20")
    kind = _field_kind(parts)
    if kind in ("text", "optional text"):
        if kind == "optional text" and text.strip() in ("", "null", "~"):
            value: Any = None
        elif len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":  # quoted on purpose: YAML's quoting rules
            value = _yaml_value(item, text)
        else:
            value = cli_text(text) if parts in PROSE_FIELDS else text
    else:
        value = _yaml_value(item, text) if text.strip() else None
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override '{item}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value
    return parts


def _yaml_value(item: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(
            f"override {item}: not a valid value ({getattr(err, 'problem', err)}); quote it or fix the syntax"
        ) from None


def _field_kind(parts: tuple[str, ...]) -> Optional[str]:
    """'text' / 'optional text' for a field whose values are strings (str, Path, a Literal of
    strings), 'structured' for any other field, None for a key the schema does not have."""
    section = _section_model(list(parts[:-1]))
    if section is None:
        return None
    fields = {info.alias or name: info for name, info in section.model_fields.items()}
    if parts[-1] not in fields:
        return None
    annotation = fields[parts[-1]].annotation
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    rest = {a for a in members if a is not type(None)}
    optional = type(None) in members
    inner = next(iter(rest)) if optional and len(rest) == 1 else annotation
    if (
        inner in (str, Path)
        or rest == {str, Path}
        or (getattr(inner, "__origin__", None) is Literal and all(isinstance(v, str) for v in inner.__args__))
    ):
        return "optional text" if optional else "text"
    return "structured"


def _describe(err: ValidationError, raw: dict[str, Any]) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    if not loc:  # a check across sections (JobConfig's validators): its message names the keys
        return first["msg"].removeprefix("Value error, ")
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        section = _section_model(loc[:-1])
        known = sorted(_field_names(section)) if section else []
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"valid keys: {', '.join(known)}"
        return f"{key}: unknown key ({fix})"
    given = _lookup(raw, loc)
    msg = first["msg"].removeprefix("Value error, ")
    shown = f" (got {given!r})" if given is not _MISSING else ""
    return f"{key}: {msg}{shown}"


_MISSING = object()


def _lookup(raw: Any, loc: list[str]) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and part.isdigit() and int(part) < len(raw):
            raw = raw[int(part)]
        else:
            return _MISSING
    return raw


def _field_names(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


def _section_model(loc: list[str]) -> Optional[type[BaseModel]]:
    model: Any = JobConfig
    for part in loc:
        if part.isdigit():
            continue
        fields = {info.alias or name: info for name, info in model.model_fields.items()}
        if part not in fields:
            return None
        model = _model_in(fields[part].annotation)
        if model is None:
            return None
    return model


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None
