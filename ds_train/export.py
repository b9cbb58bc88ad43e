"""Offline exports, no GPU and no process group.

`ds-train consolidate`: the ZeRO-3 shards of one checkpoint -> a PEFT adapter dir.

No base model is loaded: the shards hold only the trainable tensors (frozen weights are excluded
at save time), so time and memory grow with the adapter, not the model. The shard arithmetic is DeepSpeed's own
(zero_to_fp32, lazy mode, optimizer files memory-mapped so the Adam moments are never read); this module first
checks every rank's files, so a missing or damaged one is named instead of surfacing as an index error, then
writes the tensors under the names PEFT saves and loads.

OUT_DIR/
  adapter_config.json          from the checkpoint's adapter/ (or rebuilt from the config saved in the shards)
  adapter_model.safetensors    LoRA tensors, fp32
  base_trainable.safetensors   fully trained base weights (model.train_audio_mlp), when there are any

`ds-train merge`: base HiggsAudioModel + adapter dir -> a model dir that replaces the base path anywhere.

The merge runs in fp32 (LoRA deltas are small next to the weights; adding them in bf16 would round most away),
then the result is cast to the output dtype. OUT_DIR gets sharded safetensors + config.json from save_pretrained,
and every non-weight file of the base dir (text tokenizer, generation_config.json, audio_tokenizer/, ...), so
HiggsAudioModel.from_pretrained, AutoTokenizer and boson's HiggsAudioServeEngine load it as they load the base.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from ds_train.adapter import (ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, BASE_TRAINABLE, adapter_key,
                              strip_peft_prefix)
from ds_train.checkpoint import check_shards, resolve_step_dir, shard_files
from ds_train.errors import CheckpointError
from ds_train.fsutil import staged_dir

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


def fp32_trainable_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """{full parameter name: fp32 tensor} of the trainable parameters, as DeepSpeed's zero_to_fp32 rebuilds them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    buffer_names = set(torch.load(shard_files(step_dir, 0)[0], map_location="cpu", weights_only=False,
                                  mmap=True).get("buffer_names", []))
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports progress with print()
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                        exclude_frozen_parameters=True, lazy_mode=True)
    return {name: t.contiguous().clone() for name, t in lazy.items() if name not in buffer_names}


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


# ---- merge ----

MERGE_INFO = "ds_train_merge.json"  # provenance; also marks the dir as ours to replace on a re-run
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def merge(base_model_dir, adapter_dir, out_dir, dtype: str = "bf16", max_shard_size: str = "5GB") -> Path:
    """Merge the LoRA adapter (and base_trainable.safetensors, if any) of `adapter_dir` into the base model;
    write a drop-in model dir at `out_dir` (atomically). Returns `out_dir`."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    base_dir, adapter_dir, out_dir = local_model_dir(str(base_model_dir)), Path(adapter_dir), Path(out_dir)
    has_lora = (adapter_dir / ADAPTER_CONFIG).is_file()
    has_base = (adapter_dir / BASE_TRAINABLE).is_file()
    if has_lora and not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{adapter_dir} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    if not has_lora and not has_base:
        raise CheckpointError(f"{adapter_dir} holds neither a LoRA adapter ({ADAPTER_CONFIG}) nor {BASE_TRAINABLE}")

    model = HiggsAudioModel.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    if has_base:
        load_base_trainable(model, adapter_dir / BASE_TRAINABLE)
    if has_lora:
        model = merge_lora(model, adapter_dir)
    model = model.to(DTYPES[dtype])

    with staged_dir(out_dir, replace=lambda d: (d / MERGE_INFO).is_file()) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        copy_non_weight_files(base_dir, tmp)
        (tmp / MERGE_INFO).write_text(json.dumps({"base_model": str(base_dir), "adapter": str(adapter_dir.resolve()),
                                                  "dtype": dtype}, indent=1) + "\n")
    return out_dir


def local_model_dir(path: str) -> Path:
    """A local model dir; a hub id resolves to its snapshot (from the local cache when offline)."""
    if os.path.isdir(path):
        return Path(path)
    from ds_train.preflight import is_hub_id

    if not is_hub_id(path):
        raise FileNotFoundError(f"base model dir {path} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path))


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


def merge_lora(model, adapter_dir: Path):
    """PeftModel.from_pretrained + merge_and_unload, after checking every adapter tensor actually loaded."""
    return load_lora(model, adapter_dir).merge_and_unload(safe_merge=True)


def load_lora(model, adapter_dir: Path):
    """PeftModel.from_pretrained, checked: every tensor of the adapter file is loaded, as saved."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

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


def copy_non_weight_files(base_dir: Path, out: Path) -> None:
    """Everything of the base dir except its top-level weights, and files save_pretrained already wrote."""
    for entry in base_dir.iterdir():
        name = entry.name
        is_weights = entry.is_file() and (name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"))
        if name.startswith(".") or is_weights or (out / name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / name)
        else:
            shutil.copy2(entry, out / name)
