"""`ds-train consolidate`: the ZeRO-3 shards of one checkpoint -> a PEFT adapter dir, offline.

No GPU, no process group, no base model: the shards hold only the trainable tensors (frozen weights are excluded
at save time), so time and memory grow with the adapter, not the model. The shard arithmetic is DeepSpeed's own
(zero_to_fp32, lazy mode, optimizer files memory-mapped so the Adam moments are never read); this module first
checks every rank's files, so a missing or damaged one is named instead of surfacing as an index error, then
writes the tensors under the names PEFT saves and loads.

OUT_DIR/
  adapter_config.json          from the checkpoint's adapter/ (or rebuilt from the config saved in the shards)
  adapter_model.safetensors    LoRA tensors, fp32
  base_trainable.safetensors   fully trained base weights (model.train_audio_mlp), when there are any
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from ds_train.checkpoint import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_TRAINABLE, META, CheckpointError,
                                 staged_dir, step_of, strip_peft_prefix)

ADAPTER_NAME = "default"  # the PEFT adapter name ds_train trains under
ADAPTER_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_TRAINABLE, "README.md"}


def consolidate(checkpoint_dir, out_dir, tag: Optional[str] = None) -> Path:
    """Rebuild the trainable tensors of a ZeRO-3 checkpoint into a PEFT adapter dir at `out_dir` (atomically).

    `checkpoint_dir` is a step-XXXXXX dir, or OUTPUT_DIR/checkpoints with `latest` (or `tag`) naming one.
    """
    from safetensors.torch import save_file

    step_dir = resolve_step_dir(Path(checkpoint_dir), tag)
    saved_config = check_shards(step_dir)
    tensors = fp32_trainable_tensors(step_dir)
    lora = {adapter_key(n): t for n, t in tensors.items() if "lora_" in n}
    base = {strip_peft_prefix(n): t for n, t in tensors.items() if "lora_" not in n}
    if not lora and not base:
        raise CheckpointError(f"{step_dir} holds no trainable tensors")
    out_dir = Path(out_dir)
    with staged_dir(out_dir, replace=lambda d: all(p.name in ADAPTER_FILES for p in d.iterdir())) as tmp:
        if lora:
            write_adapter_config(step_dir, saved_config, tmp)
            save_file(lora, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if base:
            save_file(base, str(tmp / BASE_TRAINABLE), metadata={"format": "pt"})
    return out_dir


def resolve_step_dir(checkpoint_dir: Path, tag: Optional[str]) -> Path:
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir} is not a directory")
    if (checkpoint_dir / "checkpoints").is_dir():  # OUTPUT_DIR given
        checkpoint_dir = checkpoint_dir / "checkpoints"
    if step_of(checkpoint_dir) is not None and not (checkpoint_dir / "latest").exists():
        if tag is not None and tag != checkpoint_dir.name:
            raise CheckpointError(f"--tag {tag} given with the step dir {checkpoint_dir}; give one or the other")
        step_dir = checkpoint_dir
    else:
        if tag is None:
            latest = checkpoint_dir / "latest"
            if not latest.is_file():
                raise CheckpointError(f"{checkpoint_dir} has no `latest` file: give a step-XXXXXX dir, or --tag "
                                      f"(available: {_tags(checkpoint_dir)})")
            tag = latest.read_text().strip()
        step_dir = checkpoint_dir / tag
        if not step_dir.is_dir():
            raise CheckpointError(f"no checkpoint {tag} in {checkpoint_dir} (available: {_tags(checkpoint_dir)})")
    if not (step_dir / META).is_file():
        raise CheckpointError(f"{step_dir} is not a complete ds_train checkpoint (no {META}: its save did not "
                              f"finish); use an earlier one (available: {_tags(step_dir.parent)})")
    return step_dir


def _tags(root: Path) -> str:
    tags = sorted((p for p in root.iterdir() if (p / META).is_file()), key=lambda p: step_of(p) or -1)
    return ", ".join(p.name for p in tags) or "none"


def shard_files(step_dir: Path, rank: int) -> tuple[Path, Path]:
    prefix = step_dir / f"zero_pp_rank_{rank}_mp_rank_00"
    return Path(f"{prefix}_model_states.pt"), Path(f"{prefix}_optim_states.pt")


def check_shards(step_dir: Path) -> dict:
    """Check that each rank of the world size in META left a readable model and optimizer file of one ZeRO-3 run;
    raise one CheckpointError listing every problem. Returns the run config saved in the client state."""
    world = json.loads((step_dir / META).read_text())["world_size"]
    if (step_dir / "mp_rank_00_model_states.pt").is_file():
        raise CheckpointError(f"{step_dir} was saved under ZeRO-1/2 (mp_rank_00_model_states.pt); consolidate reads "
                              "ZeRO-3 shards. Its adapter/ dir, exported at save time, is the same adapter.")
    problems, shapes, config = [], None, {}
    extra = sorted(p.name for p in step_dir.glob("zero_pp_rank_*_states.pt")
                   if int(p.name.split("_")[3]) >= world)
    if extra:
        problems.append(f"files of ranks beyond the {world} in {META}: {', '.join(extra)}")
    for rank in range(world):
        model_file, optim_file = shard_files(step_dir, rank)
        for f in (model_file, optim_file):
            if not f.is_file():
                problems.append(f"{f.name}: missing")
        if not model_file.is_file() or not optim_file.is_file():
            continue
        model_state = _load(model_file, problems)
        optim_state = _load(optim_file, problems)
        if model_state is None or optim_state is None:
            continue
        osd = optim_state.get("optimizer_state_dict", {})
        if int(osd.get("zero_stage", -1)) != 3 or "fp32_flat_groups" not in osd:
            problems.append(f"{optim_file.name}: not a ZeRO-3 optimizer shard (stage {osd.get('zero_stage')})")
            continue
        if osd.get("partition_count") != world or model_state.get("dp_world_size") != world:
            problems.append(f"{optim_file.name}: written by {osd.get('partition_count')} ranks, {META} says {world}")
        if shapes is None:
            shapes, config = model_state.get("param_shapes"), model_state.get("ds_train", {}).get("config", {})
        elif model_state.get("param_shapes") != shapes:
            problems.append(f"{model_file.name}: parameter list differs from rank 0's (files of different runs)")
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} ({world} ranks) cannot be consolidated:\n  "
                              + "\n  ".join(problems))
    return config


def _load(path: Path, problems: list) -> Optional[dict]:
    try:
        # mmap: the optimizer file's Adam moments are mapped, not read.
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch raises several types for a truncated or garbled zip
        problems.append(f"{path.name}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160]}), "
                        "truncated or corrupt")
        return None


def fp32_trainable_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """{full parameter name: fp32 tensor} of the trainable parameters, as DeepSpeed's zero_to_fp32 rebuilds them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    buffer_names = set(torch.load(shard_files(step_dir, 0)[0], map_location="cpu", weights_only=False,
                                  mmap=True).get("buffer_names", []))
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports progress with print()
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                        exclude_frozen_parameters=True, lazy_mode=True)
    return {name: t.contiguous().clone() for name, t in lazy.items() if name not in buffer_names}


def adapter_key(name: str) -> str:
    """Parameter name -> key in adapter_model.safetensors (what peft's get_peft_model_state_dict writes)."""
    return name.replace(f".{ADAPTER_NAME}", "")


def write_adapter_config(step_dir: Path, saved_config: dict, out: Path) -> None:
    """The adapter config exported at save time; rebuilt from the saved run config when that is gone."""
    exported = step_dir / "adapter" / ADAPTER_CONFIG
    if exported.is_file():
        shutil.copyfile(exported, out / ADAPTER_CONFIG)
        return
    if not saved_config.get("lora"):
        raise CheckpointError(f"{exported} is missing and the shards carry no run config to rebuild it from")
    from peft import LoraConfig

    from ds_train.model import lora_target_regex

    lora = saved_config["lora"]
    LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias="none",
               target_modules=lora_target_regex(lora["target_modules"]),
               base_model_name_or_path=saved_config.get("model", {}).get("path")).save_pretrained(str(out))
