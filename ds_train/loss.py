"""Teacher-forced loss for HiggsAudioModel, which returns logits but no loss.

Text: position t predicts label t+1 of `expanded_labels` (the labels after the model merged audio into the sequence).
Audio: `audio_logits[n]` is computed at the n-th audio-out position of the concatenated audio-out stream and
predicts that stream's code n+1, per codebook. The stream is the collator's segments laid end to end; every segment
starts with the stream BOS, whose label is -100, so shifting over the concatenation never trains one segment's last
position to predict the next segment's first code. Skipping the shift trains the model to copy its input, which at
generation time yields silence.

Token weighting: the objective of a step is the mean over all trained positions of the global batch, text and each
codebook counted separately:
    loss = text_weight * S_text / N_text + audio_weight * mean_k (S_k / N_k)    (codebooks with N_k > 0)
where S are summed cross-entropies and N trained positions over every micro-batch of every rank. Each micro-batch
contributes `objective(its sums, the step's global counts)`; those terms add up to the loss above, so the number
(and the gradient) does not depend on how the global batch is split into micro-batches and ranks. The counts come
from the labels alone (`trained_positions`), so they are known, and all-reduced, before the first forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE = -100


def trained_positions(input_ids: torch.Tensor, label_ids: torch.Tensor, label_audio_ids: torch.Tensor,
                      audio_token_ids: tuple[int, ...], num_codebooks: int) -> torch.Tensor:
    """[N_text, N_codebook_0, ..., N_codebook_K-1] that this micro-batch trains, from the collated labels alone.

    Text: the model expands each audio placeholder token into audio positions labelled IGNORE and keeps every other
    label; the shift drops each row's first position. Audio: every label of the concatenated stream but its first.
    (tests/test_loss.py checks both against the forward's `expanded_labels` and the loss's own counts.)
    """
    audio = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in audio_token_ids:
        audio |= input_ids == token
    text = ((label_ids != IGNORE) & ~audio)[:, 1:].sum()
    if label_audio_ids.numel() and label_audio_ids.shape[1] >= 2:
        codebooks = (label_audio_ids[:, 1:] != IGNORE).sum(dim=1)
    else:
        codebooks = torch.zeros(num_codebooks, dtype=torch.long)
    return torch.cat([text.reshape(1), codebooks]).to(torch.long)


@dataclass
class LossSums:
    """Summed cross-entropies of one micro-batch; `text` and `codebooks` stay attached to the graph."""
    text: torch.Tensor  # ()
    codebooks: torch.Tensor  # (K,)
    counts: torch.Tensor  # (1 + K,) trained positions, as trained_positions() counts them

    def detached(self) -> torch.Tensor:
        """(1 + K,) [S_text, S_0 .. S_K-1] without the graph: what is accumulated for logging."""
        return torch.cat([self.text.detach().reshape(1), self.codebooks.detach()]).float()


def _sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE, count) over positions whose label is not IGNORE; an attached 0 when there are none."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return ce, (labels != IGNORE).sum()


def trained_text_labels(expanded_labels: torch.Tensor) -> torch.Tensor:
    """The trained labels t+1 in row-major order: the rows ds_train.text_head projects (its logits are (N, V))."""
    shifted = expanded_labels[:, 1:]
    return shifted[shifted != IGNORE]


def _text_pairs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V), labels (N,)) of the text predictions: position t scores label t+1. With 2-D logits
    ds_train.text_head already projected only the trained positions, in row-major order."""
    labels = labels.to(logits.device)
    if logits.dim() == 2:
        return logits, trained_text_labels(labels)
    return logits[:, :-1, :].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def loss_sums(outputs, label_audio_ids: torch.Tensor) -> LossSums:
    """Summed text and per-codebook audio cross-entropy of a HiggsAudioModel forward output."""
    logits = outputs.logits
    text, n_text = _sum_ce(*_text_pairs(logits, outputs.expanded_labels))
    audio_logits = outputs.audio_logits
    num_codebooks = audio_logits.shape[1] if audio_logits is not None and audio_logits.dim() == 3 \
        else label_audio_ids.shape[0]
    if audio_logits is None or audio_logits.shape[0] < 2 or label_audio_ids.numel() == 0:
        anchor = audio_logits.sum() * 0.0 if audio_logits is not None else logits.sum() * 0.0
        codebooks = anchor.expand(num_codebooks).clone()
        n_codebooks = torch.zeros(num_codebooks, dtype=torch.long, device=logits.device)
    else:
        shifted = label_audio_ids.to(audio_logits.device)[:, 1:]  # (K, N-1): position n predicts code n+1
        pairs = [_sum_ce(audio_logits[:-1, k, :], shifted[k]) for k in range(num_codebooks)]
        codebooks = torch.stack([s for s, _ in pairs])
        n_codebooks = torch.stack([n for _, n in pairs])
    counts = torch.cat([n_text.reshape(1), n_codebooks]).to(torch.long)
    return LossSums(text, codebooks, counts)


