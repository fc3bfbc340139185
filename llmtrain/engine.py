"""DeepSpeed engine from our config: ZeRO stage, offload, precision, accumulation, clipping,
AdamW with weight-decay groups, the LR schedule, and model construction (ZeRO-3 builds the
model partitioned, never whole on one rank).

Applied from outside the model, in this order (as torchtitan's parallelize does):
    1. `prepare_deepspeed_runtime()`  process-wide DeepSpeed settings for this device
    2. `build_model(...)`            under `deepspeed.zero.Init` for stage 3, weights loaded
    3. `initialize(...)`             deepspeed.initialize on the existing process group

The optimizer comes from the kernels dispatch point (`kernels.adamw_optimizer` when present:
fused Triton AdamW on CUDA, torch AdamW elsewhere). Its `step` is wrapped by `StepGuard` so the
loop can skip an update whose loss was not finite without touching the Adam moments.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

import kernels
from llmtrain.config import JobConfig
from llmtrain.errors import UserError
from llmtrain.model.decoder import Decoder, no_init
from llmtrain.model.quantize import numel as quantized_numel
from llmtrain.schedule import lr_multiplier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """How one global batch is split: global = micro x accumulation x world."""

    world_size: int
    micro_batch_size: int
    grad_accum: int

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum


def batch_layout(cfg: JobConfig, world_size: int) -> Layout:
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_step = mbs * world_size
    if gbs % per_step:
        raise UserError(
            f"train.global_batch_size={gbs} is not divisible by train.micro_batch_size x workers = "
            f"{mbs} x {world_size}; choose a global batch that is a multiple of {per_step}"
        )
    return Layout(world_size=world_size, micro_batch_size=mbs, grad_accum=gbs // per_step)


def resolve_precision(cfg: JobConfig, on_gpu: bool) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if on_gpu and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


MIN_BUCKET = 5_000_000  # elements (20 MB in fp32); PyTorch DDP's buckets are 25 MB


def deepspeed_config(cfg: JobConfig, layout: Layout, precision: str, on_gpu: bool, hidden_size: Optional[int] = None) -> dict:
    """The DeepSpeed JSON config generated from ours.

    Communication buckets and ZeRO-3's persistence threshold scale with the model's hidden size
    (the rule Hugging Face's "auto" DeepSpeed values use): buckets of hidden^2 elements, and only
    parameters below 10 x hidden elements (norms, biases) kept whole on every rank. Fixed
    defaults (50M-element buckets, 100k persistence) would keep a small model's attention
    projections unpartitioned and allocate buckets many times the model's size. Buckets never
    go below MIN_BUCKET elements: each bucket is one collective, a point where every rank
    waits, so a small model's hidden^2 would mean dozens per step (benchmarks/train_throughput.py)."""
    bucket = min(50_000_000, max(MIN_BUCKET, hidden_size**2)) if hidden_size else 50_000_000
    zero: dict = {
        "stage": cfg.zero.stage,
        "contiguous_gradients": True,
        "overlap_comm": on_gpu,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if cfg.zero.stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": int(0.9 * bucket),
                "stage3_param_persistence_threshold": 10 * hidden_size if hidden_size else 100_000,
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if cfg.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # Our optimizer is a client optimizer (torch or Triton AdamW); allow it under ZeRO and
        # under CPU offload, where DeepSpeed would otherwise insist on its JIT-built CPUAdam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def prepare_deepspeed_runtime(on_gpu: bool) -> None:
    """Process-wide DeepSpeed settings, then DeepSpeed's communication layer on the process
    group that already exists (call after the process group is up, before building the model:
    ZeRO-3's `zero.Init` needs the world size).

    On CPU the accelerator is pinned to `cpu` (skips the probe), and DeepSpeed's shared-memory
    communication op is marked incompatible: `init_distributed` would otherwise JIT-compile it
    (~56 s, ../shared/NOTES-cpu.md) although gloo needs none of it.
    """
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR is set: DeepSpeed picks its accelerator on import
    import deepspeed.ops

    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)


# ---------------------------------------------------------------------------------------------
# Model construction


def build_model(model_config, cfg: JobConfig, ds_config: dict, weights: Optional[Callable[[], Iterable]] = None):
    """Construct the decoder; under ZeRO-3 inside `deepspeed.zero.Init` so every rank only ever
    holds its partition. With `weights()` (the base's (name, tensor) pairs) nothing is
    initialised randomly: ZeRO 0-2 build on the meta device and take each loaded tensor as the
    parameter's storage; ZeRO-3 builds uninitialised partitions and copies each rank's slice."""
    import deepspeed  # ~3 s; the driver and `llmtrain --help` never need it

    if cfg.zero.stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device="cpu" if cfg.zero.offload_params else None):
            with no_init() if weights is not None else contextlib.nullcontext():
                model = Decoder(model_config)
    elif weights is not None:
        with torch.device("meta"):
            model = Decoder(model_config)
    else:
        model = Decoder(model_config)
    model.gradient_checkpointing = cfg.model.activation_checkpointing
    if weights is not None:
        load_weights(model, weights(), zero_stage=cfg.zero.stage)
    return model


