"""The PEFT adapter dir, the one format every trained result leaves in: gathered from the ZeRO-3 partitions
(export_adapter, collective) and written atomically (write_adapter, rank 0).

ADAPTER_DIR/
  adapter_config.json          peft LoraConfig
  adapter_model.safetensors    LoRA tensors, fp32, under the keys peft saves and loads; with lora.modules_to_save
                               also those modules' weights, whole, under peft 0.17's keys for them (the parameter's
                               name in the PeftModel: base_model.model.audio_codebook_embeddings.weight), which the
                               config's modules_to_save (full module paths) tells PeftModel.from_pretrained to load
  base_trainable.safetensors   fully trained base weights (model.train_audio_mlp), merged by `ds-train merge`
"""

from __future__ import annotations

import json
from pathlib import Path

from ds_train import dist
from ds_train.errors import ConfigError
from ds_train.fsutil import staged_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_TRAINABLE = "base_trainable.safetensors"
ADAPTER_NAME = "default"  # the PEFT adapter name ds_train trains under
ADAPTER_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_TRAINABLE, "README.md"}


def export_adapter(model, out_dir: Path) -> None:
    """Collective: gather the fp32 trainable weights on every rank; rank 0 writes a PEFT adapter dir.

    Under ZeRO-3 a plain `save_pretrained` sees empty partitions (the 40-byte adapter files of public reports);
    DeepSpeed's safe_get_full_fp32_param gathers the full fp32 master copy of each parameter.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    full = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = safe_get_full_fp32_param(p)
            value = (value if value is not None else p.detach().float()).cpu().clone()
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(value.shape) != shape or value.numel() == 0:
                raise RuntimeError(f"adapter export of {name} gathered shape {tuple(value.shape)}, expected {shape}")
            full[name] = value
    if dist.is_main():
        write_adapter(model, full, out_dir)


def write_adapter(model, full: dict, out_dir: Path) -> None:
    """Write trainable weights (full names) as a PEFT adapter dir, atomically; never an empty file."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not full or any(t.numel() == 0 for t in full.values()):
        raise RuntimeError(f"adapter export to {out_dir}: no trainable tensors, or an empty one")
    modules = model.peft_config[ADAPTER_NAME].modules_to_save if hasattr(model, "peft_config") else None
    lora = {n: t for n, t in full.items() if "lora_" in n}
    saved = {n: t for n, t in full.items() if in_modules(n, modules)}
    base = {strip_peft_prefix(n): t for n, t in full.items() if n not in lora and n not in saved}
    with staged_dir(out_dir, replace=lambda _: True) as tmp:
        if lora:
            state = {**get_peft_model_state_dict(model, state_dict=lora), **saved}
            if len(state) != len(lora) + len(saved) or any(t.numel() == 0 for t in state.values()):
                raise RuntimeError(f"adapter export lost tensors: {len(lora)} trainable LoRA tensors and "
                                   f"{len(saved)} of lora.modules_to_save, {len(state)} exported")
            model.peft_config[ADAPTER_NAME].save_pretrained(str(tmp))
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
        if base:
            save_file({k: v.contiguous() for k, v in base.items()}, str(tmp / BASE_TRAINABLE),
                      metadata={"format": "pt"})


def strip_peft_prefix(name: str) -> str:
    """Parameter name in the PeftModel -> its name in HiggsAudioModel."""
    return name.removeprefix("base_model.model.")


def in_modules(name: str, modules) -> bool:
    """Whether the parameter `name` (in the PeftModel) belongs to one of `modules` (paths in HiggsAudioModel, as
    the adapter config's modules_to_save lists them). Its key in adapter_model.safetensors is `name` itself."""
    return any(strip_peft_prefix(name).startswith(m + ".") for m in modules or ())


def adapter_key(name: str) -> str:
    """Parameter name -> key in adapter_model.safetensors (what peft's get_peft_model_state_dict writes)."""
    return name.replace(f".{ADAPTER_NAME}", "")


def check_init_adapter(init_from: str, r: int, alpha: int) -> None:
    """Pre-flight for lora.init_from: an adapter dir whose rank and scale are this run's."""
    d = Path(init_from)
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (d / f).is_file()]
    if missing:
        raise ConfigError(f"lora.init_from={init_from}: not a PEFT adapter dir (missing {', '.join(missing)})")
    saved = json.loads((d / ADAPTER_CONFIG).read_text())
    wrong = [f"{key}={saved.get(peft_key)} (this run: {ours})"
             for key, peft_key, ours in (("lora.r", "r", r), ("lora.alpha", "lora_alpha", alpha))
             if saved.get(peft_key) != ours]
    if wrong:
        raise ConfigError(f"lora.init_from={init_from} was trained with {', '.join(wrong)}; set the same values")


def load_init_adapter(model, init_from: str) -> None:
    """Collective under ZeRO-3: copy a saved adapter's LoRA tensors into the (partitioned) LoRA parameters, before
    deepspeed.initialize builds the fp32 masters from them. Every tensor must match a LoRA parameter of this model
    and targets, and every LoRA parameter must get one."""
    import deepspeed
    from safetensors.torch import load_file

    saved = load_file(str(Path(init_from) / ADAPTER_WEIGHTS))
    modules = model.peft_config[ADAPTER_NAME].modules_to_save
    params = {adapter_key(n): p for n, p in model.named_parameters() if "lora_" in n}
    params.update({n: p for n, p in model.named_parameters() if in_modules(n, modules)})
    extra, lacking = sorted(saved.keys() - params.keys()), sorted(params.keys() - saved.keys())
    shapes = [f"{k}: {tuple(saved[k].shape)} vs {tuple(getattr(params[k], 'ds_shape', params[k].shape))}"
              for k in sorted(saved.keys() & params.keys())
              if tuple(saved[k].shape) != tuple(getattr(params[k], "ds_shape", params[k].shape))]
    if extra or lacking or shapes:
        found = ([f"{len(extra)} tensor(s) for modules this run does not adapt or save, e.g. {extra[0]}"]
                 if extra else []) \
            + ([f"{len(lacking)} adapted module(s) it has no tensor for, e.g. {lacking[0]}"] if lacking else []) \
            + ([f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}"] if shapes else [])
        raise ConfigError(f"lora.init_from={init_from} does not match this model and lora.target_modules: "
                          + "; ".join(found))
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        for key, p in params.items():  # on every rank: without ZeRO-3 each holds its own full copy
            p.data.copy_(saved[key].to(p.dtype))
    whole = sum(1 for k in saved if "lora_" not in k)
    dist.print0(f"lora.init_from: {len(saved) - whole} LoRA tensors"
                + (f" and {whole} of lora.modules_to_save" if whole else "") + f" from {init_from}; the optimizer "
                "starts fresh")
