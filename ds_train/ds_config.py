"""The DeepSpeed JSON of a run, derived from the config.

The file describes the system (ZeRO stage, offload, bucket sizes); the numbers that also live in our config are
injected from it, and a JSON that states a different value is an error, not a silent override.
"""

from __future__ import annotations

import json
from typing import Optional

from ds_train.config import Config
from ds_train.errors import ConfigError


def resolve_dtype(cfg: Config, cuda: bool) -> str:
    if cfg.model.dtype == "auto":
        return "bf16" if cuda else "fp32"
    return cfg.model.dtype


def deepspeed_config(cfg: Config, world_size: int, cuda: bool, path: Optional[str] = None) -> dict:
    path = path or cfg.train.deepspeed_config
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config not found: {path} (train.deepspeed_config)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")

    t, o = cfg.train, cfg.optim
    dtype = resolve_dtype(cfg, cuda)
    ours = {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "train.grad_accum"),
        "train_batch_size": (t.micro_batch_size * t.grad_accum * world_size,
                             "train.micro_batch_size x train.grad_accum x world size"),
        "gradient_clipping": (o.max_grad_norm, "optim.max_grad_norm"),
    }
    for key, (value, source) in ours.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(
                f"{path}: {key}={ds[key]} but our config gives {value} (from {source}); "
                f"remove {key} from the JSON or set it to \"auto\" - it is derived from the run config"
            )
        ds[key] = value

    for key in ("bf16", "fp16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") not in (None, "auto", key == dtype):
            raise ConfigError(f"{path}: {key}.enabled contradicts model.dtype={cfg.model.dtype} (resolved {dtype})")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == "bf16"}
    ds["fp16"] = {"enabled": False}

    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = opt.setdefault("params", {})
    for key, value in (("lr", o.lr), ("weight_decay", o.weight_decay), ("betas", list(o.betas)), ("eps", o.eps)):
        if key in params and params[key] != "auto" and params[key] != value:
            raise ConfigError(f"{path}: optimizer.params.{key}={params[key]} but optim.{key} is {value}; remove it from the JSON")
        params[key] = value
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove the 'scheduler' section; set optim.scheduler / optim.warmup_steps instead")

    zero = ds.setdefault("zero_optimization", {})
    if cfg.train.mode == "qlora":
        from ds_train.qlora import check_qlora_setup

        check_qlora_setup(zero_stage(ds), path)
    if not cuda:
        # Pinned host memory needs a GPU driver.
        for off in ("offload_param", "offload_optimizer"):
            if isinstance(zero.get(off), dict):
                zero[off]["pin_memory"] = False
    ds.setdefault("steps_per_print", 10**9)  # our logger reports; keep DeepSpeed's own step prints quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
