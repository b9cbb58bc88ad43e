"""ds_train/generate.py (`ds-train generate`) and ds_train/samples.py (audio samples during training).

The memorisation tests are the end-to-end proof that the training signal matches inference: the tiny model,
fine-tuned by the real CLI (2 ranks, ZeRO-3) on one voice-cloning sample, must regenerate its exact audio codes
through Boson's own HiggsAudioServeEngine (greedy) and close the audio stream itself where the clip ends; the
untrained model must not. With the audio label shift removed from loss.py they fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml

from conftest import JUDGE_HEARS, MEMO_ROWS, MEMO_STEPS, launch, loss_records, plain_config, read_metrics, write_config

NUM_CODEBOOKS = 8


def memo_prompts(data: Path, system_prompt: str = "Generate audio following instruction."):
    from boson_multimodal.data_types import ChatMLSample

    from ds_train.generate import Prompt
    from ds_train.data.manifest import voice_cloning_prompt

    return [Prompt(ChatMLSample(messages=voice_cloning_prompt(text, system_prompt, ref_text,
                                                              str(data / "audio" / f"ref_{speaker}.wav"))),
                   f"{i:03d}", text) for i, (speaker, ref_text, text) in enumerate(MEMO_ROWS)]


def target_codes(data: Path, tiny_model: Path) -> list[torch.Tensor]:
    """The codes training taught: the last clip of each MEMO_ROWS sample (each is in the manifest twice)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    from ds_train.data.cache import CachedDataset
    from ds_train.data.cache import default_cache_dir

    dataset = CachedDataset(default_cache_dir(str(data / "train.jsonl")), HiggsAudioConfig.from_pretrained(tiny_model))
    return [e["audio_codes"][:, int(e["audio_starts"][-1]):].long() for e in dataset.entries[::2]]


def boson_engine(model_dir: Path):
    """Boson's serve engine, constructed from a model dir as a user constructs it."""
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    from ds_train.data.audio import _local_semantic_teacher

    with _local_semantic_teacher(str(model_dir / "audio_tokenizer" / "semantic_model")):
        return HiggsAudioServeEngine(str(model_dir), str(model_dir / "audio_tokenizer"), device="cpu",
                                     torch_dtype=torch.float32, kv_cache_lengths=[512])


def boson_greedy(engine, prompts, max_frames: int):
    """(codes, stopped by the stream EOS) per prompt, called as a user calls it (default stop strings)."""
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    audio_eos = engine.tokenizer.convert_tokens_to_ids("<|audio_eos|>")
    out = []
    for p in prompts:
        r = engine.generate(p.sample, max_new_tokens=max_frames + NUM_CODEBOOKS + 2, temperature=0.0,
                            ras_win_len=0, force_audio_gen=True, seed=0)
        codes = revert_delay_pattern(torch.from_numpy(r.generated_audio_tokens))[:, 1:-1]
        out.append((codes, audio_eos in r.generated_text_tokens.tolist()))
    return out


@pytest.fixture(scope="module")
def untrained_engine(tiny_model):
    return boson_engine(tiny_model)


@pytest.mark.slow
def test_memorised_samples_regenerate_exactly_through_the_serve_engine(memorised_run, tiny_model, untrained_engine):
    data = memorised_run.parent / "data"
    targets = target_codes(data, tiny_model)
    assert [tuple(t.shape) for t in targets] == [(NUM_CODEBOOKS, 10)]
    prompts = memo_prompts(data)
    max_frames = max(t.shape[1] for t in targets) + 10

    for (codes, stopped_by_eos), target in zip(boson_greedy(boson_engine(memorised_run / "merged"), prompts,
                                                            max_frames), targets):
        assert stopped_by_eos
        assert torch.equal(codes, target), (codes[0], target[0])

    for (codes, _), target in zip(boson_greedy(untrained_engine, prompts, max_frames), targets):
        n = min(codes.shape[1], target.shape[1])
        assert codes.shape != target.shape or not torch.equal(codes, target)
        assert (codes[0, :n] == target[0, :n]).float().mean() < 0.5


