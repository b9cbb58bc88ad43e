"""Teacher-forced loss for HiggsAudioModel, which returns logits but no loss.

Text: position t predicts label t+1 of `expanded_labels` (the labels after the model merged audio into the sequence).
Audio: `audio_logits[n]` is computed at the n-th audio-out position of the concatenated audio-out stream and
predicts that stream's code n+1, per codebook. The stream is the collator's segments laid end to end; every segment
starts with the stream BOS, whose label is -100, so shifting over the concatenation never trains one segment's last
position to predict the next segment's first code. Skipping the shift trains the model to copy its input, which at
generation time yields silence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class LossOutput:
    total: torch.Tensor  # what backward runs on
    text: torch.Tensor
    audio: torch.Tensor
    codebooks: torch.Tensor  # (num_codebooks,) per-codebook audio loss
    text_tokens: int
    audio_tokens: int  # trained audio positions, summed over codebooks


def _mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over positions whose label is not IGNORE; 0 (still attached to the graph) when none."""
    n = int((labels != IGNORE).sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return ce / n, n


def text_loss(logits: torch.Tensor, expanded_labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """logits (B, T, V), expanded_labels (B, T)."""
    shifted_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shifted_labels = expanded_labels[:, 1:].reshape(-1).to(logits.device)
    return _mean_ce(shifted_logits, shifted_labels)


def audio_loss(audio_logits: torch.Tensor, label_audio_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """audio_logits (N, K, V), label_audio_ids (K, N): mean over codebooks of each codebook's mean CE."""
    num_codebooks = audio_logits.shape[1] if audio_logits is not None and audio_logits.dim() == 3 else label_audio_ids.shape[0]
    if audio_logits is None or audio_logits.shape[0] < 2 or label_audio_ids.numel() == 0:
        zero = audio_logits.sum() * 0.0 if audio_logits is not None else torch.zeros(())
        return zero, torch.zeros(num_codebooks, device=zero.device), 0
    labels = label_audio_ids.to(audio_logits.device)[:, 1:]  # (K, N-1)
    logits = audio_logits[:-1]  # (N-1, K, V)
    per_codebook, counts = [], []
    for k in range(num_codebooks):
        loss_k, n_k = _mean_ce(logits[:, k, :], labels[k])
        per_codebook.append(loss_k)
        counts.append(n_k)
    codebooks = torch.stack(per_codebook)
    trained = torch.tensor([c > 0 for c in counts], device=codebooks.device)
    # Average over the codebooks that have labels here; an all-masked batch gives an attached zero, not NaN.
    mean = (codebooks * trained).sum() / trained.sum().clamp(min=1)
    return mean, codebooks.detach(), sum(counts)


def compute_loss(outputs, label_audio_ids: torch.Tensor, text_weight: float = 1.0,
                 audio_weight: float = 1.0) -> LossOutput:
    """Weighted text + audio loss from a HiggsAudioModel forward output."""
    text, n_text = text_loss(outputs.logits, outputs.expanded_labels)
    audio, codebooks, n_audio = audio_loss(outputs.audio_logits, label_audio_ids)
    total = text_weight * text + audio_weight * audio
    return LossOutput(total, text.detach(), audio.detach(), codebooks, n_text, n_audio)
