"""Architecture files: a HiggsAudioModel built from its config alone, with random weights (`model.init=random`).

For benchmarks and scale tests of the released architecture (configs/arch/higgs-v2-3b.json) without its weights:

- `build_random_model` creates the model under `deepspeed.zero.Init` (ZeRO-3: every parameter is partitioned as
  its module is built, so no rank ever holds the whole model) with torch's own init switched off, then fills each
  rank's *partition* with N(0, initializer_range). torch's init would draw every full tensor on every rank (and
  then discard all but 1/world of it); filling partitions draws 1/world of that and never a full tensor.
- `make_arch_dir` writes a weightless model dir: config.json (optionally a scaled-down copy: fewer layers, smaller
  widths, same layer types and vocabulary) and a text tokenizer with the Higgs special tokens at the config's ids
  (a byte-level tokenizer padded to the full 128256 vocabulary, Llama-3's special block at 128000-128255).
- `write_random_weights` (`make-arch --weights`) adds random bf16 weights to such a dir, sharded as save_pretrained
  shards (5 GB files + model.safetensors.index.json, like Boson's release), one shard in memory at a time: a base
  for measuring `ds-train merge` at real size. `write_random_adapter` writes a LoRA adapter dir for it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from ds_train import dist
from ds_train.ds_config import zero_stage
from ds_train.errors import ConfigError

# The Llama-3 special block (offset from vocab_size - 256); the Higgs tokens are placed at the config's ids.
LLAMA3_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
                   8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>", 11: "<|audio_bos|>"}
HIGGS_IDS = {"<|audio_eos|>": "audio_eos_token_id", "<|audio_out_bos|>": "audio_out_bos_token_id",
             "<|AUDIO|>": "audio_in_token_idx", "<|AUDIO_OUT|>": "audio_out_token_idx"}


def build_random_model(model_config, ds_config: dict, dtype: torch.dtype, attn_implementation: str, seed: int,
                       torch_init: bool = False):
    """HiggsAudioModel(model_config) with random weights; partitioned at creation under ZeRO-3. `torch_init=True`
    keeps torch's per-module init of full tensors instead (only to measure what skipping it saves)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.modeling_utils import no_init_weights

    # _from_config builds under deepspeed.zero.Init while HfDeepSpeedConfig is alive, in `dtype`.
    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    with no_init_weights(_enable=not torch_init), _no_init_broadcast(enabled=not torch_init):
        # torch.nn.init.* are no-ops: parameters start as uninitialised memory, filled below.
        model = HiggsAudioModel._from_config(model_config, torch_dtype=dtype, attn_implementation=attn_implementation)
    del hf_ds
    if not torch_init:
        fill_random(model, model_config.text_config.initializer_range, seed)
    return model


@contextlib.contextmanager
def _no_init_broadcast(enabled: bool):
    """zero.Init broadcasts every new parameter from rank 0 before partitioning it, so that all ranks agree on
    torch's random init. Uninitialised memory that fill_random overwrites needs no agreement: skip the broadcast
    (DeepSpeed 0.19's Init._zero_init_param minus its broadcast)."""
    from deepspeed.runtime.zero.partition_parameters import Init

    original = Init._zero_init_param
    if not enabled:
        yield
        return

    def partition_only(self, param):
        self._convert_to_deepspeed_param(param)
        param.partition()

    Init._zero_init_param = partition_only
    try:
        yield
    finally:
        Init._zero_init_param = original


FILL_BLOCK = 1 << 20  # values drawn per fill; tensors repeat them from a random offset


@torch.no_grad()
def fill_random(model: nn.Module, std: float, seed: int) -> None:
    """N(0, std) values into every Linear and Embedding weight (what _init_weights fills), zero biases; norms keep
    their ones. One block of 2^20 values is drawn and each tensor repeats it from its own random offset: drawing
    2.9e9 bf16 normals per rank costs ~3 minutes (61 ns each on this CPU), the copy ~2 s, and weights that are
    then frozen need no more randomness than that. A ZeRO-3 partition is filled in place on its rank; a replicated
    tensor (no ZeRO-3, or a parameter under the persistence threshold) gets the same values on every rank."""
    shared = torch.Generator().manual_seed(seed)
    block = torch.empty(2 * FILL_BLOCK).normal_(0.0, std, generator=shared)
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        for name, p in module.named_parameters(recurse=False):
            if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False):
                target, rank = p.ds_tensor, dist.rank()  # this rank's partition: its own offset
            else:
                target, rank = None, 0
            offset = int(torch.randint(FILL_BLOCK, (1,), generator=shared)) + rank
            if target is not None:
                _tile(target, block, offset, zero=name != "weight")
                continue
            import deepspeed

            # Under ZeRO-3 (persisted parameter) rank 0's values are kept; every rank computes the same ones.
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_tensor")):
                _tile(p.data.view(-1), block, offset, zero=name != "weight")


def _tile(flat: torch.Tensor, block: torch.Tensor, offset: int, zero: bool) -> None:
    if zero:
        flat.zero_()
        return
    for start in range(0, flat.numel(), FILL_BLOCK):
        n = min(FILL_BLOCK, flat.numel() - start)
        flat[start:start + n].copy_(block[offset:offset + n])


