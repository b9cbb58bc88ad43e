"""ds_train/data/split.py: data.eval_split holds out whole speakers (or samples without them), never trained on."""

from __future__ import annotations

import json
import math

from conftest import base_config, write_config
from ds_train.config import load_config
from ds_train.data.split import hold_out


def test_whole_speakers_are_held_out_until_the_fraction_is_reached():
    speakers = [f"spk{i % 7}" for i in range(70)] + [f"big{i % 2}" for i in range(30)]  # 7 x 10 and 2 x 15 samples
    picks = set()
    for seed in range(20):
        out = hold_out(speakers, 0.2, seed, "train.jsonl")
        held = {speakers[i] for i in out.indices}
        assert held == set(out.speakers)
        assert out.indices == sorted(i for i, s in enumerate(speakers) if s in held)  # whole speakers only
        sizes = sorted(speakers.count(s) for s in held)
        assert len(out.indices) >= 20 and len(out.indices) - sizes[-1] < 20  # the last one taken reached 20%
        assert hold_out(speakers, 0.2, seed, "train.jsonl") == out  # a function of (seed, file name)
        picks.add(tuple(out.speakers))
    assert len(picks) >= 10  # the seed chooses which speakers
    assert hold_out(speakers, 0.2, 0, "other.jsonl") != hold_out(speakers, 0.2, 0, "train.jsonl")


def test_without_speakers_or_with_one_samples_are_held_out():
    for speakers in ([None] * 40, ["alto"] * 40, [""] * 40):
        out = hold_out(speakers, 0.15, 3, "plain.jsonl")
        assert len(out.indices) == math.ceil(0.15 * 40) == 6 and out.speakers == []
    assert hold_out([None] * 40, 0.15, 3, "a.jsonl") != hold_out([None] * 40, 0.15, 4, "a.jsonl")
    # Unnamed samples beside named speakers are units of their own; one unit always stays in training.
    assert hold_out(["a", "a", None], 0.9, 0, "x").indices in ([0, 1], [2])
    assert hold_out(["a", "b"], 0.99, 0, "x").indices in ([0], [1])
    assert hold_out([None], 0.5, 0, "x").indices == []


def test_held_out_samples_never_enter_a_training_plan(tiny_model, demo_data, nospeaker_data, tmp_path, capsys):
    """Two real manifests (demo_data: speakers alto 3, bass 3, tenor 2; nospeaker_data: the same rows without
    speakers) through build_data: whole speakers held out of the first, 2 samples of the second, and no
    held-out sample in any epoch's plan."""
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig
    from transformers import AutoTokenizer

    from ds_train.data.loader import build_data
    from ds_train.data.manifest import speakers_by_source
    from ds_train.samples import load_prompts

    out = tmp_path / "out"
    raw = base_config(tiny_model, demo_data, out, train={"epochs": 5}, eval={"samples": 4},
                      data={"train_files": [str(demo_data / "train.jsonl"), str(nospeaker_data)], "eval_split": 0.25})
    del raw["data"]["train_file"]
    cfg = load_config(str(write_config(tmp_path / "split.yaml", raw)))
    data = build_data(cfg, HiggsAudioConfig.from_pretrained(str(tiny_model)),
                      AutoTokenizer.from_pretrained(str(tiny_model)), out)

    demo_speakers = speakers_by_source(str(demo_data / "train.jsonl"))
    held = data.held_out
    assert set(held) == {str(demo_data / "train.jsonl"), str(nospeaker_data)}
    held_speakers = {demo_speakers[s] for s in held[str(demo_data / "train.jsonl")]}
    assert len(held_speakers) == 1 and len(held[str(demo_data / "train.jsonl")]) in (2, 3)  # one whole speaker >= 2
    assert len(held[str(nospeaker_data)]) == 2  # ceil(0.25 x 8)
    eval_sources = [e["source"] for e in data.eval.loader.dataset.entries]
    assert sorted(eval_sources) == sorted(s for sources in held.values() for s in sources)

    entries = data.train_set.entries
    assert len(entries) == 16 - len(eval_sources)
    # Training sources are file:line; both files are named apart by their file names.
    assert {e["source"] for e in entries}.isdisjoint(eval_sources)
    assert not held_speakers & {demo_speakers.get(e["source"]) for e in entries}
    for epoch in range(cfg.train.epochs):
        data.sampler.set_epoch(epoch)
        trained = {entries[i]["source"] for b in data.sampler.plan() for i in b}
        assert trained == {e["source"] for e in entries}  # every training sample, no held-out one

    said = capsys.readouterr().out
    speaker = held_speakers.pop()
    n = len(held[str(demo_data / "train.jsonl")])
    assert (f"data.eval_split=0.25 held out train.jsonl: {n} of 8 samples, 1 speaker(s) ({speaker}); "
            f"plain.jsonl: 2 of 8 samples (by sample)") in said
    # eval.samples=4 speaks the first 4 held-out samples, file after file, numbered across the files.
    prompts = load_prompts(cfg, held)
    wanted = [(m, s) for m, sources in held.items() for s in sorted(sources, key=lambda s: int(s.split(":")[1]))][:4]
    rows = {m: [json.loads(line) for line in open(m)] for m in held}
    assert [p.target_audio for p in prompts] == [
        str(demo_data / rows[m][int(s.split(":")[1]) - 1]["audio"]) for m, s in wanted]
    assert [p.name[:4] for p in prompts] == ["000-", "001-", "002-", "003-"]
    report = json.loads((out / "data_report.json").read_text())
    assert [(r["manifest"], r["samples"], r["held_out"], r["per_epoch"]) for r in report["train_mix"]] == [
        (str(demo_data / "train.jsonl"), 8 - n, n, 8 - n), (str(nospeaker_data), 6, 2, 6)]
