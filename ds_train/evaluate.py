"""Held-out evaluation, token-weighted like training: the eval loss is the mean over every trained position of the
eval set (text and each codebook counted separately), the same on 1, 2 or N ranks. The same forwards give the
teacher-forced top-1 accuracy of the text and of each codebook.

Under ZeRO-3 every rank runs every forward (parameters are gathered collectively): ranks run the same number of
rounds, and a rank without a micro-batch of its own in a round forwards a filler batch whose loss is not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ds_train import dist
from ds_train.config import Config
from ds_train.data.loader import EvalData
from ds_train.loss import LossReport, loss_sums, report, top1_correct


@dataclass
class EvalReport(LossReport):
    text_acc: float = 0.0
    codebook_acc: Optional[list] = None  # per codebook; None for a codebook with no trained position

    def as_record(self, prefix: str = "") -> dict:
        trained = [a for a in self.codebook_acc or [] if a is not None]
        return {**super().as_record(prefix), f"{prefix}text_acc": self.text_acc,
                f"{prefix}audio_acc": sum(trained) / len(trained) if trained else None,
                f"{prefix}codebook_acc": self.codebook_acc}


@torch.no_grad()
def evaluate(engine, data: EvalData, cfg: Config) -> EvalReport:
    engine.eval()
    device = dist.device()
    mine = len(data.sampler)  # this rank's micro-batches, known from the plan: batches stream, none is held
    rounds = int(dist.all_reduce([mine], op="max")[0])
    batches = iter(data.loader)
    totals = None
    for i in range(rounds):
        batch = (next(batches) if i < mine else data.filler()).to(device)
        outputs = engine(**batch.inputs)
        sums = loss_sums(outputs, batch.label_audio_ids)
        if totals is None:
            totals = torch.zeros(3, *sums.counts.shape, dtype=torch.float64, device=device)
        if i < mine:
            totals[0] += sums.detached()
            totals[1] += sums.counts
            totals[2] += top1_correct(outputs, batch.label_audio_ids)
    totals = dist.all_reduce_tensor(totals).tolist()  # the one host sync of the evaluation
    engine.train()
    losses = report(totals[0], totals[1], cfg.loss.text_weight, cfg.loss.audio_weight)
    counts, correct = totals[1], totals[2]
    return EvalReport(**asdict(losses), text_acc=correct[0] / counts[0] if counts[0] else 0.0,
                      codebook_acc=[c / n if n else None for c, n in zip(correct[1:], counts[1:])])
