"""Offline exports, no GPU and no process group.

`ds-train consolidate`: the ZeRO-3 shards of one checkpoint -> a PEFT adapter dir (train.mode=lora), or a full model
dir (train.mode=full).

LoRA: no base model is loaded: the shards hold only the trainable tensors (frozen weights are excluded
at save time), so time and memory grow with the adapter, not the model. The shard arithmetic is DeepSpeed's own
(zero_to_fp32, lazy mode, optimizer files memory-mapped so the Adam moments are never read); this module first
checks every rank's files, so a missing or damaged one is named instead of surfacing as an index error, then
writes the tensors under the names PEFT saves and loads.

OUT_DIR/
  adapter_config.json          from the checkpoint's adapter/ (or rebuilt from the config saved in the shards)
  adapter_model.safetensors    LoRA tensors and the lora.modules_to_save weights, fp32 (adapter.py's layout)
  base_trainable.safetensors   fully trained base weights (model.train_audio_mlp), when there are any

Full fine-tuning: the same fp32 tensors, materialised one at a time, go through merge.py's model dir writer with the
frozen ones read from the base named in the saved config (model.path, or --base): bf16 (or fp32) safetensors, sharded,
the base's config and non-weight files copied, loadable by HiggsAudioServeEngine and `ds-train generate`. The
optimizer files are memory-mapped; the pages read for a tensor are released once it is rebuilt, so peak memory is one
output shard plus the largest tensor in fp32, not the 4 bytes per parameter of the fp32 state.

The adapter files are loaded onto a base model here too (load_base_trainable, load_lora) for `ds-train generate`;
`ds-train merge` is ds_train/merge.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from ds_train.adapter import (ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, BASE_TRAINABLE, adapter_key,
                              in_modules, strip_peft_prefix)
from ds_train.checkpoint import check_shards, resolve_step_dir, shard_files
from ds_train.errors import CheckpointError
from ds_train.fsutil import drop_mapped_pages, staged_dir

def consolidate(checkpoint_dir, out_dir, tag: Optional[str] = None, base: Optional[str] = None,
                dtype: str = "bf16", max_shard_size: str = "5GB") -> Path:
    """Rebuild the trainable tensors of a ZeRO-3 checkpoint into a PEFT adapter dir at `out_dir` (atomically); of a
    full fine-tuning run (train.mode=full), into a model dir of `dtype` on the base model `base` (default: the run's
    model.path).

    `checkpoint_dir` is a step-XXXXXX dir, or OUTPUT_DIR/checkpoints with `latest` (or `tag`) naming one.
    """
    from safetensors.torch import save_file

    step_dir = resolve_step_dir(Path(checkpoint_dir), tag)
    saved_config = check_shards(step_dir)
    if saved_config.get("train", {}).get("mode") == "full":
        return consolidate_full(step_dir, saved_config, Path(out_dir), base, dtype, max_shard_size)
    tensors = fp32_trainable_tensors(step_dir)
    empty = [n for n, t in tensors.items() if t.numel() == 0]
    if not tensors or empty:
        raise CheckpointError(f"{step_dir} holds no trainable tensors, or empty ones: {empty[:5]}")
    modules = saved_modules(step_dir, saved_config, tensors)
    lora = {adapter_key(n): t for n, t in tensors.items() if "lora_" in n}
    lora.update({n: t for n, t in tensors.items() if in_modules(n, modules)})  # under their own names, as peft's
    base = {strip_peft_prefix(n): t for n, t in tensors.items() if "lora_" not in n and not in_modules(n, modules)}
    out_dir = Path(out_dir)
    with staged_dir(out_dir, replace=lambda d: all(p.name in ADAPTER_FILES for p in d.iterdir())) as tmp:
        if lora:
            write_adapter_config(step_dir, saved_config, modules, tmp)
            save_file(lora, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if base:
            save_file(base, str(tmp / BASE_TRAINABLE), metadata={"format": "pt"})
    return out_dir


def consolidate_full(step_dir: Path, saved_config: dict, out_dir: Path, base: Optional[str], dtype: str,
                     max_shard_size: str) -> Path:
    """A full fine-tuning checkpoint -> a model dir: its trained tensors over the base's (see the module docstring)."""
    from ds_train.merge import local_model_dir, write_model_dir

    base = base or saved_config.get("model", {}).get("path")
    if not base:
        raise CheckpointError(f"{step_dir}: the shards carry no run config naming the base model; pass --base")
    if saved_config.get("model", {}).get("init") == "random" and not Path(base).is_dir():
        raise CheckpointError(f"{step_dir}: the run built its model from {base} (model.init=random), not a model dir to "
                              "take config and tokenizer files from; pass --base with a dir of that architecture "
                              "(`ds-train make-arch`; without --weights it serves when every weight was trained)")
    lazy = lazy_fp32_trainable_tensors(step_dir)
    if not lazy:
        raise CheckpointError(f"{step_dir} holds no trainable tensors")
    flat_groups = [t for lazy_t in list(lazy.values())[:1] for group in lazy_t.flat_groups for t in group]
    trained = {name: Released(t, flat_groups) for name, t in lazy.items()}
    return write_model_dir(local_model_dir(base), out_dir, trained, {}, dtype, max_shard_size,
                           {"checkpoint": str(step_dir.resolve())})


