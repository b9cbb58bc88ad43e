"""The training loop end to end: the real `deepspeed` launcher, 2 CPU processes, ZeRO-3 with every parameter
partitioned (stage3_param_persistence_threshold 0), real peft, real boson classes, the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import base_config, ds_train, launch, losses, read_metrics, write_config

pytestmark = pytest.mark.slow

RECORD_KEYS = {"step", "epoch", "loss", "text_loss", "audio_loss", "codebook_losses", "lr", "grad_norm",
               "tokens_per_s", "samples_per_s", "step_time_s", "peak_mem_gb"}


def test_zero3_two_ranks_loss_falls_and_outputs(tiny_model, demo_data, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, demo_data, out,
                      lora={"r": 16, "alpha": 16, "dropout": 0.0,
                            "target_modules": ["self_attn.q_proj", "self_attn.v_proj", "audio_mlp.up_proj",
                                               "audio_mlp.down_proj", "audio_lm_head", "text_lm_head"]},
                      data={"train_file": str(demo_data / "train.jsonl"), "eval_file": str(demo_data / "eval.jsonl")},
                      optim={"lr": 0.01, "scheduler": "constant"},
                      train={"epochs": 8, "micro_batch_size": 2, "eval_every": 8, "eval_on_start": True},
                      checkpoint={"every_steps": 16})
    shm_before = set(Path("/dev/shm").glob("deepspeed_*"))
    proc = launch(["train", str(write_config(tmp_path / "c.yaml", cfg))])
    assert "parameters:" in proc.stdout and "trainable" in proc.stdout
    # DeepSpeed's CPU shm all-reduce would leave 69 MB per rank in /dev/shm (RAM) after every run; it is off.
    assert set(Path("/dev/shm").glob("deepspeed_*")) == shm_before

    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 16 and [r["step"] for r in steps] == list(range(1, 17))
    for r in steps:
        assert RECORD_KEYS <= r.keys()
        assert len(r["codebook_losses"]) == 8 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert last < first - 2.0, (first, last)  # overfits 8 samples: the loss clearly falls
    assert steps[-1]["audio_loss"] < steps[0]["audio_loss"] - 0.3
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 8, 16] and all(r["eval_loss"] == r["eval_loss"] for r in evals)

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 8 and saved["model"]["path"] == str(tiny_model)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * (3 * 2 + 2 * 2 + 2)  # A and B of every targeted module
    assert all(t.numel() > 0 and t.abs().sum() > 0 for t in adapter.values())
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 16
    assert (out / "checkpoints" / "latest").read_text() == "step-000016"


def test_data_parallel_equivalence(tiny_model, demo_data, tmp_path):
    """2 ranks x 1 sample and 1 process x 2 accumulated samples see the same global batch: same losses."""
    runs = {}
    for name, nprocs, accum in (("two_ranks", 2, 1), ("one_process", 1, 2)):
        out = tmp_path / name
        cfg = base_config(tiny_model, demo_data, out, train={"max_steps": 5, "grad_accum": accum, "epochs": 3},
                          optim={"lr": 0.01, "scheduler": "linear", "warmup_steps": 2})
        launch(["train", str(write_config(tmp_path / f"{name}.yaml", cfg))], nprocs=nprocs)
        runs[name] = losses(out)
    assert len(runs["two_ranks"]) == 5
    assert runs["two_ranks"] == pytest.approx(runs["one_process"], abs=1e-5)
    assert runs["two_ranks"][-1] != runs["two_ranks"][0]  # training moved the weights


def test_activation_checkpointing_same_losses_under_zero3(tiny_model, demo_data, tmp_path):
    runs = {}
    for flag in (False, True):
        out = tmp_path / f"ckpt_{flag}"
        cfg = base_config(tiny_model, demo_data, out, train={"max_steps": 3},
                          model={"path": str(tiny_model), "audio_tokenizer_path": str(tiny_model / "audio_tokenizer"),
                                 "activation_checkpointing": flag})
        launch(["train", str(write_config(tmp_path / f"{flag}.yaml", cfg))])
        runs[flag] = [v for r in read_metrics(out) if "loss" in r for v in (r["loss"], r["grad_norm"])]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_config_errors_stop_before_any_process_group(tiny_model, demo_data, tmp_path):
    cfg = base_config(tiny_model, demo_data, tmp_path / "o", optim={"lrr": 1})
    proc = ds_train(["train", str(write_config(tmp_path / "bad.yaml", cfg))])
    assert proc.returncode == 2 and "config error: Key 'lrr' not in 'OptimConfig'" in proc.stderr
    assert "Traceback" not in proc.stderr
