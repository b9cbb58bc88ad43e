"""ds-train plan: exact counts of the released architecture, the per-device arithmetic, the recommendations."""

from __future__ import annotations

import pytest

from conftest import REPO

ARCH = str(REPO / "configs/arch/higgs-v2-3b.json")
GIB = 2**30


def _cfg(*overrides):
    from ds_train.config import load_config

    return load_config(overrides=[f"model.path={ARCH}", "model.init=random", "model.dtype=bf16",
                                  "model.audio_tokenizer_path=x", "data.train_file=x", "train.output_dir=x",
                                  *overrides])


def _plan(cfg, world, positions, capacity, device="gpu"):
    from ds_train.ds_config import deepspeed_config
    from ds_train.plan import plan_memory
    from ds_train.preflight import load_model_config

    ds = deepspeed_config(cfg, world, cuda=True)
    return plan_memory(cfg, load_model_config(ARCH), ds, world, positions, capacity, device)


def test_counts_of_the_released_architecture_with_default_lora():
    from ds_train.plan import count_model
    from ds_train.preflight import load_model_config

    c = count_model(_cfg(), load_model_config(ARCH))
    # LoRA r=16 per layer: q, o 16 x (3072+3072); k, v 16 x (3072+1024); audio_mlp gate, up, down 16 x (3072+8192)
    assert c.trainable == 28 * (2 * 98304 + 2 * 65536 + 3 * 180224) == 24_313_856
    assert c.frozen == 5_771_283_456
    assert c.largest_module == 128256 * 3072  # embedding / text head: what ZeRO-3 gathers at once at least


def test_modules_to_save_count_as_trainable():
    from ds_train.plan import count_model
    from ds_train.preflight import load_model_config

    c = count_model(_cfg("lora.modules_to_save=[audio_lm_head,audio_codebook_embeddings]"), load_model_config(ARCH))
    heads = 2 * 8 * 1026 * 3072  # 8 codebooks x (1024 codes + bos + eos) rows of 3072, head and embedding
    assert (c.trainable, c.frozen) == (24_313_856 + heads, 5_771_283_456 - heads)


def test_zero3_partitions_the_base_and_recommends_zero2_on_an_80gb_gpu():
    p = _plan(_cfg("train.deepspeed_config=ds_configs/zero3.json"), world=8, positions=4096, capacity=80.0)
    assert p.components["parameters"] == pytest.approx(5_771_283_456 * 2 / 8 / GIB)
    assert p.components["optimizer"] == pytest.approx(24_313_856 * 12 / 8 / GIB)
    assert p.fits
    assert any(r.startswith("ZeRO-2 fits") for r in p.recommendations)


def test_full_text_logits_cost_what_the_vocabulary_says():
    trained = _plan(_cfg(), world=1, positions=4096, capacity=80.0)
    full = _plan(_cfg("model.full_text_logits=true"), world=1, positions=4096, capacity=80.0)
    # 4032 more positions x 128256 words x (bf16 logits + fp32 copy + log-softmax + gradient = 14 bytes)
    assert full.components["logits"] - trained.components["logits"] == pytest.approx(4032 * 128256 * 14 / GIB)


def test_too_small_a_device_gets_checkpointing_and_a_token_budget():
    p = _plan(_cfg("train.deepspeed_config=ds_configs/zero3.json"), world=8, positions=8192, capacity=24.0)
    assert not p.fits
    ckpt = [r for r in p.recommendations if r.startswith("model.activation_checkpointing=true")]
    budget = [r for r in p.recommendations if r.startswith("data.max_tokens <=")]
    assert ckpt and budget
    tokens = int(budget[0].split("<=")[1].split()[0])
    assert tokens % 256 == 0 and 0 < tokens < 8192
    assert _plan(_cfg("train.deepspeed_config=ds_configs/zero3.json"), world=8, positions=tokens,
                 capacity=24.0).total_gib <= 0.9 * 24.0


