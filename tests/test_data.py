"""ds_train.data on the demo set's prepared cache: labels checked by brute force with and without the delay pattern,
labels that never drift across epochs, lengths that match what the model runs, DataLoader workers."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
import yaml

from conftest import (SETTINGS_MAX_TOKENS, SETTINGS_STEPS, base_config, launch, loss_records, read_metrics,
                      write_config)
from ds_train.config import load_config
from ds_train.data.cache import CachedDataset
from ds_train.data.collate import IGNORE, Collate, make_collator, to_dataset_sample
from ds_train.data.loader import build_loader
from ds_train.data.prepare import prepare
from ds_train.data.sampler import MicroBatchSampler
from ds_train.demo.tiny import SPECIAL_ID

AUDIO_OUT = SPECIAL_ID["<|AUDIO_OUT|>"]
AUDIO_IN = SPECIAL_ID["<|AUDIO|>"]
TARGET_TAIL = [SPECIAL_ID[t] for t in ("<|audio_out_bos|>", "<|AUDIO_OUT|>", "<|audio_eos|>", "<|eot_id|>")]
BOS, EOS = 1024, 1025  # the tiny model's audio_stream_bos_id / audio_stream_eos_id
K = 8  # codebooks


def make_cfg(model, out, **data):
    d = base_config(model, model, out, data={"train_file": "unused.jsonl", **data})
    return load_config(str(write_config(out.parent / f"{out.name}.yaml", d)))


@pytest.fixture(scope="module")
def configs(tiny_model, tiny_model_nodelay):
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    return {"delay": HiggsAudioConfig.from_pretrained(str(tiny_model)),
            "nodelay": HiggsAudioConfig.from_pretrained(str(tiny_model_nodelay))}


@pytest.fixture(scope="module")
def cache(tiny_model, demo_data, text_tok, tmp_path_factory):
    """The demo train set prepared with default settings (the session's shared cache next to the manifest)."""
    cfg = make_cfg(tiny_model, tmp_path_factory.mktemp("data_out") / "out")
    result = prepare(cfg, str(demo_data / "train.jsonl"), text_tok)
    assert result.num_samples == 8 and not result.bad
    return result.cache_dir


def dataset(cache, configs, kind="delay"):
    return CachedDataset(cache, configs[kind])


def collate(configs, text_tok, kind="delay"):
    return Collate(make_collator(configs[kind]))


def expected_audio(codes: torch.Tensor, delay: bool, trained: bool):
    """(input codes, labels) boson's collator must give one audio-out segment, written out position by position."""
    T = codes.shape[1]
    width = T + 2 + (K - 1 if delay else 0)
    inp = torch.full((K, width), EOS, dtype=torch.long)
    lab = torch.full((K, width), IGNORE, dtype=torch.long)
    for k in range(K):
        lead = k if delay else 0  # codebook k starts k steps late under the delay pattern
        inp[k, : lead + 1] = BOS
        inp[k, lead + 1: lead + 1 + T] = codes[k]
        if trained:
            lab[k, lead + 1: lead + 1 + T] = codes[k]
            lab[k, lead + 1 + T] = EOS  # the model must learn to stop
    return inp, lab


def expected_text_labels(ids: list[int], text_tok) -> list[int]:
    """Only the final assistant turn is trained, and <|AUDIO_OUT|> itself never is (its audio is)."""
    header = text_tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    starts = [p for p in range(len(ids)) if ids[p:p + len(header)] == header]
    assert len(starts) == 2  # the reference turn and the target turn
    last = starts[-1] + len(header)
    assert ids[last:] == TARGET_TAIL
    return [IGNORE] * last + [t if t != AUDIO_OUT else IGNORE for t in ids[last:]]


@pytest.mark.parametrize("kind", ["delay", "nodelay"])
def test_labels_train_the_target_and_mask_the_reference(cache, configs, text_tok, kind):
    ds, fn, delay = dataset(cache, configs, kind), collate(configs, text_tok, kind), kind == "delay"
    for i in range(len(ds)):
        e = ds.entries[i]
        b = fn([ds[i]])
        ids = e["input_ids"].tolist()
        assert b.inputs["label_ids"][0].tolist() == expected_text_labels(ids, text_tok)

        ref_codes = e["audio_codes"][:, : e["audio_starts"][1]].long()
        target_codes = e["audio_codes"][:, e["audio_starts"][1]:].long()
        ref_in, ref_lab = expected_audio(ref_codes, delay, trained=False)
        tgt_in, tgt_lab = expected_audio(target_codes, delay, trained=True)
        assert b.inputs["audio_out_ids_start"].tolist() == [0, ref_in.shape[1]]
        assert torch.equal(b.inputs["audio_out_ids"], torch.cat([ref_in, tgt_in], dim=1))
        assert torch.equal(b.label_audio_ids, torch.cat([ref_lab, tgt_lab], dim=1))
        assert (b.label_audio_ids[:, : ref_in.shape[1]] == IGNORE).all()  # the reference adds no loss
        assert int((b.label_audio_ids == EOS).sum()) == K  # one stop target per codebook
        assert (b.label_audio_ids[:, ref_in.shape[1]:] >= 0).sum() == K * (target_codes.shape[1] + 1)


def test_batched_labels_are_the_single_sample_labels_laid_side_by_side(cache, configs, text_tok):
    ds, fn = dataset(cache, configs), collate(configs, text_tok)
    picks = [7, 0, 3]
    singles = [fn([ds[i]]) for i in picks]
    b = fn([ds[i] for i in picks])
    width = max(s.inputs["label_ids"].shape[1] for s in singles)
    for row, s in zip(b.inputs["label_ids"], singles):
        n = s.inputs["label_ids"].shape[1]
        assert torch.equal(row[:n], s.inputs["label_ids"][0]) and (row[n:] == IGNORE).all()
    assert b.inputs["label_ids"].shape[1] == width
    assert torch.equal(b.label_audio_ids, torch.cat([s.label_audio_ids for s in singles], dim=1))
    assert b.num_tokens == sum(s.num_tokens for s in singles) == sum(ds.lengths[i] for i in picks)


def test_boson_collator_edits_its_input_labels(cache, configs, text_tok):
    """Why data.py hands the collator fresh copies: given the same sample twice, it trains no audio the second time."""
    ds, fn = dataset(cache, configs), collate(configs, text_tok)
    sample = ds[0]
    first = fn([sample])
    second = fn([sample])
    assert (first.label_audio_ids >= 0).any()
    assert (second.label_audio_ids == IGNORE).all()  # the target audio silently dropped out of the loss
    assert (sample.label_ids[sample.input_ids == AUDIO_OUT] == IGNORE).all()


def test_labels_are_identical_in_epoch_1_and_epoch_5(tiny_model, cache, configs, text_tok, tmp_path):
    ds = dataset(cache, configs)
    # A cache that keeps int64 ids (so no dtype conversion copies them by accident): only data.py's explicit copy
    # stands between the collator's in-place edit and the cache.
    for e in ds.entries:
        e["input_ids"], e["label_ids"] = e["input_ids"].long(), e["label_ids"].long()
    pristine = [e["label_ids"].clone() for e in ds.entries]
    cfg = make_cfg(tiny_model, tmp_path / "out")
    loader, sampler = build_loader(ds, collate(configs, text_tok).collator, cfg, rank=0, world=1)

    def epoch_labels(epoch):
        sampler.set_epoch(epoch)
        order = [b[0] for b in sampler.rank_batches()]
        return {i: (b.inputs["label_ids"].clone(), b.label_audio_ids.clone()) for i, b in zip(order, loader)}

    first, fifth = epoch_labels(0), epoch_labels(4)
    assert sorted(first) == sorted(fifth) == list(range(8))
    for i in range(8):
        assert torch.equal(first[i][0], fifth[i][0]) and torch.equal(first[i][1], fifth[i][1])
        assert (fifth[i][1] >= 0).any()  # still trains the target audio
        assert torch.equal(ds.entries[i]["label_ids"], pristine[i])


@pytest.mark.parametrize("kind", ["delay", "nodelay"])
def test_lengths_are_the_sequences_the_model_runs(tiny_model, tiny_model_nodelay, cache, configs, text_tok, kind):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    model = HiggsAudioModel.from_pretrained(str(tiny_model if kind == "delay" else tiny_model_nodelay)).eval()
    ds, fn = dataset(cache, configs, kind), collate(configs, text_tok, kind)
    with torch.no_grad():
        for picks in ([0], [5], [1, 6, 2]):
            b = fn([ds[i] for i in picks])
            out = model(**b.inputs)
            # Each row holds exactly its sample's merged length; the model pads the batch to a multiple of 8.
            assert out.attention_mask.sum(dim=1).tolist() == [ds.lengths[i] for i in picks]
            assert out.expanded_labels.shape[1] == -(-max(ds.lengths[i] for i in picks) // 8) * 8
            assert b.num_tokens == sum(ds.lengths[i] for i in picks)
    if kind == "delay":  # the delay pattern adds K-1 positions to each audio-out segment
        plain = dataset(cache, configs, "nodelay")
        assert [a - b for a, b in zip(ds.lengths, plain.lengths)] == [2 * (K - 1)] * len(ds)  # reference + target


def test_workers_give_the_same_batches_as_the_main_process(tiny_model, cache, configs, text_tok, tmp_path):
    ds, collator = dataset(cache, configs), collate(configs, text_tok).collator
    budget = 2 * max(ds.lengths) + 10
    inline_cfg = make_cfg(tiny_model, tmp_path / "a", max_tokens=budget)
    worker_cfg = make_cfg(tiny_model, tmp_path / "b", max_tokens=budget, num_workers=2, persistent_workers=True,
                          prefetch_factor=3, pin_memory=True)
    inline, s0 = build_loader(ds, collator, inline_cfg, rank=0, world=1)
    workers, s2 = build_loader(ds, collator, worker_cfg, rank=0, world=1)
    assert (inline.num_workers, workers.num_workers) == (0, 2)
    assert workers.persistent_workers and workers.prefetch_factor == 3
    assert workers.pin_memory == torch.cuda.is_available()  # pinning needs a GPU
    for epoch in (0, 1):
        s0.set_epoch(epoch)
        s2.set_epoch(epoch)
        a, b = list(inline), list(workers)
        assert len(a) == len(b) == len(s0) and len(a) >= 4
        assert any(x.num_samples > 1 for x in a)
        for x, y in zip(a, b):
            assert x.num_samples == y.num_samples and x.num_tokens == y.num_tokens
            assert torch.equal(x.label_audio_ids, y.label_audio_ids)
            for key, value in x.inputs.items():
                assert (value is None and y.inputs[key] is None) or torch.equal(value, y.inputs[key]), key
    # resume mid-epoch in a fresh loader: the rest of the epoch, same batches
    s2.set_epoch(1, start=2)
    rest = list(workers)
    assert [r.num_tokens for r in rest] == [x.num_tokens for x in a[2:]]


def test_collate_survives_pickling_for_spawned_workers(cache, configs, text_tok):
    ds, fn = dataset(cache, configs), collate(configs, text_tok)
    again = pickle.loads(pickle.dumps(fn))
    x, y = fn([ds[2], ds[4]]), again([ds[2], ds[4]])
    assert torch.equal(x.label_audio_ids, y.label_audio_ids)
    assert torch.equal(x.inputs["input_ids"], y.inputs["input_ids"])


def test_whisper_decodes_audio_in_clips_only(cache, configs, demo_data):
    from ds_train.data.audio import load_audio

    ds = dataset(cache, configs)
    tts = to_dataset_sample(ds.entries[0], AUDIO_IN, AUDIO_OUT, whisper=True)
    assert tts.audio_waveforms_concat.numel() == 0  # TTS: both clips are audio-out; nothing to decode
    assert tts.audio_waveforms_start.tolist() == [0, 0] and tts.audio_sample_rate.tolist() == [16000, 16000]

    wav = str(demo_data / "audio" / "utt_0000.wav")
    entry = copy.deepcopy(ds.entries[0])
    entry["input_ids"] = torch.tensor([1, AUDIO_IN, 2, AUDIO_OUT, 3], dtype=torch.int32)
    entry["audio_paths"] = [wav, entry["audio_paths"][1]]
    asr = to_dataset_sample(entry, AUDIO_IN, AUDIO_OUT, whisper=True)
    n = len(load_audio(wav, 16000))
    assert asr.audio_waveforms_concat.shape == (n,) and asr.audio_waveforms_start.tolist() == [0, n]
    assert torch.equal(asr.get_wv(0)[0], torch.from_numpy(load_audio(wav, 16000)))


def test_dataset_needs_a_prepared_cache_that_fits_the_model(cache, configs, tmp_path):
    with pytest.raises(FileNotFoundError, match="run `ds-train prepare CONFIG` first"):
        CachedDataset(tmp_path / "nothing", configs["delay"])
    wide = copy.deepcopy(configs["delay"])
    wide.audio_num_codebooks = 12
    with pytest.raises(ValueError, match="cached audio has 8 codebooks, the model needs 12"):
        CachedDataset(cache, wide)


def test_token_budget_batches_respect_the_budget_on_real_lengths(cache, configs):
    ds = dataset(cache, configs)
    s = MicroBatchSampler(ds.lengths, 0, 1, 1, seed=0, max_tokens=3 * max(ds.lengths))
    assert all(max(ds.lengths[i] for i in b) * len(b) <= 3 * max(ds.lengths) for b in s.plan())
    assert sorted(i for b in s.plan() for i in b) == list(range(len(ds)))


def test_whisper_processor_comes_from_a_config_key_with_a_clear_offline_error(tmp_path):
    """Models with encode_whisper_embed=true need a Whisper processor; it was a hard-coded hub id. Now it is
    model.whisper_processor_path, and a missing one says which key to set. (No network here: a local path that
    does not exist stands for an unreachable hub.)"""
    from ds_train.data.collate import load_whisper_processor
    from ds_train.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.whisper_processor_path=.*nowhere.*encode_whisper_embed=true"):
        load_whisper_processor(str(tmp_path / "nowhere"))


def test_max_tokens_below_a_sample_names_its_manifest_line_or_skips_it(tiny_model, cache, configs, tmp_path, capsys):
    # Before issue 11 this ended in a traceback naming a cache index, after the model was built.
    from ds_train.data.loader import fit_max_tokens
    from ds_train.errors import DataError

    lengths = dataset(cache, configs).lengths
    limit = sorted(lengths)[-3]  # the two longest samples do not fit
    longest = sorted(range(len(lengths)), key=lambda i: lengths[i])[-2:]
    with pytest.raises(DataError) as e:
        fit_max_tokens(dataset(cache, configs), make_cfg(tiny_model, tmp_path / "o", max_tokens=limit), "train.jsonl")
    msg = str(e.value)
    assert msg.startswith(f"2 bad sample(s) in train.jsonl: longer than data.max_tokens={limit} fits (the longest "
                          f"needs {max(lengths)}: raise it)")
    for i in longest:
        assert f"train.jsonl:{i + 1}: {lengths[i]} tokens (text + audio frames), more than data.max_tokens" in msg

    ds = dataset(cache, configs)
    cfg = make_cfg(tiny_model, tmp_path / "o2", max_tokens=limit, skip_bad=True)
    assert fit_max_tokens(ds, cfg, "train.jsonl") == 2
    assert len(ds) == 6 and max(ds.lengths) == limit
    assert sorted(e["source"] for e in ds.entries) == sorted(f"train.jsonl:{i + 1}" for i in range(8) if i not in longest)
    assert "skipped 2 sample(s) of train.jsonl longer than data.max_tokens" in capsys.readouterr().out


# ---- in a training run (conftest's settings_runs: data.max_tokens=700, 2 ranks, grad_accum 1) -------------------

# The demo set's merged lengths (text + audio frames) and the token-budget plans of the settings runs (seed 42,
# data.max_tokens=700, 2 ranks), written out: MicroBatchSampler's output on the day it was checked by hand (every
# sample once per epoch, each micro-batch within the budget, each epoch's order different). The run must train
# exactly these; a change of the sampler's shuffle or packing shows here first.
DEMO_LENGTHS = [223, 234, 233, 224, 234, 233, 221, 187]
SETTINGS_PLANS = {0: [[7], [6, 0], [3, 2, 5], [1, 4]], 1: [[4, 1], [7], [6, 0], [3, 2, 5]]}


@pytest.mark.slow
def test_token_budget_run_trains_the_plan_and_never_exceeds_max_tokens(settings_runs, cache, configs):
    out = settings_runs["zero3"]
    lengths = dataset(cache, configs).lengths
    assert list(lengths) == DEMO_LENGTHS
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 42
    logged_epochs = {r["epoch"]: r for r in read_metrics(out) if "padding_efficiency" in r}
    steps = loss_records(out)
    assert sorted(steps) == list(range(1, SETTINGS_STEPS + 1))
    step = 0
    for epoch in sorted(logged_epochs):
        plan = SETTINGS_PLANS[epoch]
        assert all(max(lengths[i] for i in b) * len(b) <= SETTINGS_MAX_TOKENS for b in plan)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))  # nothing dropped
        # The run logged this plan's padding efficiency (real positions / padded positions of its micro-batches),
        # and trained its micro-batches 2k and 2k+1 at its step k.
        padded = sum(max(lengths[i] for i in b) * len(b) for b in plan)
        assert logged_epochs[epoch]["padding_efficiency"] == pytest.approx(sum(lengths) / padded, rel=1e-12)
        assert logged_epochs[epoch]["dropped_samples"] == 0
        for k in range(len(plan) // 2):
            step += 1
            if step > SETTINGS_STEPS:
                break
            r, step_batches = steps[step], plan[2 * k: 2 * k + 2]
            assert r["epoch"] == epoch
            assert r["tokens"] == sum(lengths[i] for b in step_batches for i in b), (step, plan)
            assert r["samples_per_s"] * r["step_time_s"] == pytest.approx(sum(map(len, step_batches)), rel=1e-9)
    assert step >= SETTINGS_STEPS and len(logged_epochs) == 2  # 4 micro-batches = 2 steps per epoch


@pytest.mark.slow
def test_workers_run_trains_exactly_like_the_main_process(settings_runs):
    """data.num_workers=2 (persistent) and num_workers=0: the same batches, so the same losses and eval losses."""
    runs = {name: settings_runs[name] for name in ("zero3", "zero3_inline")}
    workers = {n: yaml.safe_load((out / "config.yaml").read_text())["data"]["num_workers"] for n, out in runs.items()}
    assert workers == {"zero3": 2, "zero3_inline": 0}
    a, b = loss_records(runs["zero3"]), loss_records(runs["zero3_inline"])
    assert sorted(a) == sorted(b) == list(range(1, SETTINGS_STEPS + 1))
    for step in a:
        for key in ("loss", "grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-6), (step, key)
    assert a[1]["loss"] != a[SETTINGS_STEPS]["loss"]  # the weights moved, so later steps compare trained models
    evals = [{r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r} for out in runs.values()]
    assert sorted(evals[0]) == list(range(1, SETTINGS_STEPS + 1))
    assert evals[0] == pytest.approx(evals[1], rel=1e-6)


@pytest.mark.slow
def test_two_manifests_with_weights_and_eval_split_train_and_evaluate(tiny_model, demo_data, nospeaker_data, configs,
                                                                      text_tok, tmp_path):
    """data.train_files (demo_data at weight 1, nospeaker_data at 0.5) with data.eval_split=0.25 in a real 2-rank
    run: the data report lists both manifests and the mix, each step trains the weighted plan's micro-batches, and
    the final evaluation runs on the held-out samples."""
    from ds_train.data.loader import build_data

    files = [str(demo_data / "train.jsonl"), str(nospeaker_data)]
    out = tmp_path / "run"
    raw = base_config(tiny_model, demo_data, out, train={"max_steps": 3, "epochs": 99, "eval_on_start": True},
                      data={"train_files": [files[0], {"path": files[1], "weight": 0.5}], "eval_split": 0.25})
    del raw["data"]["train_file"]
    proc = launch(["train", str(write_config(tmp_path / "mix.yaml", raw))])

    report = json.loads((out / "data_report.json").read_text())
    assert [(m["manifest"], m["samples"]) for m in report["manifests"]] == [(files[0], 8), (files[1], 8)]
    mix = report["train_mix"]
    assert [r["manifest"] for r in mix] == files and [r["weight"] for r in mix] == [1.0, 0.5]
    assert mix[1]["held_out"] == 2 and mix[1]["samples"] == 6 and mix[1]["per_epoch"] == 3  # 0.5 x 6
    assert mix[0]["per_epoch"] == mix[0]["samples"] == 8 - mix[0]["held_out"]
    n = mix[0]["per_epoch"] + 3
    assert (f"data mix: train.jsonl {mix[0]['samples']} samples x weight 1 = {mix[0]['per_epoch']} per epoch "
            f"({mix[0]['per_epoch'] / n:.1%}); plain.jsonl 6 samples x weight 0.5 = 3 per epoch ({3 / n:.1%})"
            in proc.stdout)

    # The caches the run prepared, read here: the 11 training samples (the demo's 5 kept, then plain.jsonl's 6) and
    # the plan's first 6 micro-batches (seed 42, both manifests at their weights), written out as MicroBatchSampler
    # made them when this was checked by hand: step k trained micro-batches 2k-2 and 2k-1.
    cfg = load_config(str(tmp_path / "mix.yaml"))
    data = build_data(cfg, configs["delay"], text_tok, tmp_path / "here")
    lengths = data.train_set.lengths
    assert list(lengths) == [223, 233, 224, 233, 221, 223, 233, 234, 233, 221, 187]
    plan = [[9], [0], [2], [1], [7], [3]]
    steps = loss_records(out)
    assert sorted(steps) == [1, 2, 3]
    for k in steps:
        assert steps[k]["tokens"] == sum(lengths[i] for b in plan[2 * k - 2: 2 * k] for i in b), k
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3]
    # The untrained model (LoRA's B starts at 0) on the 5 held-out samples (train.jsonl lines 2, 5, 8; plain.jsonl
    # lines 2, 4): 12.540543, the value this run logged on 2 Dec 2026 (a regression pin, rel 2e-5). An offline plain
    # HiggsAudioModel forward of each held-out sample alone, fp32, with the cross-entropy written out (text position
    # t scores label t+1, audio position n code n+1; token-weighted over all 5 samples: text 5.588929 over 15
    # positions, each codebook over 208) gave 12.539817, 5.8e-5 away relatively; the cause of that gap is not yet
    # found (open, noted on issue 15). The mean of the 5 per-sample losses (a mis-weighting) gave 12.539013.
    assert evals[0]["eval_loss"] == pytest.approx(12.540543, rel=2e-5)
    assert math.isfinite(evals[1]["eval_loss"]) and evals[1]["eval_loss"] != evals[0]["eval_loss"]


def test_opening_reads_no_shard_and_keeps_no_per_sample_objects(cache, configs, monkeypatch):
    """CachedDataset reads index.json and maps samples.npy: no shard is read until a sample of it is, the lengths
    are one compact array, and no file of the cache is a pickle (torch.save writes a zip, pickle starts 0x80)."""
    import array

    import ds_train.data.cache as cache_module

    reads = []
    real = cache_module.read_arrays
    monkeypatch.setattr(cache_module, "read_arrays", lambda path: reads.append(path) or real(path))
    ds = dataset(cache, configs)
    assert reads == [] and len(ds) == 8
    assert type(ds.lengths) is array.array and ds.lengths.itemsize == 8
    assert ds.row.dtype.kind == "i" and not hasattr(ds, "_entries")
    ds[3]
    assert [p.name for p in reads] == ["shard-00000.dsc"]
    for path in cache.iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", path.name
    # DataLoader workers get the dataset pickled without its mappings (a spawned worker maps the files again).
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.stores[0]._shards == {} and torch.equal(clone[3].input_ids, ds[3].input_ids)
