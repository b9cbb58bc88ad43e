"""`ds-train generate`: speak texts with a fine-tuned model through Boson's serve engine.

The prompt is laid out by `HiggsAudioServeEngine._prepare_inputs` (Boson's `prepare_chatml_sample` + its collator,
configured as training configures it): system prompt, optional reference text + reference audio turn, the text to
speak, then `<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>` - exactly the tokens that precede
the target audio in a training sample (ds_train.data.manifest.voice_cloning_prompt builds both). Decoding is the model's
own `generate` (delay pattern, stream BOS/EOS, sampling), through `HiggsAudioServeEngine.generate`.

The engine is Boson's class around a model already in memory: base + PEFT adapter (no merge on disk), a merged dir,
or the DeepSpeed engine's module during training (ds_train.samples).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from ds_train.adapter import ADAPTER_CONFIG, BASE_TRAINABLE

if TYPE_CHECKING:
    from boson_multimodal.data_types import ChatMLSample

# Generation stops once the audio stream is closed (<|audio_eos|>): one clip per prompt, never a second segment.
STOP_STRINGS = ["<|audio_eos|>", "<|eot_id|>", "<|end_of_text|>"]
KV_CACHE_LENGTHS = [1024, 4096, 8192]  # HiggsAudioServeEngine's buckets


@dataclass
class Prompt:
    """The turns before the audio to generate, the spoken text, and the clip it should sound like (if known)."""

    sample: ChatMLSample
    name: str  # output file stem
    text: str
    target_audio: Optional[str] = None
    ref_audio: Optional[str] = None  # the voice to clone (speaker similarity is measured against it)


@dataclass
class Sampling:
    temperature: float = 0.7  # 0: greedy (and repetition-aware resampling off: greedy means argmax)
    top_k: Optional[int] = None
    top_p: float = 0.95
    seed: int = 0
    max_new_frames: int = 1500  # audio frames (30 s at the Higgs tokenizer's 50 frames/s)
    ras_win_len: int = 7  # Boson's repetition-aware sampling window; 0 turns it off

    def __post_init__(self):
        if self.temperature < 0 or self.max_new_frames <= 0:
            raise ValueError(f"need temperature >= 0 and max_new_frames > 0, got {self.temperature}, "
                             f"{self.max_new_frames}")


@dataclass
class Spoken:
    codes: torch.Tensor  # (num_codebooks, frames), delay pattern reverted, stream BOS/EOS removed
    wav: np.ndarray
    sampling_rate: int
    frames_per_second: float
    stopped_by: str  # "eos" (the model closed the audio stream) | "length_cap" (max_new_frames reached)

    def info(self) -> dict:
        frames = int(self.codes.shape[1])
        return {"frames": frames, "seconds": round(frames / self.frames_per_second, 3), "stopped_by": self.stopped_by,
                "sampling_rate": self.sampling_rate}


def serve_engine(model, text_tokenizer, audio_tokenizer, capture_cuda_graphs: bool = False,
                 whisper_processor_path: Optional[str] = None):
    """Boson's HiggsAudioServeEngine around a model in memory (its constructor would load one from a path): the
    attributes its __init__ sets, minus the loading."""
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine
    from transformers.cache_utils import StaticCache

    from ds_train.data.collate import DEFAULT_WHISPER_PROCESSOR, make_collator

    engine = HiggsAudioServeEngine.__new__(HiggsAudioServeEngine)
    engine.model, engine.tokenizer = _GreedyWithoutKnobs(model), text_tokenizer
    engine.audio_tokenizer = _ZeroFrameSafe(audio_tokenizer)
    engine.device = str(model.device)
    engine.audio_num_codebooks = model.config.audio_num_codebooks
    engine.audio_codebook_size = model.config.audio_codebook_size
    engine.model.set_audio_special_tokens(text_tokenizer)
    cache_config = deepcopy(model.config.text_config)
    cache_config.num_hidden_layers += len(model.config.audio_dual_ffn_layers or [])
    engine.kv_caches = {n: StaticCache(config=cache_config, batch_size=1, max_cache_len=n,
                                       device=model.device, dtype=model.dtype) for n in KV_CACHE_LENGTHS}
    # The collator settings training uses (they are the serve engine's).
    engine.collator = make_collator(model.config, whisper_processor_path or DEFAULT_WHISPER_PROCESSOR)
    if capture_cuda_graphs:
        engine.model.capture_model(engine.kv_caches.values())
    return engine


class _ZeroFrameSafe:
    """The audio tokenizer as the serve engine sees it. The engine decodes every generated clip, and the codec's
    decoder fails on a clip of zero frames - what a model that closes the audio stream at once (early in training)
    generates. Such a clip is empty audio, not a crashed run."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def decode(self, vq_code: torch.Tensor):
        if vq_code.shape[-1] == 0:
            return np.zeros((vq_code.shape[0], 1, 0), dtype=np.float32)
        return self._tokenizer.decode(vq_code)


