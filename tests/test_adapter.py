"""ds_train/adapter.py with lora.modules_to_save: one real 2-rank ZeRO-3 run (every parameter partitioned) trains
LoRA on the attention projections and the audio head and audio codebook embeddings fully; its adapter dir, the
consolidated shards and the merged model must all hold those whole modules, and plain peft must load them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ds_train.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ds_train.export import consolidate, load_lora

from conftest import ATTENTION, base_config, launch, write_config

SAVED = ["audio_codebook_embeddings", "audio_decoder_proj.audio_lm_head"]  # full paths of the suffixes below
KEYS = [f"base_model.model.{m}.weight" for m in SAVED]  # peft 0.17's keys for modules_to_save


@pytest.fixture(scope="module")
def run(tiny_model, demo_data, tmp_path_factory) -> Path:
    """OUTPUT_DIR of a 2-step run, checkpoint step-000002 (= latest), adapter/ and merged/."""
    out = tmp_path_factory.mktemp("modules_to_save") / "run"
    cfg = base_config(tiny_model, demo_data, out, train={"max_steps": 2},
                      lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ATTENTION,
                            "modules_to_save": ["audio_lm_head", "audio_codebook_embeddings"]},
                      checkpoint={"every_steps": 2, "keep_last": 2, "merge": True})
    launch(["train", str(write_config(out.parent / "run.yaml", cfg))])
    return out


@pytest.fixture(scope="module")
def batch(run, tiny_model, demo_data):
    """A real collated batch of 4 training samples (the prepared cache the run wrote)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    from ds_train.data.cache import CachedDataset, default_cache_dir
    from ds_train.data.collate import Collate, make_collator

    config = HiggsAudioConfig.from_pretrained(str(tiny_model))
    dataset = CachedDataset(default_cache_dir(str(demo_data / "train.jsonl")), config)
    return Collate(make_collator(config))([dataset[i] for i in range(4)]).inputs


def load(path: Path):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    return HiggsAudioModel.from_pretrained(str(path), torch_dtype=torch.float32).eval()


@torch.no_grad()
def audio_logits(model, batch) -> torch.Tensor:
    out = model(**batch)
    assert out.audio_logits.numel()
    return out.audio_logits


@pytest.mark.slow
def test_trained_modules_are_whole_in_the_adapter(run, tiny_model):
    adapter = run / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]  # no base_trainable
    assert json.loads((adapter / ADAPTER_CONFIG).read_text())["modules_to_save"] == SAVED
    tensors, base = load_file(adapter / ADAPTER_WEIGHTS), load_file(tiny_model / "model.safetensors")
    assert len(tensors) == 4 * 3 * 2 + 2  # LoRA A/B of q/k/v/o in 3 layers, and the two modules
    for key in KEYS:  # gathered whole from the ZeRO-3 partitions (never peft#2450's empty [0]), and trained
        name = key.removeprefix("base_model.model.")
        assert tensors[key].dtype == torch.float32 and tensors[key].shape == base[name].shape == (8208, 64)
        assert (tensors[key] - base[name].float()).abs().max() > 1e-4, f"{name} did not train"


@pytest.mark.slow
def test_consolidate_equals_the_end_of_run_export(run, tmp_path):
    adapter = load_file(run / "adapter" / ADAPTER_WEIGHTS)
    out = consolidate(run / "checkpoints", tmp_path / "adapter")
    # Without the checkpoint's exported adapter config, the shards' run config gives the same modules_to_save.
    step = shutil.copytree(run / "checkpoints" / "step-000002", tmp_path / "step-000002")
    shutil.rmtree(step / "adapter")
    rebuilt = consolidate(step, tmp_path / "rebuilt")
    for d in (out, rebuilt):
        assert sorted(p.name for p in d.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        assert json.loads((d / ADAPTER_CONFIG).read_text())["modules_to_save"] == SAVED
        got = load_file(d / ADAPTER_WEIGHTS)
        assert got.keys() == adapter.keys() and all(torch.equal(got[k], adapter[k]) for k in adapter)


@pytest.mark.slow
def test_plain_peft_loads_it_and_the_merged_model_computes_the_same(run, tiny_model, batch):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    adapter = run / "adapter"
    peft_model = PeftModel.from_pretrained(load(tiny_model), str(adapter)).eval()
    saved, loaded = load_file(adapter / ADAPTER_WEIGHTS), get_peft_model_state_dict(peft_model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    for module in SAVED:  # peft wrapped them and loaded the trained copies; the base's stay as they were
        wrapper = peft_model.get_base_model().get_submodule(module)
        assert torch.equal(wrapper.modules_to_save["default"].weight, saved[f"base_model.model.{module}.weight"])
        assert not torch.equal(wrapper.original_module.weight, wrapper.modules_to_save["default"].weight)
    load_lora(load(tiny_model), adapter)  # `ds-train generate`'s loader: every tensor loaded as saved
    merged = load(run / "merged")
    merged_weights = load_file(run / "merged" / "model.safetensors")
    for module in SAVED:
        assert torch.equal(merged_weights[f"{module}.weight"], saved[f"base_model.model.{module}.weight"])
    reference = audio_logits(peft_model, batch)
    torch.testing.assert_close(audio_logits(merged, batch), reference, rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter():  # the comparison above sees the adapter
        assert (audio_logits(peft_model, batch) - reference).abs().max() > 1e-3


@pytest.mark.slow
def test_init_from_loads_the_saved_modules(run, tiny_model):
    """lora.init_from continues from such an adapter: LoRA tensors and the whole modules (here on one process, no
    ZeRO: load_init_adapter's gather is then a no-op)."""
    from ds_train.adapter import load_init_adapter
    from ds_train.config import load_config
    from ds_train.model import apply_lora

    cfg = load_config(None, [f"model.path={tiny_model}", f"model.audio_tokenizer_path={tiny_model}/audio_tokenizer",
                             "data.train_file=unused.jsonl", "train.output_dir=unused", "lora.r=8", "lora.alpha=16",
                             f"lora.target_modules=[{','.join(ATTENTION)}]",
                             "lora.modules_to_save=[audio_lm_head,audio_codebook_embeddings]"])
    model = apply_lora(load(tiny_model), cfg)
    load_init_adapter(model, str(run / "adapter"))
    saved, params = load_file(run / "adapter" / ADAPTER_WEIGHTS), dict(model.named_parameters())
    for key in KEYS:
        assert torch.equal(params[key], saved[key])
    assert torch.equal(params["base_model.model.layers.0.self_attn.q_proj.lora_B.default.weight"],
                       saved["base_model.model.layers.0.self_attn.q_proj.lora_B.weight"])
