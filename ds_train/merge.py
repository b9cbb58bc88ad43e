"""`ds-train merge` and checkpoint.merge: base HiggsAudioModel dir + adapter dir -> a drop-in model dir, streamed.
The writer (write_model_dir) is the one owner of the model dir format: `consolidate` of a full fine-tuning
checkpoint (ds_train/export.py) writes through it too, its trained tensors in place of base_trainable's.

The base is never loaded as a model. Each output shard is built tensor by tensor from the base's safetensors files
(read with pread, not mmap, so pages already merged do not stay in the process), written, and dropped: peak memory
is one output shard (at most `max_shard_size`) plus the adapter plus one tensor in fp32, where loading the base in
fp32 took 4 bytes per parameter (23 GB at real size).

The result is byte for byte what PeftModel.from_pretrained(base loaded in fp32) + merge_and_unload(safe_merge=True)
+ .to(dtype) + save_pretrained wrote (peft 0.17.1, transformers 4.46.3; tests/test_merge.py keeps that reference):
- values: per weight, w = base.to(fp32); a fully trained weight (base_trainable.safetensors, or a module of the
  adapter config's modules_to_save in adapter_model.safetensors) replaces it;
  w += (B @ A [transposed with fan_in_fan_out]) * scaling, in fp32 (scaling = alpha / r, or alpha / sqrt(r) with
  use_rslora; rank_pattern / alpha_pattern per module, as peft resolves them); then w.to(dtype). LoRA deltas are
  small next to the weights: adding them in bf16 would round most away.
- layout: the model's state_dict order, huggingface_hub's shard split at `max_shard_size`, safetensors metadata
  {"format": "pt"}, model.safetensors.index.json when sharded, config.json / generation_config.json as
  save_pretrained writes them, then every non-weight file of the base dir (text tokenizer, audio_tokenizer/, ...).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch

from ds_train.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_TRAINABLE, in_modules
from ds_train.errors import CheckpointError
from ds_train.fsutil import staged_dir

MERGE_INFO = "ds_train_merge.json"  # provenance; also marks the dir as ours to replace on a re-run
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PEFT_PREFIX = "base_model.model."


def merge(base_model_dir, adapter_dir, out_dir, dtype: str = "bf16", max_shard_size: str = "5GB") -> Path:
    """Merge the LoRA adapter (and base_trainable.safetensors, if any) of `adapter_dir` into the base model;
    write a drop-in model dir at `out_dir` (atomically), one shard in memory at a time. Returns `out_dir`."""
    from safetensors.torch import load_file

    check_dtype(dtype)
    base_dir, adapter_dir, out_dir = local_model_dir(str(base_model_dir)), Path(adapter_dir), Path(out_dir)
    has_lora = (adapter_dir / ADAPTER_CONFIG).is_file()
    has_base = (adapter_dir / BASE_TRAINABLE).is_file()
    if has_lora and not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{adapter_dir} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    if not has_lora and not has_base:
        raise CheckpointError(f"{adapter_dir} holds neither a LoRA adapter ({ADAPTER_CONFIG}) nor {BASE_TRAINABLE}")

    skeleton = model_skeleton(base_dir)
    trained = load_file(str(adapter_dir / BASE_TRAINABLE)) if has_base else {}
    if has_lora:
        saved = saved_module_weights(skeleton, adapter_dir)
        twice = sorted(trained.keys() & saved.keys())
        if twice:
            raise CheckpointError(f"{adapter_dir}: {twice[:5]} are in both {BASE_TRAINABLE} and modules_to_save")
        trained.update(saved)
    lora = lora_deltas(skeleton, adapter_dir) if has_lora else {}
    return write_model_dir(base_dir, out_dir, trained, lora, dtype, max_shard_size,
                           {"adapter": str(adapter_dir.resolve())}, skeleton, trained_file=adapter_dir)


def write_model_dir(base_dir: Path, out_dir: Path, trained, lora: dict, dtype: str, max_shard_size: str,
                    provenance: dict, skeleton=None, trained_file=None) -> Path:
    """The model dir writer (`merge`, and `consolidate` of a full fine-tuning checkpoint): the base's weights with
    `trained` replacing some (name -> tensor, or a lazy one with .shape and .contiguous(), materialised one at a time)
    and `lora` deltas added, cast to `dtype`, sharded, the base's non-weight files copied; atomically. The base's
    weight files are read only for the tensors `trained` lacks (a run that trained every weight needs none)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    check_dtype(dtype)
    skeleton = skeleton if skeleton is not None else model_skeleton(base_dir)
    tied = len(list(skeleton.named_parameters(remove_duplicate=False))) - len(list(skeleton.named_parameters()))
    if tied:  # HiggsAudioModel ties none (no get_output_embeddings); save_pretrained would drop the copies
        raise CheckpointError(f"{base_dir}: the model ties {tied} weight(s) to others; ds_train writes models "
                              "without tied weights only")
    shapes = {n: t.to(DTYPES[dtype]) if t.is_floating_point() else t for n, t in skeleton.state_dict().items()}
    check_trained(trained, shapes, trained_file or "the trained weights")
    split = split_torch_state_dict_into_shards(shapes, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    from_base = {n: shapes[n] for n in shapes if n not in trained}
    with (BaseWeights(base_dir) if from_base else contextlib.nullcontext()) as base, \
            staged_dir(out_dir, replace=lambda d: (d / MERGE_INFO).is_file()) as tmp:
        if from_base:
            base.check_has(from_base)
        for filename, names in split.filename_to_tensors.items():
            shard = {name: merged_tensor(name, base, trained, lora, shapes[name].dtype) for name in names}
            save_file(shard, str(tmp / filename), metadata={"format": "pt"})
            del shard
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        write_configs(skeleton, DTYPES[dtype], tmp)
        copy_non_weight_files(base_dir, tmp)
        (tmp / MERGE_INFO).write_text(json.dumps({"base_model": str(base_dir), **provenance, "dtype": dtype},
                                                 indent=1) + "\n")
    return out_dir


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def merged_tensor(name: str, base: "BaseWeights", trained: dict, lora: dict, dtype: torch.dtype) -> torch.Tensor:
    """One weight of the merged model, in peft's order of operations (see the module docstring)."""
    # our own copy (a fresh tensor from a lazy one, or the adapter file's, used once): changed in place below
    w = trained[name].contiguous() if name in trained else base.read(name)
    if name not in lora:
        return w if w.dtype == dtype else w.to(torch.float32).to(dtype)
    w = w.to(torch.float32)
    a, b, scaling, fan_in_fan_out = lora[name]
    delta = b @ a
    w += (delta.T if fan_in_fan_out else delta) * scaling
    if not torch.isfinite(w).all():
        raise CheckpointError(f"merging the adapter into {name} gives non-finite values: the adapter is broken")
    return w.to(dtype)


def model_skeleton(base_dir: Path):
    """HiggsAudioModel of the base's config on the meta device (no memory), configured as from_pretrained(base,
    torch_dtype=float32) configures it: its state_dict gives the names, order and shapes save_pretrained writes."""
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
    from transformers import GenerationConfig

    config = HiggsAudioConfig.from_pretrained(str(base_dir))
    config.name_or_path = str(base_dir)  # from_pretrained records it; config.json carries it as _name_or_path
    with torch.device("meta"):
        model = HiggsAudioModel._from_config(config, torch_dtype=torch.float32)
    if model.can_generate() and (base_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(base_dir))
    return model


def write_configs(model, dtype: torch.dtype, out: Path) -> None:
    """config.json and generation_config.json, as PreTrainedModel.save_pretrained (transformers 4.46) writes them
    for the model cast to `dtype`."""
    model.config.torch_dtype = str(dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__]
    model.config._attn_implementation_autoset = False
    model.config.save_pretrained(str(out))
    if model.can_generate():
        model.generation_config.save_pretrained(str(out))


def lora_deltas(skeleton, adapter_dir: Path) -> dict[str, tuple]:
    """{base weight name: (A, B, scaling, fan_in_fan_out)} for every module the adapter's LoraConfig targets in the
    base, checked against the adapter file: every targeted Linear has its A and B, of its shape, and nothing else."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(adapter_dir))
    unsupported = [f"{k}={getattr(config, k)}" for k in ("use_dora", "lora_bias") if getattr(config, k, None)]
    if unsupported:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: {', '.join(unsupported)} is not supported by "
                              "`ds-train merge` (ds_train never writes it)")
    weights = {k: t for k, t in load_file(str(adapter_dir / ADAPTER_WEIGHTS)).items()
               if not in_modules(k, config.modules_to_save)}  # whole modules: saved_module_weights
    targets = {name: module for name, module in skeleton.named_modules()
               if name and check_target_module_exists(config, name)}
    not_linear = sorted(n for n, m in targets.items() if not isinstance(m, torch.nn.Linear))
    if not_linear:
        raise CheckpointError(f"{adapter_dir}: LoRA on non-Linear modules {not_linear[:5]} is not supported by "
                              "`ds-train merge`")
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in targets for ab in "AB"}
    missing = sorted(set(weights) ^ expected)
    shapes = []
    out = {}
    for name, module in targets.items():
        a, b = weights.get(f"{PEFT_PREFIX}{name}.lora_A.weight"), weights.get(f"{PEFT_PREFIX}{name}.lora_B.weight")
        if a is None or b is None:
            continue
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        out_f, in_f = module.weight.shape[::-1] if config.fan_in_fan_out else module.weight.shape
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            shapes.append(f"{name}: A {tuple(a.shape)}, B {tuple(b.shape)} for a ({out_f}, {in_f}) weight at r={r}")
            continue
        # As peft's LoraLayer.update_layer: a Python float, multiplied into the fp32 product.
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        out[f"{name}.weight"] = (a.to(torch.float32), b.to(torch.float32), scaling, config.fan_in_fan_out)
    if missing or shapes:
        raise CheckpointError(f"adapter {adapter_dir} does not fit the base model: keys in only one of adapter "
                              f"file / model: {missing[:5]}; shape mismatches: {shapes[:5]}")
    return out


def saved_module_weights(skeleton, adapter_dir: Path) -> dict:
    """{base weight name: tensor} of the adapter config's modules_to_save, stored whole in the adapter file under
    peft's keys (PEFT_PREFIX + name); each module's every state_dict entry must be there, as peft's loader needs."""
    from peft import LoraConfig
    from safetensors import safe_open

    modules = LoraConfig.from_pretrained(str(adapter_dir)).modules_to_save or []
    known = dict(skeleton.named_modules())
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "pt") as f:
        keys = {k.removeprefix(PEFT_PREFIX) for k in f.keys() if in_modules(k, modules)}
        out = {}
        for m in modules:
            if m not in known:
                raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: modules_to_save names {m}, which the base "
                                      "model lacks (adapter trained on another model?)")
            expected = {f"{m}.{k}" for k in known[m].state_dict()}
            got = {k for k in keys if k.startswith(m + ".")}
            if got != expected:
                raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS}: module {m} of modules_to_save has tensors "
                                      f"{sorted(got)[:5]}, the base model {sorted(expected)[:5]}")
            out.update({k: f.get_tensor(PEFT_PREFIX + k) for k in expected})
    return out