@torch.no_grad()
def top1_correct(outputs, label_audio_ids: torch.Tensor) -> torch.Tensor:
    """(1 + K,) positions whose argmax is the label - text, then each codebook - with the shifts of `loss_sums`
    (so divided by its counts it is the teacher-forced top-1 accuracy)."""
    text_logits, text_labels = _text_pairs(outputs.logits, outputs.expanded_labels)
    text = (text_logits.argmax(-1) == text_labels).sum().reshape(1)  # IGNORE never equals an argmax
    audio_logits = outputs.audio_logits
    k = label_audio_ids.shape[0] if label_audio_ids.dim() == 2 else 0
    if audio_logits is None or audio_logits.dim() != 3 or audio_logits.shape[0] < 2 or not label_audio_ids.numel():
        return torch.cat([text, torch.zeros(audio_logits.shape[1] if audio_logits is not None and
                                            audio_logits.dim() == 3 else k, dtype=torch.long, device=text.device)])
    shifted = label_audio_ids.to(audio_logits.device)[:, 1:]
    codebooks = (audio_logits[:-1].argmax(-1).T == shifted).sum(dim=1)
    return torch.cat([text, codebooks]).to(torch.long)


def objective(sums: LossSums, global_counts: torch.Tensor, text_weight: float, audio_weight: float) -> torch.Tensor:
    """This micro-batch's share of the step's token-weighted loss (see the module docstring). Summed over every
    micro-batch of every rank it is the loss; a micro-batch that trains nothing gives an attached 0."""
    counts = global_counts.to(sums.codebooks.device, torch.float32)
    n_text, n_codebooks = counts[0], counts[1:]
    text = sums.text / n_text.clamp(min=1)
    trained = n_codebooks > 0
    audio = (sums.codebooks / n_codebooks.clamp(min=1)).sum() / trained.sum().clamp(min=1)
    return text_weight * text + audio_weight * audio


@dataclass
class LossReport:
    """The step's (or the eval set's) losses as plain numbers, from globally summed sums and counts."""
    loss: float
    text: float
    audio: float
    codebooks: list[Optional[float]]  # None for a codebook with no trained position

    def as_record(self, prefix: str = "") -> dict:
        return {f"{prefix}loss": self.loss, f"{prefix}text_loss": self.text, f"{prefix}audio_loss": self.audio,
                f"{prefix}codebook_losses": self.codebooks}


def report(sums: list[float], counts: list[float], text_weight: float, audio_weight: float) -> LossReport:
    """sums = [S_text, S_0..S_K-1], counts = [N_text, N_0..N_K-1], both summed over the global batch."""
    text = sums[0] / counts[0] if counts[0] else 0.0
    codebooks = [s / n if n else None for s, n in zip(sums[1:], counts[1:])]
    trained = [c for c in codebooks if c is not None]
    audio = sum(trained) / len(trained) if trained else 0.0
    return LossReport(text_weight * text + audio_weight * audio, text, audio, codebooks)


@dataclass
class LossOutput:
    total: torch.Tensor  # what backward runs on
    text: torch.Tensor
    audio: torch.Tensor
    codebooks: torch.Tensor  # (num_codebooks,) per-codebook mean audio loss
    text_tokens: int
    audio_tokens: int  # trained audio positions, summed over codebooks


def compute_loss(outputs, label_audio_ids: torch.Tensor, text_weight: float = 1.0,
                 audio_weight: float = 1.0) -> LossOutput:
    """The token-weighted loss of one batch on its own (its counts are the global ones): for tools and tests."""
    sums = loss_sums(outputs, label_audio_ids)
    total = objective(sums, sums.counts, text_weight, audio_weight)
    counts = sums.counts.float().clamp(min=1)
    codebook_means = sums.codebooks.detach() / counts[1:]
    trained = sums.counts[1:] > 0
    audio = (codebook_means * trained).sum() / trained.sum().clamp(min=1)
    return LossOutput(total, sums.text.detach() / counts[0], audio, codebook_means,
                      int(sums.counts[0]), int(sums.counts[1:].sum()))


@dataclass
class MicroLoss:
    """What an objective makes of one micro-batch for train.train_step."""
    loss: torch.Tensor  # what backward runs on: this micro-batch's share of the step's objective
    parts: LossSums  # token sums of the forward; its counts are checked against the collator's (train.check_counts)
    stats: torch.Tensor  # (objective.STATS,) fp64 sums of the objective's own numbers, all-reduced with the rest


class Sft:
    """train.objective=sft: the token-weighted teacher-forced loss (the module docstring). An objective tells
    train.train_step what to all-reduce before the forward (`known`), what each micro-batch contributes (`micro`) and
    what the step's totals mean (`report`)."""

    STATS = 0

    def __init__(self, cfg):
        self.text_weight, self.audio_weight = cfg.loss.text_weight, cfg.loss.audio_weight

    def known(self, batches) -> torch.Tensor:
        """Global numbers the objective divides by, besides the trained-position counts: none."""
        return torch.zeros(0, dtype=torch.long)

    def micro(self, engine, batch, counts: torch.Tensor, known: torch.Tensor) -> MicroLoss:
        parts = loss_sums(engine(**batch.inputs), batch.label_audio_ids)
        loss = objective(parts, counts, self.text_weight, self.audio_weight)
        return MicroLoss(loss, parts, torch.zeros(0, dtype=torch.float64, device=loss.device))

    def report(self, sums: list[float], counts: list[float], stats: list[float], known: list[float]) -> LossReport:
        return report(sums, counts, self.text_weight, self.audio_weight)
