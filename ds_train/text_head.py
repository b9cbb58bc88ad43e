"""Text logits only where a text label is trained.

Boson's forward projects every position to the 128256-word text vocabulary, and the loss then casts that to fp32:
at 4k positions a (4096 x 128256) bf16 tensor plus its fp32 copy and gradient, ~6 GB, for a TTS sample that trains
~3 text labels. Here the text head inside the forward passes the final hidden states through unchanged, and a
forward hook on the model projects only the positions t whose label t+1 is trained (row-major order, see
ds_train.loss.text_loss_at_trained). The head's Linear is still called as a module inside the model's forward, so
ZeRO-3 gathers its weight and traces it like any other layer. Same loss, same gradients.
"""

from __future__ import annotations

from torch import nn

from ds_train.loss import IGNORE


class DeferredTextHead(nn.Module):
    """Stands in for `audio_decoder_proj.text_lm_head` in Boson's forward; the real Linear is `.linear`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden_states):
        return hidden_states


def project_trained_positions_only(higgs_model) -> None:
    """Install the deferred head and the projecting hook on a HiggsAudioModel (not the PeftModel around it)."""
    proj = higgs_model.audio_decoder_proj
    if isinstance(proj.text_lm_head, DeferredTextHead):
        return
    proj.text_lm_head = DeferredTextHead(proj.text_lm_head)
    higgs_model.register_forward_hook(_project_trained)


def _project_trained(model, args, output):
    hidden, labels = output.logits, output.expanded_labels  # hidden: (B, T, H) from the deferred head
    head = model.audio_decoder_proj.text_lm_head.linear
    if labels is None:  # no labels given: every position, as Boson's forward does
        output.logits = head(hidden)
        return output
    trained = labels[:, 1:] != IGNORE
    output.logits = head(hidden[:, :-1][trained])  # (trained positions, vocab)
    return output