def frozen_model(model_config, cfg: JobConfig, ds_config: dict, weights: Optional[Callable[[], Iterable]] = None):
    """A second, frozen copy of the model for inference beside the trained one (e.g. the DPO
    reference), handled by the same ZeRO stage: under ZeRO-3 partitioned like the policy and
    wrapped in an optimizer-less DeepSpeed engine (which gathers each layer for its forward);
    otherwise a plain module, whole on every rank. Returns a module in eval mode."""
    import deepspeed  # ~3 s; the driver and `llmtrain --help` never need it

    model = build_model(model_config, cfg, ds_config, weights)
    model.requires_grad_(False)
    if cfg.zero.stage == 3:
        config = {k: v for k, v in ds_config.items() if k != "gradient_clipping"}
        config["zero_optimization"] = dict(ds_config["zero_optimization"], stage=3)
        config.pop("zero_allow_untested_optimizer", None)
        model, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    model.eval()  # DeepSpeedEngine.eval() returns None
    return model


def load_weights(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], zero_stage: int) -> int:
    """Fill `model`'s parameters from named tensors (fp32 or whatever dtype the parameter has);
    every parameter must come once (a tied LM head comes with its embedding). Returns the count.

    A parameter on the meta device (ZeRO 0-2 `build_model`) takes the tensor itself as its
    storage: safetensors returns it backed by a private memory map of the file, so the
    parameter is that memory (same dtype) or a single conversion of it (e.g. a bf16 checkpoint
    trained in fp32), never a random init followed by a copy. Under ZeRO-3 each
    rank copies its own slice of the flattened tensor into its partition (`ds_tensor`, the
    layout `zero.Init` partitions with): no collective and no whole parameter on any rank."""
    params = dict(model.named_parameters())
    count = 0
    if zero_stage != 3:  # read and convert in parallel where this process has threads
        tensors = _converted(tensors, lambda name: params[name].dtype, min(4, torch.get_num_threads()))
    for name, tensor in tensors:
        param = params[name]
        with torch.no_grad():
            if zero_stage == 3 and hasattr(param, "ds_tensor"):
                _fill_partition(name, param, tensor)
            elif param.is_meta:
                _assign(model, name, torch.nn.Parameter(tensor.to(param.dtype), requires_grad=param.requires_grad))
            else:
                param.copy_(tensor.to(param.dtype))
        count += 1
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # the LM head re-shares the embedding's new Parameter
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise UserError(f"the base's weights have no tensor {left[0]} ({len(left)} missing); the weights are incomplete")
    return count