def check_trained(trained, shapes: dict, what) -> None:
    """Trained weights (names as in HiggsAudioModel) must be weights of the base model, of their shapes."""
    unknown = sorted(set(trained) - set(shapes))
    if unknown:
        raise CheckpointError(f"{what} names weights the base model lacks: {unknown[:5]} "
                              "(trained on another model?)")
    for name, value in trained.items():
        if tuple(shapes[name].shape) != tuple(value.shape):
            raise CheckpointError(f"{what}: {name} has shape {tuple(value.shape)}, the base model "
                                  f"{tuple(shapes[name].shape)}")


# safetensors dtype names -> torch (the ones a model checkpoint holds)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class BaseWeights:
    """The base dir's safetensors weights (one file, or shards named by model.safetensors.index.json), read one
    tensor at a time with pread: no mmap, so a tensor's pages leave the process with the tensor."""

    def __init__(self, base_dir: Path):
        index = base_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (base_dir / "model.safetensors").is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{base_dir} has neither model.safetensors nor model.safetensors.index.json: "
                                  "`ds-train merge` reads safetensors weights (convert the base with "
                                  "save_pretrained(safe_serialization=True))")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.files, self.where = {}, {}
        for f in files:
            fd = os.open(base_dir / f, os.O_RDONLY)
            self.files[f] = fd
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, n, 8))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self.where[name] = (fd, 8 + n, info)
        self.base_dir = base_dir

    def check_has(self, shapes: dict) -> None:
        missing = sorted(set(shapes) - set(self.where))
        wrong = [f"{n}: {self.where[n][2]['shape']} vs {list(shapes[n].shape)}" for n in shapes
                 if n in self.where and self.where[n][2]["shape"] != list(shapes[n].shape)]
        if missing or wrong:
            raise CheckpointError(f"base model {self.base_dir}: weights missing {missing[:5]}, shapes differing from "
                                  f"its config.json {wrong[:5]}")

    def read(self, name: str) -> torch.Tensor:
        fd, data_start, info = self.where[name]
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        view, done = memoryview(buf), 0
        while done < len(buf):  # pread may return less than asked for large reads
            got = os.preadv(fd, [view[done:]], data_start + begin + done)
            if got == 0:
                raise CheckpointError(f"{self.base_dir}: {name} is truncated on disk")
            done += got
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        t = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(info["shape"]) if buf else \
            torch.empty(info["shape"], dtype=dtype)
        return t

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fd in self.files.values():
            os.close(fd)


def local_model_dir(path: str) -> Path:
    """A local model dir; a hub id resolves to its snapshot (from the local cache when offline)."""
    if os.path.isdir(path):
        return Path(path)
    from ds_train.preflight import is_hub_id

    if not is_hub_id(path):
        raise FileNotFoundError(f"base model dir {path} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path))


def copy_non_weight_files(base_dir: Path, out: Path) -> None:
    """Everything of the base dir except its top-level weights, and files already written."""
    for entry in base_dir.iterdir():
        name = entry.name
        is_weights = entry.is_file() and (name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"))
        if name.startswith(".") or is_weights or (out / name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / name)
        else:
            shutil.copy2(entry, out / name)
