"""Checkpoints: save, resume, and the PEFT adapter export that runs at each save and at the end.

OUTPUT_DIR/checkpoints/
  step-000123/          DeepSpeed ZeRO shards (trainable parameters only) + our client state
    rng-rank00000.pt    each rank's RNG states
    adapter/            PEFT adapter of this step (adapter_config.json + adapter_model.safetensors)
    ds_train_meta.json  written by rank 0 once every rank's files are on disk: the dir is complete
  latest                names the newest complete checkpoint; written last, atomically
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ds_train import dist, faults
from ds_train.config import Config, ConfigError, flatten, to_dict

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_TRAINABLE = "base_trainable.safetensors"  # fully trained base weights (audio_mlp), merged by `ds-train merge`
META = "ds_train_meta.json"
STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, damaged or written by another setup."""


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
    _fsync(path.parent)


def read_latest(out_dir: Path) -> Optional[Path]:
    latest = checkpoint_root(out_dir) / "latest"
    if not latest.is_file():
        return None
    return checkpoint_root(out_dir) / latest.read_text().strip()


def save(engine, model, cfg: Config, out_dir: Path, state: dict, eval_loss: Optional[float] = None) -> Path:
    """Collective: every rank writes its shards and RNG; then rank 0 writes the adapter, `latest`, and prunes."""
    root = checkpoint_root(out_dir)
    tag = tag_of(state["step"])
    if dist.is_main() and (root / tag).exists():
        # Left by a crashed save or an abandoned branch of the run: files of another world size must not mix in.
        _remove_checkpoint(root / tag)
    dist.barrier()
    client = {"ds_train": {**state, "eval_loss": eval_loss, "world_size": dist.world_size(), "config": to_dict(cfg)}}
    engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(_rng_state(), root / tag / f"rng-rank{dist.rank():05d}.pt")
    export_adapter(model, root / tag / "adapter")
    _fsync_rank_files(root / tag, dist.rank())
    faults.crash_if("after_shards", state["step"])
    dist.barrier()  # every rank's files are on disk before `latest` may name them
    if dist.is_main():
        atomic_write(root / tag / META, json.dumps({"step": state["step"], "eval_loss": eval_loss,
                                                    "world_size": dist.world_size(), "config": to_dict(cfg)}))
        atomic_write(root / "latest", tag)
        _prune(root, tag, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)
    dist.barrier()
    return root / tag


def _fsync_rank_files(step_dir: Path, rank: int) -> None:
    """Flush this rank's shards (DeepSpeed's torch.save does not) so `latest` never names data still in cache."""
    mine = [p for p in step_dir.iterdir() if p.is_file() and (f"zero_pp_rank_{rank}_" in p.name
                                                              or p.name == f"rng-rank{rank:05d}.pt"
                                                              or (rank == 0 and p.name.startswith("mp_rank_")))]
    for p in mine:
        _fsync(p)
    _fsync(step_dir)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_of(path: Path) -> Optional[int]:
    m = STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _prune(root: Path, current: str, keep_last: int, keep_best: int) -> None:
    """Keep the newest `keep_last` complete checkpoints and the `keep_best` lowest eval losses; drop dirs that a
    crashed save left without META (every rank has passed the barrier, so none is still being written).
    Complete dirs past the current step belong to an abandoned branch of the run (a resume from an older
    checkpoint): they are neither counted nor removed here; a save at the same step replaces them."""
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)
    done = [p for p in dirs if (p / META).is_file() and step_of(p) <= step_of(root / current)]
    keep = set(done[-keep_last:]) | {root / current}
    keep |= {p for p in dirs if (p / META).is_file() and step_of(p) > step_of(root / current)}
    if keep_best:
        scored = [(json.loads((p / META).read_text())["eval_loss"], p) for p in done]
        scored = [(loss, p) for loss, p in scored if loss is not None and math.isfinite(loss)]
        keep |= {p for _, p in sorted(scored, key=lambda s: (s[0], step_of(s[1])))[:keep_best]}
    for p in dirs:
        if p not in keep:
            _remove_checkpoint(p)