@pytest.mark.slow
def test_generate_cli_speaks_base_plus_adapter_without_a_merge(memorised_run, tiny_model, untrained_engine, tmp_path):
    from ds_train.cli import main

    data = memorised_run.parent / "data"
    targets = target_codes(data, tiny_model)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": text, "ref_text": ref_text, "out": speaker,
                                           "ref_audio": str(data / "audio" / f"ref_{speaker}.wav")}) + "\n"
                               for speaker, ref_text, text in MEMO_ROWS))
    out = tmp_path / "out"
    assert main(["generate", str(tiny_model), "--adapter", str(memorised_run / "adapter"), "--prompts", str(prompts),
                 "--temperature", "0", "--max-new-frames", "20", "--out", str(out)]) == 0
    for (speaker, _, text), target in zip(MEMO_ROWS, targets):
        info = json.loads((out / f"{speaker}.json").read_text())
        frames = target.shape[1]
        assert info["text"] == text and info["stopped_by"] == "eos" and info["frames"] == frames
        assert info["seconds"] == pytest.approx(frames / 50) and info["sampling_rate"] == 16000
        wav, rate = sf.read(out / f"{speaker}.wav")
        assert rate == 16000 and len(wav) == frames * 320  # 320 samples per frame at 16 kHz / 50 Hz

    # The API behind it: same codes as training taught; the length cap is reported as such.
    from ds_train.generate import Sampling, load_engine, speak

    engine = load_engine(str(tiny_model), str(memorised_run / "adapter"))
    for prompt, target in zip(memo_prompts(data), targets):
        spoken = speak(engine, prompt, Sampling(temperature=0.0, max_new_frames=20))
        assert torch.equal(spoken.codes, target) and spoken.stopped_by == "eos"
    capped = speak(engine, memo_prompts(data)[0], Sampling(temperature=0.0, max_new_frames=5))
    assert capped.stopped_by == "length_cap" and capped.codes.shape == (NUM_CODEBOOKS, 5)
    # The memorised model is too sure of itself to show sampling; the untrained one is not.
    sampled = [speak(untrained_engine, memo_prompts(data)[0], Sampling(temperature=1.0, seed=s, max_new_frames=12))
               for s in (1, 1, 2)]
    assert torch.equal(sampled[0].codes, sampled[1].codes)  # the seed makes sampling repeatable
    assert not torch.equal(sampled[0].codes, sampled[2].codes)


