"""The one source of truth for a run: typed dataclasses validated in __post_init__, loaded from YAML + dotlist
overrides. The DeepSpeed JSON derived from it is ds_config.py; the old trainer's flags are translated in cli.py."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ds_train.errors import ConfigError


# LoRA targets as module-path suffixes. Anchoring each on a '.' keeps `mlp.*` (text FFN) and `audio_mlp.*`
# (DualFFN audio path) apart.
DEFAULT_LORA_TARGETS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "audio_mlp.gate_proj", "audio_mlp.up_proj", "audio_mlp.down_proj",
]


@dataclass
class ModelConfig:
    path: str = MISSING  # local HiggsAudioModel dir or hub id (when online)
    tokenizer_path: Optional[str] = None  # defaults to `path`
    audio_tokenizer_path: str = MISSING
    # boson's audio tokenizer hard-codes a hub id for its semantic teacher; point this at a local copy on offline nodes.
    semantic_model_path: Optional[str] = None
    # Only models with encode_whisper_embed=true use it (the released v2 does not); offline, a local copy.
    whisper_processor_path: str = "openai/whisper-large-v3-turbo"
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    train_audio_mlp: bool = False  # train.mode=lora: also train the DualFFN audio_mlp weights fully (not through LoRA)
    # train.mode=full: what trains, as module-path patterns (fnmatch, matched against whole dotted components:
    # `audio_mlp` is every layers.N.audio_mlp.*, `layers.2[0-7]` eight layers); the rest is frozen. "*": everything.
    trainable: List[str] = field(default_factory=lambda: ["*"])
    trust_remote_code: bool = False
    # pretrained: load the weights at `path`. random: build the architecture at `path` (an arch JSON such as
    # configs/arch/higgs-v2-3b.json, or a dir with config.json) with random weights, for benchmarks and scale tests.
    init: str = "pretrained"
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs the flash-attn package)
    # true: project every position to the text vocabulary, as Boson's forward does (kept to measure the saving);
    # false: only the positions with a trained text label (same loss, no positions x vocab tensor).
    full_text_logits: bool = False

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("auto", "bf16", "fp32"))
        _choice("model.init", self.init, ("pretrained", "random"))
        _choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2"))


@dataclass
class LoraConfig:
    enabled: Optional[bool] = None  # replaced by train.mode; false stops with a message naming it
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    init_from: Optional[str] = None  # a PEFT adapter dir to continue from (fresh optimizer and schedule)
    # Modules trained fully beside LoRA and saved in the adapter (peft's modules_to_save), as module-path suffixes,
    # e.g. [audio_decoder_proj.audio_lm_head, audio_codebook_embeddings].
    modules_to_save: List[str] = field(default_factory=list)

    def __post_init__(self):
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty; list module-path suffixes such as self_attn.q_proj")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


# data.format: how rows of JSON manifests read (auto: each row by its keys), or a data set form (data/formats/).
DATA_FORMATS = ("auto", "chatml", "tts", "hf", "webdataset", "ljspeech")
COLUMN_KEYS = ("audio", "text", "speaker", "language", "ref_audio", "ref_text")  # data.columns: TTS key -> column


@dataclass
class DataConfig:
    train_file: Optional[str] = MISSING  # Boson ChatML (JSON list / JSONL) or a plain TTS manifest (JSONL)
    # Instead of train_file: several manifests, each a path or {path: ..., weight: ...}. A weight is a per-sample
    # rate per epoch (2: every sample twice; 0.5: a different seeded half each epoch); default 1.
    train_files: Optional[List[Any]] = None
    # train.objective=dpo: instead of train_file, a JSONL of preference pairs (a TTS row with `chosen` and `rejected`
    # audio instead of `audio`; ds_train.data.pairs)
    pairs_file: Optional[str] = None
    eval_file: Optional[str] = None
    eval_split: Optional[float] = None  # without eval_file: hold out this fraction of the training samples (by speaker)
    # prepared cache; default .ds_train_cache/<manifest stem> next to each manifest (see cache.cache_dirs)
    cache_dir: Optional[str] = None
    format: str = "auto"  # auto | chatml | tts | hf | webdataset | ljspeech (see README "Data set formats")
    # HF datasets and webdataset JSON: the column (key) of each TTS key that is not named as it, e.g.
    # {text: normalized_text, speaker: speaker_id}; unset keys use their own name.
    columns: Optional[Dict[str, str]] = None
    system_prompt: str = "Generate audio following instruction."
    max_audio_seconds: float = 30.0
    min_audio_seconds: float = 0.05
    loudness_normalize: bool = False
    skip_bad: bool = False
    plausibility: str = "warn"  # text length vs audio duration, duplicate rows: warn | error | off
    # >0: token-budget micro-batches (text + audio positions) instead of train.micro_batch_size. auto: the largest
    # budget `ds-train plan` fits on this device with 10% to spare, resolved at start (ds_train.plan.resolve_max_tokens)
    max_tokens: Union[int, str] = 0
    num_workers: int = 0
    persistent_workers: bool = False
    pin_memory: bool = True  # pinned host batches, copied with non_blocking=True (GPU only; ignored on CPU)
    prefetch_factor: Optional[int] = None
    shard_size: int = 256  # samples per cache shard
    # prepare: processes decoding + resampling audio ahead of the encoder (0: in the encoding process). 0 on a CPU box:
    # decoding is < 1% of CPU encoding there, and a forked worker slowed the encoder (benchmarks/README.md). On GPU
    # nodes, where the encoder is fast, 1-4 keep it fed.
    decode_workers: int = 0
    # prepare: clips per audio-tokenizer call. 1 = one by one, the codes inference conditions on. N > 1 pads clips
    # of similar length together, which changes codes (README); a cache records it.
    encode_batch: int = 1

    def __post_init__(self):
        if self.pairs_file is not None:
            if self.train_file is not None or self.train_files is not None:
                raise ConfigError("data.pairs_file is the training data of train.objective=dpo: unset data.train_file "
                                  "and data.train_files")
            if self.eval_split is not None:
                raise ConfigError("data.eval_split cannot split preference pairs: set data.eval_file (a manifest; "
                                  "the eval loss is the SFT loss on it)")
            if self.format not in ("auto", "tts"):
                raise ConfigError(f"data.pairs_file is a JSONL of TTS rows with chosen/rejected audio; "
                                  f"data.format={self.format} does not apply to it (auto or tts)")
        elif self.train_files is not None:
            if self.train_file is not None:
                raise ConfigError("set one of data.train_file (one manifest) and data.train_files (a list), not both")
            self.train_files = _train_files(self.train_files)
        elif self.train_file is None:
            raise ConfigError("set data.train_file (one manifest) or data.train_files (a list)")
        if self.eval_split is not None:
            if not 0 < self.eval_split < 1:
                raise ConfigError(f"data.eval_split must be in (0, 1), got {self.eval_split}")
            if self.eval_file:
                raise ConfigError("data.eval_split holds out part of the training data as the eval set: set it or "
                                  "data.eval_file, not both")
        _choice("data.format", self.format, DATA_FORMATS)
        if self.columns is not None:
            unknown = sorted(set(self.columns) - set(COLUMN_KEYS))
            if unknown:
                raise ConfigError(f"data.columns maps TTS keys to column names; {', '.join(unknown)} is not one of "
                                  f"{', '.join(COLUMN_KEYS)}")
            for key, column in self.columns.items():
                if not isinstance(column, str) or not column:
                    raise ConfigError(f"data.columns.{key} must be a column name, got {column!r}")
        _choice("data.plausibility", self.plausibility, ("warn", "error", "off"))
        _positive("data.max_audio_seconds", self.max_audio_seconds)
        _at_least("data.min_audio_seconds", self.min_audio_seconds, 0)
        if self.min_audio_seconds >= self.max_audio_seconds:
            raise ConfigError(f"data.min_audio_seconds ({self.min_audio_seconds}) must be below data.max_audio_seconds "
                              f"({self.max_audio_seconds})")
        _positive("data.shard_size", self.shard_size)
        _positive("data.encode_batch", self.encode_batch)
        if self.decode_workers < 0:
            raise ConfigError(f"data.decode_workers must be >= 0, got {self.decode_workers}")
        if self.prefetch_factor is not None:
            _positive("data.prefetch_factor", self.prefetch_factor)
        if self.max_tokens != "auto" and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise ConfigError(f"data.max_tokens must be a number >= 0 or auto, got {self.max_tokens!r}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.num_workers == 0 and (self.persistent_workers or self.prefetch_factor is not None):
            raise ConfigError("data.persistent_workers / data.prefetch_factor need data.num_workers > 0")

    def manifests(self) -> list[tuple[str, float]]:
        """(path, weight) of each training manifest: data.train_files, or data.train_file with weight 1 (with
        data.pairs_file: the manifest its pairs expand into, ds_train.data.pairs)."""
        if self.pairs_file is not None:
            from ds_train.data.pairs import pairs_manifest  # data modules import this one

            return [(str(pairs_manifest(self)), 1.0)]
        if self.train_files is None:
            return [(self.train_file, 1.0)]
        return [(f["path"], f["weight"]) for f in self.train_files]

    def has_eval(self) -> bool:
        return bool(self.eval_file or self.eval_split)


def _train_files(items) -> list[dict]:
    """data.train_files as [{path, weight}]: each item a path, or a mapping with `path` and an optional `weight`."""
    if not items:
        raise ConfigError("data.train_files is empty; list manifests, each a path or {path: ..., weight: ...}")
    out, seen = [], {}
    for i, item in enumerate(items):
        name = f"data.train_files[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or set(item) - {"path", "weight"}:
            raise ConfigError(f"{name} must be a path or {{path: ..., weight: ...}}, got {item!r} (YAML flow style "
                              "needs a space after each ':')")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise ConfigError(f"{name}.weight must be a number > 0, got {weight!r}")
        path = os.path.abspath(item["path"])
        if path in seen:
            raise ConfigError(f"{name} repeats data.train_files[{seen[path]}] ({item['path']}): list a manifest "
                              "once and give it a weight")
        seen[path] = i
        out.append({"path": item["path"], "weight": float(weight)})
    return out


# The transformers.get_scheduler names that need nothing beyond warmup and total steps (reduce_lr_on_plateau needs
# an eval metric each step; cosine_with_min_lr and warmup_stable_decay need extra arguments).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # one of SCHEDULERS
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        _at_least("optim.weight_decay", self.weight_decay, 0)
        _positive("optim.eps", self.eps)
        _at_least("optim.max_grad_norm", self.max_grad_norm, 0)
        _choice("optim.scheduler", self.scheduler, SCHEDULERS)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas needs two values in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class LossConfig:
    text_weight: float = 1.0
    audio_weight: float = 1.0
    dpo_beta: float = 0.1  # train.objective=dpo: the strength of the pull away from the reference policy
    dpo_sft_weight: float = 0.0  # train.objective=dpo: weight of the SFT loss of the chosen clips added to DPO's

    def __post_init__(self):
        _positive("loss.dpo_beta", self.dpo_beta)
        _at_least("loss.dpo_sft_weight", self.dpo_sft_weight, 0)
        if self.text_weight < 0 or self.audio_weight < 0 or self.text_weight + self.audio_weight == 0:
            raise ConfigError("loss.text_weight and loss.audio_weight must be >= 0 and not both 0")


TRAIN_MODES = ("lora", "full", "qlora")
OBJECTIVES = ("sft", "dpo")


AUTO_OR_FRESH = "auto_or_fresh"  # train.resume: resume when a checkpoint exists, else start fresh


@dataclass
class TrainConfig:
    output_dir: str = MISSING
    # lora: peft LoRA on a frozen base. full: the parameters model.trainable selects train fully (their fp32 masters
    # and Adam moments partitioned by ZeRO). qlora: LoRA on a 4-bit NF4 frozen base (bitsandbytes).
    mode: str = "lora"
    # sft: teacher-forced loss on data.train_file(s). dpo: preference tuning on data.pairs_file (ds_train.dpo)
    objective: str = "sft"
    deepspeed_config: str = "ds_configs/zero3.json"
    micro_batch_size: int = 1
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0  # >0 stops after this many optimizer steps (overrides epochs)
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end (when there is an eval set)
    eval_on_start: bool = False  # also evaluate the untrained adapter at step 0: the baseline for the curve
    # none | auto | auto_or_fresh (auto when OUTPUT_DIR has a checkpoint, else none: a requeued job) | PATH of a
    # step-XXXXXX checkpoint dir (ds_train.checkpoint.check_resume_request)
    resume: str = "none"
    max_consecutive_skips: int = 5  # non-finite loss/grad steps in a row before the run stops
    # >0: stop after this many evaluations without an improvement of checkpoint.best_metric (by its best_mode); the
    # run's adapter is then the best step's (ds_train.early_stop)
    early_stop_patience: int = 0

    def __post_init__(self):
        _choice("train.mode", self.mode, TRAIN_MODES)
        _choice("train.objective", self.objective, OBJECTIVES)
        _positive("train.micro_batch_size", self.micro_batch_size)
        _positive("train.grad_accum", self.grad_accum)
        _positive("train.log_every", self.log_every)
        _at_least("train.epochs", self.epochs, 0)
        _at_least("train.max_steps", self.max_steps, 0)
        _at_least("train.seed", self.seed, 0)
        _positive("train.max_consecutive_skips", self.max_consecutive_skips)
        _at_least("train.early_stop_patience", self.early_stop_patience, 0)
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("set train.epochs > 0 or train.max_steps > 0")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0, got {self.eval_every}")


SAMPLES_GATHER = ("auto", "always", "never")


@dataclass
class EvalConfig:
    """What a person listens to: audio generated during training (ds_train.samples)."""

    samples: Optional[Union[int, str]] = None  # prompts JSONL (as `ds-train generate --prompts`), or N eval-set samples
    samples_every: int = 0  # steps between sample generations; 0: at the end only
    samples_max_frames: int = 500  # length cap per clip (audio frames; 10 s at 50 frames/s)
    # ZeRO-3: gather the whole model once per round of samples (no collective per decode step) or let every decode
    # step gather it module by module. auto: once when the gathered model fits every rank's device (ds_train.plan).
    samples_gather: str = "auto"  # auto | always | never
    # Local model dirs that judge the samples (ds_train.quality); no hub at run time.
    asr_model: Optional[str] = None  # Whisper (transformers): samples_wer, samples_cer against the prompt text
    speaker_model: Optional[str] = None  # WavLM x-vector (transformers): samples_speaker_sim to the reference clip

    def __post_init__(self):
        if isinstance(self.samples, int) and self.samples <= 0:
            raise ConfigError(f"eval.samples must be a prompts JSONL or a number > 0, got {self.samples}")
        if self.samples_every < 0:
            raise ConfigError(f"eval.samples_every must be >= 0, got {self.samples_every}")
        if self.samples_every and self.samples is None:
            raise ConfigError("eval.samples_every > 0 needs eval.samples (a prompts JSONL or a number of eval samples)")
        _positive("eval.samples_max_frames", self.samples_max_frames)
        if self.samples_gather not in SAMPLES_GATHER:
            raise ConfigError(f"eval.samples_gather must be one of {', '.join(SAMPLES_GATHER)}, got "
                              f"{self.samples_gather!r}")
        for key in ("asr_model", "speaker_model"):
            if getattr(self, key) and self.samples is None:
                raise ConfigError(f"eval.{key} judges the generated samples: it needs eval.samples")


# checkpoint.best_metric: the metrics it can name and which way is better. (samples_length_ratio has no direction:
# 1.0 is best.) The issue's short names are accepted for the samples' judges.
BEST_METRICS = {
    "eval_loss": "min", "eval_text_loss": "min", "eval_audio_loss": "min", "eval_text_acc": "max",
    "eval_audio_acc": "max", "samples_eos_fraction": "max", "samples_code_match": "max", "samples_wer": "min",
    "samples_cer": "min", "samples_speaker_sim": "max",
}
BEST_ALIASES = {"wer": "samples_wer", "cer": "samples_cer", "speaker_sim": "samples_speaker_sim"}


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end
    keep_last: int = 2
    keep_best: int = 0  # by best_metric, among the checkpoints saved at a step where it was computed
    best_metric: str = "eval_loss"  # also ranks the final summary's best checkpoint; see BEST_METRICS
    best_mode: str = "auto"  # auto (BEST_METRICS' direction) | min | max
    merge: bool = False  # write OUTPUT_DIR/merged at the end of training

    def __post_init__(self):
        _positive("checkpoint.keep_last", self.keep_last)
        _at_least("checkpoint.every_steps", self.every_steps, 0)
        _at_least("checkpoint.keep_best", self.keep_best, 0)
        self.best_metric = BEST_ALIASES.get(self.best_metric, self.best_metric)
        if self.best_metric not in BEST_METRICS:
            raise ConfigError(f"checkpoint.best_metric must be one of {', '.join([*BEST_METRICS, *BEST_ALIASES])}; "
                              f"got {self.best_metric!r}")
        _choice("checkpoint.best_mode", self.best_mode, ("auto", "min", "max"))

    def best_direction(self) -> str:
        return BEST_METRICS[self.best_metric] if self.best_mode == "auto" else self.best_mode


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "ds_train"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        _choice("wandb.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # also write scalars, audio samples and the config to OUTPUT_DIR/tensorboard/


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        self._check_mode()
        self._check_objective()
        if self.train.eval_every > 0 and not self.data.has_eval():
            raise ConfigError("train.eval_every > 0 needs data.eval_file or data.eval_split")
        if self.train.eval_on_start and not self.data.has_eval():
            raise ConfigError("train.eval_on_start needs data.eval_file or data.eval_split")
        self._check_best_metric()

    def uses_lora(self) -> bool:
        return self.train.mode in ("lora", "qlora")

    def _check_mode(self) -> None:
        """train.mode and the keys that belong to one mode only; the old switch (lora.enabled) names its successor."""
        mode = self.train.mode
        if self.lora.enabled is False:
            raise ConfigError("lora.enabled is replaced by train.mode (lora | full | qlora): for no LoRA set "
                              "train.mode=full, with model.trainable=[audio_mlp] for what model.train_audio_mlp "
                              "trained alone")
        if self.lora.enabled and not self.uses_lora():
            raise ConfigError(f"lora.enabled=true contradicts train.mode={mode}")
        if mode == "full":
            wrong = [k for k, v in (("model.train_audio_mlp", self.model.train_audio_mlp),
                                    ("lora.init_from", self.lora.init_from),
                                    ("lora.modules_to_save", self.lora.modules_to_save)) if v]
            if wrong:
                raise ConfigError(f"{', '.join(wrong)}: LoRA settings, not used by train.mode=full (model.trainable "
                                  f"selects what trains, e.g. [audio_mlp])")
            if not self.model.trainable:
                raise ConfigError("model.trainable is empty: nothing to train (\"*\" trains everything)")
        elif self.model.trainable != ["*"]:
            raise ConfigError(f"model.trainable is for train.mode=full; with train.mode={mode} fully trained "
                              f"modules are lora.modules_to_save (or model.train_audio_mlp)")
        if self.model.train_audio_mlp and any(t.startswith("audio_mlp.") for t in self.lora.target_modules):
            raise ConfigError(
                "model.train_audio_mlp trains audio_mlp fully, so lora.target_modules must not also target audio_mlp.*"
            )

    def _check_objective(self) -> None:
        """DPO trains on a pairs file and nothing else. Any train.mode, lora.init_from or fully trained module works:
        its reference policy is the model as built, measured once before the first step (ds_train.dpo)."""
        if (self.train.objective == "dpo") != (self.data.pairs_file is not None):
            raise ConfigError("train.objective=dpo trains on data.pairs_file (and only it does): set both or neither")

    def _check_best_metric(self) -> None:
        """checkpoint.best_metric must be a metric this run computes (the default, eval_loss, only when ranking)."""
        metric, ck, patience = self.checkpoint.best_metric, self.checkpoint, self.train.early_stop_patience
        if ck.keep_best == 0 and not patience and metric == "eval_loss":
            return
        source = f"checkpoint.best_metric={metric}"
        if ck.keep_best:
            source += f" (checkpoint.keep_best={ck.keep_best})"
        if patience:
            source += f" (train.early_stop_patience={patience})"
        if metric.startswith("eval_") and not self.data.has_eval():
            raise ConfigError(f"{source} needs data.eval_file or data.eval_split")
        if metric.startswith("samples_") and self.eval.samples is None:
            raise ConfigError(f"{source} needs eval.samples")
        if metric in ("samples_wer", "samples_cer") and not self.eval.asr_model:
            raise ConfigError(f"{source} needs eval.asr_model (a local Whisper dir)")
        if metric == "samples_speaker_sim" and not self.eval.speaker_model:
            raise ConfigError(f"{source} needs eval.speaker_model (a local WavLM x-vector dir)")


def _positive(name: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _at_least(name: str, value, low) -> None:
    if value is None or value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def load_config(yaml_path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Merge defaults <- YAML <- dotlist into a validated Config. Unknown keys and bad values raise ConfigError."""
    overrides = list(overrides or [])
    # Validation runs on the final values only; the schema itself is built without __post_init__ checks.
    merged = OmegaConf.structured(Config)
    if yaml_path:
        if not Path(yaml_path).is_file():
            raise ConfigError(f"config file not found: {yaml_path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(yaml_path))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{_first_line(e)} (in {yaml_path})") from None
    for item in overrides:  # one at a time, so an error names the override that caused it
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{_first_line(e)} (command-line override {item!r})") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if "data.train_file" in missing and (merged.data.train_files is not None or merged.data.pairs_file is not None):
        # the list (or the pairs file) replaces the one manifest
        missing.remove("data.train_file")
        merged.data.train_file = None
    if missing:
        named = [m + (" (or data.train_files)" if m == "data.train_file" else "") for m in missing]
        raise ConfigError(f"missing required settings: {', '.join(named)}")
    try:
        return OmegaConf.to_object(merged)
    except (ConfigError, OmegaConfBaseException) as e:
        message = str(e) if isinstance(e, ConfigError) else _first_line(e)
        raise ConfigError(message + _origin(message, yaml_path, overrides)) from None


