"""The `dpo` task: preference tuning (DPO, conservative DPO, IPO, SimPO), full or LoRA, on the one loop.

    llmtrain dpo configs/tiny-dpo.yaml model.from=runs/tiny-sft data.path=pairs.jsonl run.dir=runs/dpo
    llmtrain dpo configs/tiny-dpo.yaml lora.r=16 dpo.loss_type=ipo dpo.beta=0.5

Everything but the data and the loss is SFT's (llmtrain/tasks/sft.py): the base (`model.from`,
exported once when it is one of our runs), LoRA or freezing, checkpoints, resume, export and the
before/after report with the base's forgetting. What DPO adds:
- the data: preference pairs packed two sequences per pair into rows (llmtrain/data/preference.py);
- the loss (llmtrain/tasks/dpo_loss.py, `dpo.loss_type`) over each sequence's summed
  log-probability, divided by the number of pairs in the global batch;
- the reference model, whose log-probabilities the policy's are compared with:
  - `dpo.precompute_reference=true`: the starting model scores every pair once before training,
    the values are cached beside the data under a key of the base and the data, and training
    holds no reference model at all;
  - LoRA: the policy itself with its adapters switched off (no second copy of the weights);
  - full tuning: a frozen copy built by the engine under the run's ZeRO stage (partitioned
    under ZeRO-3), or of `dpo.reference` when that names another model of the same shape;
  - SimPO: none (reference-free).
- metrics per logged step and at validation: `rewards/chosen`, `rewards/rejected` (beta times the
  policy-reference log-ratio), `rewards/accuracies` (chosen above rejected; a tie counts half, so
  it starts at 0.5), `rewards/margins`, `logps/chosen`, `logps/rejected` (summed per sequence).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from llmtrain.config import DpoSection, JobConfig
from llmtrain.data.atomic import atomic_file, atomic_write_json
from llmtrain.data.preference import PreferenceBatches, PreferenceSplit, build_preference_cache
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.engine import Layout
from llmtrain.errors import UserError
from llmtrain.evaluate import mean_loss
from llmtrain.model.hf import iter_model_tensors, load_hf_config
from llmtrain.tasks.base import MicroBatch, Plan, TaskData
from llmtrain.tasks.base_model import export_base, resolve_base
from llmtrain.tasks.dpo_loss import batch_logprobs, pair_values, preference_loss
from llmtrain.tasks.sft import POINTER, SFTTask
from llmtrain.worker import WorkerContext

REFERENCE_FILE = "reference_logps.npz"


class DPOTask(SFTTask):
    name = "dpo"
    split_class, batches_class = PreferenceSplit, PreferenceBatches

    # Driver side

    def prepare(self, cfg: JobConfig, layout: Layout) -> Plan:
        if not cfg.model.from_:
            raise UserError(
                "dpo needs a starting model: set model.from=MODEL (a Hugging Face dir, one of our runs or "
                "checkpoints), usually the result of `llmtrain sft`; it is also the reference"
            )
        reference = self._check_reference(cfg) if _section(cfg).reference is not None else None
        plan = super().prepare(cfg, layout)
        if reference is not None:
            pointer = Path(cfg.run.dir) / POINTER
            atomic_write_json(pointer, {**json.loads(pointer.read_text()), "reference": str(reference)})
        return plan

    def build_cache(self, cfg: JobConfig, tokenizer, template, seq_len: int, run_dir: Path) -> Path:
        return build_preference_cache(
            cfg.data, tokenizer, template, seq_len, cfg.run.seed, cfg.data.cache_dir or run_dir / "dpo-cache"
        )

    def _check_reference(self, cfg: JobConfig) -> Path:
        """`dpo.reference` must have the policy's shape and tokenizer (exported once to RUN_DIR/reference
        when it is one of our runs); checked before any data is tokenized."""
        run_dir = Path(cfg.run.dir)
        base, _ = resolve_base(cfg, run_dir)
        given = cfg.dpo.reference
        reference = export_base(Path(given).expanduser().resolve(), run_dir / "reference", "dpo.reference")
        ours, theirs = load_hf_config(base).to_dict(), load_hf_config(reference).to_dict()
        diffs = [k for k in sorted(set(ours) | set(theirs)) if k != "eos_token_id" and ours.get(k) != theirs.get(k)]
        if diffs:
            k = diffs[0]
            raise UserError(
                f"dpo.reference={given} has another shape than the policy ({k}: reference {theirs.get(k)!r}, "
                f"policy {ours.get(k)!r}); use a reference of the same architecture, or leave dpo.reference unset"
            )
        policy_tok = load_tokenizer(cfg.data.tokenizer or base)
        try:
            same = load_tokenizer(reference).fingerprint == policy_tok.fingerprint
        except UserError:
            same = False
        if not same:
            raise UserError(
                f"dpo.reference={given} was trained with another tokenizer than the policy, so their "
                "log-probabilities are not comparable; use a reference with the policy's tokenizer"
            )
        return reference

    # Worker side

    def open_split(self, name: str):
        self._splits[name] = split = super().open_split(name)
        return split

    def batches(self, split, grad_accum: int, shuffle: bool, wrap: bool):
        name = next(n for n, s in self._splits.items() if s is split)
        return _WithReference(super().batches(split, grad_accum, shuffle, wrap), lambda: self._precomputed.get(name))

    def build(self, cfg: JobConfig, layout: Layout, ctx: WorkerContext) -> TaskData:
        self._splits: dict[str, Optional[PreferenceSplit]] = {}
        self._precomputed: dict[str, torch.Tensor] = {}
        return super().build(cfg, layout, ctx)

    def setup(self, engine, ctx: WorkerContext, frozen_copy: Callable[..., torch.nn.Module]) -> None:
        """Decide where reference log-probabilities come from (module docstring). Runs before a
        resumed run loads its checkpoint, so the engine still holds the starting weights here."""
        dpo = _section(self.cfg)
        self.dpo, self.reference = dpo, None
        if dpo.loss_type == "simpo":
            self.reference_kind = "none"
        elif dpo.precompute_reference:
            self.reference_kind = "precomputed"
            self._precompute(engine, ctx)
        elif self.cfg.lora is not None and not self.info.get("reference"):
            self.reference_kind = "adapters off"
        else:
            self.reference_kind = "frozen copy"
            other = self.info.get("reference")
            if other is None:
                self.reference = frozen_copy()
            else:  # dpo.reference: same shape as the policy (checked on the driver)
                config = load_hf_config(other)
                self.reference = frozen_copy(lambda: iter_model_tensors(other, config))

    def count(self, micro_batch: MicroBatch) -> int:
        return int(micro_batch["chosen_index"].numel())

    def loss(self, model, micro_batch: MicroBatch, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mb = {k: v.to(device) for k, v in micro_batch.items()}
        policy = batch_logprobs(model, mb)
        chosen, rejected, n_chosen, n_rejected = pair_values(policy, mb)
        ref_chosen = ref_rejected = None
        if self.reference_kind != "none":
            if "ref_logps" in mb:
                ref_chosen, ref_rejected = mb["ref_logps"][:, 0], mb["ref_logps"][:, 1]
            else:
                with torch.no_grad(), self._reference_forward(model) as reference:
                    ref_chosen, ref_rejected, _, _ = pair_values(batch_logprobs(reference, mb), mb)
        dpo = self.dpo
        losses, r_chosen, r_rejected = preference_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=dpo.beta,
            loss_type=dpo.loss_type,
            label_smoothing=dpo.label_smoothing,
            simpo_gamma=dpo.simpo_gamma,
            chosen_lengths=n_chosen,
            rejected_lengths=n_rejected,
        )
        margin = r_chosen - r_rejected
        stats = {
            "rewards/chosen": r_chosen.sum(),
            "rewards/rejected": r_rejected.sum(),
            "rewards/accuracies": ((margin > 0).double() + 0.5 * (margin == 0).double()).sum(),
            "rewards/margins": margin.sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        return losses.sum(), stats

    @contextmanager
    def _reference_forward(self, policy) -> Iterator:
        """The model that gives reference log-probabilities: a frozen copy, or the policy with
        its LoRA adapters switched off for the duration (peft's own flag on each LoRA layer)."""
        if self.reference_kind == "frozen copy":
            yield self.reference
            return
        assert self.reference_kind == "adapters off", self.reference_kind
        from peft.tuners.tuners_utils import BaseTunerLayer  # loaded already: the policy holds peft layers

        layers = [m for m in policy.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield policy
        finally:
            for layer in layers:
                layer._disable_adapters = False

    def measure(self, engine, ctx: WorkerContext) -> dict[str, Optional[float]]:
        """SFT's measurements (the base's forgetting) and the held-out pairs' rewards."""
        result = super().measure(engine, ctx)
        result.pop("accuracy", None)  # preference data has no labelled choices
        val = self.validation()
        held_out = mean_loss(engine, val, ctx, self.loss, self.count) if val is not None else None
        if held_out is not None:
            result.update(
                {
                    "reward_accuracy": held_out["rewards/accuracies"],
                    "reward_margin": held_out["rewards/margins"],
                    "pairs_loss": held_out["loss"],
                }
            )
        return result

    # Precomputed reference log-probabilities

    def _precompute(self, engine, ctx: WorkerContext) -> None:
        """Score every pair of both splits with the starting weights once, split over ranks, and
        keep the values in the data cache under a key of the base model and the data; a file
        made with another base or data is never used."""
        key = reference_key(self.info, self.meta)
        path = self.cache / REFERENCE_FILE
        cached = _read_reference(path, key, say=ctx.is_main)
        if cached is None:
            tables = {}
            for name, split in self._splits.items():
                if split is None:
                    continue
                table = torch.zeros((split.num_pairs, 2), dtype=torch.float64, device=ctx.device)
                per_pass = self.layout.micro_batch_size * ctx.world_size
                passes = -(-split.num_rows // per_pass)
                batches = super().batches(split, passes, shuffle=False, wrap=False)
                engine.train(False)
                with torch.no_grad():
                    for mb in batches.next_step():
                        mb = {k: v.to(ctx.device) for k, v in mb.items()}
                        chosen, rejected, _, _ = pair_values(batch_logprobs(engine, mb), mb)
                        table[mb["pair_ids"]] = torch.stack([chosen, rejected], dim=1).double()
                engine.train(True)
                if ctx.world_size > 1:
                    torch.distributed.all_reduce(table)  # each pair was scored by exactly one rank
                tables[name] = table.cpu().numpy()
            if ctx.is_main:
                _write_reference(path, key, tables)
            ctx.barrier()
            cached = tables
        for name, table in cached.items():
            self._precomputed[name] = torch.from_numpy(np.asarray(table))


class _WithReference:
    """Batches whose micro-batches also carry `ref_logps` [P, 2] (chosen, rejected) when the
    reference log-probabilities were precomputed; state and order are the wrapped batches'."""

    def __init__(self, batches: PreferenceBatches, table: Callable[[], Optional[torch.Tensor]]):
        self.batches, self._table = batches, table

    def next_step(self) -> list[MicroBatch]:
        table = self._table()
        out = self.batches.next_step()
        if table is not None:
            for mb in out:
                mb["ref_logps"] = table[mb["pair_ids"]]
        return out

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def reference_key(info: dict, meta: dict) -> str:
    """Identifies the starting model (its config and weight files) and the data (the cache key)."""
    h = hashlib.sha256(meta["key"].encode())
    base = Path(info["base"])
    h.update((base / "config.json").read_bytes())
    for f in sorted(base.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:  # the header (tensor names, shapes, offsets) and both ends of the data
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()[:32]


def _read_reference(path: Path, key: str, say: bool) -> Optional[dict[str, np.ndarray]]:
    """The cached tables when `path` holds them for `key`; otherwise None (and, with `say`, why)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            if str(f["key"]) == key:
                return {name: f[name] for name in ("train", "val") if name in f}
            why = "holds reference log-probabilities of another model or data"
    except (OSError, ValueError, KeyError):
        why = "is unreadable"
    if say:
        print(f"llmtrain: {path} {why}; recomputing them")
    return None


def _write_reference(path: Path, key: str, tables: dict[str, np.ndarray]) -> None:
    with atomic_file(path) as tmp:  # keeps the .npz suffix, so numpy writes exactly that file
        np.savez(tmp, key=np.asarray(key), **tables)
    print(f"llmtrain: reference log-probabilities of {sum(len(t) for t in tables.values()):,} pairs cached in {path}")


def _section(cfg: JobConfig) -> DpoSection:
    return cfg.dpo if cfg.dpo is not None else DpoSection()
