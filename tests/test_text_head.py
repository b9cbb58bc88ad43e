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


def test_deferring_the_head_keeps_parameter_names_and_the_lora_head(tiny_model):
    """Adapters and checkpoints name parameters by module path: deferring the head (LoRA-wrapped or not) must not
    move it (a wrapper module would rename `text_lm_head.*` and the adapter would no longer load without it)."""
    from ds_train.bench.synthetic import SyntheticBatches
    from ds_train.config import load_config
    from ds_train.model import apply_lora, base_model
    from ds_train.text_head import project_trained_positions_only

    cfg = load_config(None, [f"model.path={tiny_model}", f"model.audio_tokenizer_path={tiny_model}/audio_tokenizer",
                             "data.train_file=unused.jsonl", "train.output_dir=unused", "lora.dropout=0.0",
                             "lora.target_modules=[self_attn.q_proj,text_lm_head]"])
    model = apply_lora(_model(tiny_model, False), cfg)
    names = [n for n, _ in model.named_parameters()]
    batch = SyntheticBatches(base_model(model).config, (40, 90), 2, 0.7, seed=5).batch(0, 0)
    full = model(**batch.inputs).logits
    project_trained_positions_only(base_model(model))
    assert [n for n, _ in model.named_parameters()] == names
    assert any("text_lm_head.lora_A" in n for n in names)
    out = model(**batch.inputs)
    trained = out.expanded_labels[:, 1:] != -100
    torch.testing.assert_close(out.logits, full[:, :-1][trained], rtol=1e-5, atol=1e-6)