def test_a_samples_round_gathers_the_model_once_only_where_it_fits():
    """The memory decision of in-training samples (ds_train.samples asks `samples_gather_fits` at every round with
    measured usage; the plan asks it with its own numbers) and the engine pieces the round builds and frees."""
    from ds_train.plan import kv_cache_gib, samples_gather_fits
    from ds_train.preflight import load_model_config

    # 10% of the device stays free: 60 + 12 = 72 of 80 fits, 60 + 12.1 does not.
    assert samples_gather_fits(12.0, 60.0, 80.0) and not samples_gather_fits(12.1, 60.0, 80.0)
    # KV caches of 1024 + 4096 + 8192 positions: keys and values x (28 decoder + 28 DualFFN audio layers) x 8 KV
    # heads x 128 x 2 bytes (bf16) = 2.84 GiB per rank, every round.
    assert kv_cache_gib(load_model_config(ARCH), 2) == pytest.approx(2 * 56 * 8 * 128 * 13312 * 2 / GIB)

    model = (5_771_283_456 + 24_313_856) * 2 / GIB  # frozen + LoRA, bf16: 10.8 GiB
    on_80 = _plan(_cfg("train.deepspeed_config=ds_configs/zero3.json", "eval.samples=2"), world=8, positions=4096,
                  capacity=80.0)
    s = on_80.samples
    assert s["model"] == pytest.approx(model) and s["KV caches"] == pytest.approx(2 * 56 * 8 * 128 * 13312 * 2 / GIB)
    # Between steps a rank holds its partitions, LoRA, optimizer and runtime, not activations, logits or the
    # training's gathered working set; the round adds the engine pieces.
    c = on_80.components
    assert s["used"] == pytest.approx(c["parameters"] + c["LoRA"] + c["gradients"] + c["optimizer"] + c["runtime"]
                                      + s["KV caches"] + s["audio tokenizer"])
    assert s["path"] == "gathered once"
    on_16 = _plan(_cfg("train.deepspeed_config=ds_configs/zero3.json", "eval.samples=2"), world=8, positions=4096,
                  capacity=16.0)
    assert on_16.samples["path"] == "gathered per decode step"  # 10.8 GiB + ~4.4 GiB held > 14.4 GiB
    never = _plan(_cfg("train.deepspeed_config=ds_configs/zero3.json", "eval.samples=2", "eval.samples_gather=never"),
                  world=8, positions=4096, capacity=80.0)
    assert never.samples["path"] == "gathered per decode step"
    zero2 = _plan(_cfg("train.deepspeed_config=ds_configs/zero2.json", "eval.samples=2"), world=8, positions=4096,
                  capacity=80.0)
    assert zero2.samples["path"] == "replicated"
    assert _plan(_cfg("train.deepspeed_config=ds_configs/zero3.json"), 8, 4096, 80.0).samples == {}  # no samples


def test_offload_moves_the_partitions_and_optimizer_to_the_host():
    """ds_configs/zero3_offload.json: the frozen base and LoRA partitions, the gradients (with the fp32 copy the CPU
    optimizer steps on) and AdamW's state are host memory; the device keeps the gathered working set, the reduce
    bucket DeepSpeed allocates whole (reduce_bucket_size=5e7 in that file), activations and logits."""
    on = _plan(_cfg("train.deepspeed_config=ds_configs/zero3_offload.json"), world=8, positions=4096, capacity=80.0)
    off = _plan(_cfg("train.deepspeed_config=ds_configs/zero3.json"), world=8, positions=4096, capacity=80.0)
    frozen, trainable = 5_771_283_456, 24_313_856
    assert on.host_components == pytest.approx({
        "parameters": frozen * 2 / 8 / GIB, "LoRA": trainable * 2 / 8 / GIB,
        "gradients": trainable * (2 + 4) / 8 / GIB, "optimizer": trainable * 12 / 8 / GIB})
    assert sorted(on.components) == ["activations", "gathered parameters", "gradient bucket", "logits", "runtime"]
    assert on.components["gradient bucket"] == pytest.approx(50_000_000 * 2 / GIB)
    for name in ("gathered parameters", "activations", "logits", "runtime"):
        assert on.components[name] == off.components[name], name
    moved = sum(off.components[k] for k in ("parameters", "LoRA", "gradients", "optimizer"))
    assert on.total_gib == pytest.approx(off.total_gib - moved + 50_000_000 * 2 / GIB)
    assert on.fits and any(r.startswith("ZeRO-2 fits") for r in on.recommendations)
    # Too small a device: zero3.json points to the offload config with what it would take per device (with
    # zero3.json's own reduce bucket, 2e8 elements).
    small = _plan(_cfg("train.deepspeed_config=ds_configs/zero3.json"), world=8, positions=4096, capacity=24.0)
    small_on = _plan(_cfg("train.deepspeed_config=ds_configs/zero3_offload.json"), world=8, positions=4096,
                     capacity=24.0)
    expected = small_on.total_gib + (200_000_000 - 50_000_000) * 2 / GIB
    assert f"ZeRO-3 with parameters and optimizer on the host ({expected:.1f} GiB per device): " \
           "ds_configs/zero3_offload.json" in small.recommendations
    assert not any("zero3_offload" in r for r in small_on.recommendations)


def test_plan_command_and_the_check_at_start_on_every_shipped_config(monkeypatch, capsys):
    """`ds-train plan` and train's start-up check (CPU here: offloaded state is host memory, counted once)."""
    from ds_train.plan import check_at_start, plan_command
    from ds_train.ds_config import deepspeed_config
    from ds_train.preflight import load_model_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    for ds in sorted((REPO / "ds_configs").glob("*.json")):
        cfg = _cfg(f"train.deepspeed_config={ds}")
        p = plan_command(cfg, gpu_memory=80.0)
        assert "total per device" in capsys.readouterr().out
        cpu = check_at_start(cfg, load_model_config(ARCH), deepspeed_config(cfg, 2, cuda=False), longest=1024)
        if "offload" in ds.name:
            assert p.host_components and not cpu.host_components
            assert cpu.components["parameters (offloaded)"] == pytest.approx(p.host_components["parameters"])
        else:
            assert not p.host_components