class _GreedyWithoutKnobs:
    """The model as the serve engine sees it. Boson's engine passes `temperature` and `top_p` to `generate` even when
    it decodes greedily (temperature 0 -> do_sample=False), and transformers then warns about each flag at every
    call, on every rank. Greedy decoding reads none of the sampling flags: they are unset here."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, *args, **kwargs):
        if kwargs.get("do_sample") is False:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return self._model.generate(*args, **kwargs)


# transformers' notice when Boson's StaticCache path calls the deprecated Cache.get_max_length(): it misnames the
# method and names nothing a user can change.
GET_MAX_CACHE_NOTICE = "`get_max_cache()` is deprecated for all Cache classes."


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(GET_MAX_CACHE_NOTICE)


@contextlib.contextmanager
def _without_get_max_cache_notice():
    """transformers.cache_utils without that one notice, while the serve engine generates."""
    logger, drop = logging.getLogger("transformers.cache_utils"), _DropNotice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def speak(engine, prompt: Prompt, sampling: Sampling) -> Spoken:
    """One clip for one prompt, by HiggsAudioServeEngine.generate."""
    k = engine.audio_num_codebooks
    greedy = sampling.temperature == 0
    with _without_get_max_cache_notice():
        response = engine.generate(
            prompt.sample,
            # Steps: the stream-BOS frame, one per frame, K - 1 delayed codebooks, the stream-EOS frame.
            max_new_tokens=sampling.max_new_frames + k + 1,
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            stop_strings=STOP_STRINGS, force_audio_gen=True,
            ras_win_len=0 if greedy else sampling.ras_win_len, seed=sampling.seed,
        )
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    tokens = torch.from_numpy(response.generated_audio_tokens)
    if engine.model.config.use_delay_pattern:
        tokens = revert_delay_pattern(tokens)
    codes = tokens.clip(0, engine.audio_codebook_size - 1)[:, 1:-1]  # as the engine decodes it
    eos_id = engine.tokenizer.convert_tokens_to_ids("<|audio_eos|>")
    stopped_by = "eos" if eos_id in response.generated_text_tokens.tolist() else "length_cap"
    return Spoken(codes, response.audio, response.sampling_rate, float(engine.audio_tokenizer.tps), stopped_by)


def write_spoken(out_dir: Path, prompt: Prompt, spoken: Spoken, extra: Optional[dict] = None) -> Path:
    """OUT_DIR/NAME.wav (at the audio tokenizer's rate) and OUT_DIR/NAME.json (frames, seconds, stopped_by)."""
    import soundfile as sf

    out_dir.mkdir(parents=True, exist_ok=True)
    wav = out_dir / f"{prompt.name}.wav"
    sf.write(wav, spoken.wav, spoken.sampling_rate)
    info = {"text": prompt.text, **spoken.info(), **(extra or {})}
    (out_dir / f"{prompt.name}.json").write_text(json.dumps(info, indent=1) + "\n")
    return wav


# ---------------------------------------------------------------------------------------------------------------
# Prompts

def read_prompts(path: str, system_prompt: str) -> list[Prompt]:
    """A prompts JSONL (or JSON list): `text`, optional `ref_audio` + `ref_text` (voice cloning), optional `out`
    (file stem). Relative audio paths resolve against the file's directory; every bad line is reported at once."""
    from ds_train.data.manifest import raw_records, voice_cloning_prompt
    from ds_train.errors import DataError

    from boson_multimodal.data_types import ChatMLSample

    base, name = Path(path).resolve().parent, os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts, bad = [], []
    for source, row, error in raw_records(path):
        reason = error or _prompt_problem(row, base)
        if reason:
            bad.append({"source": source, "reason": reason})
            continue
        ref_audio = str(base / row["ref_audio"]) if "ref_audio" in row else None
        messages = voice_cloning_prompt(row["text"], system_prompt, row.get("ref_text"), ref_audio)
        prompts.append(Prompt(ChatMLSample(messages=messages), row.get("out") or f"{len(prompts):03d}", row["text"],
                              ref_audio=ref_audio))
    if bad:
        raise DataError(bad, path)
    if not prompts:
        raise DataError([{"source": name, "reason": "no prompts"}], path)
    names = [p.name for p in prompts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError([{"source": name, "reason": f"'out' names used twice: {dupes}"}], path)
    return prompts


def _prompt_problem(row, base: Path) -> Optional[str]:
    if not isinstance(row, dict):
        return "not a JSON object"
    unknown = set(row) - {"text", "ref_audio", "ref_text", "out"}
    if unknown:
        return f"unknown keys {sorted(unknown)}; expected text, ref_audio, ref_text, out"
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        return "'text' must be a non-empty string"
    if ("ref_audio" in row) != ("ref_text" in row):
        return "'ref_audio' and 'ref_text' go together"
    if "ref_audio" in row and not (base / row["ref_audio"]).is_file():
        return f"reference audio not found: {base / row['ref_audio']}"
    if "out" in row and (not isinstance(row["out"], str) or not row["out"] or "/" in row["out"]):
        return "'out' must be a file stem (no '/')"
    return None


def prompts_from_manifest(path: str, fmt: str, system_prompt: str, n: int, only: Optional[set[str]] = None,
                          columns: Optional[dict] = None) -> list[Prompt]:
    """The first `n` usable samples of a training/eval manifest or data set (of those whose source is in `only`,
    when given) as prompts: every turn before the last assistant audio turn, whose clip becomes the target the
    generated audio is compared with."""
    from boson_multimodal.data_types import AudioContent, ChatMLSample

    from ds_train.data import clips
    from ds_train.data.manifest import audio_contents, contents, read_manifest, text_of

    prompts = []
    for rec in read_manifest(path, fmt, system_prompt, columns=columns):
        if rec.sample is None or (only is not None and rec.source not in only):
            continue
        messages = rec.sample.messages
        last = max((i for i, m in enumerate(messages) if m.role == "assistant"
                    and any(isinstance(c, AudioContent) for c in contents(m))), default=None)
        if last is None:
            continue
        target = next(c for c in contents(messages[last]) if isinstance(c, AudioContent)).audio_url
        prompt_sample = ChatMLSample(messages=messages[:last])
        earlier = [c.audio_url for c in audio_contents(prompt_sample)]
        for c in audio_contents(prompt_sample):  # the serve engine reads files only: a member goes as its bytes
            if clips.split(c.audio_url)[1] is not None and clips.exists(c.audio_url):
                c.raw_audio, c.audio_url = base64.b64encode(clips.read_bytes(c.audio_url)).decode(), ""
        stem = f"{len(prompts):03d}-{Path(target).stem}"
        prompts.append(Prompt(prompt_sample, stem, (text_of(prompt_sample) or [""])[-1], target,
                              ref_audio=earlier[-1] if earlier else None))
        if len(prompts) == n:
            break
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# Loading

def load_engine(model_dir: str, adapter_dir: Optional[str] = None, audio_tokenizer_path: Optional[str] = None,
                tokenizer_path: Optional[str] = None, semantic_model_path: Optional[str] = None,
                device: str = "auto", dtype: str = "auto"):
    """A serve engine for base + adapter (LoRA applied by PEFT in memory, a fully trained audio_mlp loaded over the
    base) or for a merged / base model dir alone."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from transformers import AutoTokenizer

    from ds_train.data.audio import load_audio_tokenizer
    from ds_train.export import load_base_trainable, load_lora
    from ds_train.model import base_model, torch_dtype

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    audio_tokenizer_path = audio_tokenizer_path or os.path.join(model_dir, "audio_tokenizer")
    if not os.path.isfile(os.path.join(audio_tokenizer_path, "config.json")):
        raise FileNotFoundError(f"no audio tokenizer at {audio_tokenizer_path}: pass --audio-tokenizer")
    # The adapter is applied in fp32 and the model cast afterwards, as `ds-train merge` does.
    model = HiggsAudioModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter_dir:
        adapter = Path(adapter_dir)
        if not (adapter / ADAPTER_CONFIG).is_file() and not (adapter / BASE_TRAINABLE).is_file():
            raise FileNotFoundError(f"{adapter} holds neither {ADAPTER_CONFIG} nor {BASE_TRAINABLE}")
        if (adapter / BASE_TRAINABLE).is_file():
            load_base_trainable(model, adapter / BASE_TRAINABLE)
        if (adapter / ADAPTER_CONFIG).is_file():
            model = base_model(load_lora(model, adapter))  # LoRA layers sit inside the HiggsAudioModel
    model = model.to(device=device, dtype=torch_dtype(dtype)).eval()
    text_tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_dir)
    audio_tokenizer = load_audio_tokenizer(audio_tokenizer_path, device, semantic_model_path)
    return serve_engine(model, text_tokenizer, audio_tokenizer, capture_cuda_graphs=device.startswith("cuda"))


def generate_files(engine, prompts: list[Prompt], sampling: Sampling, out_dir: Path) -> list[dict]:
    """Speak every prompt into OUT_DIR; returns one info dict per file."""
    infos = []
    for prompt in prompts:
        spoken = speak(engine, prompt, sampling)
        wav = write_spoken(out_dir, prompt, spoken, {"sampling": asdict(sampling)})
        infos.append({"wav": str(wav), **spoken.info()})
    return infos
