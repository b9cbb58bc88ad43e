"""prepare's pass-2 audio path on this machine (issue 16): clips/s and hours of audio encoded per hour of wall time,
  before  - decode + resample + encode one clip at a time in one process (prepare before data.decode_workers),
  workers - the same encoder, clips decoded + resampled ahead in worker processes (data.decode_workers=--workers),
  batchN  - workers, and N clips of similar length per encoder call (data.encode_batch=N),
all with the same torch thread count in the encoding process, and the fraction of codes the padded batches change.

  python benchmarks/prepare_encode.py MODEL_DIR [--clips 48] [--threads 1] [--batch 4,8] [--workers 1] [--repeat 2]
  python benchmarks/prepare_encode.py --real-size [--clips 12] ...

MODEL_DIR is a `ds-train make-tiny` checkpoint (its audio_tokenizer/). --real-size builds the released tokenizer's
architecture (bosonai/higgs-audio-v2-tokenizer's config.json: 24 kHz, 25 Hz, D=256, and a HuBERT-base semantic teacher)
with random weights, its codebooks initialised on synthetic speech as make-tiny does. Clips: FLAC at 44.1 kHz (so
decoding and the 44.1 -> tokenizer-rate resampling cost what they cost on common corpora), durations log-normal around
4 s clipped to 1-12 s, synthetic speech (ds_train.demo.data.synth), written to a temporary folder.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ds_train.data.audio import load_audio, load_audio_tokenizer
from ds_train.data.encoder import ClipCodes, encode_clip
from ds_train.demo.data import RATE, synth

REAL_SIZE = {"n_filters": 32, "D": 256, "codebook_dim": 64, "target_bandwidths": [0.5, 1, 1.5, 2, 4],
             "ratios": [8, 5, 4, 2, 3], "sample_rate": 24000, "bins": 1024, "n_q": 8,
             "semantic_techer": "hubert_base_general"}
WORDS = "the quick brown fox jumps over a lazy dog while seven bright ships sail far away".split()


def real_size_tokenizer(tmp: Path):
    import boson_multimodal.audio_processing.higgs_audio_tokenizer as hat
    import librosa
    from transformers import HubertConfig, HubertModel

    from ds_train.data.audio import _local_semantic_teacher, encode

    torch.manual_seed(0)
    HubertModel(HubertConfig()).save_pretrained(tmp / "hubert")  # HuBERT base: 12 layers, 768 wide, 95 M
    with _local_semantic_teacher(str(tmp / "hubert")):
        tok = hat.HiggsAudioTokenizer(**REAL_SIZE, device="cpu").eval()
    primer = np.concatenate([synth(" ".join(WORDS), f0) for f0 in (110.0, 160.0, 210.0)])
    encode(tok, librosa.resample(primer, orig_sr=RATE, target_sr=tok.sampling_rate))  # k-means-initialises codebooks
    return tok


def write_clips(d: Path, n: int) -> tuple[list[str], float]:
    import librosa

    rng = np.random.default_rng(0)
    paths, seconds = [], 0.0
    for i in range(n):
        target = float(np.clip(rng.lognormal(np.log(4.0), 0.5), 1.0, 12.0))
        text = " ".join(rng.choice(WORDS, 40))
        wav = librosa.resample(synth(text, 100.0 + 10 * (i % 12)), orig_sr=RATE, target_sr=44100)
        wav = wav[:int(target * 44100)]
        paths.append(str(d / f"{i:04d}.flac"))
        sf.write(paths[-1], wav, 44100)
        seconds += len(wav) / 44100
    return paths, seconds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir", nargs="?")
    p.add_argument("--real-size", action="store_true")
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", default="4,8")
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = real_size_tokenizer(tmp) if a.real_size else load_audio_tokenizer(f"{a.model_dir}/audio_tokenizer")
        params = sum(x.numel() for x in tok.parameters())
        paths, seconds = write_clips(tmp, a.clips)
        encode_clip(paths[0], tok, False)  # warm-up, untimed
        t0 = time.time()
        for path in paths:
            load_audio(path, tok.sampling_rate)
        decode_s = time.time() - t0
        before = [encode_clip(path, tok, False) for path in paths]
        walls, differ = {}, {}
        for _ in range(a.repeat):  # interleaved, best of each: the box is shared, its load changes within minutes
            t0 = time.time()
            [encode_clip(path, tok, False) for path in paths]
            walls.setdefault("before", []).append(time.time() - t0)
            differ["before"] = 0.0
            for batch in [1, *(int(b) for b in a.batch.split(",") if b)]:
                name = "workers" if batch == 1 else f"batch{batch}"
                clips = ClipCodes(tok, loudness_normalize=False, workers=a.workers, batch=batch)
                t0 = time.time()
                clips.encode(paths)
                codes = [clips(path) for path in paths]
                walls.setdefault(name, []).append(time.time() - t0)
                assert all(c.shape == b.shape for c, b in zip(codes, before))
                differ[name] = sum(int((c != b).sum()) for c, b in zip(codes, before)) / sum(b.numel() for b in before)
        runs = [(name, min(w), differ[name]) for name, w in walls.items()]
    print(f"tokenizer: {'real-size, random weights' if a.real_size else a.model_dir} ({params / 1e6:.0f} M "
          f"parameters); {a.clips} clips, {seconds:.0f} s of audio; torch threads {a.threads}; "
          f"decode workers {a.workers}; best of {a.repeat}; decode + resample alone: {decode_s:.1f} s")
    print("| run | wall s | clips/s | hours of audio / hour | codes differing from `before` |")
    print("|---|---:|---:|---:|---:|")
    for name, wall, differ in runs:
        print(f"| {name} | {wall:.1f} | {a.clips / wall:.2f} | {seconds / wall:.1f} | {differ:.1%} |")
    print(json.dumps({"real_size": a.real_size, "clips": a.clips, "audio_s": seconds, "threads": a.threads,
                      "workers": a.workers, "decode_s": decode_s,
                      "runs": [{"run": n, "wall_s": w, "differ": d} for n, w, d in runs]}))


if __name__ == "__main__":
    main()
