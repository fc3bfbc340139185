"""benchmarks/gpu_check.sh on a machine without CUDA: it says so and exits 0; its driver
(benchmarks/gpu_check.py) runs every part that needs no GPU at tiny shapes on CPU (--cpu-smoke:
the kernels under the interpreter), prints one table, exits 1 on a parity failure; nothing it
runs imports ray, deepspeed or datasets. Every run is a subprocess: the driver installs an
import blocker and must not install it in the test process (nor put benchmarks/ on sys.path,
where benchmarks/kernels.py would shadow the kernels package)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from runtime_support import REPO, subprocess_env

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def table(stdout: str) -> dict[str, tuple[str, str]]:
    """{check: (status, result)} from the table the driver prints last (columns 2+ spaces apart)."""
    lines = stdout.split("\ngpu_check: ")[-1].splitlines()
    assert re.split(r"\s{2,}", lines[1]) == ["part", "check", "status", "result"]
    cells = [re.split(r"\s{2,}", line.strip(), maxsplit=3) for line in lines[2:]]
    return {name: (status, result) for _, name, status, result in cells}


def run(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = subprocess_env(CUDA_VISIBLE_DEVICES="", **(env or {}))  # as on a machine without CUDA
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_the_shell_script_on_cpu_says_so_and_exits_0():
    proc = run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], timeout=120, env={"PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and "exit 0" in proc.stdout


def test_nothing_it_runs_imports_ray_deepspeed_or_datasets():
    """Every module of the CUDA path (kernels.*, benchmarks/kernels.py, triton.testing, the
    torch.compile stack, llmtrain.model, llmtrain.metrics) imports under the blocker, and the
    blocker does block (ray, deepspeed and datasets are installed here)."""
    proc = run([sys.executable, str(SCRIPT), "--imports"], timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "blocked attempts: none; loaded: none" in proc.stdout
    probe = f"import runpy; runpy.run_path({str(SCRIPT)!r})\nimport deepspeed"
    proc = run([sys.executable, "-c", probe], timeout=180)
    assert proc.returncode == 1 and "gpu_check: deepspeed is blocked" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_cpu_smoke_runs_convergence_and_the_decoder_driver_and_prints_one_table():
    """(b) and (d) at tiny shapes: the triton and torch backends agree, the table has every row."""
    proc = run([sys.executable, str(SCRIPT), "--cpu-smoke", "--parts", "bcd"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = table(proc.stdout)
    assert rows["convergence, 5 steps fp32, all kernels vs references"][0] == "ok"
    assert rows["decoder tiny-cpu loss parity over 3 steps"][0] == "ok"
    for backend in ("triton", "torch"):
        assert rows[f"decoder tiny-cpu float32 {backend}"][1].endswith("(batch 2 x seq 64)")
        assert re.match(r"[\d,]+ tok/s, MFU [\d.]+%", rows[f"decoder tiny-cpu float32 {backend}"][1])
    assert rows["benchmarks/kernels.py"][0] == "SKIP" and "CUDA only" in rows["benchmarks/kernels.py"][1]
    assert rows["imports of ray/deepspeed/datasets"] == ("ok", "none")


PATCHED = """
import importlib, runpy, sys
ns = runpy.run_path({script!r})
S = importlib.import_module("kernels.swiglu")
S.swiglu = lambda gate, up: S.swiglu_reference(gate, up) * 1.001  # a kernel 0.1% off
sys.exit(ns["main"](["--cpu-smoke", "--parts", "a"]))
"""


@pytest.mark.slow
def test_a_parity_failure_is_a_failed_row_and_a_nonzero_exit():
    """(a) on CPU tensors (interpreted kernels) against the references: every kernel passes
    but the one made wrong, which fails its row and the exit status."""
    proc = run([sys.executable, "-c", PATCHED.format(script=str(SCRIPT))], timeout=600)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    status = {name: s for name, (s, _) in table(proc.stdout).items()}
    assert status.pop("swiglu float32 [37x160]") == "FAIL"
    assert {k.split()[0] for k in status} >= {"attention", "rms_norm", "apply_rope", "cross_entropy", "FusedAdamW", "imports"}
    assert set(status.values()) == {"ok"}, status


# benchmarks/kernels.py's CUDA lines, as its format strings print them
KERNELS_PY_OUTPUT = """CUDA device: NVIDIA H100 80GB HBM3; kernels backend triton

attention, causal, bf16, head dim 128, 16 heads, 16384 tokens per batch (TFLOP/s)
   seq     pass   triton  sdpa-flash  ratio  flash_attn  ratio
   512      fwd    201.3       250.1   0.80       260.2   0.77
  8192  fwd+bwd    310.0       330.5   0.94

AdamW step over 3 fp32 tensors, 62M parameters (ms)
  triton 1.23  torch-fused 1.50  ratio (baseline / triton) 1.22
  triton 1.23  torch-foreach 2.40  ratio (baseline / triton) 1.95

forward+backward, bf16 (ms; ratio = baseline / triton)
  rms_norm [16384x4096]            triton 0.321  eager 0.901 (2.81x)  torch.compile 0.350 (1.09x)
"""

PARSE = """
import json, runpy, sys
ns = runpy.run_path({script!r})
print(json.dumps(ns["kernel_bench_rows"](sys.stdin.read())))
"""


def test_the_table_takes_the_numbers_of_benchmarks_kernels_py():
    proc = subprocess.run(
        [sys.executable, "-c", PARSE.format(script=str(SCRIPT))],
        input=KERNELS_PY_OUTPUT,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(map(tuple, json.loads(proc.stdout)))
    assert rows == {
        "attention seq 512 fwd": "triton 201.3 TFLOP/s, sdpa-flash 250.1 (0.80x), FA2 260.2 (0.77x)",
        "attention seq 8192 fwd+bwd": "triton 310.0 TFLOP/s, sdpa-flash 330.5 (0.94x)",
        "AdamW vs torch-fused": "triton 1.23 ms, torch-fused 1.50 ms (1.22x)",
        "AdamW vs torch-foreach": "triton 1.23 ms, torch-foreach 2.40 ms (1.95x)",
        "rms_norm fwd+bwd": "triton 0.321 ms; eager 2.81x, torch.compile 1.09x slower",
    }
