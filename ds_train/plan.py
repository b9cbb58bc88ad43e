"""`ds-train plan CONFIG [--hostfile F] [--gpu-memory GB] [--positions N]`: will this run fit, before any GPU is
touched? Per-device memory of the configured model, LoRA, ZeRO stage/offload and micro-batch, and what to change.

The model is counted exactly from its config (built on the meta device, nothing allocated). Per device:
  parameters    frozen base x dtype bytes; ZeRO-3: / ranks, plus the gathered working set (up to
                stage3_max_live_parameters, twice: parameters and all-gather buffers); offload_param: on the host
  LoRA          trainable x dtype bytes (ZeRO-3: / ranks); offload_param: on the host
  gradients     trainable x dtype bytes (ZeRO-2/3: / ranks); offload_optimizer: on the host with an fp32 copy
                (4 bytes per trainable / ranks), and the device keeps the reduce bucket (reduce_bucket_size x dtype)
  optimizer     AdamW m, v (+ an fp32 master copy in bf16) = 12 (bf16) or 8 (fp32) bytes per trainable / ranks;
                offload_optimizer: on the host
  activations   what backward keeps per position and decoder layer (below); with activation checkpointing only each
                layer's input plus one layer recomputed
  logits        text head over every position (model.full_text_logits=true) or only the trained ones, the audio head
                at audio positions: dtype + fp32 copy + log-softmax + gradient
  runtime       the process itself: 0.85 GiB on CPU (torch, DeepSpeed, transformers, gloo), 0.6 GiB CUDA context
A round of in-training samples (eval.samples; ds_train.samples) runs between steps, when activations and logits are
freed. It builds the serve engine's pieces (KV caches, audio tokenizer) and frees them after the round, so they are
not in the step's total; under ZeRO-3 it gathers the whole model once for the round when that fits next to what the
rank holds (`samples_gather_fits`), else every decode step gathers it module by module as training does.
Per position and decoder layer, backward keeps (elements of dtype): 2 norm inputs and outputs (4h), q and the
attention output (2h), k and v (2 kv), the MLP's gate, up, activation and product (4i), the residual (h), the
DualFFN's text/audio split copy (h); each RMSNorm also keeps an fp32 copy (2 x 4h bytes); each LoRA target its
rank-r intermediate, and with lora.dropout > 0 a dropped-out copy of its input; eager attention its T x T weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ds_train import dist
from ds_train.config import Config
from ds_train.model import lora_target_regex

GIB = 2**30
# Measured on the project's CPU box: 0.74 GiB (2026-11-22) to ~1.05 GiB (2026-11-21) of RSS before the model, as
# the page cache holds the libraries' file-backed pages differently; the middle of that range.
CPU_RUNTIME_GIB = 0.85
CUDA_CONTEXT_GIB = 0.6
AUDIO_FRACTION = 0.85  # TTS micro-batches: most positions are audio
# Of the device, kept free when the whole model is gathered for a round of samples: decoding's own activations and
# the allocator's slack.
SAMPLES_HEADROOM = 0.1


@dataclass
class Plan:
    world: int
    positions: int  # per micro-batch and device
    components: dict  # name -> GiB per device
    host_components: dict  # offloaded: name -> GiB per rank on the host
    capacity_gib: float
    device: str
    recommendations: list = field(default_factory=list)
    samples: dict = field(default_factory=dict)  # a round of samples (eval.samples): GiB per device, and the path

    @property
    def total_gib(self) -> float:
        return sum(self.components.values())

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.capacity_gib


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
    """Exact parameter counts of the configured model + LoRA, from shapes on the meta device."""
    import re

    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    with torch.device("meta"):
        model = HiggsAudioModel(model_config)
    pattern = re.compile(lora_target_regex(cfg.lora.target_modules)) if cfg.uses_lora() else None
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
        if (cfg.model.train_audio_mlp and ".audio_mlp." in name) or any(f".{s}." in f".{name}" for s in saved):
            trainable += p.numel()
        else:
            frozen += p.numel()
    t = model_config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return ModelCounts(frozen, trainable, largest, t.num_hidden_layers, t.hidden_size, t.intermediate_size,
                       t.num_key_value_heads * head_dim, t.num_attention_heads, t.vocab_size,
                       model_config.audio_num_codebooks * (model_config.audio_codebook_size + 2), targets)


def plan_memory(cfg: Config, model_config, ds_config: dict, world: int, positions: int, capacity_gib: float,
                device: str, longest: int | None = None) -> Plan:
    """Predicted per-device memory of one training step; `positions` per micro-batch (padded), `longest` sequence."""
    c = count_model(cfg, model_config)
    comp, host = memory_components(cfg, c, ds_config, world, positions, device, longest)
    p = Plan(world, positions, comp, host, capacity_gib, device)
    p.recommendations = recommend(cfg, ds_config, p, c, device, longest)
    if cfg.eval.samples is not None:
        zero = ds_config.get("zero_optimization", {})
        b = 2 if ds_config.get("bf16", {}).get("enabled") else 4
        p.samples = samples_round(cfg, model_config, p, c, b, int(zero.get("stage", 0)))
    return p


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
    (host if offload_param else comp)["LoRA"] = c.trainable * b / (world if stage == 3 else 1) / GIB
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
    (host if offload_opt else comp)["optimizer"] = c.trainable * (12 if bf16 else 8) / (world if stage >= 1 else 1) / GIB
    comp["activations"] = activation_bytes(cfg, c, positions, b, longest or positions) / GIB
    comp["logits"] = logits_bytes(cfg, c, positions, b) / GIB
    comp["runtime"] = CUDA_CONTEXT_GIB if cuda else CPU_RUNTIME_GIB
    if not cuda:  # on CPU the "device" is host memory: offloaded state lives there too
        comp.update({f"{k} (offloaded)": v for k, v in host.items()})
        host = {}
    return comp, host


def samples_round(cfg: Config, model_config, p: Plan, c: ModelCounts, b: int, stage: int) -> dict:
    """A round of samples per device, in GiB: the engine pieces it builds and frees, the whole model, and whether a
    ZeRO-3 run gathers it once for the round (what `samples_gather_fits` decides at run time from measured usage)."""
    pieces = {"KV caches": kv_cache_gib(model_config, b),
              "audio tokenizer": _weights_gib(cfg.model.audio_tokenizer_path)}
    model = (c.frozen + c.trainable) * b / GIB
    between_steps = p.total_gib - sum(p.components.get(k, 0.0) for k in
                                      ("activations", "logits", "gathered parameters"))
    used = between_steps + sum(pieces.values())
    gather = cfg.eval.samples_gather
    once = stage == 3 and (gather == "always" or gather == "auto" and samples_gather_fits(model, used, p.capacity_gib))
    path = "replicated" if stage != 3 else "gathered once" if once else "gathered per decode step"
    return {**pieces, "model": model, "used": used, "path": path}


def samples_gather_fits(model_gib: float, used_gib: float, capacity_gib: float) -> bool:
    """Whether the whole model, gathered for a round of samples, fits a device on top of what it holds now, with
    SAMPLES_HEADROOM of the device to spare."""
    return used_gib + model_gib <= (1 - SAMPLES_HEADROOM) * capacity_gib


def kv_cache_gib(model_config, b: int) -> float:
    """The serve engine's static KV caches (ds_train.generate.KV_CACHE_LENGTHS, batch 1) in the model's dtype: keys
    and values for every decoder layer and every DualFFN audio layer."""
    from ds_train.generate import KV_CACHE_LENGTHS

    t = model_config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    layers = t.num_hidden_layers + len(model_config.audio_dual_ffn_layers or [])
    return 2 * layers * t.num_key_value_heads * head_dim * sum(KV_CACHE_LENGTHS) * b / GIB


def _weights_gib(folder: str) -> float:
    # The audio tokenizer as it is stored (0 for a hub id: nothing local to measure).
    p = Path(folder)
    files = [f for f in p.rglob("*") if f.suffix in (".pth", ".bin", ".safetensors")] if p.is_dir() else []
    return sum(f.stat().st_size for f in files) / GIB


def local_ranks() -> int:
    """Ranks on this machine, from the launcher's environment (1 without one)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))