def _origin(message: str, yaml_path: Optional[str], overrides: List[str]) -> str:
    """Where the value an error names was set: the command line wins over the YAML, as in the merge."""
    named = [item for item in overrides if re.search(rf"\b{re.escape(item.split('=', 1)[0].strip())}\b", message)]
    if named:
        return f" (from the command line: {', '.join(named)})"
    return f" (in {yaml_path})" if yaml_path else ""


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = [ln for ln in lines[1:] if ln.startswith(("full_key", "object_type"))]
    return " ".join([lines[0], *detail[:1]]) if lines else type(e).__name__


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data, credentials redacted (it is written to disk and sent to W&B)."""
    return redact(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a.b": leaf} for every leaf of a nested dict: dotted keys, as the command line writes them."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def redact(obj: Any) -> Any:
    """Replace values of secret-looking keys, and any value equal to a credential in the environment."""
    secrets = {v for k, v in os.environ.items() if v and len(v) >= 8 and _is_secret_key(k)}

    def walk(x, key=""):
        if isinstance(x, dict):
            return {k: walk(v, str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, key) for v in x]
        if isinstance(x, str) and (_is_secret_key(key) or x in secrets):
            return "***"
        return x

    return walk(obj)


def _is_secret_key(key: str) -> bool:
    k = key.upper()
    return any(s in k for s in ("API_KEY", "TOKEN", "SECRET", "PASSWORD")) and "TOKENIZER" not in k
