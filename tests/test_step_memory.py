"""ds_train/step_memory.py in train.mode=full: what model.trainable selects, counted exactly on the released
architecture, and the per-device / host memory of its bf16 parameters, fp32 masters, Adam moments and gradients
under ZeRO-2, ZeRO-3 and ZeRO-3 with offload (hand-computed here from the shapes)."""

from __future__ import annotations

import pytest

from conftest import REPO

ARCH = str(REPO / "configs/arch/higgs-v2-3b.json")
GIB = 2**30
ALL = 5_771_283_456  # every parameter of the released architecture
H, INTER, KV, VOCAB, AUDIO_VOCAB = 3072, 8192, 1024, 128256, 8 * (1024 + 2)
AUDIO_MLP = 3 * H * INTER  # gate, up, down of one layer's DualFFN audio path
LAYER = 2 * H * H + 2 * H * KV + 3 * H * INTER + AUDIO_MLP + 4 * H  # attention, mlp, audio_mlp, 4 RMSNorms


def _cfg(*overrides):
    from ds_train.config import load_config

    return load_config(overrides=[f"model.path={ARCH}", "model.init=random", "model.dtype=bf16",
                                  "model.audio_tokenizer_path=x", "data.train_file=x", "train.output_dir=x",
                                  "train.mode=full", *overrides])


def _counts(*overrides):
    from ds_train.preflight import load_model_config
    from ds_train.step_memory import count_model

    return count_model(_cfg(*overrides), load_model_config(ARCH))


def test_full_mode_counts_what_model_trainable_selects():
    # The hand count: layers, text embedding and head, audio codebook embedding and head, final norm.
    assert 28 * LAYER + 2 * VOCAB * H + 2 * AUDIO_VOCAB * H + H == ALL
    everything = _counts()  # model.trainable=["*"]
    assert (everything.trainable, everything.frozen) == (ALL, 0)
    assert everything.lora_targets_per_layer == {}  # no LoRA intermediates in the activations
    audio_mlp = _counts("model.trainable=[audio_mlp]")
    assert (audio_mlp.trainable, audio_mlp.frozen) == (28 * AUDIO_MLP, ALL - 28 * AUDIO_MLP)
    last_eight = _counts("model.trainable=['layers.2[0-7]']")  # layers 20-27, not layer 2
    assert last_eight.trainable == 8 * LAYER == 1_409_384_448
    heads = _counts("model.trainable=[audio_decoder_proj.audio_lm_head,audio_codebook_embeddings]")
    assert heads.trainable == 2 * AUDIO_VOCAB * H
    assert heads.largest_module == VOCAB * H  # ZeRO-3's gathered minimum does not depend on the mode


def _components(ds_json, world=8, *overrides):
    from ds_train.ds_config import deepspeed_config
    from ds_train.step_memory import memory_components

    cfg = _cfg("model.trainable=[audio_mlp]", f"train.deepspeed_config={REPO / 'ds_configs' / ds_json}", *overrides)
    c = _counts("model.trainable=[audio_mlp]", *overrides)
    return memory_components(cfg, c, deepspeed_config(cfg, world, cuda=True), world, 4096, "gpu")


def test_full_mode_masters_moments_and_gradients_per_zero_stage_and_offload():
    trained, frozen = 28 * AUDIO_MLP, ALL - 28 * AUDIO_MLP  # 2,113,929,216 and 3,657,354,240
    zero3, host = _components("zero3.json")
    assert not host
    assert {k: zero3[k] for k in ("parameters", "trained parameters", "gradients", "fp32 masters", "Adam moments")} \
        == pytest.approx({"parameters": frozen * 2 / 8 / GIB, "trained parameters": trained * 2 / 8 / GIB,
                          "gradients": trained * 2 / 8 / GIB, "fp32 masters": trained * 4 / 8 / GIB,
                          "Adam moments": trained * 8 / 8 / GIB})
    assert "LoRA" not in zero3 and "optimizer" not in zero3
    # ZeRO-2: every rank holds all bf16 parameters; gradients, masters and moments are partitioned.
    zero2, _ = _components("zero2.json")
    assert (zero2["parameters"], zero2["trained parameters"]) == pytest.approx((frozen * 2 / GIB, trained * 2 / GIB))
    assert (zero2["gradients"], zero2["fp32 masters"], zero2["Adam moments"]) == \
        pytest.approx((trained * 2 / 8 / GIB, trained * 4 / 8 / GIB, trained * 8 / 8 / GIB))
    # Offload: partitions, masters, moments and the gradients with the fp32 copy the CPU optimizer steps on are host
    # memory; the device keeps the reduce bucket (5e7 elements in zero3_offload.json).
    device, host = _components("zero3_offload.json")
    assert host == pytest.approx({"parameters": frozen * 2 / 8 / GIB, "trained parameters": trained * 2 / 8 / GIB,
                                  "gradients": trained * (2 + 4) / 8 / GIB, "fp32 masters": trained * 4 / 8 / GIB,
                                  "Adam moments": trained * 8 / 8 / GIB})
    assert device["gradient bucket"] == pytest.approx(50_000_000 * 2 / GIB)
    # fp32: the optimizer steps on the weights themselves, so there are no masters.
    fp32, _ = _components("zero3.json", 8, "model.dtype=fp32")
    assert "fp32 masters" not in fp32
    assert (fp32["trained parameters"], fp32["Adam moments"]) == \
        pytest.approx((trained * 4 / 8 / GIB, trained * 8 / 8 / GIB))
