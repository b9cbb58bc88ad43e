"""bf16 end to end on this CPU (it has AVX512-BF16): the code paths a GPU run takes by default. DeepSpeed names a bf16
run's optimizer shards `bf16_zero_pp_rank_R_...`; checkpoints, consolidation and resume must all find them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, base_config, launch, read_metrics, write_config
from ds_train.adapter import ADAPTER_WEIGHTS
from ds_train.export import consolidate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["zero3_partition_all.json", "zero3_offload.json"])
def bf16_run(tiny_model, demo_data, tmp_path_factory, request) -> Path:
    """A 4-step bf16 run, checkpoints at steps 2 and 4; with the base config's ZeRO-3 and with offload (bf16
    partitions on the host, DeepSpeedCPUAdam stepping the fp32 masters)."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    cfg = base_config(tiny_model, demo_data, out, train={"max_steps": 4, "epochs": 2,
                                                         "deepspeed_config": str(REPO / "ds_configs" / request.param)},
                      checkpoint={"every_steps": 2, "keep_last": 5})
    cfg["model"]["dtype"] = "bf16"
    launch(["train", str(write_config(out.parent / "run.yaml", cfg))])
    return out


def step_losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def test_bf16_shards_are_named_as_deepspeed_names_them(bf16_run):
    step = bf16_run / "checkpoints" / "step-000002"
    names = sorted(p.name for p in step.glob("*_states.pt"))
    assert names == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]


def test_bf16_checkpoint_consolidates_to_the_exported_adapter(bf16_run, tmp_path):
    out = consolidate(bf16_run / "checkpoints", tmp_path / "adapter", tag="step-000002")
    got = load_file(out / ADAPTER_WEIGHTS)
    exported = load_file(bf16_run / "checkpoints" / "step-000002" / "adapter" / ADAPTER_WEIGHTS)
    assert got.keys() == exported.keys() and len(got) == 2 * (4 * 3 + 3 * 2)  # A/B: q/k/v/o in 3 layers, audio_mlp in 2
    for key in got:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], exported[key]), key
    final = load_file(bf16_run / "adapter" / ADAPTER_WEIGHTS)
    assert any(not torch.equal(got[k], final[k]) for k in got)  # step 2 is not the final state


def test_bf16_resume_continues_exactly(bf16_run, tmp_path):
    resumed = tmp_path / "run"
    shutil.copytree(bf16_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    (resumed / "checkpoints" / "latest").write_text("step-000002")
    saved = json.loads((bf16_run / "checkpoints" / "step-000002" / "ds_train_meta.json").read_text())["config"]
    saved["train"]["output_dir"], saved["train"]["resume"] = str(resumed), "auto"
    launch(["train", str(write_config(tmp_path / "resume.yaml", saved))])
    want, got = step_losses(bf16_run), step_losses(resumed)
    assert sorted(got) == [1, 2, 3, 4] and all(v == v for v in want.values())
    assert [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)]  # bit for bit
    final_resumed, final = load_file(resumed / "adapter" / ADAPTER_WEIGHTS), load_file(bf16_run / "adapter" / ADAPTER_WEIGHTS)
    assert final_resumed.keys() == final.keys() and all(torch.equal(final_resumed[k], final[k]) for k in final)
