"""Checks that run before any process group exists, shared by train, prepare and the benchmarks: the model config,
both tokenizers and the output dir. Whatever is wrong here stops the run with exit 2, naming the setting."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ds_train.adapter import check_init_adapter
from ds_train.checkpoint import check_resume_request
from ds_train.config import Config
from ds_train.errors import ConfigError

HIGGS_SPECIALS = {  # token -> HiggsAudioConfig attribute holding its id (None: only needs to exist)
    "<|AUDIO|>": "audio_in_token_idx",
    "<|AUDIO_OUT|>": "audio_out_token_idx",
    "<|audio_out_bos|>": "audio_out_bos_token_id",
    "<|audio_eos|>": "audio_eos_token_id",
    "<|audio_bos|>": None,
}


def is_hub_id(path: str) -> bool:
    """'org/name' that is not a local path: loadable from the hub when online."""
    return not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None and not path.startswith(".")


def require_local_or_hub(path: str, setting: str) -> None:
    if not os.path.exists(path) and not is_hub_id(path):
        raise ConfigError(f"{setting}={path} does not exist (and is not a hub id like org/name)")


def load_model_config(path: str):
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    require_local_or_hub(path, "model.path")
    try:
        return HiggsAudioConfig.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"cannot load a HiggsAudioConfig from model.path={path}: {e}") from None


def load_text_tokenizer(cfg: Config, model_config):
    """The text tokenizer, checked for the Higgs audio special tokens at the ids the model config names."""
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer_path or cfg.model.path
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the text tokenizer from {path}: {e}") from None
    vocab = tok.get_vocab()
    missing = [t for t in HIGGS_SPECIALS if t not in vocab]
    if missing:
        raise ConfigError(f"text tokenizer at {path} lacks the Higgs audio special tokens {missing}; "
                          "use the tokenizer shipped with the Higgs Audio model")
    for token, attr in HIGGS_SPECIALS.items():
        if attr and vocab[token] != getattr(model_config, attr):
            raise ConfigError(f"text tokenizer at {path} maps {token} to {vocab[token]} but the model config's "
                              f"{attr} is {getattr(model_config, attr)}: tokenizer and model do not match")
    return tok


def check_audio_tokenizer(cfg: Config, model_config) -> None:
    """Fail before any process group exists when the audio tokenizer cannot feed this model."""
    path = cfg.model.audio_tokenizer_path
    config_file = Path(path) / "config.json"
    require_local_or_hub(path, "model.audio_tokenizer_path")
    if is_hub_id(path):
        return  # checked when it is downloaded
    if not config_file.is_file():
        raise ConfigError(f"audio tokenizer dir {path} has no config.json")
    n_q = json.loads(config_file.read_text()).get("n_q", 8)
    if n_q != model_config.audio_num_codebooks:
        raise ConfigError(f"audio tokenizer at {path} has {n_q} codebooks but the model has "
                          f"{model_config.audio_num_codebooks} (audio_num_codebooks): they must match")


def check_output_dir(cfg: Config, for_prepare: bool = False) -> Path:
    """Fail before any process group exists: unwritable dir, another run's checkpoints without resume, or a resume
    that finds nothing."""
    out = Path(cfg.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir {out} is not writable: {e}") from None
    if not for_prepare:
        check_resume_request(cfg, out)
    return out


def check_judges(cfg: Config) -> None:
    """eval.asr_model / eval.speaker_model are local model dirs: a run never downloads them mid-training."""
    for key in ("asr_model", "speaker_model"):
        path = getattr(cfg.eval, key)
        if path and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"eval.{key}={path} is not a local model dir (no config.json); download it once "
                              "(e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) and point the key at DIR")


def check_full_run_base(cfg: Config) -> None:
    """A full fine-tuning run ends by consolidating into OUTPUT_DIR/merged, which takes the config and tokenizer files,
    and every weight model.trainable left frozen, from model.path: with model.init=random that must be a model dir
    holding them, or the run would fail after training."""
    from ds_train.merge import WEIGHT_SUFFIXES

    if cfg.train.mode != "full" or cfg.model.init != "random":
        return
    path = Path(cfg.model.path)
    make = f"`ds-train make-arch ARCH.json DIR{'' if cfg.model.trainable == ['*'] else ' --weights'}`"
    if not path.is_dir():
        raise ConfigError(f"model.path={path}: a full fine-tuning run (train.mode=full) with model.init=random ends by "
                          f"writing OUTPUT_DIR/merged from a model dir's config and tokenizer files; write one with "
                          f"{make} and set model.path to it")
    if cfg.model.trainable != ["*"] and not any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise ConfigError(f"model.path={path} holds no weights, and model.trainable={cfg.model.trainable} leaves some "
                          f"frozen: OUTPUT_DIR/merged takes them from model.path; write it with {make}")


@dataclass
class Preflight:
    model_config: object  # HiggsAudioConfig
    text_tokenizer: object
    out_dir: Path


def preflight(cfg: Config, for_prepare: bool = False) -> Preflight:
    """Load and cross-check the model config and tokenizers, and make sure the output dir can take this run."""
    model_config = load_model_config(cfg.model.path)
    text_tokenizer = load_text_tokenizer(cfg, model_config)
    check_audio_tokenizer(cfg, model_config)
    if cfg.lora.init_from:
        check_init_adapter(cfg.lora.init_from, cfg.lora.r, cfg.lora.alpha)
    check_judges(cfg)
    return Preflight(model_config, text_tokenizer, check_output_dir(cfg, for_prepare))
