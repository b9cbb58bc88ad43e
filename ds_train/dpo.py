"""Preference tuning (train.objective=dpo): the DPO loss on the log-likelihood of the target audio turn, as an
objective of train.train_step.

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

The reference policy is the model as the run builds it, before its first step: the base with a fresh (identity) LoRA
adapter, the base with lora.init_from's adapter, or the full model of train.mode=full. It never changes, so its
log-likelihood of every paired sample is computed once, in a pre-pass at the start of the run (reference_table: every
rank forwards its share of the pairs, no grad, eval mode; the results are summed into one fp64 tensor indexed by
sample), before a resumed run loads its checkpoint. Rank 0 saves it in OUTPUT_DIR/dpo_reference.npz with a
fingerprint of what it depends on, and a relaunch loads it instead. No second copy of the model is kept (ZeRO-3
partitions one), and a step runs one forward per micro-batch, not two.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ds_train import dist
from ds_train.config import Config
from ds_train.fsutil import replacing
from ds_train.data.collate import Batch, chosen_only
from ds_train.loss import IGNORE, LossReport, MicroLoss, loss_sums, objective, report


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


REFERENCE = "dpo_reference.npz"  # in OUTPUT_DIR: written and read here alone


def reference_table(engine, data, cfg: Config, out: Path, dtype: str) -> torch.Tensor:
    """(samples of the training set,) fp64 on the host: each paired sample's log-likelihood under the model as it is
    now (the reference policy; call it before a checkpoint is loaded). Loaded from OUTPUT_DIR when a previous launch
    of this run saved it for the same model, data and dtype; otherwise computed by all ranks, each its share of the
    pairs in fixed chunks of pairs (so the numbers do not depend on the number of ranks), and saved by rank 0."""
    dataset, sampler = data.train_set, data.sampler
    path, lines = Path(out) / REFERENCE, dataset.record_numbers()
    paired = np.concatenate([sampler.chosen, sampler.rejected])
    fingerprint = _fingerprint(cfg, dataset, dtype)
    saved = _load(path, fingerprint, lines[paired])
    if all(dist.all_gather_object(saved is not None)):  # every rank takes the same path
        table = torch.zeros(len(dataset), dtype=torch.float64)
        table[torch.from_numpy(paired)] = torch.from_numpy(saved)
        dist.print0(f"dpo: reference log-likelihoods of {len(sampler.chosen)} pair(s) loaded from {path}")
        return table
    t0, device, world = time.time(), dist.device(), dist.world_size()
    chunks = reference_chunks(sampler.chosen, sampler.rejected, dataset.length_array(),
                              cfg.train.micro_batch_size, cfg.data.max_tokens)
    table = torch.zeros(len(dataset), dtype=torch.float64, device=device)
    engine.eval()
    with torch.no_grad():
        for k in range(dist.rank(), math.ceil(len(chunks) / world) * world, world):
            # ZeRO-3: every rank joins every forward; a rank past the last chunk forwards chunk 0 and drops it
            indices = chunks[k] if k < len(chunks) else chunks[0]
            batch = data.loader.collate_fn([(i, dataset[i]) for i in indices]).to(device)
            logps = sample_logps(engine(**batch.inputs), batch)
            if k < len(chunks):
                table[torch.tensor(indices, device=device)] = logps
    engine.train()
    table = dist.all_reduce_tensor(table).cpu()  # each sample is filled by one rank, zero elsewhere
    if dist.is_main():
        with replacing(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(fingerprint), lines=lines[paired], logps=table.numpy()[paired])
    dist.print0(f"dpo: reference log-likelihoods of {len(sampler.chosen)} pair(s) computed in {time.time() - t0:.1f}s "
                f"({len(chunks)} forward(s) over {world} rank(s)), saved to {path}")
    return table


def reference_chunks(chosen: np.ndarray, rejected: np.ndarray, lengths: np.ndarray, micro_batch_size: int,
                     max_tokens: int) -> list[list[int]]:
    """The pre-pass's micro-batches: the pairs in order, chosen then rejected, `micro_batch_size` pairs each, or with
    a token budget as many as fit it (as PairSampler counts a pair: twice its longer sample, padded to the longest)."""
    chunks, longest = [], 0
    for c, r in zip(chosen.tolist(), rejected.tolist()):
        size = 2 * int(max(lengths[c], lengths[r]))
        n = len(chunks[-1]) // 2 if chunks else 0
        full = (max(longest, size) * (n + 1) > max_tokens) if max_tokens else n >= micro_batch_size
        if not chunks or full:
            chunks.append([])
            longest = 0
        chunks[-1] += [c, r]
        longest = max(longest, size)
    return chunks


def _fingerprint(cfg: Config, dataset, dtype: str) -> str:
    """What the reference log-likelihoods depend on: the model as built (model and LoRA settings, train.mode, the
    dtype, the seed) and the prepared pairs (their cache's fingerprint and manifest digest)."""
    index = dataset.index or {}
    what = {"model": asdict(cfg.model), "lora": asdict(cfg.lora), "mode": cfg.train.mode, "dtype": dtype,
            "seed": cfg.train.seed,  # model.init=random: the weights are the seed's
            "cache": [index.get("fingerprint"), index.get("manifest_sha1")]}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _load(path: Path, fingerprint: str, want: np.ndarray) -> Optional[np.ndarray]:
    """The saved log-likelihoods of the samples with record numbers `want`, or None when the file is missing, made
    for something else, or lacks one of them."""
    try:
        with np.load(path) as saved:
            if str(saved["fingerprint"]) != fingerprint:
                return None
            known, logps = saved["lines"], saved["logps"]
    except (OSError, ValueError, KeyError):
        return None
    if not len(known):
        return None
    order = np.argsort(known)
    at = order[np.searchsorted(known, want, sorter=order).clip(max=len(known) - 1)]
    return logps[at] if (known[at] == want).all() else None


@dataclass
class DpoReport:
    """The step's numbers, global means over its pairs; rewards are beta * (log pi - log ref)."""
    loss: float  # what was optimised: DPO + loss.dpo_sft_weight x SFT
    dpo_loss: float
    chosen_reward: float
    rejected_reward: float
    accuracy: float  # the fraction of pairs whose chosen reward is the higher
    sft: Optional[LossReport]  # the chosen clips' SFT loss (trained with weight loss.dpo_sft_weight)

    def as_record(self, prefix: str = "") -> dict:
        record = {f"{prefix}loss": self.loss, f"{prefix}dpo_loss": self.dpo_loss,
                  f"{prefix}dpo_chosen_reward": self.chosen_reward,
                  f"{prefix}dpo_rejected_reward": self.rejected_reward,
                  f"{prefix}dpo_margin": self.chosen_reward - self.rejected_reward,
                  f"{prefix}dpo_accuracy": self.accuracy}
        if self.sft is not None:
            record.update(self.sft.as_record(f"{prefix}sft_"))
        return record


class Dpo:
    """train.objective=dpo as an objective of train.train_step (see ds_train.loss.Sft for the protocol): each
    micro-batch holds whole pairs; `known` is the global pair count; `stats` the pairs' summed DPO loss, chosen and
    rejected rewards and correctly ordered pairs. The chosen clips' SFT loss is always computed (its counts are what
    train.check_counts checks; it is logged as sft_loss) and trained with loss.dpo_sft_weight."""

    STATS = 4

    def __init__(self, cfg: Config, reference: torch.Tensor):
        self.reference = reference  # reference_table: per training-set sample
        lc = cfg.loss
        self.beta, self.sft_weight, self.text_weight, self.audio_weight = \
            lc.dpo_beta, lc.dpo_sft_weight, lc.text_weight, lc.audio_weight

    def known(self, batches: list[Batch]) -> torch.Tensor:
        return torch.tensor([sum(b.num_samples for b in batches) // 2])

    def micro(self, engine, batch: Batch, counts: torch.Tensor, known: torch.Tensor) -> MicroLoss:
        reference = self.reference[batch.indices].to(batch.label_audio_ids.device)
        outputs = engine(**batch.inputs)
        terms = pair_terms(sample_logps(outputs, batch), reference, self.beta)
        loss = terms.loss.sum() / known[0].to(terms.loss.dtype)
        parts = loss_sums(outputs, chosen_only(batch.label_audio_ids, batch.audio_owner))
        if self.sft_weight:
            loss = loss + self.sft_weight * objective(parts, counts, self.text_weight, self.audio_weight)
        stats = torch.stack([terms.loss.detach().sum(), terms.chosen_reward.detach().sum(),
                             terms.rejected_reward.detach().sum(), (terms.chosen_reward > terms.rejected_reward).sum()])
        return MicroLoss(loss, parts, stats.to(torch.float64))

    def report(self, sums: list[float], counts: list[float], stats: list[float], known: list[float]) -> DpoReport:
        dpo_loss, chosen, rejected, right = (t / known[0] for t in stats)
        sft = report(sums, counts, self.text_weight, self.audio_weight)
        return DpoReport(dpo_loss + self.sft_weight * sft.loss, dpo_loss, chosen, rejected, right, sft)
