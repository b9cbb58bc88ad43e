"""The memory of one training step per device, and where it lives (device or host), under a ZeRO section.

The model is counted exactly from its config (built on the meta device, nothing allocated). Per device:
  parameters    frozen base x dtype bytes; ZeRO-3: / ranks, plus the gathered working set (up to
                stage3_max_live_parameters, twice: parameters and all-gather buffers); offload_param: on the host
  LoRA          trainable x dtype bytes (ZeRO-3: / ranks); offload_param: on the host. train.mode=full: "trained
                parameters", what model.trainable selects ("parameters" is then the rest, frozen)
  gradients     trainable x dtype bytes (ZeRO-2/3: / ranks); offload_optimizer: on the host with an fp32 copy
                (4 bytes per trainable / ranks), and the device keeps the reduce bucket (reduce_bucket_size x dtype)
  optimizer     AdamW m, v (+ an fp32 master copy in bf16) = 12 (bf16) or 8 (fp32) bytes per trainable / ranks
                (ZeRO-1/2/3); offload_optimizer: on the host. train.mode=full names the parts: "fp32 masters" (4, bf16
                only) and "Adam moments" (8)
  activations   what backward keeps per position and decoder layer (below); with activation checkpointing only each
                layer's input plus one layer recomputed
  logits        text head over every position (model.full_text_logits=true) or only the trained ones, the audio head
                at audio positions: dtype + fp32 copy + log-softmax + gradient
  runtime       the process itself: 0.78 GiB on CPU (torch, DeepSpeed, transformers, gloo), 0.6 GiB CUDA context
Per position and decoder layer, backward keeps (elements of dtype): 2 norm inputs and outputs (4h), q and the
attention output (2h), k and v (2 kv), the MLP's gate, up, activation and product (4i), the residual (h), the
DualFFN's text/audio split copy (h); each RMSNorm also keeps an fp32 copy (2 x 4h bytes); each LoRA target its
rank-r intermediate, and with lora.dropout > 0 a dropped-out copy of its input; eager attention its T x T weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_train.config import Config
from ds_train.model import lora_target_regex, trainable_regex

GIB = 2**30
# A CPU rank's RSS besides the model: ~0.58 GiB of its own memory plus the libraries' pages it maps, which depend on
# what the page cache holds: a bench-train rank's peak RSS is 1.14 GiB with the libraries read from disk (after
# drop_caches, or a long-lived venv) and 1.36-1.41 GiB with them all cached (a fresh install, as CI has), with 0.49
# GiB of either model, optimizer and step (2026-12-04). The plan takes the middle, within 12% of both.
CPU_RUNTIME_GIB = 0.78
CUDA_CONTEXT_GIB = 0.6
AUDIO_FRACTION = 0.85  # TTS micro-batches: most positions are audio


@dataclass
class ModelCounts:
    frozen: int
    trainable: int
    largest_module: int  # parameters of the largest single module (ZeRO-3 gathers one at a time, at least)
    layers: int
    hidden: int
    intermediate: int
    kv: int
    heads: int
    vocab: int
    audio_vocab: int
    lora_targets_per_layer: dict  # target -> (in_features, is_audio)


def count_model(cfg: Config, model_config) -> ModelCounts:
    """Exact parameter counts of the configured model, from shapes on the meta device: trainable = LoRA (+ audio_mlp
    with model.train_audio_mlp, + lora.modules_to_save), or in train.mode=full what model.trainable selects."""
    import re

    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    with torch.device("meta"):
        model = HiggsAudioModel(model_config)
    pattern = re.compile(lora_target_regex(cfg.lora.target_modules)) if cfg.uses_lora() else None
    full = re.compile(trainable_regex(cfg.model.trainable)) if cfg.train.mode == "full" else None
    frozen = trainable = largest = 0
    targets = {}
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        largest = max(largest, own)
        if isinstance(module, torch.nn.Linear) and pattern and pattern.match(name):
            trainable += cfg.lora.r * (module.in_features + module.out_features)
            if ".layers.0." in f".{name}":
                targets[name.split(".layers.0.")[-1]] = (module.in_features, ".audio_mlp." in name)
    saved = cfg.lora.modules_to_save if cfg.uses_lora() else []
    for name, p in model.named_parameters():
        if full.search(name) if full else ((cfg.model.train_audio_mlp and ".audio_mlp." in name)
                                            or any(f".{s}." in f".{name}" for s in saved)):
            trainable += p.numel()
        else:
            frozen += p.numel()
    t = model_config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return ModelCounts(frozen, trainable, largest, t.num_hidden_layers, t.hidden_size, t.intermediate_size,
                       t.num_key_value_heads * head_dim, t.num_attention_heads, t.vocab_size,
                       model_config.audio_num_codebooks * (model_config.audio_codebook_size + 2), targets)


def memory_components(cfg: Config, c: ModelCounts, ds_config: dict, world: int, positions: int, device: str,
                      longest: int | None = None) -> tuple[dict, dict]:
    """({name: GiB per device}, {name: GiB per rank on the host}) of one training step under `ds_config`."""
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    b = 2 if bf16 else 4
    offload_param = (zero.get("offload_param") or {}).get("device", "none") != "none" and stage == 3
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") != "none"
    cuda = device != "cpu"
    full = cfg.train.mode == "full"

    comp, host = {}, {}
    # offload_param keeps every rank's partition (frozen base and LoRA) on the host; ZeRO-3 still gathers each
    # module onto the device for its forward and backward, so the gathered working set stays a device cost.
    (host if offload_param else comp)["parameters"] = c.frozen * b / (world if stage == 3 else 1) / GIB
    if stage == 3:
        # stage3_max_reuse_distance (1e9 in our JSONs) keeps a gathered parameter until backward has used it again,
        # so up to stage3_max_live_parameters (or the whole model) is gathered at once; measured on CPU, RSS grows
        # by twice that (the all-gather's flat buffers as well as the parameters): 320M-parameter fp32 copy, 2 ranks,
        # +3.05 GiB over 1.2 GiB of parameters.
        live = int(zero.get("stage3_max_live_parameters", 1e9))
        gathered = max(min(live, c.frozen + c.trainable), c.largest_module)
        comp["gathered parameters"] = 2 * gathered * b / GIB
    trained = "trained parameters" if full else "LoRA"
    (host if offload_param else comp)[trained] = c.trainable * b / (world if stage == 3 else 1) / GIB
    grads = c.trainable * b / (world if stage >= 2 else 1) / GIB
    if offload_opt:
        # The reduced gradient partitions accumulate on the host (stage3 grad_partitions_flat_buffer), next to an
        # fp32 copy the CPU optimizer steps on; the device keeps only the reduce bucket the gradients pass through,
        # which DeepSpeed allocates whole (reduce_bucket_size elements) on a GPU; on CPU only the touched part of
        # that torch.empty is resident.
        host["gradients"] = grads + c.trainable * 4 / (world if stage >= 1 else 1) / GIB
        bucket = int(zero.get("reduce_bucket_size", 5e8))
        comp["gradient bucket"] = (bucket if cuda else min(bucket, c.trainable)) * b / GIB
    else:
        comp["gradients"] = grads
    per_rank = c.trainable / (world if stage >= 1 else 1) / GIB
    if full:  # AdamW's state in its parts: fp32 masters (bf16 only; in fp32 it steps on the weights), then m and v
        optimizer = {"fp32 masters": 4 * per_rank} if bf16 else {}
        optimizer["Adam moments"] = 8 * per_rank
    else:
        optimizer = {"optimizer": (12 if bf16 else 8) * per_rank}
    (host if offload_opt else comp).update(optimizer)
    comp["activations"] = activation_bytes(cfg, c, positions, b, longest or positions) / GIB
    comp["logits"] = logits_bytes(cfg, c, positions, b) / GIB
    comp["runtime"] = CUDA_CONTEXT_GIB if cuda else CPU_RUNTIME_GIB
    if not cuda:  # on CPU the "device" is host memory: offloaded state lives there too
        comp.update({f"{k} (offloaded)": v for k, v in host.items()})
        host = {}
    return comp, host


def activation_bytes(cfg: Config, c: ModelCounts, positions: int, b: int, longest: int) -> float:
    h, i, kv = c.hidden, c.intermediate, c.kv
    per_layer = (4 * h + 2 * h + 2 * kv + 4 * i + h + h) * b + 2 * 2 * 4 * h
    for _, (fan_in, is_audio) in c.lora_targets_per_layer.items():
        share = AUDIO_FRACTION if is_audio else 1.0
        per_layer += share * (cfg.lora.r * b + (fan_in * b + fan_in if cfg.lora.dropout > 0 else 0))
    layers = c.layers
    attn = 0.0
    if cfg.model.attn_implementation == "eager":
        attn = c.heads * longest * positions * b  # T x T weights per head (positions/T sequences of length T)
    if cfg.model.activation_checkpointing:
        return positions * layers * h * b + positions * per_layer + attn
    return positions * layers * per_layer + layers * attn


def logits_bytes(cfg: Config, c: ModelCounts, positions: int, b: int) -> float:
    per_entry = b + 4 + 4 + 4  # logits, fp32 copy, log-softmax, gradient
    text_positions = positions if cfg.model.full_text_logits else min(positions, 64)
    audio_positions = AUDIO_FRACTION * positions
    return per_entry * (text_positions * c.vocab + audio_positions * c.audio_vocab)


def step_gib(cfg: Config, c: ModelCounts, ds_config: dict, world: int, positions: int, device: str,
             longest: int | None) -> float:
    """GiB per device of one step (memory_components' device side)."""
    return sum(memory_components(cfg, c, ds_config, world, positions, device, longest)[0].values())
