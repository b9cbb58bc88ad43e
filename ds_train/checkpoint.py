"""Checkpoints: save, resume, and the PEFT adapter export that runs at each save and at the end.

OUTPUT_DIR/checkpoints/
  step-000123/          DeepSpeed ZeRO shards (trainable parameters only) + our client state
    rng-rank00000.pt    each rank's RNG states
    adapter/            PEFT adapter of this step (adapter_config.json + adapter_model.safetensors)
  latest                names the newest complete checkpoint; written last, atomically
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ds_train import dist
from ds_train.config import Config, ConfigError, to_dict

ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_TRAINABLE = "base_trainable.safetensors"  # fully trained base weights (audio_mlp), merged by `ds-train merge`
META = "ds_train_meta.json"


def tag_of(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def atomic_write(path: Path, text: str) -> None:
    """Write-to-temp, fsync, rename: readers see the old content or the new, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_latest(out_dir: Path) -> Optional[Path]:
    latest = checkpoint_root(out_dir) / "latest"
    if not latest.is_file():
        return None
    return checkpoint_root(out_dir) / latest.read_text().strip()


def save(engine, model, cfg: Config, out_dir: Path, state: dict, eval_loss: Optional[float] = None) -> Path:
    """Collective: every rank writes its shards and RNG; then rank 0 writes the adapter, `latest`, and prunes."""
    root = checkpoint_root(out_dir)
    tag = tag_of(state["step"])
    client = {"ds_train": {**state, "eval_loss": eval_loss, "world_size": dist.world_size(), "config": to_dict(cfg)}}
    engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(_rng_state(), root / tag / f"rng-rank{dist.rank():05d}.pt")
    export_adapter(model, root / tag / "adapter")
    _fault_point("after_shards", state["step"])
    dist.barrier()  # every rank's files are on disk before `latest` may name them
    if dist.is_main():
        atomic_write(root / tag / META, json.dumps({"step": state["step"], "eval_loss": eval_loss,
                                                    "world_size": dist.world_size()}))
        atomic_write(root / "latest", tag)
        _prune(root, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)
    dist.barrier()
    return root / tag


def _fault_point(name: str, step: int) -> None:
    # Test hook: DS_TRAIN_FAULT=after_shards:4 kills this process mid-save at step 4, as a crash would.
    if os.environ.get("DS_TRAIN_FAULT") == f"{name}:{step}":
        os._exit(99)


def _prune(root: Path, keep_last: int, keep_best: int) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / META).is_file())
    keep = set(done[-keep_last:])
    if keep_best:
        scored = [(json.loads((p / META).read_text())["eval_loss"], p) for p in done]
        scored = [(loss, p) for loss, p in scored if loss is not None]
        keep |= {p for _, p in sorted(scored)[:keep_best]}
    for p in done:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def find_resume(cfg: Config, out_dir: Path) -> Optional[Path]:
    """The checkpoint dir to resume from, None for a fresh start; raises when a requested resume finds nothing."""
    mode = cfg.train.resume
    if mode == "none":
        return None
    if mode == "auto":
        path = read_latest(out_dir)
        if path is None:
            raise ConfigError(f"train.resume=auto but {checkpoint_root(out_dir)} has no complete checkpoint "
                              "(no `latest`); use train.resume=none to start fresh")
    else:
        path = Path(mode)
    if not (path / META).is_file():
        raise ConfigError(f"train.resume={mode}: {path} is not a complete ds_train checkpoint (no {META})")
    saved = json.loads((path / META).read_text())["world_size"]
    if saved != dist.world_size():
        raise ConfigError(
            f"checkpoint {path} was written by {saved} ranks but this run has {dist.world_size()}. ZeRO shards are "
            f"per rank: relaunch with {saved} ranks to resume, or run `ds-train consolidate {path} ADAPTER_DIR` "
            "and start a new run from that adapter."
        )
    return path


def load(engine, path: Path) -> dict:
    """Restore shards, optimizer, scheduler and this rank's RNG; return our client state."""
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    rng = path / f"rng-rank{dist.rank():05d}.pt"
    _set_rng_state(torch.load(rng, weights_only=False))
    return client["ds_train"]


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
            full[name] = (value if value is not None else p.detach().float()).cpu().clone()
    if dist.is_main():
        write_adapter(model, full, out_dir)


def write_adapter(model, full: dict, out_dir: Path) -> None:
    """Write trainable weights (full names) as a PEFT adapter dir, atomically; never an empty file."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora = {n: t for n, t in full.items() if "lora_" in n}
    base = {_strip_peft_prefix(n): t for n, t in full.items() if "lora_" not in n}
    if lora:
        state = get_peft_model_state_dict(model, state_dict=lora)
        if len(state) != len(lora) or any(t.numel() == 0 for t in state.values()):
            raise RuntimeError(f"adapter export lost tensors: {len(lora)} trainable LoRA tensors, {len(state)} exported")
        model.peft_config["default"].save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if base:
        save_file({k: v.contiguous() for k, v in base.items()}, str(tmp / BASE_TRAINABLE), metadata={"format": "pt"})
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def _strip_peft_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")
