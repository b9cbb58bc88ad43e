"""Audio I/O and the Higgs audio tokenizer: decode with soundfile, resample as Boson's serve engine does, encode."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import librosa
import numpy as np
import soundfile as sf
import torch

from ds_train.data import clips
from ds_train.fsutil import file_digest

LIBROSA_RESAMPLER = "soxr_hq"  # librosa.load's default res_type, which the serve engine uses
# The hub id boson's HiggsAudioTokenizer hard-codes for its semantic teacher (HuBERT).
SEMANTIC_TEACHER_IDS = ("bosonai/hubert_base", "facebook/hubert-base-ls960", "microsoft/wavlm-base-plus")


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, silent, too long."""


def load_audio(path: str | os.PathLike, target_sr: int) -> np.ndarray:
    """Decode once, downmix to mono float32, resample to `target_sr`. `path` is a file or a member of a data set's
    tar / parquet / Arrow file (clips.py).

    The samples equal `librosa.load(path, sr=target_sr)`, which is how HiggsAudioServeEngine loads a reference clip
    at inference: the codes training conditions on are the codes inference will condition on. (torchaudio's
    resampler differs by ~1e-4 and changed 0.8-1.4% of the reference codes.)
    """
    try:
        wav, sr = sf.read(clips.open_clip(str(path)), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError, LookupError, ValueError) as e:
        raise AudioError(f"cannot decode audio: {e}") from None
    wav = wav.mean(axis=1)
    if wav.size == 0:
        raise AudioError("audio has zero length")
    if sr != target_sr:
        wav = librosa.resample(wav, orig_sr=sr, target_sr=target_sr, res_type=LIBROSA_RESAMPLER)
    return np.ascontiguousarray(wav, dtype=np.float32)


def audio_info(path: str | os.PathLike) -> tuple[int, float]:
    """(sample rate, seconds) from the header alone (of a member: its bytes are read, the rest of its file is not)."""
    try:
        info = sf.info(clips.open_clip(str(path)))
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError, LookupError, ValueError) as e:
        raise AudioError(f"cannot read audio header: {e}") from None
    return info.samplerate, info.frames / max(info.samplerate, 1)


@contextlib.contextmanager
def _local_semantic_teacher(local_dir: Optional[str]):
    """Make boson's tokenizer load its semantic teacher from `local_dir` instead of the hub, for offline nodes."""
    if not local_dir:
        yield
        return
    import boson_multimodal.audio_processing.higgs_audio_tokenizer as hat

    original = hat.AutoModel

    class _LocalAutoModel:
        @staticmethod
        def from_pretrained(name, *args, **kwargs):
            if name in SEMANTIC_TEACHER_IDS:
                kwargs.pop("trust_remote_code", None)
                return original.from_pretrained(local_dir, *args, **kwargs)
            return original.from_pretrained(name, *args, **kwargs)

    hat.AutoModel = _LocalAutoModel
    try:
        yield
    finally:
        hat.AutoModel = original


def load_audio_tokenizer(path: str, device: str = "cpu", semantic_model_path: Optional[str] = None):
    """Load a Higgs audio tokenizer (real or tiny) through boson's own loader.

    A `semantic_model/` folder next to the tokenizer's config.json (the tiny one ships it) is used as the
    semantic teacher unless `semantic_model_path` names another local copy.
    """
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import load_higgs_audio_tokenizer

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"audio tokenizer dir {path} has no config.json")
    bundled = Path(path) / "semantic_model"
    local = semantic_model_path or (str(bundled) if bundled.is_dir() else None)
    with _local_semantic_teacher(local):
        tok = load_higgs_audio_tokenizer(path, device=device)
    return tok


def tokenizer_fingerprint(path: str) -> dict:
    """What identifies an audio tokenizer for cache invalidation: its config and the SHA-1 of its weights. Never its
    path or mtimes: a tokenizer copied to another disk is the same tokenizer."""
    p = Path(path)
    out = {"id": path} if not p.exists() else {}  # a hub id is all there is to go by
    if (p / "config.json").is_file():
        out["config"] = json.loads((p / "config.json").read_text())
    if (p / "model.pth").is_file():
        out["weights_sha1"] = weights_digest(p / "model.pth")
    return out


def weights_digest(path: Path) -> str:
    """SHA-1 of a weights file, computed once: remembered beside it (keyed by size and mtime) when the folder is
    writable, since hashing a real tokenizer's weights on every start costs seconds."""
    st = path.stat()
    memo = path.with_name(f".{path.name}.sha1.json")
    try:
        saved = json.loads(memo.read_text())
        if saved["size"] == st.st_size and saved["mtime_ns"] == st.st_mtime_ns:
            return saved["sha1"]
    except (OSError, ValueError, KeyError):
        pass
    digest = file_digest(str(path))
    try:
        memo.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": digest}))
    except OSError:
        pass  # a read-only model dir: hash again next time
    return digest


