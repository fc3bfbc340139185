"""Our top-level `kernels` package must not confuse transformers, which probes for an unrelated
PyPI package of the same name (Hugging Face hub kernels)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, STORIES260K, need_shared

SCRIPT = f"""
import pathlib
import kernels
assert pathlib.Path(kernels.__file__).resolve().parent == pathlib.Path({str(REPO)!r}) / "kernels", kernels.__file__
from transformers.utils import import_utils
assert import_utils.is_kernels_available() is False
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(STORIES260K)!r})
model = AutoModelForCausalLM.from_pretrained({str(STORIES260K)!r})
ids = tok("Once upon a time", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=24, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
"""


def test_transformers_works_beside_our_kernels_package():
    need_shared()
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside")
