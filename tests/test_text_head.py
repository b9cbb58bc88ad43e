"""Text logits only at trained positions: the same loss and gradients as Boson's full projection."""

from __future__ import annotations

import torch

from ds_train.loss import compute_loss


def _model(tiny_model, deferred: bool):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.text_head import project_trained_positions_only

    model = HiggsAudioModel.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
    model.config.use_cache = False
    if deferred:
        project_trained_positions_only(model)
    return model


def test_trained_positions_only_gives_the_full_projection_loss_and_gradients(tiny_model):
    from ds_train.bench.synthetic import SyntheticBatches

    full, deferred = _model(tiny_model, False), _model(tiny_model, True)
    batch = SyntheticBatches(full.config, (40, 90), 3, 0.7, seed=5).batch(0, 0)
    results = []
    for model in (full, deferred):
        out = model(**batch.inputs)
        loss = compute_loss(out, batch.label_audio_ids)
        loss.total.backward()
        results.append((out.logits.shape, loss, model.layers[0].self_attn.q_proj.weight.grad.clone(),
                        model.embed_tokens.weight.grad.clone()))
    (full_shape, full_loss, full_q, full_emb), (sel_shape, sel_loss, sel_q, sel_emb) = results
    assert len(full_shape) == 3 and full_shape[-1] == 272  # (B, T, vocab): Boson's forward
    # 3 samples x 3 trained text labels (audio_out_bos, audio_eos, eot) after the shift: the only rows projected
    assert tuple(sel_shape) == (9, 272) and sel_loss.text_tokens == full_loss.text_tokens == 9
    torch.testing.assert_close(sel_loss.text, full_loss.text, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sel_loss.total, full_loss.total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sel_q, full_q, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sel_emb, full_emb, rtol=1e-5, atol=1e-7)
