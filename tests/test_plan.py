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


def test_a_dpo_micro_batch_counts_both_clips_of_each_pair():
    """Without data.max_tokens the plan sizes a micro-batch as micro_batch_size x the longest sample; under
    train.objective=dpo a micro-batch of N pairs holds 2N clips (the token budget, when set, already counts both)."""
    from ds_train.plan import positions_of

    sft = _cfg("train.micro_batch_size=3")
    dpo = _cfg("train.micro_batch_size=3", "train.objective=dpo", "data.train_file=null", "data.pairs_file=p.jsonl")
    assert positions_of(sft, 500, None) == 1500 and positions_of(dpo, 500, None) == 3000
    assert positions_of(sft, None, None) == 3 * 4096 and positions_of(dpo, None, None) == 6 * 4096
    budget = _cfg("train.objective=dpo", "data.train_file=null", "data.pairs_file=p.jsonl", "data.max_tokens=2048")
    assert positions_of(budget, 500, None) == 2048 and positions_of(dpo, 500, 777) == 777


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


def test_full_fine_tune_on_80gb_gpus_zero3_and_offload(monkeypatch, capsys):
    """The fewest 80 GiB GPUs the full fine-tune of the released architecture needs at 4096 positions, with at most
    90% of each in use: ZeRO-3 partitions 16 bytes per parameter (bf16 weight and gradient, fp32 master, Adam m and
    v) over the ranks next to what does not shrink (gathered set, activations, logits, runtime); with offload the
    partitions are host memory and one GPU holds the rest."""
    from ds_train.plan import plan_command

    monkeypatch.setenv("WORLD_SIZE", "8")
    p = plan_command(_cfg("train.mode=full", "train.deepspeed_config=ds_configs/zero3.json"), gpu_memory=80.0)
    out = capsys.readouterr().out
    partitioned = ("parameters", "trained parameters", "gradients", "fp32 masters", "Adam moments")
    at_8 = sum(p.components[k] for k in partitioned)
    assert at_8 == pytest.approx(5_771_283_456 * 16 / 8 / GIB)
    rest = p.total_gib - at_8
    by_hand = min(w for w in range(1, 65) if rest + at_8 * 8 / w <= 0.9 * 80.0)
    assert by_hand == 2  # 1: 96.3 GiB; 2: 53.3 GiB + 12.4 GiB
    count, gib, host = p.gpus["zero3.json"]
    assert (count, gib) == (2, pytest.approx(rest + at_8 * 4))
    offload = p.gpus["ZeRO-3 + offload (zero3_offload.json)"]
    assert offload[0] == 1 and offload[2] == pytest.approx(5_771_283_456 * (2 + 2 + 4 + 4 + 8) / GIB)
    assert f"full fine-tune needs 2 x 80 GiB GPUs with zero3.json ({gib:.1f} GiB per device); 1 x 80 GiB GPU with " \
           f"ZeRO-3 + offload (zero3_offload.json) ({offload[1]:.1f} GiB per device, {offload[2]:.1f} GiB of host " \
           "RAM in all)" in out


def _tiny_or_scaled(which, tiny_model, tmp_path):
    """(model.path, model.init) of the tiny checkpoint or a scaled-down copy of the released architecture."""
    if which == "tiny":
        return str(tiny_model), "pretrained"
    from ds_train.arch import make_arch_dir

    scale = dict(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2)
    return str(make_arch_dir(ARCH, str(tmp_path / "scaled"), scale)), "random"


def _auto_cfg(path, init, *overrides):
    from ds_train.config import load_config

    return load_config(overrides=[f"model.path={path}", f"model.init={init}", "model.audio_tokenizer_path=x",
                                  "data.train_file=x", "train.output_dir=x",
                                  f"train.deepspeed_config={REPO / 'ds_configs/zero3.json'}", *overrides])


