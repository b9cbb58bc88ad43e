"""ds_train/loss.py against a brute-force reference written here, on real collated batches of the tiny model."""

from __future__ import annotations

import pytest
import torch

from ds_train.config import load_config
from ds_train.data.cache import CachedDataset
from ds_train.data.collate import Collate, make_collator
from ds_train.loss import compute_loss, loss_sums, objective, report
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
    batch = Collate(make_collator(model_config))([ds[i] for i in range(n)])
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


def test_audio_shift_direction_matches_generation(tiny_model, demo_data, tmp_path):
    """Generation samples code n+1 from the audio logits at position n (`audio_logits[-1]` of a prefix). So the loss
    must score code n+1 with the logits of position n: a forward over the sequence cut right after audio position n
    gives, at its last audio position, the logits the full forward has at n - and those are the ones the loss pairs
    with label n+1. A shift the other way (or none) pairs them with another label and fails here."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    batch, out, mc = _batch_and_outputs(tiny_model, demo_data, tmp_path / "cache", n=1)
    model = HiggsAudioModel.from_pretrained(str(tiny_model)).eval()
    inputs = batch.inputs
    start = int(inputs["audio_out_ids_start"][-1])  # the trained (last) audio-out segment
    n = start + 5  # a position well inside it
    prefix = dict(inputs)
    prefix["audio_out_ids"] = inputs["audio_out_ids"][:, : n + 1]
    prefix["label_ids"] = None
    with torch.no_grad():
        cut = model(**prefix)
    torch.testing.assert_close(cut.audio_logits[-1], out.audio_logits[n], rtol=1e-4, atol=1e-4)
    labels = batch.label_audio_ids
    # The loss's per-codebook sum is over pairs (logits[j], label[j+1]); recompute the term for j = n directly.
    term = torch.nn.functional.cross_entropy(out.audio_logits[n], labels[:, n + 1], reduction="none")
    unshifted = torch.nn.functional.cross_entropy(out.audio_logits[n], labels[:, n], reduction="none")
    full = loss_sums(out, labels).codebooks
    only_n = labels.clone()
    only_n[:, : n + 1] = IGNORE
    only_n[:, n + 2:] = IGNORE
    got = loss_sums(out, only_n).codebooks  # only label n+1 is left: the loss must use logits n for it
    torch.testing.assert_close(got, term, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, unshifted, rtol=1e-3)
    assert (full > got).all()


def test_trained_positions_match_the_forward(tiny_model, demo_data, tmp_path):
    """The counts the loop all-reduces before any forward equal what the loss counts on the forward's labels."""
    batch, out, mc = _batch_and_outputs(tiny_model, demo_data, tmp_path / "cache", n=3)
    counts = batch.counts
    assert counts.tolist() == loss_sums(out, batch.label_audio_ids).counts.tolist()
    assert counts[0] == int((out.expanded_labels[:, 1:] != IGNORE).sum())
    assert counts[0] > 0 and (counts[1:] > 0).all()


def test_loss_and_gradient_do_not_depend_on_the_split(tiny_model, demo_data, tmp_path):
    """The same global batch of 8 samples as 1x8, 2x4 and 4x2 micro-batches: the summed objective, and the gradient
    it leaves, are the same (fp32, rel 1e-5). The old per-micro-batch mean differs between splits.

    (Not 8x1: boson's forward takes another path for a batch of one sample (`left_padding` when batch size is 1),
    and for one sample of this set it gives a first text logit 2e-3 away from any batched forward, fp64 too. That is
    the model's, not the loss's; the 2-rank DeepSpeed tests compare splits that run the same forwards.)"""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    _, _, mc = _batch_and_outputs(tiny_model, demo_data, tmp_path / "cache", n=1)
    tok_cfg = load_config(None, [f"model.path={tiny_model}", f"model.audio_tokenizer_path={tiny_model}/audio_tokenizer",
                                 f"data.train_file={demo_data}/train.jsonl", f"train.output_dir={tmp_path}/out"])
    ds = CachedDataset(tmp_path / "cache", mc)
    collate = Collate(make_collator(mc))
    torch.manual_seed(0)
    model = HiggsAudioModel.from_pretrained(str(tiny_model)).train()
    model.config.use_cache = False  # as build_model sets it for training
    params = [p for n, p in model.named_parameters() if "audio_mlp" in n or "self_attn" in n]
    results = {}
    for size in (8, 4, 2):
        batches = [collate([ds[i] for i in range(j, j + size)]) for j in range(0, 8, size)]
        counts = sum(b.counts for b in batches)
        model.zero_grad()
        total, old_style = 0.0, 0.0
        for b in batches:
            out = model(**b.inputs)
            parts = loss_sums(out, b.label_audio_ids)
            loss = objective(parts, counts, tok_cfg.loss.text_weight, tok_cfg.loss.audio_weight)
            loss.backward()
            total += loss.item()
            old_style += compute_loss(out, b.label_audio_ids).total.item() / len(batches)
        results[size] = (total, [p.grad.clone() for p in params], old_style)
    for size in (4, 2):
        assert results[size][0] == pytest.approx(results[8][0], rel=1e-5)
        for g, ref in zip(results[size][1], results[8][1]):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-8)
    # The per-micro-batch mean (the old objective) moves by more than the tolerance the new one meets.
    assert abs(results[2][2] - results[8][2]) > 1e-5 * abs(results[8][2])


