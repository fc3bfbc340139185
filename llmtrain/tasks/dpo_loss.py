"""Preference losses: DPO (sigmoid, with cDPO label smoothing), IPO and SimPO, over packed pairs.

    seq = batch_logprobs(model, mb)                     # [S] summed log p of each sequence's answer
    chosen, rejected, n_c, n_r = pair_values(seq, mb)   # [P] each
    losses, r_c, r_r = preference_loss(chosen, rejected, ref_c, ref_r, beta=0.1, loss_type="sigmoid",
                                       chosen_lengths=n_c, rejected_lengths=n_r)
    loss_sum = losses.sum()                             # the caller divides by the global pair count

The micro-batches are llmtrain/data/preference.py's: `seq_ids` maps each label position to its
sequence, so the per-sequence sums are exact under packing (a scatter-add over supervised
tokens; attention never crosses a sequence). With pi the policy, ref the reference and y_w /
y_l the chosen / rejected answers, logp = log pi(y|x) summed over the answer's tokens and
n = its supervised token count:

- sigmoid (DPO, Rafailov et al. 2023, Eq. 7): h = (logp_w - ref_w) - (logp_l - ref_l),
  loss = -log sigmoid(beta h); with label smoothing eps (conservative DPO, Mitchell 2023)
  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
- ipo (Azar et al. 2023, Eq. 17): loss = (h_avg - 1 / (2 beta))^2 with h_avg = (logp_w - ref_w) / n_w
  - (logp_l - ref_l) / n_l: TRL (1.16, DPOTrainer) divides each log-ratio by its answer's token
  count (the IPO authors' normalisation, as TRL's comment says), and so do we.
- simpo (Meng et al. 2024, Eq. 6): reference-free, loss = -log sigmoid(beta (logp_w / n_w -
  logp_l / n_l) - gamma), label-smoothed like sigmoid (TRL's CPOTrainer does the same).

Rewards (detached, for logging as TRL does): beta (logp - ref) for sigmoid and ipo (summed, not
averaged, also for ipo), beta logp / n for simpo. Token counts are clamped to >= 1.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "simpo")


def sequence_logprobs(token_logps: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[S] sum of token_logps [B, L] over the positions of each sequence (seq_ids [B, L], -1 = none)."""
    valid = seq_ids >= 0
    out = torch.zeros(num_seqs, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, seq_ids[valid], token_logps[valid])


def batch_logprobs(model, micro_batch: dict) -> torch.Tensor:
    """[S] summed log-probabilities of each sequence's supervised tokens under `model` (a Decoder,
    or a DeepSpeed engine around one; the micro-batch already on its device): the per-token
    cross-entropy comes from the LM head's own forward (reduction="none"), so the [B, L, V]
    logits are never materialised and ZeRO-3 gathers the head's weight there."""
    ce = model(micro_batch["input_ids"], position_ids=micro_batch["position_ids"], labels=micro_batch["labels"], reduction="none")
    seq_ids = micro_batch["seq_ids"].to(ce.device)
    return sequence_logprobs(-ce, seq_ids, int(micro_batch["response_lengths"].numel()))


def pair_values(seq_values: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, ...]:
    """(chosen [P], rejected [P], chosen token counts [P], rejected token counts [P]) of a
    micro-batch, from per-sequence values [S]."""
    device = seq_values.device
    chosen, rejected = micro_batch["chosen_index"].to(device), micro_batch["rejected_index"].to(device)
    lengths = micro_batch["response_lengths"].to(device)
    return seq_values[chosen], seq_values[rejected], lengths[chosen], lengths[rejected]


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor],
    ref_rejected_logps: Optional[torch.Tensor],
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses [P], chosen rewards [P], rejected rewards [P]) in fp32 (fp64 inputs stay
    fp64); the rewards are detached. Inputs are [P] summed log-probabilities (the formulas: module
    docstring); ipo and simpo need the token counts, simpo no reference (None is accepted there).
    Nothing is averaged over pairs: the caller sums the losses and divides by the global count."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5 or (label_smoothing and loss_type == "ipo"):
        raise ValueError(f"label_smoothing must lie in [0, 0.5) and is not defined for ipo (got {label_smoothing}, {loss_type})")
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    pc, pr = chosen_logps.to(dtype), rejected_logps.to(dtype)
    if loss_type != "sigmoid" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type={loss_type} averages over answer tokens: pass chosen_lengths and rejected_lengths")
    if loss_type == "simpo":
        avg_c, avg_r = pc / _count(chosen_lengths, pc), pr / _count(rejected_lengths, pr)
        losses = _smoothed(beta * (avg_c - avg_r) - simpo_gamma, label_smoothing)
        return losses, (beta * avg_c).detach(), (beta * avg_r).detach()
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type={loss_type} compares with the reference: pass ref_chosen_logps and ref_rejected_logps")
    ratio_c = pc - ref_chosen_logps.to(pc.device, dtype)
    ratio_r = pr - ref_rejected_logps.to(pr.device, dtype)
    if loss_type == "sigmoid":
        losses = _smoothed(beta * (ratio_c - ratio_r), label_smoothing)
    else:  # ipo
        h = ratio_c / _count(chosen_lengths, pc) - ratio_r / _count(rejected_lengths, pr)
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, (beta * ratio_c).detach(), (beta * ratio_r).detach()


def _smoothed(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x) (eps = 0: plain -log sigmoid(x))."""
    if eps == 0:
        return -F.logsigmoid(logits)
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def _count(lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return lengths.to(like.device, like.dtype).clamp(min=1.0)
