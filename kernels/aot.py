"""Ahead-of-time compilation of every kernel for real GPU targets, with the resources it uses.

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` lowers a
kernel to PTX and a cubin for sm_80 (Ampere) or sm_90 (Hopper). The resource use is read from
the same ptxas that Triton uses (its `-v` report: registers, spill stores/loads, stack) and from
the compiled kernel's metadata (the shared memory Triton allocates). Every kernel module lists
its cases (`aot_cases()`): each autotune config of each target, for the dtypes and head/row
sizes the kernel is specialised on, with the argument alignment a real launch would see.

    from kernels.aot import all_cases, compile_case
    for case in all_cases():
        print(case.label, compile_case(case))

Reports are cached in ~/.cache/llmtrain/aot keyed by the SHA-256 of the PTX plus the ptxas
version and flags, so a changed kernel is always recompiled and re-measured (Triton caches its
own compilation in ~/.triton/cache the same way).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

SHARED_LIMIT = {80: 166912, 90: 232448}
"""Largest shared memory one block may use (opt-in): A100 163 KiB, H100 227 KiB."""
REGISTER_LIMIT = 255
CACHE = Path(os.environ.get("LLMTRAIN_AOT_CACHE", Path.home() / ".cache" / "llmtrain" / "aot"))

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}


@dataclass
class Case:
    """One compilation: `args` maps each non-constexpr argument to an example value (a torch dtype
    for a pointer, a Python int or float for a scalar); `constexprs` fixes the rest."""

    kernel: str
    target: int
    config: str
    fn: Any
    args: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.kernel} sm_{self.target} {self.config}"


@dataclass
class Report:
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    target: int
    mma: str
    """Tensor-core instructions in the PTX: "wgmma" (Hopper), "mma" (mma.sync), or "-" (none)."""

    @property
    def problems(self) -> list[str]:
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"register spills ({self.spill_stores} B stores, {self.spill_loads} B loads)")
        if self.shared > SHARED_LIMIT[self.target]:
            out.append(f"shared memory {self.shared} B > sm_{self.target} limit {SHARED_LIMIT[self.target]} B")
        if self.registers > REGISTER_LIMIT:
            out.append(f"{self.registers} registers > {REGISTER_LIMIT}")
        return out


def _jit(fn):
    """A JITFunction for `fn` (kernels are InterpretedFunctions when TRITON_INTERPRET=1 was set)."""
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def _source(case: Case):
    from triton.compiler import ASTSource

    fn = _jit(case.fn)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in case.constexprs:
            signature[name] = "constexpr"
            continue
        value = case.args[name]
        if isinstance(value, torch.dtype):
            signature[name] = _PTR[value]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{case.label}: argument {name}={value!r} needs a dtype, int or float example")
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT specialises on at launch
        else:
            signature[name] = "fp32"
    return ASTSource(fn=fn, signature=signature, constexprs=case.constexprs, attrs=attrs)


def _ptxas_report(ptx: str, target: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(target)
    arch = sm_arch_from_capability(target)
    flags = ["-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={arch}"]  # as Triton's make_cubin
    version = subprocess.run([ptxas.path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    key = hashlib.sha256("\0".join([ptx, version, *flags]).encode()).hexdigest()
    cached = CACHE / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas.path, *flags, str(src), "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}: {run.stderr.strip()}")
    log = run.stderr + run.stdout

    def grab(pattern: str) -> int:
        found = re.findall(pattern, log)
        if not found:
            raise RuntimeError(f"ptxas -v report lacks {pattern!r}:\n{log}")
        return max(int(x) for x in found)

    report = {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
        "ptxas": version,
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(report))
    tmp_path.replace(cached)
    return report


def compile_case(case: Case) -> Report:
    """Compile `case` for its target and return the resources the kernel uses there."""
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(
        _source(case),
        target=GPUTarget("cuda", case.target, 32),
        # fp fusion on, as the JIT's default (set explicitly: Triton 3.9 warns that its default will change)
        options={"num_warps": case.num_warps, "num_stages": case.num_stages, "enable_fp_fusion": True, **case.extra},
    )
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"{case.label}: Triton produced no cubin")
    ptx = compiled.asm["ptx"]
    ptx = ptx if isinstance(ptx, str) else ptx.decode()
    report = _ptxas_report(ptx, case.target)
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
    return Report(
        registers=report["registers"],
        spill_stores=report["spill_stores"],
        spill_loads=report["spill_loads"],
        stack=report["stack"],
        shared=int(compiled.metadata.shared),
        target=case.target,
        mma=mma,
    )


def all_cases() -> Iterator[Case]:
    """Every kernel's cases, kernel by kernel."""
    import importlib

    for name in ("attention", "rmsnorm", "rope", "swiglu", "cross_entropy", "adamw"):
        module = importlib.import_module(f"kernels.{name}")
        yield from module.aot_cases()