def test_report_relations():
    rep = report([6.0, 10.0, 20.0, 0.0], [3.0, 5.0, 4.0, 0.0], text_weight=0.5, audio_weight=2.0)
    assert rep.text == 2.0 and rep.codebooks == [2.0, 5.0, None]
    assert rep.audio == 3.5 and rep.loss == 0.5 * 2.0 + 2.0 * 3.5


def test_nothing_trainable_is_zero_not_nan(tiny_model, demo_data, tmp_path):
    batch, out, _ = _batch_and_outputs(tiny_model, demo_data, tmp_path / "cache", n=2)
    out.expanded_labels = torch.full_like(out.expanded_labels, IGNORE)
    out.logits.requires_grad_(True)
    out.audio_logits.requires_grad_(True)
    loss = compute_loss(out, torch.full_like(batch.label_audio_ids, IGNORE))
    assert loss.total.item() == 0.0 and not torch.isnan(loss.total)
    loss.total.backward()  # still attached to the graph: every rank can run backward on such a batch
    assert torch.isfinite(out.audio_logits.grad).all() and out.audio_logits.grad.abs().sum() == 0


def test_top1_correct_counts_argmax_hits_with_the_loss_shifts(tiny_model, demo_data, tmp_path):
    """Position by position: text logits at t against label t+1, audio logits at stream position j against code
    j+1 of the same segment. A model that predicted every label exactly would score the loss's counts."""
    from ds_train.loss import top1_correct

    batch, out, mc = _batch_and_outputs(tiny_model, demo_data, tmp_path / "cache")
    got = top1_correct(out, batch.label_audio_ids).tolist()
    labels = out.expanded_labels
    text = sum(int(out.logits[b, t].argmax()) == int(labels[b, t + 1])
               for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1) if labels[b, t + 1] != IGNORE)
    starts = batch.inputs["audio_out_ids_start"].tolist()
    ends = starts[1:] + [batch.label_audio_ids.shape[1]]
    codebooks = [sum(int(out.audio_logits[j, k].argmax()) == int(batch.label_audio_ids[k, j + 1])
                     for s, e in zip(starts, ends) for j in range(s, e - 1)) for k in range(mc.audio_num_codebooks)]
    assert got == [text, *codebooks]
    # Logits that put all mass on the labels: every trained position is a hit, so accuracy = 1 exactly.
    perfect = type(out)(**{**out, "logits": torch.zeros_like(out.logits), "audio_logits": torch.zeros_like(out.audio_logits)})
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != IGNORE:
                perfect.logits[b, t, labels[b, t + 1]] = 1.0
    shifted = batch.label_audio_ids[:, 1:]
    for k in range(mc.audio_num_codebooks):
        for j in range(shifted.shape[1]):
            if shifted[k, j] != IGNORE:
                perfect.audio_logits[j, k, shifted[k, j]] = 1.0
    assert top1_correct(perfect, batch.label_audio_ids).tolist() == loss_sums(out, batch.label_audio_ids).counts.tolist()