class Released:
    """A lazy zero_to_fp32 tensor whose checkpoint pages are released as soon as it is rebuilt (into fresh memory):
    without that every page read would stay in the process, the whole fp32 state by the end."""

    def __init__(self, lazy, flat_groups: list):
        self.lazy, self.flat_groups, self.shape = lazy, flat_groups, lazy.shape

    def contiguous(self) -> torch.Tensor:
        tensor = self.lazy.contiguous()
        drop_mapped_pages(self.flat_groups)
        return tensor


def fp32_trainable_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """{full parameter name: fp32 tensor} of the trainable parameters, as DeepSpeed's zero_to_fp32 rebuilds them."""
    return {name: t.contiguous().clone() for name, t in lazy_fp32_trainable_tensors(step_dir).items()}


def lazy_fp32_trainable_tensors(step_dir: Path) -> dict:
    """{full parameter name: zero_to_fp32's lazy tensor}: .shape, and .contiguous() rebuilds the fp32 tensor from
    the memory-mapped partitions of every rank."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    buffer_names = set(torch.load(shard_files(step_dir, 0)[0], map_location="cpu", weights_only=False,
                                  mmap=True).get("buffer_names", []))
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports progress with print()
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                        exclude_frozen_parameters=True, lazy_mode=True)
    return {name: t for name, t in lazy.items() if name not in buffer_names}


def saved_modules(step_dir: Path, saved_config: dict, tensors: dict) -> list[str]:
    """Full paths of the lora.modules_to_save modules: from the adapter config exported at save time, or the
    saved run's suffixes resolved against the shards' tensor names."""
    exported = step_dir / "adapter" / ADAPTER_CONFIG
    if exported.is_file():
        return json.loads(exported.read_text()).get("modules_to_save") or []
    suffixes = saved_config.get("lora", {}).get("modules_to_save") or []
    paths = {p for n in tensors if "lora_" not in n for p in prefixes(strip_peft_prefix(n))}
    return sorted(p for p in paths if any(p == s or p.endswith("." + s) for s in suffixes))


def prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def write_adapter_config(step_dir: Path, saved_config: dict, modules: list[str], out: Path) -> None:
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
               base_model_name_or_path=saved_config.get("model", {}).get("path"),
               modules_to_save=modules or None).save_pretrained(str(out))


# ---- loading an adapter onto a base model (ds-train generate) ----

def load_base_trainable(model, path: Path) -> None:
    """Load fully trained base weights (names as in HiggsAudioModel) over the base model's."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise CheckpointError(f"{path} names weights the base model lacks: {unknown[:5]} "
                              "(adapter trained on another model?)")
    for name, value in state.items():
        if params[name].shape != value.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, the base model "
                                  f"{tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(value)


def load_lora(model, adapter_dir: Path):
    """PeftModel.from_pretrained, checked: every tensor of the adapter file is loaded, as saved."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from ds_train.lean_imports import peft_bnb_only_when_loaded

    peft_bnb_only_when_loaded()
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    expected = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    loaded = get_peft_model_state_dict(peft_model)
    missing = sorted(set(expected) ^ set(loaded))
    wrong = [k for k in expected.keys() & loaded.keys()
             if not torch.equal(expected[k], loaded[k].to(expected[k].dtype))]
    if missing or wrong:
        raise CheckpointError(f"adapter {adapter_dir} does not fit the base model: keys in only one of adapter "
                              f"file / model: {missing[:5]}; tensors not loaded as saved: {wrong[:5]}")
    return peft_model