@pytest.mark.slow
def test_training_writes_judges_and_logs_audio_samples(memorised_run, tiny_model, tiny_judges):
    from ds_train.checkpoint import META
    from ds_train.data.audio import load_audio, load_audio_tokenizer
    from ds_train.quality import SpeakerEmbedder

    folder = memorised_run / "samples" / f"step-{MEMO_STEPS:06d}"
    assert sorted(p.name for p in folder.iterdir()) == ["000-utt_0.json", "000-utt_0.wav"]
    info = json.loads((folder / "000-utt_0.json").read_text())
    assert info["step"] == MEMO_STEPS and info["text"] == MEMO_ROWS[0][2] and info["frames"] == 10
    assert sf.info(folder / "000-utt_0.wav").frames == info["frames"] * 320
    records = {r["step"]: r for r in read_metrics(memorised_run) if "samples_eos_fraction" in r}
    assert sorted(records) == [MEMO_STEPS]
    # Generated on both ranks with the partitioned ZeRO-3 model: the memorised clip comes back exactly.
    last = records[MEMO_STEPS]
    assert last["samples_eos_fraction"] == 1.0 and last["samples_code_match"] == 1.0
    assert last["samples_length_ratio"] == 1.0 and last["samples_time_s"] > last["samples_judge_time_s"] > 0
    assert last["samples_params"] == "gathered once"  # eval.samples_gather=auto: the tiny model fits in RAM

    # Judged on rank 0: the tiny Whisper hears "Clam!" for "calm" (1 word of 1, 2 characters of 4 wrong); the speaker
    # similarity is that of the target clip's audio (the generated codes are the target's) to the reference.
    assert (info["transcript"], info["wer"], info["cer"]) == (JUDGE_HEARS, 1.0, 0.5)
    assert (last["samples_wer"], last["samples_cer"]) == (1.0, 0.5)
    data = memorised_run.parent / "data"
    tokenizer = load_audio_tokenizer(str(tiny_model / "audio_tokenizer"))
    clip = tokenizer.decode(target_codes(data, tiny_model)[0][None])[0, 0]
    sim = SpeakerEmbedder(str(tiny_judges[1]), "cpu").similarity(
        (clip, 16000), (load_audio(data / "audio" / "ref_alto.wav", 16000), 16000))
    assert last["samples_speaker_sim"] == pytest.approx(sim, abs=1e-5)
    assert info["speaker_sim"] == last["samples_speaker_sim"]

    # checkpoint.best_metric=wer: the checkpoint records it, the summary names the best checkpoint; curves.png.
    step_dir = memorised_run / "checkpoints" / f"step-{MEMO_STEPS:06d}"
    assert json.loads((step_dir / META).read_text())["metrics"]["samples_wer"] == 1.0
    summary = json.loads((memorised_run.parent / "summary.json").read_text())
    assert (summary["best_metric"], summary["best_checkpoint"], summary["best_value"]) == \
        ("samples_wer", str(step_dir), 1.0)
    assert summary["curves"] == str(memorised_run / "curves.png")
    assert (memorised_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_greedy_generation_is_quiet_and_decodes_as_boson_does(tiny_model, untrained_engine):
    """Boson's engine hands `temperature` and `top_p` to transformers' generate even when greedy, which then warned
    about both at every clip on every rank; transformers' misnamed `get_max_cache()` notice came with the first clip and
    a `max_batch_size` deprecation with the engine. Greedy speak() gives none of them (sampling keeps its flags), and
    the same codes as Boson's engine called directly."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from ds_train.data.manifest import voice_cloning_prompt
    from ds_train.generate import GET_MAX_CACHE_NOTICE, Prompt, Sampling, load_engine, speak
    from boson_multimodal.data_types import ChatMLSample

    prompt = Prompt(ChatMLSample(messages=voice_cloning_prompt("a quiet clip", "Generate audio following instruction.",
                                                               None, None)), "000", "a quiet clip")
    notices = []
    handler = logging.Handler()
    handler.emit = lambda record: notices.append(record.getMessage())
    cache_logger = logging.getLogger("transformers.cache_utils")
    hf_logging.warning_once.cache_clear()  # notices are logged once per process: this test must not depend on order
    cache_logger.addHandler(handler)
    try:
        engine = load_engine(str(tiny_model))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            greedy = [speak(engine, prompt, Sampling(temperature=0.0, max_new_frames=6)) for _ in range(2)]
            sampled = speak(engine, prompt, Sampling(temperature=1.0, seed=1, max_new_frames=6))
    finally:
        cache_logger.removeHandler(handler)
    assert [str(w.message) for w in caught if "do_sample" in str(w.message)] == []
    assert [n for n in notices if n.startswith(GET_MAX_CACHE_NOTICE) or "'max_batch_size'" in n] == []
    (boson_codes, _), = boson_greedy(untrained_engine, [prompt], 5)  # its budget has one step more: 6 frames
    assert greedy[0].codes.shape[1] > 0 and torch.equal(greedy[0].codes, boson_codes)
    assert torch.equal(greedy[1].codes, boson_codes)
    assert sampled.codes.shape[1] > 0 and not torch.equal(sampled.codes, boson_codes)


def test_a_clip_of_zero_frames_is_empty_audio(tiny_model):
    """A model that closes the audio stream at once (early in training) makes Boson's engine decode zero frames,
    which the codec's decoder cannot: the engine's tokenizer returns empty audio instead of crashing the run."""
    from ds_train.data.audio import load_audio_tokenizer
    from ds_train.generate import _ZeroFrameSafe

    tokenizer = load_audio_tokenizer(str(tiny_model / "audio_tokenizer"))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        tokenizer.decode(torch.zeros(1, NUM_CODEBOOKS, 0, dtype=torch.long))
    safe = _ZeroFrameSafe(tokenizer)
    assert safe.decode(torch.zeros(1, NUM_CODEBOOKS, 0, dtype=torch.long)).shape == (1, 1, 0)
    assert safe.decode(torch.zeros(1, NUM_CODEBOOKS, 2, dtype=torch.long)).shape == (1, 1, 640)
    assert safe.sampling_rate == 16000 and safe.tps == 50


@pytest.mark.slow
def test_samples_gathered_once_are_the_per_step_samples_without_a_collective(tiny_model, demo_data, eval3, plain_run,
                                                                             tmp_path):
    """ds_train.bench.samples on the plain run's config (2 ranks, every parameter partitioned): 2 steps, a round of
    2 eval samples with eval.samples_gather=never then =always, one more step. Both rounds make the same clips (codes
    and WAV bytes) in the same decode steps; the per-step round gathers at every step and the gathered-once round
    runs no collective while decoding; no KV cache or audio tokenizer outlives a round; and the steps around the
    rounds train exactly as the plain run's steps 1-3 (ZeRO-3's hooks are back after the gathered round)."""
    out = tmp_path / "run"
    config = plain_config(tiny_model, demo_data, eval3, out)
    cfg = yaml.safe_load(config.read_text())
    write_config(config, {**cfg, "eval": {"samples": 2, "samples_max_frames": 16}})
    launch([str(config)], module="ds_train.bench.samples", env={"BENCH_SAMPLES_STEPS": "2", "BENCH_SAMPLES_AFTER": "1"})
    bench = json.loads((out / "bench_samples.json").read_text())
    per_step, once = bench["rounds"]
    assert (per_step["params"], once["params"]) == ("gathered per decode step", "gathered once")
    assert once["codes"] == per_step["codes"] and once["wav_sha1"] == per_step["wav_sha1"]
    assert sum(len(c[0]) for c in once["codes"]) > 0  # clips with frames, not two empty ones
    assert once["decode_steps"] == per_step["decode_steps"] > 2
    assert once["decoding_collectives"] == 0
    assert per_step["decoding_collectives"] >= per_step["decode_steps"]
    assert per_step["engine_pieces_alive"] == once["engine_pieces_alive"] == 0
    plain = loss_records(plain_run)
    assert bench["losses"] == pytest.approx([plain[s]["loss"] for s in (1, 2, 3)], rel=1e-6)


def test_samples_are_due_every_n_steps_and_at_the_end(tmp_path):
    from ds_train.config import load_config
    from ds_train.samples import TrainingSamples

    cfg = load_config(None, ["model.path=m", "model.audio_tokenizer_path=t", "data.train_file=x.jsonl",
                             f"train.output_dir={tmp_path}", "eval.samples=2", "eval.samples_every=5"])
    samples = TrainingSamples.__new__(TrainingSamples)
    samples.cfg, samples.prompts = cfg, ["a prompt"]
    assert [s for s in range(1, 13) if samples.due(s, last_step=s == 12)] == [5, 10, 12]
    samples.prompts = []  # eval.samples unset: never
    assert not any(samples.due(s, last_step=s == 12) for s in range(1, 13))


def test_read_prompts_reports_every_bad_line(tmp_path):
    from ds_train.generate import read_prompts
    from ds_train.errors import DataError

    (tmp_path / "ref.wav").write_bytes(b"")
    lines = ['{"text": "hello", "out": "a"}', "not json", '{"text": ""}', '{"text": "x", "ref_audio": "ref.wav"}',
             '{"text": "x", "ref_audio": "gone.wav", "ref_text": "y"}', '{"text": "x", "speaker": "s"}',
             '{"text": "fine", "ref_audio": "ref.wav", "ref_text": "r"}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        read_prompts(str(tmp_path / "p.jsonl"), "sys")
    assert [b["source"] for b in e.value.bad] == ["p.jsonl:2", "p.jsonl:3", "p.jsonl:4", "p.jsonl:5", "p.jsonl:6"]
    (tmp_path / "p.jsonl").write_text(lines[0] + "\n" + lines[-1] + "\n")
    prompts = read_prompts(str(tmp_path / "p.jsonl"), "sys")
    assert [p.name for p in prompts] == ["a", "001"]
    roles = [m.role for m in prompts[1].sample.messages]
    assert roles == ["system", "user", "assistant", "user"]  # the training layout minus the target turn
    assert prompts[1].sample.messages[2].content.audio_url == str(tmp_path / "ref.wav")
    assert (prompts[0].ref_audio, prompts[1].ref_audio) == (None, str(tmp_path / "ref.wav"))
