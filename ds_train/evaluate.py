"""Held-out evaluation. Under ZeRO-3 every rank runs every forward (parameters are gathered collectively)."""

from __future__ import annotations

import torch

from ds_train import dist
from ds_train.config import Config
from ds_train.loss import compute_loss


@torch.no_grad()
def evaluate(engine, loader, cfg: Config) -> float:
    """Mean loss over the held-out set. Every rank runs the same number of forwards (ZeRO-3 gathers parameters
    collectively); a rank with one batch fewer repeats its first batch with weight 0."""
    engine.eval()
    batches = list(loader)
    rounds = int(dist.all_reduce([len(batches)], op="max")[0])
    total = count = 0.0
    for i in range(rounds):
        batch = batches[i] if i < len(batches) else batches[0] if batches else None
        if batch is None:
            raise RuntimeError("evaluation set gives this rank no batch; it has fewer samples than ranks")
        batch = batch.to(dist.device())
        outputs = engine(**batch.inputs)
        loss = compute_loss(outputs, batch.label_audio_ids, cfg.loss.text_weight, cfg.loss.audio_weight)
        weight = 1.0 if i < len(batches) else 0.0
        total += weight * loss.total.item()
        count += weight
    total, count = dist.all_reduce([total, count])
    engine.train()
    return total / max(count, 1.0)
