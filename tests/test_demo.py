"""ds_train/demo: the held voice is one a tiny model can learn (its codes recur); the summary says whether it did."""

from __future__ import annotations

import json
import math



def codebook0(tokenizer, voice: str, text: str, speaker: str) -> list[int]:
    import librosa

    from ds_train.data.audio import LIBROSA_RESAMPLER, encode
    from ds_train.demo.data import RATE, speak_as

    wav = librosa.resample(speak_as(voice, text, speaker), orig_sr=RATE, target_sr=16000, res_type=LIBROSA_RESAMPLER)
    return encode(tokenizer, wav)[0].tolist()


def test_held_voice_codes_repeat_within_words_and_recur_across_clips(tiny_model):
    """The held voice's codes (codebook 0 of the tiny tokenizer) repeat while a word is held and come back when the
    speaker says the word again; the character voice gives almost every frame a code of its own (measured: 32% vs 0%
    repeated frames, 56 vs 104 distinct codes in ~130 frames)."""
    from ds_train.data.audio import load_audio_tokenizer

    tokenizer = load_audio_tokenizer(str(tiny_model / "audio_tokenizer"))
    clips = [("calm water", "bass"), ("water calm", "bass"), ("water and stars", "tenor"), ("blue water", "alto")]
    stats = {}
    for voice in ("held", "chars"):
        codes = [codebook0(tokenizer, voice, text, speaker) for text, speaker in clips]
        frames = sum(len(c) for c in codes)
        repeated = sum(a == b for c in codes for a, b in zip(c, c[1:])) / sum(len(c) - 1 for c in codes)
        stats[voice] = (repeated, len({x for c in codes for x in c}) / frames, codes)
    (held_repeated, held_distinct, held), (chars_repeated, chars_distinct, _) = stats["held"], stats["chars"]
    assert held_repeated > 0.25 and chars_repeated < 0.02
    assert held_distinct < 0.5 < chars_distinct
    assert [len(c) for c in held] == [26, 26, 40, 26]  # 12 frames a word, 2 a pause
    water = max(set(held[0][12:]), key=held[0][12:].count)  # the code bass holds for "water"...
    assert held[0][12:].count(water) >= 3 and held[1][:12].count(water) >= 3  # ...in both of its clips


def test_summary_prints_audio_loss_against_the_uniform_guess(tmp_path, capsys):
    from ds_train.config import load_config, to_yaml
    from ds_train.demo.summary import demo_summary

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"audio_codebook_size": 1024}))
    out = tmp_path / "out"
    (out / "samples" / "step-000020").mkdir(parents=True)
    cfg = load_config(None, [f"model.path={model}", "model.audio_tokenizer_path=/t", "data.train_file=/d.jsonl",
                             "data.eval_file=/e.jsonl", f"train.output_dir={out}", "eval.samples=2"])
    (out / "config.yaml").write_text(to_yaml(cfg))
    records = [{"step": 0, "eval_audio_loss": 6.95, "eval_audio_acc": 0.002},
               {"step": 1, "loss": 12.5, "text_loss": 5.6, "audio_loss": 6.94},
               {"step": 20, "loss": 1.5, "text_loss": 0.0003, "audio_loss": 1.5},
               {"step": 20, "eval_audio_loss": 3.5, "eval_audio_acc": 0.364},
               {"step": 20, "samples_eos_fraction": 0.5, "samples_length_ratio": 0.75, "samples_code_match": 0.25}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    demo_summary(str(out), "160")
    text = capsys.readouterr().out
    assert f"against {math.log(1026):.3f} = ln(1026)" in text
    assert "train: 6.940 (step 1) -> 1.500 (step 20)" in text
    assert "eval:  6.950 (step 0) -> 3.500 (step 20); top-1 code accuracy 0.2% (step 0) -> 36.4% (step 20)" in text
    assert f"samples:   {out}/samples/step-000020 (greedy; stopped by the stream EOS 50%, length 0.75 x" in text
