"""ds_train/qlora.py (train.mode=qlora) and ds_train/bench/qlora.py on the tiny model, with real bitsandbytes NF4
layers on this CPU (bitsandbytes' CPU backend) and the real DeepSpeed launcher for training."""

from __future__ import annotations

import pytest
import torch
import bitsandbytes as bnb
from safetensors.torch import load_file

from conftest import REPO, base_config, ds_train, launch, losses, write_config
from ds_train.config import load_config

# Decoder-layer Linear modules of the tiny model: q/k/v/o and the text MLP in 3 layers, audio_mlp in 2.
TINY_LINEARS = 3 * (4 + 3) + 2 * 3


def _cfg(model_dir, *extra):
    return load_config(None, [f"model.path={model_dir}", f"model.audio_tokenizer_path={model_dir}/audio_tokenizer",
                              "data.train_file=unused.jsonl", "train.output_dir=unused", "train.mode=qlora",
                              "lora.dropout=0.0", *extra])


def _batch(tiny_model, demo_data, tmp_path):
    from ds_train.data.cache import CachedDataset
    from ds_train.data.collate import Collate, make_collator
    from ds_train.data.prepare import prepare
    from ds_train.preflight import load_model_config, load_text_tokenizer

    cfg = _cfg(tiny_model, f"data.train_file={demo_data}/train.jsonl")
    mc = load_model_config(str(tiny_model))
    prepare(cfg, cfg.data.train_file, load_text_tokenizer(cfg, mc), str(tmp_path / "cache"))
    ds = CachedDataset(tmp_path / "cache", mc)
    return Collate(make_collator(mc))([ds[0], ds[1]])


def test_base_layers_are_4bit_heads_and_fully_trained_modules_are_not(tiny_model):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from ds_train.model import build_model

    model = build_model(_cfg(tiny_model, "model.train_audio_mlp=true", "lora.target_modules=[self_attn.q_proj]"),
                        {"zero_optimization": {"stage": 2}}, torch.bfloat16)
    hm = model.get_base_model()
    q = hm.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear4bit)  # peft's bnb LoRA layer, not its generic one
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and q.base_layer.weight.dtype == torch.uint8
    assert q.base_layer.weight.quant_state.quant_type == "nf4" and q.base_layer.compute_dtype == torch.bfloat16
    assert isinstance(hm.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    # audio_mlp trains fully here, so it stays a bf16 nn.Linear, as do the heads
    for kept in (hm.layers[0].audio_mlp.up_proj, hm.audio_decoder_proj.text_lm_head,
                 hm.audio_decoder_proj.audio_lm_head):
        assert type(kept) is torch.nn.Linear and kept.weight.dtype == torch.bfloat16
    assert hm.layers[0].audio_mlp.up_proj.weight.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.uint8] == []


def test_zero3_is_refused_at_start_naming_the_config(tiny_model, demo_data, tmp_path):
    cfg = base_config(tiny_model, demo_data, tmp_path / "o", train={"mode": "qlora"})  # zero3_partition_all.json
    proc = ds_train(["train", str(write_config(tmp_path / "q.yaml", cfg))])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("zero3_partition_all.json: ZeRO stage 3 cannot partition bitsandbytes 4-bit weights; train.mode=qlora "
            "supports ZeRO stages 0, 1, 2 (e.g. train.deepspeed_config=ds_configs/zero2.json)") in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_qlora_trains_on_two_ranks_resumes_and_merges_into_the_bf16_base(tiny_model, demo_data, tmp_path):
    def config(out, **train):
        cfg = base_config(tiny_model, demo_data, out, optim={"lr": 0.01, "scheduler": "constant"},
                          train={"mode": "qlora", "deepspeed_config": str(REPO / "ds_configs/zero2.json"),
                                 "micro_batch_size": 2, "max_steps": 12, "epochs": 20, **train},
                          checkpoint={"merge": True, "every_steps": 6})
        cfg["model"]["dtype"] = "bf16"
        return write_config(out.parent / f"{out.name}.yaml", cfg)

    out = tmp_path / "run"
    proc = launch(["train", str(config(out))])
    assert f"qlora: {TINY_LINEARS} decoder-layer Linear weights quantized to 4-bit NF4" in proc.stdout
    got = losses(out)
    assert len(got) == 12 and got[-1] < got[0] - 0.5, got  # measured 12.54 -> 11.44
    # The checkpoint holds the LoRA weights and optimizer only (frozen 4-bit base excluded): resuming at step 6
    # requantizes the same base and continues with the same losses.
    resumed = tmp_path / "resumed"
    launch(["train", str(config(resumed, resume=str(out / "checkpoints" / "step-000006")))])
    assert losses(resumed) == pytest.approx(got[6:], rel=1e-6)

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * (3 * 4 + 2 * 3)  # an ordinary PEFT LoRA adapter: A and B of the 18 default targets
    base, merged = load_file(tiny_model / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    name = "layers.1.audio_mlp.down_proj.weight"
    a = adapter["base_model.model.layers.1.audio_mlp.down_proj.lora_A.weight"]
    b = adapter["base_model.model.layers.1.audio_mlp.down_proj.lora_B.weight"]
    assert b.abs().sum() > 0
    # into the base's own (unquantized) weights, in peft's order of operations; the tiny base is stored in fp32
    want = (base[name].float() + (b @ a) * (16 / 8)).to(merged[name].dtype)
    assert torch.equal(merged[name], want)


@pytest.mark.slow
def test_4bit_forward_is_near_the_merged_bf16_model(tiny_model, demo_data, tmp_path):
    from ds_train.bench.qlora import logits_gap

    gap = logits_gap(_cfg(tiny_model), _batch(tiny_model, demo_data, tmp_path), tmp_path, lr=0.01)
    assert gap["train_losses"][-1] < gap["train_losses"][0] - 0.5
    for head in ("text", "audio"):
        q, ref = gap[f"qlora_vs_merged_{head}"]["mean_abs"], gap[f"bf16_lora_vs_merged_{head}"]["mean_abs"]
        # measured 2026-12-03: text 0.0072 / 0.0006, audio 0.0038 / 0.0006 (logits ~0.13 on average)
        assert q < 0.03, gap
        assert q > 3 * ref, gap  # the base really ran in 4 bits: NF4 error dominates the merge's bf16 rounding