# ----------------------------------------------------------------------------------------------------------------
# Weightless model dirs.

def scaled_arch(arch: dict, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict:
    """A smaller copy of an architecture: same layer types (every layer DualFFN as in the original), vocabulary,
    codebooks and special ids; `layers` decoder layers of the given widths."""
    out = json.loads(json.dumps(arch))
    t = out["text_config"]
    t.update(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
             num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads)
    dual = [i for i in arch["audio_dual_ffn_layers"] if i < layers]
    out.update(audio_dual_ffn_layers=dual, audio_ffn_hidden_size=hidden, audio_ffn_intermediate_size=intermediate)
    return out


def make_arch_dir(arch_file: str, out_dir: str, scale: dict | None = None) -> Path:
    """OUT_DIR/config.json (the arch, scaled down when `scale` gives layers/hidden/...) and a text tokenizer with the
    Higgs specials at the config's ids. No weights: load it with model.init=random."""
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    arch = json.loads(Path(arch_file).read_text())
    if scale:
        arch = scaled_arch(arch, **scale)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(arch, indent=2) + "\n")
    build_text_tokenizer(HiggsAudioConfig.from_pretrained(str(out))).save_pretrained(out)
    return out


def write_random_weights(model_dir, seed: int = 0, max_shard_size: str = "5GB") -> Path:
    """Random bf16 weights for MODEL_DIR/config.json, written shard by shard: N(0, initializer_range) in Linear and
    Embedding weights (one block of values repeated from a random offset per tensor, as fill_random), ones in the
    norms, zeros in biases. Peak memory is one shard, never the model."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from ds_train.merge import model_skeleton

    out = Path(model_dir)
    skeleton = model_skeleton(out)
    shapes = {n: t.to(torch.bfloat16) for n, t in skeleton.state_dict().items()}
    split = split_torch_state_dict_into_shards(shapes, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    gen = torch.Generator().manual_seed(seed)
    block = torch.empty(2 * FILL_BLOCK).normal_(0.0, skeleton.config.text_config.initializer_range, generator=gen)
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            module_name, _, kind = name.rpartition(".")
            module = skeleton.get_submodule(module_name)
            t = torch.empty(shapes[name].shape, dtype=torch.bfloat16)
            if kind == "weight" and isinstance(module, (nn.Linear, nn.Embedding)):
                _tile(t.view(-1), block, int(torch.randint(FILL_BLOCK, (1,), generator=gen)), zero=False)
            else:
                t.fill_(1.0 if kind == "weight" else 0.0)  # norm scales; biases
            shard[name] = t
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def write_random_adapter(model_dir, out_dir, targets: list[str], r: int = 16, alpha: int = 32, seed: int = 0) -> Path:
    """A PEFT adapter dir (as ds_train writes it) for the model of MODEL_DIR/config.json: LoRA on `targets` (module
    suffixes, as lora.target_modules), A and B random fp32 (B non-zero, so merging it changes the weights)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from safetensors.torch import save_file

    from ds_train.adapter import ADAPTER_WEIGHTS
    from ds_train.merge import PEFT_PREFIX, model_skeleton
    from ds_train.model import lora_target_regex

    out = Path(out_dir)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=lora_target_regex(targets),
                        base_model_name_or_path=str(model_dir))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model_skeleton(Path(model_dir)).named_modules():
        if check_target_module_exists(config, name):
            out_f, in_f = module.weight.shape
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) / in_f ** 0.5
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    if not tensors:
        raise ConfigError(f"lora targets {targets} match no module of {model_dir}")
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def build_text_tokenizer(model_config):
    """Byte-level tokenizer over the model's whole vocabulary: bytes at 0-255, unreachable fillers up to the special
    block (the last 256 ids, Llama-3 layout), the Higgs audio tokens at the ids the config names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ds_train.demo.tiny import SPECIALS, _bytes_to_unicode

    vocab_size = model_config.text_config.vocab_size
    base = vocab_size - 256
    names = {base + off: tok for off, tok in LLAMA3_SPECIALS.items()}
    for tok, attr in HIGGS_IDS.items():
        idx = getattr(model_config, attr)
        if not base <= idx < vocab_size or idx in names:
            raise ConfigError(f"{attr}={idx} is not a free id of the special block [{base}, {vocab_size})")
        names[idx] = tok
    free = [i for i in range(base, vocab_size) if i not in names]
    for tok in SPECIALS:  # the rest of what Boson's chat template uses: next free ids
        if tok not in names.values():
            names[free.pop(0)] = tok
    reserved = iter(range(10**6))
    specials = [names.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(base, vocab_size)]

    symbols = _bytes_to_unicode()
    vocab = {symbols[b]: b for b in range(256)}
    vocab.update({f"<|filler_{i}|>": i for i in range(256, base)})  # never produced: there are no merges
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    pad = names[model_config.pad_token_id] if model_config.pad_token_id in names else "<|end_of_text|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token=pad, model_max_length=model_config.text_config.max_position_embeddings)
    for idx, name in names.items():
        assert tok.convert_tokens_to_ids(name) == idx, (name, tok.convert_tokens_to_ids(name), idx)
    return tok
