"""The fused Triton AdamW vs torch.optim.AdamW, under Triton's interpreter on CPU: step for step
in fp32, bf16 parameters with fp32 masters, in-kernel gradient scaling and clipping, state_dict
resume, and as DeepSpeed's client optimizer under ZeRO-2 and ZeRO-3 on 2 gloo processes.

Tolerances: the Adam moments are bit-identical to torch's (same fma rounding); parameters may
differ by ~1 float32 ulp per step because torch's vectorised CPU sqrt is not correctly rounded
(kernels/adamw.py), so after 25 steps they agree within 1e-6 relative (+1e-7 absolute).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
AD = importlib.import_module("kernels.adamw")

SHAPES = [(17,), (64, 33), (5, 7, 3), (1,), (70001,)]  # 70001 spans two CPU blocks of 65536


@pytest.fixture(autouse=True)
def force_triton():
    """CPU parameters take the kernel (interpreted) only when the triton backend is forced."""
    import kernels

    before = kernels.dispatch._backend
    kernels.set_backend("triton")
    yield
    kernels.dispatch._backend = before


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def groups(ps):
    return [{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0, "lr": 3e-3}]


def grads(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_fp32_equals_torch_adamw_step_for_step():
    fused, ref = make_params(), make_params()
    opt = AD.FusedAdamW(groups(fused), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    want = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 5)) for o in (opt, want)]
    for step in range(25):
        for p, q, g in zip(fused, ref, grads(step)):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 7:
            fused[1].grad = ref[1].grad = None  # a parameter without a gradient this step is skipped
        opt.step()
        want.step()
        for s in sched:
            s.step()
        for p, q in zip(fused, ref):
            close(p, q)
            if p in opt.state:
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(opt.state[p][key], want.state[q][key]), (step, key)
                assert opt.state[p]["step"].item() == want.state[q]["step"].item()
    assert opt.state[fused[1]]["step"].item() == 24


def test_bf16_params_keep_fp32_masters():
    """bf16 parameters: the update runs on an fp32 master equal to torch AdamW on fp32 copies;
    the parameter is the master rounded to bf16 (within one bf16 ulp: the interpreter truncates)."""
    fused = make_params(torch.bfloat16)
    ref = [p.detach().float().requires_grad_() for p in fused]
    opt = AD.FusedAdamW(groups(fused), lr=1e-2, weight_decay=0.1)
    want = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=0.1)
    for step in range(10):
        gs = grads(step, torch.bfloat16)
        for p, q, g in zip(fused, ref, gs):
            p.grad, q.grad = g, g.float()
        opt.step()
        want.step()
    for p, q in zip(fused, ref):
        assert p.dtype == torch.bfloat16 and opt.state[p]["master"].dtype == torch.float32
        close(opt.state[p]["master"], q.detach())
        torch.testing.assert_close(p.float(), q.detach(), atol=0, rtol=2**-7)


def test_grad_scale_and_clipping_inside_the_kernel():
    fused, ref = make_params(), make_params()
    opt = AD.FusedAdamW(groups(fused), lr=1e-2, max_grad_norm=0.5)
    want = torch.optim.AdamW(groups(ref), lr=1e-2)
    for step in range(5):
        for p, q, g in zip(fused, ref, grads(step)):
            p.grad, q.grad = 64.0 * g, g.clone()  # e.g. a loss scale of 64, undone by grad_scale
        opt.step(grad_scale=1 / 64)
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        want.step()
        for p, q in zip(fused, ref):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        assert torch.equal(fused[0].grad, 64.0 * grads(step)[0])  # gradients themselves untouched


def test_state_dict_resume_continues_identically():
    a, b = make_params(), make_params()
    oa = AD.FusedAdamW(groups(a), lr=1e-2)
    ob = AD.FusedAdamW(groups(b), lr=1e-2)
    for step in range(6):
        for opt, ps in ((oa, a), (ob, b)):
            for p, g in zip(ps, grads(step)):
                p.grad = g
            if step < 3 or opt is oa:
                opt.step()
        if step == 2:
            saved = ob.state_dict()
            ob = AD.FusedAdamW(groups(b), lr=1e-2)
            ob.load_state_dict(saved)
            for p, q in zip(a, b):
                assert torch.equal(p, q)
    for step in range(3, 6):
        for p, g in zip(b, grads(step)):
            p.grad = g
        ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_cpu_parameters_take_torch_operations_unless_triton_is_forced(monkeypatch):
    """ZeRO-Offload gives the optimizer CPU partitions: under `auto` they are updated with torch's
    own operations (bit-identical to torch.optim.AdamW), not the interpreter."""
    import kernels

    kernels.set_backend("auto")
    monkeypatch.setattr(AD, "fused_adamw_update", lambda *a, **k: pytest.fail("the kernel ran on CPU under auto"))
    for dtype in (torch.float32, torch.bfloat16):
        fused = make_params(dtype)
        ref = [p.detach().float().requires_grad_() for p in fused]
        opt = AD.FusedAdamW(groups(fused), lr=1e-2, weight_decay=0.1)
        want = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=0.1)
        for step in range(5):
            for p, q, g in zip(fused, ref, grads(step, dtype)):
                p.grad, q.grad = g, g.float()
            opt.step()
            want.step()
        for p, q in zip(fused, ref):
            master = opt.state[p].get("master", p)
            assert torch.equal(master, q.detach())
            assert torch.equal(p, q.detach().to(dtype))


def test_dispatch_factory():
    import kernels

    before = kernels.dispatch._backend
    try:
        ps = make_params()
        kernels.set_backend("torch")
        assert (
            type(kernels.adamw_optimizer(groups(ps), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)) is torch.optim.AdamW
        )
        kernels.set_backend("triton")
        opt = kernels.adamw_optimizer(groups(ps), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        assert isinstance(opt, AD.FusedAdamW)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # a group's own value wins
        kernels.set_backend("auto")  # CPU parameters: torch's optimizer
        assert type(kernels.adamw_optimizer(groups(ps), lr=1e-3)) is torch.optim.AdamW
    finally:
        kernels.dispatch._backend = before


# ---- DeepSpeed ZeRO on 2 CPU processes -------------------------------------------------------


def _zero_worker(out: str, store: str) -> None:
    """One rank: for ZeRO stages 2 and 3, the same model and data through two DeepSpeed engines,
    one with FusedAdamW as the client optimizer and one with torch.optim.AdamW; rank 0 writes
    both final parameter sets per stage."""
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a ~60 s JIT build
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)  # no port to race for
    launches = []
    kernel = AD.fused_adamw_update
    AD.fused_adamw_update = lambda *a, **k: launches.append(1) or kernel(*a, **k)
    result = {}
    for stage in (2, 3):
        ds = {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        }
        for name in ("fused", "torch"):
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 40), torch.nn.GELU(), torch.nn.Linear(40, 3)
            )
            decay = [p for p in model.parameters() if p.dim() == 2]
            no_decay = [p for p in model.parameters() if p.dim() < 2]
            pg = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
            opt = (
                AD.FusedAdamW(pg, lr=3e-3, betas=(0.9, 0.95))
                if name == "fused"
                else torch.optim.AdamW(pg, lr=3e-3, betas=(0.9, 0.95))
            )
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
            assert engine.optimizer.optimizer is opt  # the ZeRO wrapper steps our optimizer on its flat partitions
            g = torch.Generator().manual_seed(100 + rank)
            for _ in range(8):
                x, y = torch.randn(4, 24, generator=g), torch.randn(4, 3, generator=g)
                loss = torch.nn.functional.mse_loss(engine(x), y)
                engine.backward(loss)
                engine.step()
            with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
                result[f"{stage}-{name}"] = [p.detach().clone().tolist() for p in model.parameters()]
            result[f"{stage}-{name}-loss"] = loss.item()
    result["kernel_launches"] = len(launches)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()  # neither rank tears the group down while the other is still in a collective
    dist.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_zero_client_optimizer_equals_torch_adamw(tmp_path):
    """ZeRO-2 (and ZeRO-3) on 2 CPU processes: FusedAdamW as the client optimizer trains the
    same parameters as torch.optim.AdamW."""
    out, store = tmp_path / "result.json", tmp_path / "store"
    here = Path(__file__).resolve()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            LLMTRAIN_KERNELS="triton",
        )  # the kernel itself (interpreted) on the CPU partitions
        code = f"import sys; sys.path.insert(0, {str(here.parent)!r}); import {here.stem} as t; t._zero_worker({str(out)!r}, {str(store)!r})"
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    logs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in logs)
    result = json.loads(out.read_text())
    assert result["kernel_launches"] >= 2 * 8  # the Triton kernel stepped the partitions (8 steps, 2 stages)
    torch.manual_seed(0)
    init = torch.nn.Linear(24, 40).weight
    for stage in (2, 3):
        assert abs(result[f"{stage}-fused-loss"] - result[f"{stage}-torch-loss"]) < 1e-5, stage
        for fused, ref in zip(result[f"{stage}-fused"], result[f"{stage}-torch"]):
            close(torch.tensor(fused), torch.tensor(ref))
        assert (torch.tensor(result[f"{stage}-fused"][0]) - init).abs().max() > 1e-3  # training really updated the weights