def _remove_checkpoint(path: Path) -> None:
    (path / META).unlink(missing_ok=True)  # first: a half-removed dir must not look complete
    shutil.rmtree(path)


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
        raise ConfigError(f"train.resume={mode}: {path} is not a complete ds_train checkpoint (no {META}); "
                          "give a step-XXXXXX dir that holds one, or train.resume=auto")
    meta = json.loads((path / META).read_text())
    if meta["world_size"] != dist.world_size():
        raise ConfigError(
            f"checkpoint {path} was written by {meta['world_size']} ranks but this run has {dist.world_size()}. "
            f"ZeRO shards are per rank: relaunch with {meta['world_size']} ranks to resume, or run "
            f"`ds-train consolidate {path} ADAPTER_DIR` and start a new run from that adapter."
        )
    changed = config_changes(meta.get("config", {}), to_dict(cfg))
    if changed:
        dist.print0(f"warning: resuming {path} with changed settings, so the run will not continue exactly as it "
                    "would have: " + "; ".join(changed))
    return path


# Settings whose change makes a resumed run differ from the uninterrupted one (data order, schedule, shapes).
CONTINUATION_KEYS = ("data.train_file", "data.max_tokens", "train.micro_batch_size", "train.grad_accum",
                     "train.epochs", "train.max_steps", "train.seed", "optim", "lora", "model.path",
                     "model.train_audio_mlp", "loss")


def load(engine, path: Path) -> dict:
    """Restore shards, optimizer, scheduler and this rank's RNG; return our client state."""
    rng = path / f"rng-rank{dist.rank():05d}.pt"
    if not rng.is_file():
        raise CheckpointError(f"{path} has no RNG state for rank {dist.rank()} ({rng.name}); the checkpoint is damaged")
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None or "ds_train" not in client:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
    _set_rng_state(torch.load(rng, weights_only=False))
    return client["ds_train"]


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for the CONTINUATION_KEYS that differ between two config dicts."""
    if not saved:  # checkpoints written before META carried the config
        return []
    old, new = flatten(saved), flatten(current)
    keys = sorted(k for k in old.keys() | new.keys()
                  if any(k == c or k.startswith(c + ".") for c in CONTINUATION_KEYS))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


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
    lora = {n: t for n, t in full.items() if "lora_" in n}
    base = {strip_peft_prefix(n): t for n, t in full.items() if "lora_" not in n}
    with staged_dir(out_dir, replace=lambda _: True) as tmp:
        if lora:
            state = get_peft_model_state_dict(model, state_dict=lora)
            if len(state) != len(lora) or any(t.numel() == 0 for t in state.values()):
                raise RuntimeError(f"adapter export lost tensors: {len(lora)} trainable LoRA tensors, "
                                   f"{len(state)} exported")
            model.peft_config["default"].save_pretrained(str(tmp))
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
        if base:
            save_file({k: v.contiguous() for k, v in base.items()}, str(tmp / BASE_TRAINABLE),
                      metadata={"format": "pt"})


def strip_peft_prefix(name: str) -> str:
    """Parameter name in the PeftModel -> its name in HiggsAudioModel."""
    return name.removeprefix("base_model.model.")


@contextlib.contextmanager
def staged_dir(out_dir: Path, replace: Callable[[Path], bool]) -> Iterator[Path]:
    """Build OUT_DIR's content in a hidden sibling and move it into place only when complete: on error nothing is
    left behind. An existing non-empty OUT_DIR is replaced only when `replace(OUT_DIR)` says it is ours."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not replace(out_dir))):
        raise FileExistsError(f"{out_dir} exists and is not an earlier output of this command; "
                              "remove it or choose another output dir")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync(p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    _fsync(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
