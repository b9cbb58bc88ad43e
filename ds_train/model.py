"""HiggsAudioModel + text tokenizer, loaded partitioned under ZeRO-3, frozen (4-bit for train.mode=qlora: qlora.py),
adapted with peft LoRA."""

from __future__ import annotations

import fnmatch
import functools
import re

import torch
from torch.utils.checkpoint import checkpoint

from ds_train import dist
from ds_train.adapter import load_init_adapter
from ds_train.config import Config
from ds_train.ds_config import zero_stage
from ds_train.errors import ConfigError

def lora_target_regex(targets: list[str]) -> str:
    """Full-match regex for module-path suffixes: 'mlp.up_proj' never matches 'audio_mlp.up_proj'."""
    return r"^(.*\.)?(" + "|".join(re.escape(t) for t in targets) + r")$"


def trainable_regex(patterns: list[str]) -> str:
    """Search regex for model.trainable: each fnmatch pattern must cover whole dotted components of a parameter
    name ('audio_mlp' matches layers.3.audio_mlp.up_proj.weight, never a hypothetical audio_mlp_gate)."""
    parts = [fnmatch.translate(p).removeprefix("(?s:").removesuffix(")\\Z") for p in patterns]
    return r"(^|\.)(" + "|".join(parts) + r")(\.|$)"


def select_trainable(model, patterns: list[str]) -> None:
    """train.mode=full: the parameters `patterns` select train, the rest stays frozen; a pattern that selects
    nothing is a config error listing the model's top-level modules."""
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not any(re.search(trainable_regex([p]), n) for n in names)]
    if unmatched:
        tops = sorted({n.split(".")[0] for n in names})
        raise ConfigError(f"model.trainable {unmatched} select no parameter; top-level modules: {tops}, e.g. "
                          f"audio_mlp, layers.0.self_attn, audio_decoder_proj.audio_lm_head")
    selected = re.compile(trainable_regex(patterns))
    for name, p in model.named_parameters():
        p.requires_grad_(bool(selected.search(name)))


def build_model(cfg: Config, ds_config: dict, dtype: torch.dtype):
    """Load, freeze and adapt the model. Under ZeRO-3 every parameter is created partitioned (no rank ever holds
    the whole model) and the checkpoint is loaded shard by shard into the partitions."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from transformers.integrations import HfDeepSpeedConfig

    if cfg.model.init == "random":
        from ds_train.arch import build_random_model
        from ds_train.preflight import load_model_config

        model = build_random_model(load_model_config(cfg.model.path), ds_config, dtype,
                                   cfg.model.attn_implementation, cfg.train.seed)
    else:
        # transformers' from_pretrained builds under deepspeed.zero.Init while this object is alive.
        hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None  # noqa: F841 (kept alive)
        model = HiggsAudioModel.from_pretrained(cfg.model.path, torch_dtype=dtype,
                                                attn_implementation=cfg.model.attn_implementation,
                                                trust_remote_code=cfg.model.trust_remote_code)
        del hf_ds
    model.config.use_cache = False
    model.requires_grad_(False)
    if cfg.train.mode == "qlora":
        from ds_train.qlora import fully_trained, quantize_base

        n = quantize_base(model, fully_trained(cfg), dtype, dist.device())
        dist.print0(f"qlora: {n} decoder-layer Linear weights quantized to 4-bit NF4 (compute dtype {dtype})")
    if cfg.train.mode == "full":
        select_trainable(model, cfg.model.trainable)
    model = apply_lora(model, cfg)
    if cfg.lora.init_from:
        load_init_adapter(model, cfg.lora.init_from)
    if cfg.model.train_audio_mlp:
        for name, p in model.named_parameters():
            if ".audio_mlp." in name:
                p.requires_grad_(True)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(decoder_layers(model))
    if not cfg.model.full_text_logits:
        from ds_train.text_head import project_trained_positions_only

        project_trained_positions_only(base_model(model))
    trainable, total = count_parameters(model)
    dist.print0(f"parameters: {trainable:,} trainable / {total:,} total ({100 * trainable / total:.3f}%)")
    return model


def apply_lora(model, cfg: Config):
    if not cfg.uses_lora():
        return model
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in cfg.lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        suffixes = sorted({".".join(n.split(".")[-2:]) for n in names if n.endswith("_proj")})
        raise ConfigError(f"lora.target_modules {unmatched} match no module; available: {suffixes}")
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=lora_target_regex(cfg.lora.target_modules), bias="none")
    return get_peft_model(model, lora)


def base_model(model):
    """The HiggsAudioModel inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model):
    return base_model(model).layers


def enable_activation_checkpointing(layers) -> None:
    """Recompute each decoder layer in backward. Boson's decoder loop ignores `gradient_checkpointing`, so the
    layers' own forward is wrapped; module names (and so checkpoints and adapters) stay as they are."""
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); partitioned ZeRO-3 parameters and packed 4-bit ones count at their full size."""
    trainable = total = 0
    for p in model.parameters():
        quant = getattr(p, "quant_state", None)
        n = quant.shape.numel() if quant is not None else getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]

