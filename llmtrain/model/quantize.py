"""The frozen base held in 4 bits for QLoRA (`lora.quantize: nf4 | fp4`), through bitsandbytes.

    quantize_base(model, "nf4", double_quant=True, compute_dtype=torch.float32)  # in place
    quantized_bytes(model)          # bytes the 4-bit layers hold (packed weights + scales)
    dequantized(weight, "nf4", True)  # what a 4-bit layer computes with, for a merged export

Every nn.Linear of the model (the blocks' projections; our LM head and embeddings are not
Linear layers) becomes a `bitsandbytes.nn.Linear4bit` holding its weight quantized in blocks of
64 (NF4 or FP4), the blocks' scales optionally quantized again (double quantisation), and
dequantized block by block in the matmul's compute dtype. Quantizing is deterministic, so every
rank quantizes the same base to the same bytes, and a checkpoint need not hold them: a resumed
run quantizes the base again (llmtrain/checkpoint.py keeps only the trainable tensors).
LoRA adapters (llmtrain/model/lora.py) wrap the 4-bit layers like any Linear.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
from torch import nn

from llmtrain.errors import UserError

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights (the QLoRA paper's)


def quiet_bitsandbytes_probe() -> None:
    """bitsandbytes' CPU backend logs a warning on import when our top-level `kernels` package
    shadows Hugging Face's `kernels` (it looks there for an optional prebuilt kernel, which could
    not be downloaded offline anyway). peft and transformers import bitsandbytes whenever it is
    installed, so this runs before them (llmtrain/model/lora.py) and here: that one logger only."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _missing(detail: str) -> UserError:
    return UserError(
        f"lora.quantize needs bitsandbytes ({detail}); install it with `pip install 'llmtrain[qlora]'`, "
        "or drop lora.quantize to train LoRA on the full-precision base"
    )


def check_bitsandbytes() -> None:
    """The driver's check that bitsandbytes is installed, without importing it (~3 s)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise _missing("not installed")


def import_bitsandbytes():
    """bitsandbytes, or a one-line error naming the install."""
    quiet_bitsandbytes_probe()
    try:
        import bitsandbytes
    except ImportError as err:
        raise _missing(str(err)) from None
    return bitsandbytes


def quantize_base(
    model: nn.Module, quant_type: str, double_quant: bool, compute_dtype: torch.dtype, device: Optional[torch.device] = None
) -> int:
    """Replace every nn.Linear of `model` by a frozen 4-bit Linear4bit with the same weights
    (quantized on `device`, default the weight's), one layer at a time, so the full-precision
    copy of a layer is freed as soon as it is quantized. Returns the number of layers."""
    bnb = import_bitsandbytes()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = child.weight.detach()
            target = torch.device(device) if device is not None else weight.device
            # Built on the meta device: nn.Linear's random initialisation is never run.
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type=quant_type,
                device="meta",
            )
            # bitsandbytes' CPU inference path (eval mode, on CPUs with AVX512-BF16) repacks the
            # weight in place and multiplies in bf16: evaluation would then differ from training
            # (fp32 here) and between machines. Keep the one dequantize-and-matmul path.
            layer.support_avx512bf16_for_cpu = False
            layer.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=double_quant,
                quant_type=quant_type,
                blocksize=BLOCKSIZE,
                module=layer,
            ).to(target)  # quantizes
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.detach().to(target, compute_dtype), requires_grad=False)
            setattr(parent, name, layer)
            count += 1
    if count == 0:
        raise UserError("lora.quantize: the model has no Linear layers to quantize; drop lora.quantize")
    return count


def is_quantized(param: torch.Tensor) -> bool:
    """A 4-bit weight made by `quantize_base` (bitsandbytes' Params4bit)."""
    return getattr(param, "quant_state", None) is not None and getattr(param, "bnb_quantized", False)


def numel(param: torch.Tensor) -> int:
    """The parameters `param` stands for: a 4-bit weight's packed tensor holds two per byte."""
    return int(torch.Size(param.quant_state.shape).numel()) if is_quantized(param) else param.numel()


def holds_quantized(model: nn.Module) -> bool:
    return any(is_quantized(p) for p in model.parameters())


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes held by the 4-bit weights and their quantization state, parameters they stand for)."""
    held = params = 0
    for p in model.parameters():
        if not is_quantized(p):
            continue
        state = p.quant_state
        params += numel(p)
        held += p.numel() * p.element_size()
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        held += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return held, params


def dequantized(weight: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    """`weight` quantized as `quantize_base` does and dequantized again: the weight a 4-bit
    layer multiplies by (bitwise the same, for the same input dtype and device)."""
    bnb = import_bitsandbytes()
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type
    )
    return bnb.functional.dequantize_4bit(packed, state)