@torch.no_grad()
def encode(tokenizer, wav: np.ndarray, loudness_normalize: bool = False) -> torch.Tensor:
    """Codes (n_q, T) for one waveform already at the tokenizer's rate: boson's own `encode`, the codes inference
    conditions on. `prepare`'s default (data.encode_batch=1)."""
    codes = tokenizer.encode(wav, sr=tokenizer.sampling_rate, loudness_normalize=loudness_normalize)
    return codes.cpu().long()


@torch.no_grad()
def encode_padded(tokenizer, wavs: list[np.ndarray], loudness_normalize: bool = False) -> list[torch.Tensor]:
    """Codes (n_q, T_i) of several waveforms in one encoder call: zero-padded on the right to a common length, each
    trimmed to the T_i one-by-one `encode` gives. The codes are not one-by-one's: the semantic teacher (HuBERT)
    group-normalises its first conv layer over the whole input and attends without a padding mask, and every conv
    sees the padding near a clip's end (tests/test_prepare.py measures how many codes differ)."""
    if loudness_normalize:
        wavs = [_loudness_normalized(w, tokenizer.sampling_rate) for w in wavs]
    length = _common_length(tokenizer, max(len(w) for w in wavs))
    x = torch.from_numpy(np.stack([np.pad(w, (0, length - len(w))) for w in wavs]))
    codes = tokenizer._xcodec_encode(x.unsqueeze(1).to(tokenizer.device)).audio_codes.cpu().long()
    return [c[:, :frames(tokenizer, len(w))] for c, w in zip(codes, wavs)]


def _loudness_normalized(wav: np.ndarray, sr: int) -> np.ndarray:
    """What boson's `encode(loudness_normalize=True)` does to a clip before encoding it."""
    import pyloudnorm as pyln

    return pyln.normalize.loudness(wav, pyln.Meter(sr).integrated_loudness(wav), -23.0)


def frames(tokenizer, n_samples: int) -> int:
    """The number of code frames boson's `encode` gives a clip of `n_samples` (at the tokenizer's rate), from the
    conv arithmetic of its two branches, as `_xcodec_encode` reconciles them (pure Python: no tensor is made)."""
    acoustic, semantic = _branch_frames(tokenizer, n_samples)
    if acoustic != semantic:  # _xcodec_encode encodes the acoustic branch again, padded on both sides
        acoustic, _ = _branch_frames(tokenizer, n_samples + 2 * 160 * tokenizer.semantic_downsample_factor)
    return min(acoustic, semantic)


def _common_length(tokenizer, n_samples: int) -> int:
    """The least length >= n_samples at which both branches give the same number of frames: `_xcodec_encode`'s
    re-encode of a mismatch only works on one clip."""
    length = n_samples
    while len(set(_branch_frames(tokenizer, length))) > 1:
        length += 1
    return length


def _branch_frames(tokenizer, n_samples: int) -> tuple[int, int]:
    """(acoustic, semantic) frames of `_xcodec_encode` for n_samples, before it reconciles them."""
    acoustic = _conv_length(tokenizer.encoder, n_samples)
    n = n_samples
    if tokenizer.semantic_sample_rate != tokenizer.sample_rate:  # torchaudio's resample: ceil(n * new / old)
        n = -(-n * tokenizer.semantic_sample_rate // tokenizer.sample_rate)
    n = int(tokenizer.semantic_model._get_feat_extract_output_lengths(n + 320))  # get_regress_target pads 160 + 160
    if tokenizer.downsample_mode == "step_down" and tokenizer.semantic_downsample_factor > 1:
        n = -(-n // tokenizer.semantic_downsample_factor)  # target[:, ::factor]
    elif tokenizer.downsample_mode == "avg":
        n = n // tokenizer.semantic_downsample_factor  # AvgPool1d(factor, factor)
    return acoustic, _conv_length(tokenizer.encoder_semantic, n)


def _conv_length(module: torch.nn.Module, n: int) -> int:
    """Output length of a chain of Conv1d layers (residual branches keep the length, so module order is the chain)."""
    for conv in module.modules():
        if isinstance(conv, torch.nn.Conv1d):
            (k,), (s,), (p,), (d,) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
            n = (n + 2 * p - d * (k - 1) - 1) // s + 1
    return n