def _converted(
    tensors: Iterable[tuple[str, torch.Tensor]], dtype_of: Callable[[str], torch.dtype], workers: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs in order, each read from its memory map and converted to
    `dtype_of(name)` by a pool of `workers` threads (torch releases the GIL while it copies),
    at most 2 x workers ahead: transformers' from_pretrained loads with such a pool
    (core_model_loading.GLOBAL_WORKERS). One thread (a Ray worker of one CPU): in this thread."""
    if workers <= 1:
        yield from tensors
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque = collections.deque()
        for name, tensor in tensors:
            pending.append((name, pool.submit(tensor.to, dtype_of(name))))
            if len(pending) > 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _assign(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name) if module_name else model, leaf, param)


def _fill_partition(name: str, param: torch.nn.Parameter, tensor: torch.Tensor) -> None:
    """This rank's slice of `tensor` into ZeRO-3 parameter `param`'s partition: rank r of the
    parameter's group holds elements [r * size, (r + 1) * size) of the flattened parameter,
    the last partition padded (deepspeed/runtime/zero/partition_parameters.py _partition_param)."""
    if tuple(tensor.shape) != tuple(param.ds_shape):
        raise UserError(
            f"the base's {name} has shape {tuple(tensor.shape)}, the model's {tuple(param.ds_shape)}; the weights do not match"
        )
    if getattr(param, "ds_secondary_tensor", None) is not None:  # hpZ's second copy: not laid out here
        raise NotImplementedError("load_weights: ZeRO++ secondary partitions (zero_hpz_partition_size) are not filled")
    part = param.ds_tensor
    size = part.numel()
    start = size * torch.distributed.get_rank(group=param.ds_process_group)
    flat = tensor.reshape(-1)
    n = max(0, min(size, flat.numel() - start))
    if n:
        part.narrow(0, 0, n).copy_(flat.narrow(0, start, n))


# ---------------------------------------------------------------------------------------------
# Optimizer


NO_DECAY_MARKERS = ("embed_tokens", "norm")


def param_groups(model: torch.nn.Module, weight_decay: float, lr: Optional[float] = None) -> list[dict]:
    """Trainable parameters in two groups: decayed matrices; no decay for norms, biases and
    embeddings (GPT-3 / Llama practice). Frozen parameters are left out of the optimizer.
    A parameter carrying an `lr_scale` attribute other than 1 (layer-wise LR decay, set by a
    task's prepare_model) goes into groups of its own with `lr` = lr x lr_scale, after the
    unscaled ones (so get_lr()[0] stays the configured LR)."""
    by_key: dict[tuple[float, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        ndim = param.ds_shape.__len__() if hasattr(param, "ds_shape") else param.dim()
        decayed = not (ndim < 2 or any(marker in name for marker in NO_DECAY_MARKERS))
        by_key.setdefault((float(getattr(param, "lr_scale", 1.0)), decayed), []).append(param)
    groups = []
    for scale, decayed in sorted(by_key, key=lambda k: (-k[0], not k[1])):
        group = {"params": by_key[(scale, decayed)], "weight_decay": weight_decay if decayed else 0.0}
        if scale != 1.0:
            group["lr"] = lr * scale
        groups.append(group)
    return groups


def make_optimizer(groups: list[dict], cfg: JobConfig) -> torch.optim.Optimizer:
    t = cfg.train
    factory = getattr(kernels, "adamw_optimizer", None)
    if factory is not None:
        return factory(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)


class StepGuard:
    """Wraps `optimizer.step` so the loop can skip one update (non-finite loss) cleanly: while
    `skip` is set, parameters and Adam moments stay untouched and DeepSpeed clears the gradients
    as usual. (ZeRO-1/2 call `step` once per parameter group, so the flag spans the whole
    engine step; the loop sets it before the boundary `engine.step()` and clears it after.)"""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.skip = False
        step = optimizer.step.__func__

        # Bound with MethodType so torch's LR scheduler, which re-binds `optimizer.step.__func__`
        # to the optimizer, keeps wrapping this function.
        def guarded_step(opt, *args, **kwargs):
            return None if self.skip else step(opt, *args, **kwargs)

        optimizer.step = types.MethodType(guarded_step, optimizer)


class Stage0Clipping:
    """Gradient clipping for ZeRO stage 0, done by us in an optimizer pre-step hook (gradients are
    all-reduced by then) so the pre-clip norm is known; DeepSpeed only reports it for ZeRO 1-3."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.max_norm = max_norm
        self.grad_norm: Optional[float] = None
        optimizer.register_step_pre_hook(self._clip)

    def _clip(self, optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        limit = self.max_norm if self.max_norm > 0 else float("inf")
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))


def initialize(model: torch.nn.Module, cfg: JobConfig, ds_config: dict):
    """deepspeed.initialize on the process group that already exists (Ray Train's / torchrun's).
    Returns (engine, step guard, grad_norm() -> float | None)."""
    import deepspeed  # ~3 s; the driver and `llmtrain --help` never need it

    optimizer = make_optimizer(param_groups(model, cfg.train.weight_decay, cfg.train.lr), cfg)
    guard = StepGuard(optimizer)
    stage0 = None
    if cfg.zero.stage == 0:
        stage0 = Stage0Clipping(optimizer, cfg.train.grad_clip)
        ds_config = dict(ds_config, gradient_clipping=0.0)
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg.train))  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config, dist_init_required=False
    )

    def grad_norm() -> Optional[float]:
        norm = stage0.grad_norm if stage0 is not None else engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    return engine, guard, grad_norm


# ---------------------------------------------------------------------------------------------
# Reading parameters across partitions


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; full sizes under ZeRO-3 (`ds_numel`) and for 4-bit weights
    (their quantization state's shape: the packed tensor holds two per byte), shared ones once."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", None) or quantized_numel(p))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_state(engine, rank: int) -> Optional[dict[str, torch.Tensor]]:
    """Every trainable parameter of the engine's model, whole, fp32 on the CPU, on rank 0 (None
    elsewhere). Every rank must call it: under ZeRO-3 it gathers the partitions (reading a
    partitioned parameter directly gives a (0,)-shaped tensor)."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]

    def read() -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}

    if engine.zero_optimization_stage() == 3:
        import deepspeed  # ~3 s; the driver and `llmtrain --help` never need it

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return read() if rank == 0 else None
    return read() if rank == 0 else None
