"""ds_train/loss.py against a brute-force reference written here, on real collated batches of the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from ds_train.config import load_config
from ds_train.data.cache import CachedDataset
from ds_train.data.collate import Collate, make_collator
from ds_train.loss import compute_loss
from ds_train.preflight import load_model_config, load_text_tokenizer
from ds_train.data.prepare import prepare

IGNORE = -100


def _batch_and_outputs(model_dir, data_dir, cache_dir, n=3):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    cfg = load_config(None, [f"model.path={model_dir}", f"model.audio_tokenizer_path={model_dir}/audio_tokenizer",
                             f"data.train_file={data_dir}/train.jsonl", f"train.output_dir={cache_dir}/out"])
    model_config = load_model_config(str(model_dir))
    tok = load_text_tokenizer(cfg, model_config)
    prepare(cfg, cfg.data.train_file, tok, str(cache_dir))
    ds = CachedDataset(cache_dir, model_config)
    batch = Collate(make_collator(model_config, tok))([ds[i] for i in range(n)])
    model = HiggsAudioModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        out = model(**batch.inputs)
    return batch, out, model_config


def brute_force(out, batch, model_config, text_weight=1.0, audio_weight=1.0):
    """Per-sample text loss and per-segment audio loss, position by position, no vectorised shifting."""
    logits, labels = out.logits, out.expanded_labels
    text_terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE:
                text_terms.append(-torch.log_softmax(logits[b, t].double(), -1)[target].item())
    text = sum(text_terms) / len(text_terms) if text_terms else 0.0

    starts = batch.inputs["audio_out_ids_start"].tolist()
    total_len = batch.label_audio_ids.shape[1]
    ends = starts[1:] + [total_len]
    k_count = model_config.audio_num_codebooks
    per_codebook = [[] for _ in range(k_count)]
    for start, end in zip(starts, ends):  # each audio-out segment on its own
        for j in range(start, end - 1):
            for k in range(k_count):
                target = int(batch.label_audio_ids[k, j + 1])
                if target != IGNORE:
                    per_codebook[k].append(-torch.log_softmax(out.audio_logits[j, k].double(), -1)[target].item())
    means = [sum(v) / len(v) for v in per_codebook if v]
    audio = sum(means) / len(means) if means else 0.0
    return text, audio, text_weight * text + audio_weight * audio


@pytest.mark.parametrize("delay", [True, False])
def test_loss_matches_brute_force(delay, tiny_model, tiny_model_nodelay, demo_data, tmp_path):
    model_dir = tiny_model if delay else tiny_model_nodelay
    batch, out, mc = _batch_and_outputs(model_dir, demo_data, tmp_path / "cache")
    assert bool(mc.use_delay_pattern) is delay
    assert out.audio_logits.shape[1:] == (8, 1026)
    got = compute_loss(out, batch.label_audio_ids, text_weight=0.7, audio_weight=1.3)
    text, audio, total = brute_force(out, batch, mc, 0.7, 1.3)
    assert got.text.item() == pytest.approx(text, rel=1e-5)
    assert got.audio.item() == pytest.approx(audio, rel=1e-5)
    assert got.total.item() == pytest.approx(total, rel=1e-5)
    assert got.audio_tokens > 0 and got.text_tokens > 0


def test_unshifted_loss_differs(tiny_model, demo_data, tmp_path):
    """The reference is sensitive to the shift: comparing logits with same-position labels gives another number."""
    batch, out, mc = _batch_and_outputs(tiny_model, demo_data, tmp_path / "cache")
    labels = batch.label_audio_ids
    mask = labels[0] != IGNORE
    unshifted = torch.nn.functional.cross_entropy(out.audio_logits[mask, 0], labels[0, mask]).item()
    shifted = compute_loss(out, labels).codebooks[0].item()
    assert not math.isclose(unshifted, shifted, rel_tol=1e-3)


def test_nothing_trainable_is_zero_not_nan(tiny_model, demo_data, tmp_path):
    batch, out, _ = _batch_and_outputs(tiny_model, demo_data, tmp_path / "cache", n=2)
    out.expanded_labels = torch.full_like(out.expanded_labels, IGNORE)
    out.logits.requires_grad_(True)
    out.audio_logits.requires_grad_(True)
    loss = compute_loss(out, torch.full_like(batch.label_audio_ids, IGNORE))
    assert loss.total.item() == 0.0 and not torch.isnan(loss.total)
    loss.total.backward()  # still attached to the graph: every rank can run backward on such a batch
    assert torch.isfinite(out.audio_logits.grad).all() and out.audio_logits.grad.abs().sum() == 0
