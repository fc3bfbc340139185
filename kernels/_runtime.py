"""How a Triton kernel is launched here: compiled and autotuned on CUDA, interpreted on CPU.

Every kernel module defines its kernels with `@triton.jit` and launches them through
`Launcher`, which holds the GPU autotune configs per target (sm_80 for Ampere-class, sm_90 for
Hopper) and one CPU config. On a CUDA tensor the kernel is compiled and autotuned over the
configs of the device's target; on a CPU tensor it runs under Triton's interpreter with the
CPU config (large blocks: the interpreter's cost grows with the number of program instances).
So forcing the `triton` backend on a CPU machine needs no `TRITON_INTERPRET=1` and leaves other
code untouched (the only patch, making Triton's own library jit functions callable from the
interpreted kernel, lasts for one launch); with `TRITON_INTERPRET=1` set before triton's import
the kernels are interpreted everywhere, which also works.

bf16 under the interpreter: loads and stores of bf16 are exact, but bf16 arithmetic and bf16
`tl.dot` give wrong results and fp32->bf16 conversion truncates instead of rounding to nearest
(measured with triton 3.9.0). The kernels therefore upcast to fp32 right after every load, and
`dot_mode` keeps `tl.dot` operands in fp32 for bf16 under the interpreter; on a GPU the same
kernels feed bf16 operands to the tensor cores (and fp32 inputs as TF32, see `dot_mode`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None
    tl = None


def require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "the 'triton' kernels backend needs the triton package (Linux); install it or set LLMTRAIN_KERNELS=torch"
        )


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_INTERPRETED: dict = {}


def interpreted(fn) -> InterpretedFunction:
    """The interpreter's version of a `@triton.jit` kernel (works without TRITON_INTERPRET)."""
    if isinstance(fn, InterpretedFunction):
        return fn
    if id(fn) not in _INTERPRETED:  # by id: hashing a JITFunction parses its source
        _INTERPRETED[id(fn)] = (fn, InterpretedFunction(fn.fn))
    return _INTERPRETED[id(fn)][1]


@contextlib.contextmanager
def _library_calls_interpreted():
    """Inside an interpreted launch, make calls to `@triton.jit` library functions (tl.max, tl.sum,
    tl.zeros, ... are themselves jit functions, compiled ones unless TRITON_INTERPRET=1 was set
    before triton was imported) run interpreted too, as they would under TRITON_INTERPRET=1."""
    original = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: interpreted(self)(*args, **kwargs)
    try:
        yield
    finally:
        JITFunction.__call__ = original


def target_of(device: torch.device) -> int:
    """Whose autotune configs a device uses: 80 (Ampere-class, also sm_86/89) or 90 (Hopper and newer)."""
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def dot_mode(dtype: torch.dtype, device: torch.device):
    """(operand dtype for tl.dot, input_precision) for inputs of `dtype` on `device`."""
    if device.type != "cuda":  # interpreter: numpy fp32 dots (bf16 dots there are wrong, see above)
        return (tl.float16 if dtype == torch.float16 else tl.float32), "ieee"
    if dtype == torch.float32:
        # TF32 tensor-core dots, fp32 accumulate (torch's allow_tf32 trade-off): "ieee" and
        # "tf32x3" fp32 dots spilled registers in every attention config compiled for sm_80/90.
        return tl.float32, "tf32"
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "tf32"


class Launcher:
    """One kernel with its configs. `configs[target]` lists the `triton.Config`s autotuned on that
    target (by `key`); `cpu` holds the meta-parameters used under the interpreter; `pick`
    (optional) narrows a target's configs by the launch arguments (e.g. by element size)."""

    def __init__(
        self,
        fn,
        configs: Optional[dict[int, Sequence[triton.Config]]] = None,
        key: Sequence[str] = (),
        cpu: Optional[dict] = None,
        pick: Optional[Callable[[list, dict], list]] = None,
    ):
        self.fn = fn
        self.configs = {t: list(c) for t, c in (configs or {}).items()}
        self.key = list(key)
        self.cpu = dict(cpu or {})
        self.pick = pick
        self._tuned = None

    def _autotuner(self):
        if self._tuned is None:
            ids = {t: {id(c) for c in cs} for t, cs in self.configs.items()}
            every = [c for cs in self.configs.values() for c in cs]

            def prune(configs, named_args, **kwargs):
                device = next(v.device for v in named_args.values() if isinstance(v, torch.Tensor))
                keep = [c for c in configs if id(c) in ids[target_of(device)]]
                if self.pick is not None:
                    keep = self.pick(keep, named_args) or keep
                return keep

            self._tuned = triton.autotune(every, key=self.key, prune_configs_by={"early_config_prune": prune})(self.fn)
        return self._tuned

    def __call__(self, grid, device: torch.device, *args, meta: Optional[dict] = None, **kwargs):
        """Launch on `grid` (a tuple, or a callable of the meta-parameters). `meta` fixes
        meta-parameters on every path (kernels without autotune configs pass their block sizes)."""
        require_triton()
        meta = dict(meta or {})
        if device.type == "cuda" and isinstance(self.fn, JITFunction):
            if self.configs:
                return self._autotuner()[grid](*args, **kwargs, **meta)
            return self.fn[grid](*args, **kwargs, **meta)
        with _library_calls_interpreted():
            return interpreted(self.fn)[grid](*args, **kwargs, **{**self.cpu, **meta})