def device_usage_gib(ranks_here: int) -> tuple[float, float]:
    """(used, capacity) of this rank's device now, in GiB. CUDA: what every process on the device holds (total -
    free) less what torch's allocator has cached here and can hand out again. CPU: this rank's share of RAM: MemTotal
    and MemTotal - MemAvailable, / local ranks (every local rank gathers its own copy at the same time)."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        return (total - free - cached) / GIB, total / GIB
    ranks = max(ranks_here, 1)
    return (_mem_total_gib() - _mem_available_gib()) / ranks, _mem_total_gib() / ranks


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


def recommend(cfg, ds_config, p: Plan, c: ModelCounts, device: str, longest: int | None) -> list[str]:
    out = []
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    b = 2 if ds_config.get("bf16", {}).get("enabled") else 4
    fixed = p.total_gib - p.components["activations"] - p.components["logits"]
    per_position = (p.components["activations"] + p.components["logits"]) / max(p.positions, 1)
    if per_position > 0:
        budget = int((0.9 * p.capacity_gib - fixed) / per_position // 256 * 256)
        if budget >= 256:
            out.append(f"data.max_tokens <= {budget} fits at this setting (90% of {p.capacity_gib:.1f} GiB)")
        else:
            out.append(f"no micro-batch fits at this setting: {fixed:.1f} GiB before activations")
    if not cfg.model.activation_checkpointing:
        ckpt = activation_bytes(_with(cfg, activation_checkpointing=True), c, p.positions, b, p.positions) / GIB
        if not p.fits:
            out.append(f"model.activation_checkpointing=true: activations {p.components['activations']:.1f} -> "
                       f"{ckpt:.1f} GiB")
    elif p.total_gib - p.components["activations"] + \
            activation_bytes(_with(cfg, activation_checkpointing=False), c, p.positions, b, p.positions) / GIB \
            < 0.9 * p.capacity_gib:
        out.append("model.activation_checkpointing=false also fits: no recompute, ~1.3x faster backward")

    def alternative(zero_optimization: dict) -> float:  # GiB per device of this run under another ZeRO section
        comp, _ = memory_components(cfg, c, {**ds_config, "zero_optimization": zero_optimization}, p.world,
                                    p.positions, device, longest)
        return sum(comp.values())

    if stage == 3:
        zero2 = alternative({"stage": 2})
        if zero2 < 0.9 * p.capacity_gib:
            out.append(f"ZeRO-2 fits (frozen base replicated, {c.frozen * b / GIB:.1f} GiB; {zero2:.1f} GiB per "
                       "device): ds_configs/zero2.json, no per-layer all-gather")
    if not p.fits and stage < 3:
        out.append("ZeRO-3 partitions the frozen base: ds_configs/zero3.json")
    if not p.fits and stage == 3 and "offload_param" not in zero:
        offloaded = alternative({**zero, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}})
        out.append(f"ZeRO-3 with parameters and optimizer on the host ({offloaded:.1f} GiB per device): "
                   "ds_configs/zero3_offload.json")
    return out


def _with(cfg: Config, **model_keys) -> Config:
    import copy

    other = copy.deepcopy(cfg)
    for k, v in model_keys.items():
        setattr(other.model, k, v)
    return other


# ----------------------------------------------------------------------------------------------------------------
# The command, and the check train runs at start.

def world_size_of(hostfile: str | None) -> int:
    """Ranks of a launch: the hostfile's slots, else the launcher's WORLD_SIZE, else local GPUs (2 without one)."""
    if hostfile:
        from ds_train.launch import parse_hostfile

        return sum(slots for _, slots in parse_hostfile(hostfile))
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    import torch

    return torch.cuda.device_count() or 2


def device_capacity(gpu_memory: float | None, local_ranks: int) -> tuple[float, str]:
    import torch

    if gpu_memory:
        return gpu_memory, "gpu" if gpu_memory else "cpu"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dist.local_rank())
        return props.total_memory / GIB, props.name
    avail = _mem_available_gib()
    return avail / max(local_ranks, 1), "cpu"


def _mem_available_gib() -> float:
    return _meminfo_gib("MemAvailable:")


def _mem_total_gib() -> float:
    return _meminfo_gib("MemTotal:")


def _meminfo_gib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 2**20
    return 0.0


def positions_of(cfg: Config, longest: int | None, positions: int | None) -> int:
    if positions:
        return positions
    if cfg.data.max_tokens:
        return cfg.data.max_tokens
    if longest:
        return cfg.train.micro_batch_size * longest
    return cfg.train.micro_batch_size * 4096


def plan_command(cfg: Config, hostfile: str | None = None, gpu_memory: float | None = None,
                 positions: int | None = None) -> Plan:
    import torch

    from ds_train.ds_config import deepspeed_config
    from ds_train.preflight import load_model_config

    model_config = load_model_config(cfg.model.path)
    world = world_size_of(hostfile)
    cuda = bool(gpu_memory) or torch.cuda.is_available()
    ds_config = deepspeed_config(cfg, world, cuda)
    local = int(os.environ.get("LOCAL_SIZE", 0)) or (torch.cuda.device_count() or 2)
    capacity, device = device_capacity(gpu_memory, local)
    if gpu_memory:
        device = "gpu"
    p = plan_memory(cfg, model_config, ds_config, world, positions_of(cfg, None, positions), capacity, device)
    print(format_plan(p, cfg))
    return p


def format_plan(p: Plan, cfg: Config) -> str:
    lines = [f"plan: {cfg.model.path}, {p.world} rank(s), {p.positions} positions per micro-batch, "
             f"{cfg.train.deepspeed_config}, activation_checkpointing={cfg.model.activation_checkpointing}"]
    for name, gib in p.components.items():
        lines.append(f"  {name:28s} {gib:8.2f} GiB")
    for name, gib in p.host_components.items():
        lines.append(f"  {name + ' (host)':28s} {gib:8.2f} GiB per rank")
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(f"  {'total per device':28s} {p.total_gib:8.2f} GiB of {p.capacity_gib:.1f} GiB ({p.device}): "
                 f"{verdict}")
    lines += [f"  recommend: {r}" for r in p.recommendations]
    if p.samples:
        s = p.samples
        gathered = f", the whole model {s['model']:.2f} GiB" if s["path"] == "gathered once" else ""
        lines.append(f"  samples round: KV caches {s['KV caches']:.2f} GiB + audio tokenizer {s['audio tokenizer']:.2f}"
                     f" GiB (freed after the round){gathered}; parameters {s['path']}")
    return "\n".join(lines)


def check_at_start(cfg: Config, model_config, ds_config: dict, longest: int) -> Plan | None:
    """train's one-line warning when the plan predicts OOM (never stops the run: the plan is an estimate)."""
    import torch

    capacity, device = device_capacity(None, local_ranks() if not torch.cuda.is_available() else 1)
    p = plan_memory(cfg, model_config, ds_config, dist.world_size(), positions_of(cfg, longest, None), capacity,
                    device, longest)
    if not p.fits:
        dist.print0(f"WARNING: ds-train plan predicts {p.total_gib:.1f} GiB per device, more than the "
                    f"{p.capacity_gib:.1f} GiB available: likely out of memory. "
                    + "; ".join(p.recommendations[:2]))
    return p
