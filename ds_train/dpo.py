"""Preference tuning (train.objective=dpo): the DPO loss on the log-likelihood of the target audio turn, and its
optimizer step.

A sample's log-likelihood is the sum, over every codebook and every trained position of its audio-out stream, of the
log-probability of the audio label, with the shift and delay-pattern masks of the SFT loss (ds_train/loss.py:
position n of the collated stream scores label n+1; stream BOS and the delay pattern's padding are IGNORE). Each
micro-batch holds whole pairs, chosen then rejected (ds_train.data.pairs). For pair i, with beta = loss.dpo_beta:
    reward_c = beta * (log pi(chosen) - log ref(chosen)),  reward_r = beta * (log pi(rejected) - log ref(rejected))
    loss_i = -log sigmoid(reward_c - reward_r)
The step's DPO loss is the mean of loss_i over the pairs of the global batch: each micro-batch contributes its
pairs' sum divided by the global pair count, all-reduced before the first forward, so the number and the gradient
do not depend on how the pairs are split into micro-batches and ranks (as loss.objective does for tokens).
loss.dpo_sft_weight adds that weight times the SFT loss of the chosen clips (token-weighted over the global batch).

The reference policy is the same model with the LoRA adapter disabled (peft's disable_adapter(), no second copy of
the weights); its forward runs under no_grad on every rank, as ZeRO-3 needs all ranks in every forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ds_train import dist, faults
from ds_train.config import Config
from ds_train.data.collate import Batch, chosen_only
from ds_train.loss import IGNORE, LossReport, loss_sums, objective, report


def sample_logps(outputs, batch: Batch) -> torch.Tensor:
    """(num_samples,) each sample's summed log-probability of its trained audio labels, in fp64: a clip's is a sum
    of thousands of terms, and DPO takes differences of such sums. (Boson's forward returns fp32 audio logits.)"""
    audio_logits = outputs.audio_logits
    logits = audio_logits if audio_logits.dtype in (torch.float32, torch.float64) else audio_logits.float()
    out = torch.zeros(batch.num_samples, dtype=torch.float64, device=logits.device)
    labels = batch.label_audio_ids.to(logits.device)
    if logits.shape[0] < 2 or not labels.numel():
        return out + logits.sum() * 0.0  # attached: every rank's backward reaches the same parameters
    shifted = labels[:, 1:]  # (K, N-1): position n predicts code n+1, as in loss.loss_sums
    nll = sum(F.cross_entropy(logits[:-1, k, :], shifted[k], ignore_index=IGNORE, reduction="none")
              for k in range(shifted.shape[0]))  # 0 where the label is IGNORE
    owner = batch.audio_owner.to(logits.device)[1:]  # label n+1 belongs to the segment (and sample) it sits in
    return out.index_add(0, owner, -nll.to(torch.float64))


@dataclass
class PairTerms:
    """Per pair of a micro-batch: the DPO loss and the two implicit rewards."""
    loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor


def pair_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> PairTerms:
    """DPO terms of pairs laid out chosen, rejected, chosen, ... in `policy` and `reference` (sample
    log-likelihoods)."""
    rewards = beta * (policy - reference.to(policy.dtype))
    chosen, rejected = rewards[0::2], rewards[1::2]
    return PairTerms(-F.logsigmoid(chosen - rejected), chosen, rejected)


def reference_logps(engine, batch: Batch) -> torch.Tensor:
    """Sample log-likelihoods under the reference policy: the model with its adapter disabled, no graph."""
    with torch.no_grad(), adapter_disabled(engine):
        return sample_logps(engine(**batch.inputs), batch)


def adapter_disabled(engine):
    """peft's disable_adapter() of the model `engine` runs (a DeepSpeed engine or the peft model itself)."""
    model = getattr(engine, "module", engine)
    if not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()  # config refuses DPO without an adapter; a bare model is its own reference
    return model.disable_adapter()


@dataclass
class DpoReport:
    """The step's numbers, global means over its pairs; rewards are beta * (log pi - log ref)."""
    loss: float  # what was optimised: DPO + loss.dpo_sft_weight x SFT
    dpo_loss: float
    chosen_reward: float
    rejected_reward: float
    accuracy: float  # the fraction of pairs whose chosen reward is the higher
    sft: Optional[LossReport]  # the chosen clips' SFT loss, when loss.dpo_sft_weight > 0

    def as_record(self, prefix: str = "") -> dict:
        record = {f"{prefix}loss": self.loss, f"{prefix}dpo_loss": self.dpo_loss,
                  f"{prefix}dpo_chosen_reward": self.chosen_reward,
                  f"{prefix}dpo_rejected_reward": self.rejected_reward,
                  f"{prefix}dpo_margin": self.chosen_reward - self.rejected_reward,
                  f"{prefix}dpo_accuracy": self.accuracy}
        if self.sft is not None:
            record.update(self.sft.as_record(f"{prefix}sft_"))
        return record


STATS = 4  # summed over pairs: loss, chosen reward, rejected reward, correctly ordered


def dpo_step(engine, batches: list[Batch], cfg: Config, step: int) -> tuple[DpoReport, int, int]:
    """One optimizer step over this rank's micro-batches of pairs: (report, tokens, samples of all ranks). Gradient
    scaling as in train.train_step: DeepSpeed's mean over ranks and accumulation steps undone, the loss carries the
    global normalisation."""
    device, world, lc = dist.device(), dist.world_size(), cfg.loss
    pairs_here = sum(b.num_samples for b in batches) // 2
    known = dist.all_reduce_tensor(torch.cat([torch.tensor([pairs_here]), sum(b.counts for b in batches)]).to(device))
    n_pairs, sft_counts = known[0].to(torch.float64), known[1:]
    stats = torch.zeros(STATS + len(sft_counts), dtype=torch.float64, device=device)
    poisoned = False
    engine.train()
    faults.raise_if("error", step)
    for batch in batches:
        batch = batch.to(device)
        reference = reference_logps(engine, batch)
        outputs = engine(**batch.inputs)
        terms = pair_terms(sample_logps(outputs, batch), reference, lc.dpo_beta)
        loss = terms.loss.sum() / n_pairs.to(terms.loss.dtype)
        if lc.dpo_sft_weight:
            parts = loss_sums(outputs, chosen_only(batch.label_audio_ids, batch.audio_owner))
            loss = loss + lc.dpo_sft_weight * objective(parts, sft_counts, lc.text_weight, lc.audio_weight)
            stats[STATS:] += parts.detached()
        if faults.active("nan_loss", step):
            loss, poisoned = loss * float("nan"), True
        engine.backward(loss * world, scale_wrt_gas=False)
        engine.step()
        stats[:STATS] += torch.stack([terms.loss.detach().sum(), terms.chosen_reward.detach().sum(),
                                      terms.rejected_reward.detach().sum(),
                                      (terms.chosen_reward > terms.rejected_reward).sum()]).to(torch.float64)
    if poisoned:
        stats *= float("nan")
    host = torch.tensor([sum(b.num_tokens for b in batches), sum(b.num_samples for b in batches)],
                        dtype=torch.float64, device=device)
    totals = dist.all_reduce_tensor(torch.cat([stats, host])).tolist()  # the step's one wait for the device
    pairs = float(n_pairs)
    dpo_loss, chosen, rejected, right = (t / pairs for t in totals[:STATS])
    sft = None
    if lc.dpo_sft_weight:
        sft = report(totals[STATS:-2], sft_counts.tolist(), lc.text_weight, lc.audio_weight)
    total = dpo_loss + (lc.dpo_sft_weight * sft.loss if sft is not None else 0.0)
    return DpoReport(total, dpo_loss, chosen, rejected, right, sft), int(totals[-2]), int(totals[-1])
