"""A small synthetic voice-cloning data set: no downloads, deterministic, written as a plain TTS manifest.

Each "speaker" has a pitch; each character of the text becomes a short harmonic tone whose pitch follows the
character, so audio depends on text and speaker the way speech does, and a model can learn the mapping.
Clips are written at 22.05 kHz so the resampling path runs.
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


def make_demo_data(out_dir: str, n: int = 16, n_eval: int = 4, seed: int = 0, skewed: bool = False) -> Path:
    """Write OUT/audio/*.wav, OUT/train.jsonl and OUT/eval.jsonl (voice cloning: ref_audio + ref_text)."""
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = sorted(SPEAKERS)
    refs = {}
    for s in names:
        ref_text = " ".join(rng.choice(WORDS, 3))
        sf.write(out / "audio" / f"ref_{s}.wav", synth(ref_text, SPEAKERS[s]), RATE)
        refs[s] = ref_text
    rows = []
    for i in range(n + n_eval):
        s = names[i % len(names)]
        # Skewed: most clips short, a few long (the shape that makes fixed-size batches waste padding).
        k = int(rng.choice([2, 3, 3, 4, 14, 22], p=[0.35, 0.25, 0.15, 0.1, 0.1, 0.05])) if skewed else int(rng.integers(2, 5))
        text = " ".join(rng.choice(WORDS, k))
        sf.write(out / "audio" / f"utt_{i:04d}.wav", synth(text, SPEAKERS[s]), RATE)
        rows.append({"audio": f"audio/utt_{i:04d}.wav", "text": text, "speaker": s,
                     "ref_audio": f"audio/ref_{s}.wav", "ref_text": refs[s]})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n:]))
    return out
