"""Held-out evaluation, token-weighted like training: the eval loss is the mean over every trained position of the
eval set (text and each codebook counted separately), the same on 1, 2 or N ranks.

Under ZeRO-3 every rank runs every forward (parameters are gathered collectively): ranks run the same number of
rounds, and a rank without a micro-batch of its own in a round forwards a filler batch whose loss is not counted.
"""

from __future__ import annotations

import torch

from ds_train import dist
from ds_train.config import Config
from ds_train.data.loader import EvalData
from ds_train.loss import LossReport, loss_sums, report


@torch.no_grad()
def evaluate(engine, data: EvalData, cfg: Config) -> LossReport:
    engine.eval()
    device = dist.device()
    batches = list(data.loader)
    rounds = int(dist.all_reduce([len(batches)], op="max")[0])
    totals = None
    for i in range(rounds):
        batch = (batches[i] if i < len(batches) else data.filler()).to(device)
        sums = loss_sums(engine(**batch.inputs), batch.label_audio_ids)
        if totals is None:
            totals = torch.zeros(2, *sums.counts.shape, dtype=torch.float64, device=device)
        if i < len(batches):
            totals[0] += sums.detached()
            totals[1] += sums.counts
    totals = dist.all_reduce_tensor(totals).tolist()  # the one host sync of the evaluation
    engine.train()
    return report(totals[0], totals[1], cfg.loss.text_weight, cfg.loss.audio_weight)
