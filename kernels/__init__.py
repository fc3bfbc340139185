"""llmtrain's kernels: Triton implementations with a PyTorch reference beside each.

The model and the engine use kernels only through the functions re-exported here from
`kernels.dispatch`, which picks Triton on CUDA and the PyTorch reference elsewhere
(override with `set_backend(...)` or the `LLMTRAIN_KERNELS` environment variable).
The functions `attention`, `swiglu` and `cross_entropy` shadow the submodules of the same
name as package attributes; reach a submodule with importlib.import_module("kernels.<name>").
See kernels/README.md.

Note: this top-level package shares its import name with an unrelated PyPI package
("kernels", Hugging Face's hub kernels) that transformers probes for; it does not define
`__version__` on purpose, and tests/test_packaging.py checks that transformers imports and
runs beside it.
"""

from kernels.dispatch import (  # noqa: F401
    adamw_optimizer,
    apply_rope,
    attention,
    backend,
    cross_entropy,
    fused_linear_cross_entropy,
    rms_norm,
    set_backend,
    swiglu,
)
