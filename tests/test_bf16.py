"""bf16 end to end on this CPU (it has AVX512-BF16): the code paths a GPU run takes by default. DeepSpeed names a bf16
run's optimizer shards `bf16_zero_pp_rank_R_...`; checkpoints, consolidation and resume must all find them. The runs
are conftest's settings runs of ds_configs/zero3_partition_all.json and zero3_offload.json (bf16 partitions on the
host, DeepSpeedCPUAdam stepping the fp32 masters), which train in bf16; test_checkpoint.py resumes them (bit for bit)
and consolidates their last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import BF16_SETTINGS, SETTINGS_STEPS
from ds_train.adapter import ADAPTER_WEIGHTS
from ds_train.checkpoint import step_of, tag_of
from ds_train.export import consolidate

pytestmark = pytest.mark.slow


@pytest.fixture(params=BF16_SETTINGS)
def bf16_run(settings_runs, request) -> Path:
    out = settings_runs[request.param]
    assert json.loads((out / "checkpoints" / tag_of(SETTINGS_STEPS) / "ds_train_meta.json").read_text())["config"][
        "model"]["dtype"] == "bf16"
    return out


def earlier_checkpoint(run: Path) -> Path:
    """The earliest checkpoint the run kept (keep_best keeps one before the last)."""
    step = min(step_of(d) for d in (run / "checkpoints").glob("step-*"))
    assert step < SETTINGS_STEPS
    return run / "checkpoints" / tag_of(step)


def test_bf16_shards_are_named_as_deepspeed_names_them(bf16_run):
    for step in (earlier_checkpoint(bf16_run), bf16_run / "checkpoints" / tag_of(SETTINGS_STEPS)):
        names = sorted(p.name for p in step.glob("*_states.pt"))
        assert names == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                         "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                         "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]


def test_bf16_checkpoint_consolidates_to_the_exported_adapter(bf16_run, tmp_path):
    step = earlier_checkpoint(bf16_run)
    out = consolidate(bf16_run / "checkpoints", tmp_path / "adapter", tag=step.name)
    got = load_file(out / ADAPTER_WEIGHTS)
    exported = load_file(step / "adapter" / ADAPTER_WEIGHTS)
    assert got.keys() == exported.keys() and len(got) == 2 * (4 * 3 + 3 * 2)  # A/B: q/k/v/o in 3 layers, audio_mlp in 2
    for key in got:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], exported[key]), key
    final = load_file(bf16_run / "adapter" / ADAPTER_WEIGHTS)
    assert any(not torch.equal(got[k], final[k]) for k in got)  # an earlier state than the final one
