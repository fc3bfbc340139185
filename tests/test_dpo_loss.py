"""Preference losses (llmtrain/tasks/dpo_loss.py): per-sequence sums exact under packing, and
the losses, rewards and gradients of sigmoid DPO, cDPO, IPO and SimPO equal to TRL's code and to
an independent reference written here from the papers' formulas; and per-token log-probs and
a DPO step through a ZeRO-3 engine equal to plain PyTorch.

TRL 1.16 has no stand-alone `DPOTrainer.dpo_loss` any more: the loss lives inside
`DPOTrainer._compute_loss`, which reads the policy's per-token log-probs from a model call. The
TRL test calls that method with a stand-in `self` and a stand-in model that returns our
sequence log-probs as per-token log-probs (reference log-probs "precomputed"), so TRL's own
arithmetic computes sigmoid and IPO (its per-token-averaged IPO included). TRL's sigmoid has no
label smoothing any more; cDPO and SimPO are checked with `CPOTrainer.cpo_loss` (a plain
function of log-probs: fed log-ratios it is cDPO, fed length-averaged log-probs it is SimPO).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmtrain.tasks.dpo_loss import pair_values, preference_loss, sequence_logprobs

CASES = [  # (loss_type, beta, label_smoothing, simpo_gamma)
    ("sigmoid", 0.1, 0.0, 0.5),
    ("sigmoid", 0.5, 0.2, 0.5),  # conservative DPO
    ("ipo", 0.1, 0.0, 0.5),
    ("ipo", 1.3, 0.0, 0.5),
    ("simpo", 2.0, 0.0, 0.5),
    ("simpo", 2.5, 0.1, 1.2),
]


def _inputs(pairs: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(pairs, generator=g, dtype=torch.float64) * 30 + 0.5) for _ in range(4)]
    lengths = [torch.randint(1, 25, (pairs,), generator=g) for _ in range(2)]
    return (*logps, *lengths)


def _ours(loss_type, beta, eps, gamma, pc, pr, rc, rr, nc, nr):
    pc, pr = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    losses, c, r = preference_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        simpo_gamma=gamma,
        chosen_lengths=nc,
        rejected_lengths=nr,
    )
    losses.sum().backward()
    return losses.detach(), c, r, pc.grad, pr.grad


# ---------------------------------------------------------------------------------------------
# Independent reference: the papers' formulas, per pair, written with softplus(-x) = -log sigmoid(x)


def _paper(loss_type, beta, eps, gamma, pc, pr, rc, rr, nc, nr):
    softplus = torch.nn.functional.softplus
    pc, pr = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    if loss_type == "sigmoid":  # Rafailov et al. 2023 Eq. 7; Mitchell 2023 (cDPO)
        u = beta * ((pc - rc) - (pr - rr))
        losses = (1 - eps) * softplus(-u) + eps * softplus(u)
        rewards = beta * (pc - rc), beta * (pr - rr)
    elif loss_type == "ipo":  # Azar et al. 2023 Eq. 17, log-ratios per answer token (TRL's normalisation)
        h = (pc - rc) / nc - (pr - rr) / nr
        losses = (h - 1 / (2 * beta)) ** 2
        rewards = beta * (pc - rc), beta * (pr - rr)
    else:  # Meng et al. 2024 Eq. 6, with TRL's label smoothing
        u = beta * pc / nc - beta * pr / nr - gamma
        losses = (1 - eps) * softplus(-u) + eps * softplus(u)
        rewards = beta * pc / nc, beta * pr / nr
    losses.sum().backward()
    return losses.detach(), rewards[0].detach(), rewards[1].detach(), pc.grad, pr.grad


@pytest.mark.parametrize("case", CASES)
def test_losses_rewards_and_gradients_follow_the_papers(case):
    inputs = _inputs()
    for got, want in zip(_ours(*case, *inputs), _paper(*case, *inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    pc, pr, rc, rr, nc, nr = inputs
    if case[0] == "simpo":  # reference-free: the reference is not read
        a = _ours(*case, pc, pr, None, None, nc, nr)[0]
        torch.testing.assert_close(a, _ours(*case, *inputs)[0], rtol=0, atol=0)


def test_sigmoid_is_the_logistic_loss_of_the_reward_margin():
    """At h = 0 the DPO loss is log 2 and the gradient pushes chosen up and rejected down equally."""
    z = torch.zeros(3, dtype=torch.float64)
    losses, _, _, gc, gr = _ours("sigmoid", 0.1, 0.0, 0.5, z, z, z, z, None, None)
    torch.testing.assert_close(
        losses, torch.full((3,), torch.log(torch.tensor(2.0, dtype=torch.float64)).item(), dtype=torch.float64)
    )
    torch.testing.assert_close(gc, torch.full((3,), -0.05, dtype=torch.float64))
    torch.testing.assert_close(gr, -gc)


def test_bad_arguments_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown preference loss_type"):
        preference_loss(x, x, x, x, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="pass chosen_lengths"):
        preference_loss(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="not defined for ipo"):
        preference_loss(x, x, x, x, beta=0.1, loss_type="ipo", label_smoothing=0.1, chosen_lengths=x, rejected_lengths=x)
    with pytest.raises(ValueError, match="compares with the reference"):
        preference_loss(x, x, None, None, beta=0.1)


# ---------------------------------------------------------------------------------------------
# TRL's own code


def _trl_dpo(loss_type, beta, pc, pr, rc, rr, nc, nr):
    """Mean loss over the pairs and its gradient w.r.t. the sequence log-probs, by
    trl.trainer.dpo_trainer.DPOTrainer._compute_loss (module docstring)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    P = len(pc)
    T = int(max(nc.max(), nr.max())) + 2
    seq = torch.cat([pc, pr]).detach().clone().requires_grad_(True)
    completion = torch.zeros(2 * P, T, dtype=torch.long)
    for i, n in enumerate(torch.cat([nc, nr]).tolist()):
        completion[i, 1 : 1 + n] = 1

    def model(**kwargs):  # per-token log-probs whose sum over each row is that sequence's log-prob
        first = torch.zeros(2 * P, T - 1, dtype=seq.dtype)
        first[:, 0] = 1
        zeros = torch.zeros(2 * P, T - 1)
        return SimpleNamespace(log_probs=first * seq[:, None], entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * P, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * P, T, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    return loss.detach(), seq.grad[:P], seq.grad[P:], trainer._metrics["train"]


def _trl_cpo(loss_type, beta, eps, gamma, chosen, rejected):
    """trl.experimental.cpo.CPOTrainer.cpo_loss on (chosen, rejected) values."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = SimpleNamespace(
        alpha=0.0,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=eps,
        simpo_gamma=gamma,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    chosen, rejected = chosen.detach().clone().requires_grad_(True), rejected.detach().clone().requires_grad_(True)
    losses, c, r = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    losses.sum().backward()
    return losses.detach(), c, r, chosen.grad, rejected.grad


@pytest.mark.parametrize("case", CASES)
def test_losses_rewards_and_gradients_equal_trl(case):
    pytest.importorskip("trl")
    loss_type, beta, eps, gamma = case
    pc, pr, rc, rr, nc, nr = inputs = _inputs(seed=1)
    losses, c, r, gc, gr = _ours(*case, *inputs)
    P = len(pc)
    if loss_type in ("sigmoid", "ipo") and eps == 0:
        mean, tc, tr, metrics = _trl_dpo(loss_type, beta, *inputs)
        torch.testing.assert_close(losses.sum() / P, mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(gc, tc * P, rtol=0, atol=1e-6)  # TRL takes the mean over pairs, we the sum
        torch.testing.assert_close(gr, tr * P, rtol=0, atol=1e-6)
        for k in range(P):  # each pair's loss and rewards on its own
            one = [t[k : k + 1] for t in inputs]
            mean_k, *_, metrics_k = _trl_dpo(loss_type, beta, *one)
            torch.testing.assert_close(losses[k], mean_k, rtol=0, atol=1e-6)
            assert metrics_k["rewards/chosen"][0] == pytest.approx(c[k].item(), abs=1e-5)  # logged as Python floats
            assert metrics_k["rewards/rejected"][0] == pytest.approx(r[k].item(), abs=1e-5)
    if loss_type == "sigmoid":  # fed log-ratios, CPO's sigmoid is (c)DPO
        want = _trl_cpo("sigmoid", beta, eps, gamma, pc - rc, pr - rr)
    elif loss_type == "ipo":  # fed per-token log-ratios, CPO's ipo is TRL's DPO ipo
        want = _trl_cpo("ipo", beta, eps, gamma, (pc - rc) / nc, (pr - rr) / nr)
        want = (want[0], beta * (pc - rc), beta * (pr - rr), want[3] / nc, want[4] / nr)  # rewards: summed log-ratios
    else:  # SimPO: CPO's simpo on length-averaged log-probs (TRL's average_log_prob=True)
        want = _trl_cpo("simpo", beta, eps, gamma, pc / nc, pr / nr)
        want = (*want[:3], want[3] / nc, want[4] / nr)
    for got, expected in zip((losses, c, r, gc, gr), want):
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sums per sequence


def test_sequence_logprobs_sum_exactly_the_positions_of_each_sequence():
    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(3, 17, generator=g)
    seq_ids = torch.randint(-1, 5, (3, 17), generator=g)
    got = sequence_logprobs(token_logps, seq_ids, 6)
    want = torch.stack([token_logps[seq_ids == s].sum() for s in range(6)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got[5] == 0  # a sequence without positions sums to 0
    leaf = token_logps.clone().requires_grad_(True)
    sequence_logprobs(leaf, seq_ids, 6).sum().backward()
    assert torch.equal(leaf.grad, (seq_ids >= 0).float())  # gradient only where a sequence has a label
    assert sequence_logprobs(token_logps, torch.full_like(seq_ids, -1), 0).shape == (0,)  # an empty padding batch


def test_pair_values_pick_each_pairs_sequences():
    seq = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mb = {
        "chosen_index": torch.tensor([0, 2]),
        "rejected_index": torch.tensor([1, 3]),
        "response_lengths": torch.tensor([5, 6, 7, 8]),
    }
    c, r, nc, nr = pair_values(seq, mb)
    assert c.tolist() == [1, 3] and r.tolist() == [2, 4] and nc.tolist() == [5, 7] and nr.tolist() == [6, 8]


# ---------------------------------------------------------------------------------------------
# Under DeepSpeed ZeRO-3


def _packed_split(vocab: int, seed: int = 0):
    """An in-memory PreferenceSplit: 2 rows of random pairs (answers supervised, prompts not)."""
    from llmtrain.data.preference import PreferenceSplit

    g = np.random.default_rng(seed)
    tokens, mask, lengths = [], [], []
    for _ in range(5 * 2):
        prompt, answer = int(g.integers(2, 6)), int(g.integers(1, 5))
        tokens.append(g.integers(0, vocab, prompt + answer))
        mask.append(np.r_[np.zeros(prompt), np.ones(answer)])
        lengths.append(prompt + answer)
    starts = np.r_[0, np.cumsum(lengths)]
    return PreferenceSplit(
        np.concatenate(tokens).astype(np.int32), np.concatenate(mask).astype(np.uint8), starts, np.array([0, 3, 5]), np.arange(5)
    )


def _zero3_worker() -> None:
    """In a fresh 1-process gloo group: per-token log-probs (reduction="none") of a ZeRO-3
    engine (every parameter partitioned, tied head) equal a plain copy's, and one DPO step
    through the engine equals the same step in plain PyTorch."""
    import deepspeed
    import torch.distributed as dist

    from llmtrain.data.preference import PreferenceBatches
    from llmtrain.model.decoder import Decoder
    from llmtrain.model.model_config import ModelConfig
    from llmtrain.tasks.dpo_loss import batch_logprobs

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a ~60 s JIT build
    dist.init_process_group("gloo", rank=0, world_size=1)
    ds = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": 0.0,
    }
    cfg = ModelConfig.from_preset(
        "tiny",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = Decoder(cfg)
    assert model.lm_head.weight.numel() == 0  # partitioned
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        plain = Decoder(cfg)
        plain.load_state_dict({n: p.detach().clone() for n, p in model.state_dict().items()})
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=ds, dist_init_required=False
    )
    mb = PreferenceBatches(_packed_split(96), 64, 0, micro_batch_size=2, grad_accum=1, rank=0, world_size=1, seed=0).micro_batch(
        [0, 1]
    )
    ref_c, ref_r = torch.full((5,), -20.0), torch.full((5,), -18.0)

    def loss_of(m):
        seq = batch_logprobs(m, mb)
        losses, *_ = preference_loss(seq[mb["chosen_index"]], seq[mb["rejected_index"]], ref_c, ref_r, beta=0.5)
        return seq, losses.sum()

    seq, loss = loss_of(engine)
    seq_plain, loss_plain = loss_of(plain)
    assert torch.allclose(seq, seq_plain, atol=1e-5, rtol=0), (seq, seq_plain)
    engine.backward(loss)
    engine.step()
    loss_plain.backward()
    with torch.no_grad():
        for p in plain.parameters():
            p -= 0.5 * p.grad
        after, expected = batch_logprobs(engine, mb), batch_logprobs(plain, mb)
    assert torch.allclose(after, expected, atol=1e-4, rtol=0), (after, expected)
    assert (after - seq).abs().max() > 1e-2  # the step moved the log-probs
    dist.destroy_process_group()
    print("ZERO3-DPO-OK")


def test_zero3_per_token_logprobs_and_a_dpo_step_equal_plain_pytorch():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu"
    )
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_dpo_loss; test_dpo_loss._zero3_worker()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ZERO3-DPO-OK" in run.stdout, run.stderr[-3000:]
