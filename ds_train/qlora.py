"""train.mode=qlora: the frozen base's decoder-layer Linear weights stored in 4-bit NF4 (bitsandbytes), LoRA on top.

What is quantized: every nn.Linear inside the decoder layers (attention, text MLP, DualFFN audio_mlp), i.e. the bulk
of the model, as transformers' BitsAndBytesConfig does for an LLM body. What stays in the run's dtype: the
embeddings, norms, Boson's audio projector and both output heads (transformers also keeps the output head unquantized),
any audio tower, and whatever trains fully (model.train_audio_mlp, lora.modules_to_save).

Why not `from_pretrained(quantization_config=BitsAndBytesConfig(...))`: with transformers 4.46.3 its environment check
fails on a machine without CUDA (`AttributeError: 'frozenset' object has no attribute 'discard'` in
integrations/bitsandbytes.py), and model.init=random does not go through from_pretrained at all. Quantizing the built
model here is one path for both, on CPU and GPU.

Why ZeRO 0/1/2 only: a Params4bit weight is packed uint8 with its quantization state (absmax, code) beside it;
ZeRO-3 partitions and re-gathers parameters as flat tensors and would split the packed data from its state.
"""

from __future__ import annotations

import re

import torch

from ds_train.errors import ConfigError

QLORA_ZERO_STAGES = (0, 1, 2)
BNB_VERSION = "0.50.2"  # the version tested (setup.cfg pins it)


def check_qlora_setup(stage: int, ds_path: str) -> None:
    """At the start of a qlora run: a ZeRO stage that keeps whole 4-bit weights on each rank, and bitsandbytes."""
    if stage not in QLORA_ZERO_STAGES:
        raise ConfigError(f"{ds_path}: ZeRO stage {stage} cannot partition bitsandbytes 4-bit weights; train.mode=qlora "
                          f"supports ZeRO stages {', '.join(map(str, QLORA_ZERO_STAGES))} "
                          f"(e.g. train.deepspeed_config=ds_configs/zero2.json)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"train.mode=qlora needs bitsandbytes (pip install bitsandbytes=={BNB_VERSION}): {e}") from None


def quantize_base(model, keep: list[str], compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace the decoder layers' nn.Linear modules (except those whose path ends with an entry of `keep`) by
    frozen bitsandbytes NF4 Linear4bit layers quantized on `device`; returns how many were replaced."""
    import bitsandbytes as bnb

    kept = re.compile(r"(^|\.)(" + "|".join(re.escape(k) for k in keep) + r")(\.|$)") if keep else None
    replaced = 0
    for layer_index, layer in enumerate(model.layers):
        for name, parent in list(layer.named_modules()):
            for child_name, child in list(parent.named_children()):
                path = f"layers.{layer_index}.{name + '.' if name else ''}{child_name}"
                if type(child) is not torch.nn.Linear or (kept and kept.search(path)):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                # Params4bit quantizes when moved to a device; the bf16 weight is freed with `child`.
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             quant_type="nf4").to(device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.to(device), requires_grad=False)
                setattr(parent, child_name, q)
                replaced += 1
    # transformers' mark of a bitsandbytes 4-bit model: peft reads it to wrap Linear4bit with its bnb LoRA layer
    # (peft/tuners/lora/bnb.py), whose forward adds the adapter to the dequantized base's output.
    model.is_loaded_in_4bit = True
    return replaced


def fully_trained(cfg) -> list[str]:
    """Module-path suffixes that must stay unquantized in a qlora run because they train fully."""
    return (["audio_mlp"] if cfg.model.train_audio_mlp else []) + list(cfg.lora.modules_to_save)
