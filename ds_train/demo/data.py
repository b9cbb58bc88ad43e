"""A small synthetic voice-cloning data set: no downloads, deterministic, written as a plain TTS manifest.

Two voices, both depending on text and speaker the way speech does; clips are written at 22.05 kHz so the
resampling path runs.

- `chars` (the tests' default): each character is a 50 ms harmonic tone whose pitch follows the character. The tiny
  audio tokenizer gives almost every such frame a code of its own (~330 distinct codes in 630 frames per codebook),
  so a model can memorise these clips but learns nothing that carries over to held-out ones.
- `held` (the demo's): each word is a held tone (240 ms, 40 ms pause) whose pitch follows the word and whose timbre
  follows the speaker. Pitches are multiples of 50 Hz, so every 20 ms tokenizer frame of a held tone holds whole
  periods and encodes to the same codes: the clip's codes repeat within a word and recur across clips, as a real
  codec's codes of real speech do. This is a voice the tiny model can learn (eval audio loss falls too).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 22050
WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars sing softly above calm blue water "
         "and every small voice learns to speak again").split()
SPEAKERS = {"alto": 180.0, "bass": 95.0, "tenor": 130.0}
FRAME_HZ = 50  # the Higgs audio tokenizer's frame rate (the tiny one's too)
# Held voice: (lowest pitch as a multiple of FRAME_HZ, harmonic amplitudes = timbre) per speaker.
HELD = {"alto": (4, (1.0, 0.25, 0.1)), "bass": (2, (1.0, 0.8, 0.6)), "tenor": (3, (1.0, 0.5, 0.3))}
VOICES = ("chars", "held")


def synth(text: str, f0: float, seconds_per_char: float = 0.05) -> np.ndarray:
    n = int(RATE * seconds_per_char)
    t = np.arange(n) / RATE
    env = np.sin(np.pi * np.arange(n) / n) ** 2
    parts = []
    for ch in text:
        if ch == " ":
            parts.append(np.zeros(n // 2))
            continue
        f = f0 * 2 ** ((ord(ch) % 24) / 24)
        tone = sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3))
        parts.append(0.3 * env * tone)
    return np.concatenate(parts).astype(np.float32)


def held(text: str, speaker: str, word_seconds: float = 0.24, pause_seconds: float = 0.04) -> np.ndarray:
    """The held voice: one tone per word, pitch FRAME_HZ x (speaker's lowest multiple + word's hash % 8)."""
    lowest, harmonics = HELD[speaker]
    n, pause = int(RATE * word_seconds), np.zeros(int(RATE * pause_seconds))
    t = np.arange(n) / RATE
    fade = np.clip(np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * RATE), 0.0, 1.0)  # 10 ms: no clicks
    parts = []
    for i, word in enumerate(text.split()):
        f = FRAME_HZ * (lowest + sum(map(ord, word)) % 8)
        tone = sum(a * np.sin(2 * np.pi * f * (h + 1) * t) for h, a in enumerate(harmonics))
        parts += ([pause] if i else []) + [0.3 * fade * tone / sum(harmonics)]
    return np.concatenate(parts).astype(np.float32)


def speak_as(voice: str, text: str, speaker: str) -> np.ndarray:
    return held(text, speaker) if voice == "held" else synth(text, SPEAKERS[speaker])


def make_demo_data(out_dir: str, n: int = 16, n_eval: int = 4, seed: int = 0, skewed: bool = False,
                   voice: str = "chars") -> Path:
    """Write OUT/audio/*.wav, OUT/train.jsonl and OUT/eval.jsonl (voice cloning: ref_audio + ref_text)."""
    if voice not in VOICES:
        raise ValueError(f"voice must be one of {VOICES}, got {voice!r}")
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = sorted(SPEAKERS)
    refs = {}
    for s in names:
        ref_text = " ".join(rng.choice(WORDS, 3))
        sf.write(out / "audio" / f"ref_{s}.wav", speak_as(voice, ref_text, s), RATE)
        refs[s] = ref_text
    rows = []
    for i in range(n + n_eval):
        s = names[i % len(names)]
        # Skewed: most clips short, a few long (the shape that makes fixed-size batches waste padding).
        k = int(rng.choice([2, 3, 3, 4, 14, 22], p=[0.35, 0.25, 0.15, 0.1, 0.1, 0.05])) if skewed else int(rng.integers(2, 5))
        text = " ".join(rng.choice(WORDS, k))
        sf.write(out / "audio" / f"utt_{i:04d}.wav", speak_as(voice, text, s), RATE)
        rows.append({"audio": f"audio/utt_{i:04d}.wav", "text": text, "speaker": s,
                     "ref_audio": f"audio/ref_{s}.wav", "ref_text": refs[s]})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n:]))
    return out
