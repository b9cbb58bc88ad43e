"""bench-train on a scaled-down copy of the released architecture, model.init=random, 2 ranks, ZeRO-3: our loop and
the transformers.Trainer baseline on the same synthetic micro-batches."""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, launch, write_config

ARCH = REPO / "configs/arch/higgs-v2-3b.json"
SMALL = dict(layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2)


def _accelerate_for_cpu_deepspeed() -> bool:
    import accelerate

    return accelerate.__version__ == "1.1.1"


@pytest.mark.slow
@pytest.mark.skipif(not _accelerate_for_cpu_deepspeed(),
                    reason="the HF baseline on CPU needs the bench extra (accelerate 1.1.1; 1.15 treats a launch "
                           "without GPUs as non-distributed)")
def test_bench_train_random_init_small_arch_against_hf_trainer(tmp_path):
    from ds_train.arch import make_arch_dir
    from ds_train.bench.synthetic import SyntheticBatches
    from ds_train.preflight import load_model_config

    model_dir = make_arch_dir(str(ARCH), str(tmp_path / "small"), SMALL)
    out = tmp_path / "out"
    cfg = {"model": {"path": str(model_dir), "init": "random"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "optim": {"lr": 0.001, "scheduler": "constant"},
           "train": {"output_dir": str(out), "deepspeed_config": str(REPO / "ds_configs/zero3_partition_all.json"),
                     "micro_batch_size": 2, "max_steps": 1}}
    launch(["bench-train", str(write_config(tmp_path / "bench.yaml", cfg)), "--synthetic", "64:128",
            "--warmup", "1", "--steps", "2", "--baseline", "hf"])
    r = json.loads((out / "bench_train.json").read_text())
    ours, hf = r["ours"], r["hf"]

    # Exactly the synthetic micro-batches of both ranks, timed steps only, through both trainers.
    batches = SyntheticBatches(load_model_config(str(model_dir)), (64, 128), 2, 0.85, 42)
    expected = sum(batches.batch(step, rank).num_tokens for step in (1, 2) for rank in (0, 1))
    assert ours["tokens"] == hf["tokens"] == expected
    assert ours["samples"] == hf["samples"] == 2 * 2 * 2
    assert r["ours_over_hf_tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
    assert ours["tokens_per_s"] == pytest.approx(expected / (2 * ours["step_time_s"]))
    assert ours["mfu"] == pytest.approx(ours["model_flops"] / (2 * ours["step_time_s"]) / 2 / 989e12)
    # The real vocabulary and codebooks: a random model is uniform over both, ln(128256) + ln(1026) = 18.69.
    assert ours["params_total"] == 35_460_224 and r["world_size"] == 2
    assert math.isfinite(ours["loss_last"]) and abs(ours["loss_last"] - 18.69) < 0.6
    # ds-train plan for this run predicts each rank's peak RSS within 15%.
    from ds_train.config import load_config
    from ds_train.ds_config import deepspeed_config
    from ds_train.plan import plan_memory

    run_cfg = load_config(str(tmp_path / "bench.yaml"), ["data.train_file=x", "model.audio_tokenizer_path=x"])
    plan = plan_memory(run_cfg, load_model_config(str(model_dir)), deepspeed_config(run_cfg, 2, cuda=False), 2,
                       positions=2 * 128, capacity_gib=8.0, device="cpu")
    assert len(ours["peak_rss_gib"]) == 2
    for rss in ours["peak_rss_gib"]:
        assert abs(plan.total_gib - rss) / rss < 0.15, (plan.total_gib, rss)


def test_fp32_matmul_matches_the_fp32_product_block_by_block(monkeypatch):
    """bench-train --fp32-matmul (CPUs without AVX512-BF16): bf16 in, bf16 out, products in fp32 over row blocks of
    the weight; forward and all three gradients equal the fp32 computation up to bf16 rounding of the results."""
    import torch

    from ds_train.bench import cpu_gemm
    from ds_train.cli import BENCH_FLAGS, _split_flags

    monkeypatch.setattr(cpu_gemm, "_BLOCK_VALUES", 5 * 16)  # 37 output rows -> 8 blocks of 5 rows (the last 2)
    assert len(list(cpu_gemm._blocks(torch.zeros(37, 16)))) == 8
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).bfloat16().requires_grad_() for s in ((3, 5, 16), (37, 16), (37,)))
    y = cpu_gemm._fp32_linear(x, w, b)
    grad = torch.randn(y.shape, generator=g).bfloat16()
    y.backward(grad)
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
    yf = torch.nn.functional.linear(xf, wf, bf)
    yf.backward(grad.float())
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    for ours, ref in ((y, yf), (x.grad, xf.grad), (w.grad, wf.grad), (b.grad, bf.grad)):
        torch.testing.assert_close(ours.float(), ref, rtol=2 ** -8, atol=1e-6)  # half a bf16 ulp
    # fp32 inputs take torch's own linear untouched.
    assert torch.equal(cpu_gemm._fp32_linear(xf, wf, bf), yf)
    assert _split_flags(["c.yaml", "--fp32-matmul", "--steps", "3"], BENCH_FLAGS) == (
        ["c.yaml"], {"fp32_matmul": True, "steps": 3})


def test_synthetic_bench_needs_no_data_whichever_data_keys_the_yaml_sets(tmp_path):
    from ds_train.cli import SYNTHETIC_DATA
    from ds_train.config import load_config

    y = write_config(tmp_path / "c.yaml", {"model": {"path": "/m"}, "train": {"output_dir": str(tmp_path)},
                                           "data": {"train_files": ["/d/a.jsonl", {"path": "/d/b.jsonl", "weight": 2}]}})
    cfg = load_config(str(y), SYNTHETIC_DATA)
    assert cfg.data.train_file == "synthetic" and cfg.data.train_files is None
