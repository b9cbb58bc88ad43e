"""`ds-train plan CONFIG [--hostfile F] [--gpu-memory GB] [--positions N]`: will this run fit, before any GPU is
touched? Per-device memory of the configured model, LoRA, ZeRO stage/offload and micro-batch, and what to change.

The memory of one step, component by component, is ds_train/step_memory.py (its docstring has the arithmetic). Here:
the plan and its recommendations, the fewest GPUs of a size a step needs, data.max_tokens=auto, the command and
train's check at start.

A round of in-training samples (eval.samples; ds_train.samples) runs between steps, when activations and logits are
freed. It builds the serve engine's pieces (KV caches, audio tokenizer) and frees them after the round, so they are
not in the step's total; under ZeRO-3 it gathers the whole model once for the round when that fits next to what the
rank holds (`samples_gather_fits`), else every decode step gathers it module by module as training does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ds_train import dist
from ds_train.config import Config
from ds_train.errors import ConfigError
from ds_train.step_memory import GIB, ModelCounts, activation_bytes, count_model, memory_components, step_gib

# Of the device, kept free when the whole model is gathered for a round of samples: decoding's own activations and
# the allocator's slack.
SAMPLES_HEADROOM = 0.1
# Of the device, kept free by the token budget plan recommends (= what data.max_tokens=auto picks) and by the GPU
# count it gives: the plan is an estimate, and the allocator fragments.
MARGIN = 0.1
# data.max_tokens budgets are multiples of this: a few MB more or less of the same device (another driver, what
# another process holds on a CPU box) then mostly resolves `auto` to the same number, so the run resumes unchanged;
# 256 positions are a small step next to real budgets of thousands.
BUDGET_STEP = 256
MAX_BUDGET_STEPS = 2**16  # 16.8M positions: the search's ceiling (a tiny model on a large host)


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
    # GPUs of this capacity a step needs: {"configured" | "offload": (count or None, GiB per device at that count)}
    gpus: dict = field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        return sum(self.components.values())

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.capacity_gib


def plan_memory(cfg: Config, model_config, ds_config: dict, world: int, positions: int, capacity_gib: float,
                device: str, longest: int | None = None) -> Plan:
    """Predicted per-device memory of one training step; `positions` per micro-batch (padded), `longest` sequence."""
    c = count_model(cfg, model_config)
    comp, host = memory_components(cfg, c, ds_config, world, positions, device, longest)
    p = Plan(world, positions, comp, host, capacity_gib, device)
    p.recommendations = recommend(cfg, ds_config, p, c, device, longest)
    if device != "cpu":
        p.gpus = gpus_needed(cfg, c, ds_config, p)
    if cfg.eval.samples is not None:
        zero = ds_config.get("zero_optimization", {})
        b = 2 if ds_config.get("bf16", {}).get("enabled") else 4
        p.samples = samples_round(cfg, model_config, p, c, b, int(zero.get("stage", 0)))
    return p


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


def recommend(cfg, ds_config, p: Plan, c: ModelCounts, device: str, longest: int | None) -> list[str]:
    out = []
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    b = 2 if ds_config.get("bf16", {}).get("enabled") else 4
    budget = largest_max_tokens(cfg, c, ds_config, p.world, p.capacity_gib, device, longest)
    if budget:
        out.append(f"data.max_tokens <= {budget} fits at this setting ({1 - MARGIN:.0%} of {p.capacity_gib:.1f} GiB)")
    else:
        fixed = p.total_gib - p.components["activations"] - p.components["logits"]
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
            out.append(f"ZeRO-2 fits (parameters replicated, {(c.frozen + c.trainable) * b / GIB:.1f} GiB; {zero2:.1f} "
                       "GiB per device): ds_configs/zero2.json, no per-layer all-gather")
    if not p.fits and stage < 3:
        out.append("ZeRO-3 partitions the parameters: ds_configs/zero3.json")
    if not p.fits and stage == 3 and "offload_param" not in zero:
        offloaded = alternative(offloaded_zero(zero))
        out.append(f"ZeRO-3 with parameters and optimizer on the host ({offloaded:.1f} GiB per device): "
                   "ds_configs/zero3_offload.json")
    return out


def offloaded_zero(zero: dict) -> dict:
    """`zero` as ZeRO-3 with parameters and optimizer on the host (what ds_configs/zero3_offload.json sets)."""
    return {**zero, "stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}


def largest_max_tokens(cfg: Config, c: ModelCounts, ds_config: dict, world: int, capacity_gib: float, device: str,
                       longest: int | None = None) -> int:
    """The largest data.max_tokens, a multiple of BUDGET_STEP, whose step takes at most (1 - MARGIN) of the device;
    0 when not even BUDGET_STEP fits. Without `longest` one sequence fills the budget (eager attention's T x T
    weights: the worst case). The step grows with the budget, so a bisection over multiples finds it."""
    limit = (1 - MARGIN) * capacity_gib

    def fits(steps: int) -> bool:
        n = steps * BUDGET_STEP
        return step_gib(cfg, c, ds_config, world, n, device, longest or n) <= limit

    if not fits(1):
        return 0
    low, high = 1, 2  # fits(low); high is tried next
    while high <= MAX_BUDGET_STEPS and fits(high):
        low, high = high, 2 * high
    high = min(high, MAX_BUDGET_STEPS + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * BUDGET_STEP


def fewest_gpus(cfg: Config, c: ModelCounts, ds_config: dict, positions: int, capacity_gib: float,
                most: int = 4096) -> int | None:
    """The fewest GPUs of `capacity_gib` on which a step of `positions` takes at most (1 - MARGIN) of each (ZeRO
    partitions shrink with more ranks; activations, logits, the gathered set and the runtime do not); None when no
    count up to `most` does."""
    limit = (1 - MARGIN) * capacity_gib
    return next((w for w in range(1, most + 1)
                 if step_gib(cfg, c, ds_config, w, positions, "gpu", positions) <= limit), None)


def gpus_needed(cfg: Config, c: ModelCounts, ds_config: dict, p: Plan) -> dict:
    """fewest_gpus at the plan's positions under the configured ZeRO section and, unless it offloads already, under
    it offloaded (offloaded_zero): {label: (count or None, GiB per device, GiB of host RAM over all ranks)}."""
    zero = ds_config.get("zero_optimization", {})
    sections = {Path(cfg.train.deepspeed_config).name: zero}
    offloads = int(zero.get("stage", 0)) == 3 and all((zero.get(k) or {}).get("device", "none") != "none"
                                                     for k in ("offload_param", "offload_optimizer"))
    if not offloads:
        sections["ZeRO-3 + offload (zero3_offload.json)"] = offloaded_zero(zero)
    out = {}
    for label, z in sections.items():
        ds = {**ds_config, "zero_optimization": z}
        n = fewest_gpus(cfg, c, ds, p.positions, p.capacity_gib)
        comp, host = memory_components(cfg, c, ds, n or p.world, p.positions, "gpu", p.positions)
        out[label] = (n, sum(comp.values()), sum(host.values()) * (n or p.world))
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
    if cfg.data.max_tokens:  # resolved from auto by now (resolve_max_tokens, or plan_command)
        return cfg.data.max_tokens
    # A DPO micro-batch of micro_batch_size pairs holds both clips of each pair (data/pairs.py), padded alike.
    sequences = cfg.train.micro_batch_size * (2 if cfg.train.objective == "dpo" else 1)
    return sequences * (longest or 4096)


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
    if cfg.data.max_tokens == "auto":
        cfg = _with_budget(cfg, *auto_budget(cfg, model_config, ds_config, world, capacity, device))
    p = plan_memory(cfg, model_config, ds_config, world, positions_of(cfg, None, positions), capacity, device)
    print(format_plan(p, cfg))
    return p


def auto_budget(cfg: Config, model_config, ds_config: dict, world: int, capacity_gib: float,
                device: str) -> tuple[int, str]:
    """data.max_tokens=auto on this device: (largest_max_tokens, the line that says so; 0 and why when none fits)."""
    c = count_model(cfg, model_config)
    budget = largest_max_tokens(cfg, c, ds_config, world, capacity_gib, device)
    if budget:
        return budget, (f"data.max_tokens=auto: {budget}, the largest multiple of {BUDGET_STEP} positions whose step "
                        f"ds-train plan fits in {1 - MARGIN:.0%} of {capacity_gib:.1f} GiB ({device})")
    fixed = step_gib(cfg, c, ds_config, world, 0, device, 0)
    return 0, (f"data.max_tokens=auto: not even {BUDGET_STEP} positions fit {1 - MARGIN:.0%} of {capacity_gib:.1f} "
               f"GiB ({device}): the step holds {fixed:.1f} GiB before activations; run `ds-train plan` for what "
               f"to change")


def _with_budget(cfg: Config, budget: int, line: str) -> Config:
    import copy

    if not budget:
        raise ConfigError(line)
    print(line)
    other = copy.deepcopy(cfg)
    other.data.max_tokens = budget
    return other


def resolve_max_tokens(cfg: Config, model_config, ds_config: dict) -> None:
    """data.max_tokens=auto -> auto_budget's number, in `cfg` itself, so the saved config.yaml, the W&B/TensorBoard
    config, the checkpoints' META and the resume comparison (checkpoint.CONTINUATION_KEYS) all hold the number.
    Rank 0 reads its device and decides, every rank takes its answer (readings may differ per rank: MemAvailable on
    CPU). Call after the process group exists and before the config is saved or compared."""
    import torch

    if cfg.data.max_tokens != "auto":
        return
    answer = None
    if dist.is_main():
        cuda = torch.cuda.is_available()
        capacity, device = device_capacity(None, 1 if cuda else local_ranks())
        answer = auto_budget(cfg, model_config, ds_config, dist.world_size(), capacity, device)
    budget, line = dist.broadcast_object(answer)
    if not budget:
        raise ConfigError(line)
    dist.print0(line)
    cfg.data.max_tokens = budget


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
    if p.gpus:  # the fewest GPUs of this size, e.g. "full fine-tune needs 2 x 80 GiB GPUs with zero3.json ..."
        lines.append(f"  {cfg.train.mode} fine-tune needs "
                     + "; ".join(_gpus_line(label, *v, p.capacity_gib) for label, v in p.gpus.items()))
    if p.samples:
        s = p.samples
        gathered = f", the whole model {s['model']:.2f} GiB" if s["path"] == "gathered once" else ""
        lines.append(f"  samples round: KV caches {s['KV caches']:.2f} GiB + audio tokenizer {s['audio tokenizer']:.2f}"
                     f" GiB (freed after the round){gathered}; parameters {s['path']}")
    return "\n".join(lines)


def _gpus_line(label: str, count: int | None, gib: float, host_gib: float, capacity_gib: float) -> str:
    if count is None:
        return (f"no number of {capacity_gib:.0f} GiB GPUs with {label}: {gib:.1f} GiB per device does not shrink "
                "with more")
    host = f", {host_gib:.1f} GiB of host RAM in all" if host_gib else ""
    gpus = f"{count} x {capacity_gib:.0f} GiB GPU{'s' if count > 1 else ''}"
    return f"{gpus} with {label} ({gib:.1f} GiB per device{host})"


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
