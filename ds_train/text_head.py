"""Text logits only where a text label is trained.

Boson's forward projects every position to the 128256-word text vocabulary, and the loss then casts that to fp32:
at 4k positions a (4096 x 128256) bf16 tensor plus its fp32 copy and gradient, ~6 GB, for a TTS sample that trains
~3 text labels. Here the text head inside the forward passes the final hidden states through unchanged, and a
forward hook on the model then calls the same head on only the positions t whose label t+1 is trained (row-major
order, see ds_train.loss.trained_text_labels). The head is called as a module both times, so ZeRO-3 gathers its
weight and traces it like any other layer. Same loss, same gradients, same parameter names.
"""

from __future__ import annotations

import functools

from ds_train.loss import IGNORE


def project_trained_positions_only(higgs_model) -> None:
    """Defer the text head of a HiggsAudioModel (not the PeftModel around it) to a hook that projects only the
    trained positions. The head module stays where it is (a LoRA-wrapped head too), so parameter names, adapters
    and checkpoints are the same as without this."""
    head = higgs_model.audio_decoder_proj.text_lm_head
    if hasattr(head, "_deferred"):
        return
    head._deferred = False
    project = head.forward

    def forward(hidden_states):
        return hidden_states if head._deferred else project(hidden_states)

    head.forward = forward
    higgs_model.register_forward_pre_hook(lambda module, args: setattr(head, "_deferred", True))
    higgs_model.register_forward_hook(functools.partial(_project_trained, head))


def _project_trained(head, model, args, output):
    head._deferred = False
    hidden, labels = output.logits, output.expanded_labels  # the deferred head passed the hidden states through
    if labels is None:  # no labels given (generation): every position, as Boson's forward does
        output.logits = head(hidden)
        return output
    trained = labels[:, 1:] != IGNORE
    output.logits = head(hidden[:, :-1][trained])  # (trained positions, vocab)
    return output
