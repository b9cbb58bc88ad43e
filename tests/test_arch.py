"""The released architecture file, weightless model dirs, the real-id tokenizer and the random-init fill."""

from __future__ import annotations


import pytest
import torch

from conftest import REPO

ARCH = REPO / "configs/arch/higgs-v2-3b.json"
SMALL = dict(layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def small_arch(tmp_path_factory):
    """configs/arch/higgs-v2-3b.json scaled down (2 DualFFN layers, width 128), real vocabulary and special ids."""
    from ds_train.arch import make_arch_dir

    return make_arch_dir(str(ARCH), str(tmp_path_factory.mktemp("arch") / "small"), SMALL)


def test_released_architecture_has_5_771b_parameters():
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.preflight import load_model_config

    config = load_model_config(str(ARCH))
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = HiggsAudioModel(config)
    assert sum(p.numel() for p in model.parameters()) == 5_771_283_456
    assert len(model.layers) == 28
    assert all(hasattr(layer, "audio_mlp") for layer in model.layers)  # DualFFN in all 28 layers
    assert sum(p.numel() for p in model.layers[0].parameters()) == 176_173_056  # one decoder layer, ~1.76e8
    assert model.audio_decoder_proj.text_lm_head.weight.shape == (128256, 3072)
    assert model.config._attn_implementation == "sdpa"


def test_arch_dir_tokenizer_has_the_higgs_specials_at_the_real_ids(small_arch):
    from ds_train.config import load_config
    from ds_train.preflight import load_model_config, load_text_tokenizer

    config = load_model_config(str(small_arch))
    assert (config.text_config.num_hidden_layers, config.text_config.hidden_size) == (2, 128)
    assert config.audio_dual_ffn_layers == [0, 1] and config.text_config.vocab_size == 128256
    cfg = load_config(overrides=[f"model.path={small_arch}", "model.audio_tokenizer_path=x", "data.train_file=x",
                                 "train.output_dir=x", "model.init=random"])
    tok = load_text_tokenizer(cfg, config)  # the project's own check of the specials against the config
    assert tok.convert_tokens_to_ids(["<|audio_eos|>", "<|audio_out_bos|>", "<|AUDIO|>", "<|AUDIO_OUT|>"]) == [
        128012, 128013, 128015, 128016]
    assert tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|audio_bos|>"]) == [
        128000, 128001, 128009, 128011]
    assert len(tok) == 128256
    assert tok.encode("hi <|AUDIO_OUT|>", add_special_tokens=False) == [104, 105, 32, 128016]


def test_random_init_fills_weights_and_keeps_norms(small_arch):
    from ds_train.arch import build_random_model
    from ds_train.preflight import load_model_config

    config = load_model_config(str(small_arch))
    no_zero3 = {"zero_optimization": {"stage": 2}}
    model = build_random_model(config, no_zero3, torch.float32, "sdpa", seed=0)
    again = build_random_model(config, no_zero3, torch.float32, "sdpa", seed=0)
    q = model.layers[0].self_attn.q_proj.weight
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    assert torch.equal(q, again.layers[0].self_attn.q_proj.weight)  # same seed, same weights on every rank
    assert not torch.equal(q.flatten()[:1000], model.layers[0].self_attn.k_proj.weight.flatten()[:1000])
    assert torch.equal(model.norm.weight, torch.ones(128))
    assert all(torch.isfinite(p).all() for p in model.parameters())
