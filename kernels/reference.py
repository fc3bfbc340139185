"""PyTorch reference implementations of every kernel (the `torch` backend and the tests' oracle).

Each reference lives beside its Triton kernel (kernels/<name>.py); this module gathers them
under the names the dispatch point uses. Importing it does not need triton.
"""

from kernels.adamw import adamw_reference as adamw  # noqa: F401
from kernels.attention import attention_reference as attention  # noqa: F401
from kernels.cross_entropy import cross_entropy_reference as cross_entropy  # noqa: F401
from kernels.cross_entropy import fused_linear_cross_entropy_reference as fused_linear_cross_entropy  # noqa: F401
from kernels.rmsnorm import rms_norm_reference as rms_norm  # noqa: F401
from kernels.rope import apply_rope_reference as apply_rope  # noqa: F401
from kernels.rope import rotate_half  # noqa: F401
from kernels.swiglu import swiglu_reference as swiglu  # noqa: F401