def _this_box(monkeypatch, ram_gib):
    """2 local ranks on a CPU box with `ram_gib` of RAM available. Mocked: /proc/meminfo's MemAvailable, which on
    this shared machine changes from one reading to the next."""
    import ds_train.plan as plan

    for key in ("WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "2")
    monkeypatch.setattr(plan, "_mem_available_gib", lambda: ram_gib)


@pytest.mark.parametrize("which, ram_gib", [("tiny", 4.0), ("scaled", 6.0)])
def test_max_tokens_auto_is_the_plans_own_recommendation(which, ram_gib, tiny_model, tmp_path, monkeypatch, capsys):
    """data.max_tokens=auto picks what `ds-train plan` recommends on the same device: the largest multiple of 256
    positions whose step takes at most 90% of it (here RAM / 2 local ranks), printed, and in the config itself."""
    from ds_train.ds_config import deepspeed_config
    from ds_train.plan import plan_command, plan_memory, resolve_max_tokens
    from ds_train.preflight import load_model_config

    path, init = _tiny_or_scaled(which, tiny_model, tmp_path)
    _this_box(monkeypatch, ram_gib)
    recommended = plan_command(_auto_cfg(path, init)).recommendations
    budget = int([r for r in recommended if r.startswith("data.max_tokens <=")][0].split("<=")[1].split()[0])
    capsys.readouterr()

    cfg = _auto_cfg(path, init, "data.max_tokens=auto")
    model_config, ds_config = load_model_config(path), deepspeed_config(cfg, 2, cuda=False)
    resolve_max_tokens(cfg, model_config, ds_config)
    assert cfg.data.max_tokens == budget and budget % 256 == 0 and budget >= 1024
    assert capsys.readouterr().out.startswith(f"data.max_tokens=auto: {budget}, the largest multiple of 256 positions"
                                              f" whose step ds-train plan fits in 90% of {ram_gib / 2:.1f} GiB (cpu)")
    # The margin: this budget's step fits 90% of the device, 256 positions more would not.
    step = [plan_memory(cfg, model_config, ds_config, 2, n, ram_gib / 2, "cpu").total_gib
            for n in (budget, budget + 256)]
    assert step[0] <= 0.9 * ram_gib / 2 < step[1]
    # `ds-train plan` with auto plans that budget.
    assert plan_command(_auto_cfg(path, init, "data.max_tokens=auto")).positions == budget


def test_max_tokens_auto_that_fits_nothing_names_what_the_step_holds(tiny_model, monkeypatch):
    from ds_train.ds_config import deepspeed_config
    from ds_train.errors import ConfigError
    from ds_train.plan import resolve_max_tokens
    from ds_train.preflight import load_model_config

    _this_box(monkeypatch, 1.2)  # 0.6 GiB a rank: less than the 0.78 GiB the runtime itself takes
    cfg = _auto_cfg(str(tiny_model), "pretrained", "data.max_tokens=auto")
    with pytest.raises(ConfigError, match=r"data.max_tokens=auto: not even 256 positions fit 90% of 0.6 GiB \(cpu\): "
                                          r"the step holds 0.8 GiB before activations"):
        resolve_max_tokens(cfg, load_model_config(str(tiny_model)), deepspeed_config(cfg, 2, cuda=False))


def test_train_resolves_auto_before_the_config_is_saved_or_compared(tiny_model, tmp_path, monkeypatch):
    """train.setup turns auto into the number before anything reads the output dir's checkpoints (the resume
    comparison of checkpoint.CONTINUATION_KEYS) or writes config.yaml / the W&B config. Mocked: the process group
    (one process here) and what follows the first collective."""
    import ds_train.train as train

    class Reached(Exception):
        pass

    seen = {}

    def check_shared_dir(out):
        seen["max_tokens"], seen["config.yaml"] = cfg.data.max_tokens, (out / "config.yaml").exists()
        raise Reached

    _this_box(monkeypatch, 4.0)
    monkeypatch.setattr(train.dist, "init_distributed", lambda: None)
    monkeypatch.setattr(train.checkpoint, "check_shared_dir", check_shared_dir)
    from ds_train.config import load_config

    cfg = load_config(overrides=[f"model.path={tiny_model}", f"model.audio_tokenizer_path={tiny_model}/audio_tokenizer",
                                 "data.train_file=x", f"train.output_dir={tmp_path / 'out'}", "data.max_tokens=auto",
                                 f"train.deepspeed_config={REPO / 'ds_configs/zero3.json'}"])
    with pytest.raises(Reached):
        train.setup(cfg)
    assert isinstance(seen["max_tokens"], int) and seen["max_tokens"] >= 1024 and not seen["config.yaml"]


def _resolve_on_rank(rank, tiny_model, init_file, ram_gib, results):
    """One rank of a 2-rank gloo group whose own RAM reading is `ram_gib[rank]` (mocked MemAvailable)."""
    import os

    import torch.distributed

    import ds_train.plan as plan
    from ds_train.ds_config import deepspeed_config
    from ds_train.preflight import load_model_config

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    plan._mem_available_gib = lambda: ram_gib[rank]
    cfg = _auto_cfg(tiny_model, "pretrained", "data.max_tokens=auto")
    plan.resolve_max_tokens(cfg, load_model_config(tiny_model), deepspeed_config(cfg, 2, cuda=False))
    results[rank] = cfg.data.max_tokens
    torch.distributed.destroy_process_group()


def test_max_tokens_auto_is_rank_0s_number_on_every_rank(tiny_model, tmp_path):
    """Readings differ per rank (MemAvailable moves; GPUs of one job may differ): rank 0 decides, every rank takes
    its number, so all samplers plan the same micro-batches. A real 2-process gloo group, no DeepSpeed."""
    import torch.multiprocessing as mp

    from ds_train.ds_config import deepspeed_config
    from ds_train.plan import count_model, largest_max_tokens
    from ds_train.preflight import load_model_config

    results = mp.Manager().dict()
    mp.spawn(_resolve_on_rank, args=(str(tiny_model), str(tmp_path / "init"), (4.0, 8.0), results), nprocs=2)
    cfg = _auto_cfg(str(tiny_model), "pretrained")
    rank_0 = largest_max_tokens(cfg, count_model(cfg, load_model_config(str(tiny_model))),
                                deepspeed_config(cfg, 2, cuda=False), 2, 4.0 / 2, "cpu")
    rank_1 = largest_max_tokens(cfg, count_model(cfg, load_model_config(str(tiny_model))),
                                deepspeed_config(cfg, 2, cuda=False), 2, 8.0 / 2, "cpu")
    assert rank_0 != rank_1 and dict(results) == {0: rank_0, 1: rank_0}
