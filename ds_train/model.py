"""HiggsAudioModel + text tokenizer, loaded partitioned under ZeRO-3, frozen (4-bit for train.mode=qlora: qlora.py),
adapted with peft LoRA."""

from __future__ import annotations

import fnmatch
import functools
import re

import torch
from torch.utils.checkpoint import checkpoint

from ds_train import dist
from ds_train.adapter import ADAPTER_NAME, load_init_adapter
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

    from ds_train.lean_imports import peft_bnb_only_when_loaded

    peft_bnb_only_when_loaded()
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in cfg.lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        suffixes = sorted({".".join(n.split(".")[-2:]) for n in names if n.endswith("_proj")})
        raise ConfigError(f"lora.target_modules {unmatched} match no module; available: {suffixes}")
    saved = modules_to_save(model, cfg)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=lora_target_regex(cfg.lora.target_modules), bias="none")
    model = get_peft_model(model, lora)
    # lora.modules_to_save train in place, not through peft's ModulesToSaveWrapper: under ZeRO-3 its deep copy is
    # a second, whole module on every rank until deepspeed.initialize partitions it, beside the frozen original,
    # and peft's own state dict of it is the empty [0] partition (peft#2450). Named in the config only after
    # injection (so peft wraps nothing here), the saved adapter_config.json tells plain peft to wrap them on load,
    # and adapter.write_adapter stores them under the keys peft loads them from.
    model.peft_config[ADAPTER_NAME].modules_to_save = saved or None
    for name in saved:
        model.get_base_model().get_submodule(name).requires_grad_(True)
    return model


def modules_to_save(model, cfg: Config) -> list[str]:
    """lora.modules_to_save resolved to full module paths, checked: each suffix matches a module; none is, holds
    or sits in a LoRA target (or a fully trained audio_mlp); none has buffers (peft's wrapper would save them) or
    a parameter tied to one outside it (training it alone would untie them, or train both)."""
    modules = dict(model.named_modules())
    saved = []
    for suffix in cfg.lora.modules_to_save:
        found = [n for n in modules if n and (n == suffix or n.endswith("." + suffix))]
        if not found:
            candidates = sorted({".".join(n.split(".")[-2:]) for n, m in modules.items()
                                 if n and ".layers." not in f".{n}." and any(True for _ in m.parameters(False))})
            raise ConfigError(f"lora.modules_to_save {suffix!r} matches no module; modules outside the decoder "
                              f"layers that own weights: {candidates}")
        saved += [n for n in found if n not in saved]
    # plain peft picks the modules to wrap on load by str.endswith on their paths
    clash = [f"{n} (by {s})" for s in saved for n in modules if n != s and n.endswith(s)]
    if clash:
        raise ConfigError(f"lora.modules_to_save: peft would also wrap {clash[:3]} when loading the adapter")
    targets = [n for n in modules if re.match(lora_target_regex(cfg.lora.target_modules), n)]
    if cfg.model.train_audio_mlp:
        targets += [n for n in modules if n.endswith(".audio_mlp")]
    overlap = [f"{s} / {t}" for s in saved for t in targets if s == t or t.startswith(s + ".") or s.startswith(t + ".")]
    if overlap:
        raise ConfigError(f"lora.modules_to_save overlaps lora.target_modules or model.train_audio_mlp ({overlap[:3]}):"
                          f" a module trains either fully or through LoRA, not both")
    with_buffers = [n for n in saved if any(True for _ in modules[n].buffers())]
    if with_buffers:
        raise ConfigError(f"lora.modules_to_save {with_buffers}: modules with buffers are not supported")
    names_of = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for s in saved:
        for p in modules[s].parameters():
            outside = [n for n in names_of[id(p)] if not n.startswith(s + ".")]
            if outside:
                raise ConfigError(f"lora.modules_to_save {s!r}: its weight is tied to {outside[0]} (the same tensor); "
                                  f"training it fully would train both, and peft's saved copy would untie them. "
                                  f"Leave it out, or untie the weights in the base model first")
    return sorted(saved)  # as consolidate rebuilds it from the shards' names


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

